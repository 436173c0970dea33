"""Drop-in parity with tesseract-jax 0.5: what its callers see, seen here too.

`tlx.apply_tesseract` raises what `tesseract_jax.apply_tesseract` raises, with the
words its callers match on, and `tesseract_core.Tesseract` is a pytree as
tesseract-jax makes it. Through `tesseract_core.Tesseract` objects of a stock server,
of `tesseract-lx serve`, and in process (`from_tesseract_api`); each test counts the
requests it allows.
"""

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx
from pydantic import ValidationError
from tesseract_core import Tesseract

# As code written for tesseract-jax imports it (`from tesseract_jax import ...`): the
# import that registers `Tesseract` as a pytree.
from tesseract_lx import apply_tesseract  # noqa: F401

from helpers import PARTIAL


PARITY = PARTIAL / "parity" / "tesseract_api.py"
V = np.array([0.0, 1.0, 2.0])
ENV = "TESSERACT_JAX_CHECK_STATIC_OUTPUTS"


def _tesseract(served, transport: str) -> Tesseract:
    if transport == "inprocess":
        return Tesseract.from_tesseract_api(PARITY)
    return Tesseract.from_url(served.get(PARITY, transport).urls[0])


@pytest.fixture(params=["stock", "tlx", "inprocess"])
def tess(served, request) -> Tesseract:
    t = _tesseract(served, request.param)
    _fresh(t)
    return t


def _fresh(t: Tesseract) -> tlx.Client:
    client = tlx.Client.wrap(t)
    client.stats.clear()
    client.structures.clear()
    return client


def _stats(t: Tesseract) -> dict:
    return dict(tlx.Client.wrap(t).stats)


def _y(x, v=V):
    return np.sqrt(x) * (1.0 + v)


def _f(t, **kwargs):
    return lambda x: tlx.apply_tesseract(t, {"x": x, "v": V}, **kwargs)["y"]


#
# 1. `tesseract_core.Tesseract` is a pytree with no leaves
#


def test_a_tesseract_is_a_pytree_with_no_leaves(tess):
    leaves, treedef = jax.tree_util.tree_flatten(tess)
    assert leaves == []
    assert jax.tree_util.tree_unflatten(treedef, []) is tess

    @jax.jit
    def f(x, t):
        return tlx.apply_tesseract(t, {"x": x, "v": V})["y"]

    x = jnp.asarray(4.0)
    np.testing.assert_allclose(f(x, tess), _y(4.0), rtol=1e-12)
    np.testing.assert_allclose(f(x, tess), _y(4.0), rtol=1e-12)  # compiled once
    assert _stats(tess) == {"apply": 2, "abstract_eval": 1}


_FAKE_TESSERACT_JAX = """
import jax
from tesseract_core import Tesseract

jax.tree_util.register_pytree_node(
    Tesseract, lambda x: ((), "registered by tesseract_jax"), lambda a, _: a
)
"""

_CHECK = """
import jax
from tesseract_core import Tesseract
{imports}
t = Tesseract.from_tesseract_api({api!r})
print(jax.tree_util.tree_structure(t).node_data()[1])
"""


def _registration(tmp_path, imports: str, fake: bool) -> str:
    """What registered `Tesseract`, in a fresh process importing `imports`."""
    if fake:
        # tesseract-jax as installed: its package and its distribution's metadata.
        (tmp_path / "tesseract_jax").mkdir(exist_ok=True)
        (tmp_path / "tesseract_jax" / "__init__.py").write_text(_FAKE_TESSERACT_JAX)
        info = tmp_path / "tesseract_jax-0.5.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: tesseract-jax\nVersion: 0.5.1\n"
        )
    code = _CHECK.format(imports=textwrap.dedent(imports), api=str(PARITY))
    env_path = [str(tmp_path)] if fake else []
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n{code}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_registration_is_tesseract_jaxs_where_it_is_installed(tmp_path):
    """tesseract-jax registers `Tesseract` when imported, and JAX refuses a second
    registration: with tesseract-jax installed, either import order works, and the
    registration is tesseract-jax's own."""
    # Without tesseract-jax, tesseract_lx registers it: leaves none, data the object.
    ours = _registration(
        tmp_path, "from tesseract_lx import apply_tesseract", fake=False
    )
    assert ours.startswith("<tesseract_core.sdk.tesseract.Tesseract object")
    for imports in (
        "from tesseract_lx import apply_tesseract\nimport tesseract_jax",
        "import tesseract_jax\nfrom tesseract_lx import apply_tesseract",
    ):
        assert _registration(tmp_path, imports, fake=True) == (
            "registered by tesseract_jax"
        )


#
# 2. Inputs the schema refuses: pydantic's `ValidationError`, at trace time, before
#    any request, with tesseract-core's words
#


def test_a_wrong_shape_is_a_validation_error_before_any_request(tess):
    f = lambda v: tlx.apply_tesseract(tess, {"x": 1.0, "v": v})["y"]
    for g in (f, jax.jit(f)):
        with pytest.raises(ValidationError, match=r"Expected shape: \(3,\)") as info:
            g(jnp.zeros(4))
        assert "`v` must be an array of shape (3,)" in str(info.value)
        assert isinstance(info.value, ValueError)
        assert info.value.errors()[0]["loc"] == ("inputs", "v")
    assert _stats(tess) == {}


@pytest.mark.parametrize(
    "inputs, words",
    [
        ({"x": 1.0}, "Missing input `v`"),
        ({"x": 1.0, "v": V, "w": V}, "Unknown input `w`"),
    ],
)
def test_missing_and_unknown_inputs_are_validation_errors(tess, inputs, words):
    with pytest.raises(ValidationError, match=words):
        jax.jit(lambda: tlx.apply_tesseract(tess, inputs))()
    assert _stats(tess) == {}


#
# 3. Value-based validation: pydantic's `ValidationError` eagerly (the Tesseract's
#    422), a `JaxRuntimeError` with its words under `jax.jit`
#


def test_value_based_validation_reaches_the_caller(tess):
    words = r"x must be strictly positive, got -1\.0"
    with pytest.raises(ValidationError, match=words) as info:
        _f(tess)(jnp.asarray(-1.0))
    assert isinstance(info.value, tlx.TesseractValidationError)
    assert info.value.endpoint == "apply" and info.value.status == 422
    with pytest.raises(jax.errors.JaxRuntimeError, match=words):
        jax.block_until_ready(jax.jit(_f(tess))(jnp.asarray(-1.0)))
    # Still usable after a failure.
    np.testing.assert_allclose(jax.jit(_f(tess))(jnp.asarray(4.0)), _y(4.0))


#
# 4. A Python list where an array is expected
#


@pytest.mark.parametrize("container", [list, tuple])
def test_a_list_for_an_array_is_a_type_error(tess, container):
    name = container.__name__
    with pytest.raises(TypeError, match=f"expects an array, but got {name}"):
        tlx.apply_tesseract(tess, {"x": 1.0, "v": container([0.0, 1.0, 2.0])})
    assert _stats(tess) == {}


#
# 5. A second derivative: refused, naming the primal inputs
#


@pytest.mark.parametrize("use_jit", [False, True])
def test_a_second_derivative_is_refused(tess, use_jit):
    f = _f(tess)
    f = jax.jit(f) if use_jit else f
    loss = lambda x: jnp.sum(f(x))
    with pytest.raises(RuntimeError, match="primal inputs"):
        jax.jacfwd(jax.grad(loss))(jnp.asarray(4.0))
    with pytest.raises(RuntimeError, match="primal inputs"):
        jax.hessian(loss)(jnp.asarray(4.0))


#
# 6. `jax.linear_transpose` of a raw JVP: traced, and refused when called
#


@pytest.mark.parametrize("use_jit", [False, True])
def test_linear_transpose_of_a_raw_jvp(tess, use_jit):
    f = _f(tess)
    f = jax.jit(f) if use_jit else f
    x = jnp.asarray(4.0)
    ct = jnp.asarray([1.0, 2.0, 3.0])

    def jvp(primals, tangents):
        return jax.jvp(f, (primals,), (tangents,))[1]

    transposed = jax.linear_transpose(jvp, x, x)  # tracing succeeds
    with pytest.raises(ValueError, match="UndefinedPrimal") as info:
        transposed(ct)
    assert "close over the point" in str(info.value)
    # The way the message shows works, and is the VJP.
    (closed,) = jax.linear_transpose(lambda t: jax.jvp(f, (x,), (t,))[1], x)(ct)
    np.testing.assert_allclose(closed, np.sum(0.25 * (1.0 + V) * ct), rtol=1e-12)


#
# 7. `check_static_outputs`: a traced call's static outputs against `/apply`'s
#


def _traced(t, x, **kwargs):
    """The static output a jitted call holds, and its array."""
    seen = {}

    @jax.jit
    def f(x):
        out = tlx.apply_tesseract(t, {"x": x, "v": V}, **kwargs)
        seen["backend"] = out["backend"]
        return out["y"]

    y = f(x)
    return seen["backend"], y


def test_static_outputs_checked_against_the_trace(tess, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    x = jnp.asarray(400.0)
    # Eagerly: `/apply`'s own value, nothing to compare.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tlx.apply_tesseract(tess, {"x": x, "v": V})["backend"] == "fallback"
        assert _traced(tess, x)[0] == "fallback"  # traced as learnt: the same
    _fresh(tess)
    # Traced from `/abstract_eval` ("reference"); `/apply` answers "fallback".
    with pytest.warns(UserWarning, match="`backend`") as record:
        backend, y = _traced(tess, x)
    assert backend == "reference"
    np.testing.assert_allclose(y, _y(400.0))
    message = str(record[0].message)
    assert "'fallback'" in message and "'reference'" in message
    # Off for one call, by the keyword or tesseract-jax's variable.
    _fresh(tess)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _traced(tess, x, check_static_outputs=False)[0] == "reference"
        monkeypatch.setenv(ENV, " Off ")
        assert _traced(tess, x)[0] == "reference"
    with pytest.warns(UserWarning, match="`backend`"):
        _traced(tess, x, check_static_outputs=True)  # the keyword beats the variable
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=ENV):
        _traced(tess, x)


def test_the_module_checks_static_outputs_by_default(served):
    client = tlx.Client.wrap(_tesseract(served, "tlx"))
    for check in (True, False):
        client.structures.clear()
        f = tlx.TesseractModule(client, check_static_outputs=check)
        assert f.with_batching("sequential").check_static_outputs is check
        g = jax.jit(lambda x: f({"x": x, "v": V})["y"])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            g(jnp.asarray(400.0))
        assert len([w for w in record if "`backend`" in str(w.message)]) == check
    with pytest.raises(TypeError):  # the annotation's check while testing, else ours
        tlx.TesseractModule(client, check_static_outputs=None)  # type: ignore[arg-type]


#
# 8. Under `jax.jit`, a failure inside the Tesseract is a `JaxRuntimeError` with
#    its words (a stock server hides them unless `TESSERACT_DEBUG=1`)
#


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_a_failure_inside_the_tesseract_keeps_its_words(served, transport):
    t = _tesseract(served, transport)
    f = lambda x: tlx.apply_tesseract(t, {"x": x, "v": V, "mode": "raise"})["y"]
    words = "a failure inside apply, on purpose"
    with pytest.raises(RuntimeError, match=words):
        f(jnp.asarray(4.0))
    with pytest.raises(jax.errors.JaxRuntimeError, match=words):
        jax.block_until_ready(jax.jit(f)(jnp.asarray(4.0)))
