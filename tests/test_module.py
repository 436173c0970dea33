"""`TesseractModule` under every JAX transformation, against the pure-JAX references.

Each test runs on every example Tesseract over a stock tesseract-runtime server, a
tesseract-lx server and in process, and asserts the exact requests sent.
"""

import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx

from conftest import fresh
from helpers import (
    CASES,
    has_batched,
    JVP,
    PARTIAL,
    PARTIAL_CASES,
    ROOT,
    schema_fixes_outputs,
    size,
    TRANSPORTS,
    tree_allclose,
    VJP,
)
from references import pytree_inputs, pytree_ref


# The array input each example is vmapped over (batched primal points).
BATCH_KEY = {"bratu": "u", "poisson": "x", "pytree": "x"}

parametrize_tesseract = pytest.mark.parametrize("tesseract", list(CASES))
parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)


def _abstract_evals(client: tlx.Client) -> int:
    """`/abstract_eval`s a cold trace costs: none when the schema fixes every shape."""
    return 0 if schema_fixes_outputs(client) else 1


def _tangents(tree, seed: int = 1):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x))), tree)


def _spy(monkeypatch, client: tlx.Client) -> list[tuple[str, dict]]:
    """Record every `(endpoint, payload)` the client sends."""
    sent = []
    request = client.request

    def spy(endpoint, payload, **kwargs):
        sent.append((endpoint, payload))
        return request(endpoint, payload, **kwargs)

    monkeypatch.setattr(client, "request", spy)
    return sent


@parametrize_tesseract
@parametrize_transport
def test_apply(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    out = f(inputs)
    assert tree_allclose(out, case.ref(inputs))
    assert client.stats == {"apply": 1}


@parametrize_tesseract
@parametrize_transport
def test_jit(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    # `filter_jit`: the pytree example's `power` is a Python int, not an array.
    fn = eqx.filter_jit(lambda inp: f(inp))
    assert tree_allclose(fn(inputs), case.ref(inputs))
    assert client.stats == {"apply": 1, "abstract_eval": _abstract_evals(client)}
    # Compiled once: the second call is one `/apply` and nothing else.
    client.stats.clear()
    fn(inputs)
    assert client.stats == {"apply": 1}


@parametrize_tesseract
@parametrize_transport
def test_jit_after_eager_call_learns_shapes(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    f(inputs)
    client.stats.clear()
    assert tree_allclose(eqx.filter_jit(lambda inp: f(inp))(inputs), case.ref(inputs))
    assert client.stats == {"apply": 1}


@parametrize_tesseract
@parametrize_transport
def test_jvp(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    tangents = _tangents(diff)
    out, out_t = jax.jvp(case.fn(f, inputs), (diff,), (tangents,))
    ref, ref_t = jax.jvp(case.fn(case.ref, inputs), (diff,), (tangents,))
    assert tree_allclose(out, ref)
    assert tree_allclose(out_t, ref_t)
    assert client.stats == {"apply": 1, JVP: 1}


@parametrize_tesseract
@parametrize_transport
def test_vjp(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    out, vjp = jax.vjp(case.fn(f, inputs), diff)
    ref, ref_vjp = jax.vjp(case.fn(case.ref, inputs), diff)
    assert tree_allclose(out, ref)
    assert client.stats == {"apply": 1}
    cts = _tangents(ref, seed=2)
    assert tree_allclose(vjp(cts), ref_vjp(cts))
    assert client.stats == {"apply": 1, VJP: 1}


@parametrize_tesseract
@parametrize_transport
def test_grad(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    grad = jax.grad(case.loss(f, inputs))(diff)
    assert tree_allclose(grad, jax.grad(case.loss(case.ref, inputs))(diff))
    assert client.stats == {"apply": 1, VJP: 1}


@parametrize_tesseract
@parametrize_transport
def test_jit_grad(client, case):
    """The foundation issue's done-criterion: to 1e-10 of the pure-JAX gradient."""
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    grad = jax.jit(jax.grad(case.loss(f, inputs)))(diff)
    ref = jax.grad(case.loss(case.ref, inputs))(diff)
    assert tree_allclose(grad, ref, rtol=1e-10, atol=1e-10)
    assert client.stats == {
        "abstract_eval": _abstract_evals(client),
        "apply": 1,
        VJP: 1,
    }


@parametrize_tesseract
@parametrize_transport
def test_jacfwd(client, case):
    f = tlx.TesseractModule(client, batching="sequential")
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    jac = jax.jacfwd(case.fn(f, inputs))(diff)
    assert tree_allclose(jac, jax.jacfwd(case.fn(case.ref, inputs))(diff))
    # One JVP per input basis vector.
    assert client.stats == {"apply": 1, JVP: size(diff)}


@parametrize_tesseract
@parametrize_transport
def test_jacrev(client, case):
    f = tlx.TesseractModule(client, batching="sequential")
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    jac = jax.jacrev(case.fn(f, inputs))(diff)
    ref_fn = case.fn(case.ref, inputs)
    assert tree_allclose(jac, jax.jacrev(ref_fn)(diff))
    # One VJP per output basis vector.
    assert client.stats == {"apply": 1, VJP: size(ref_fn(diff))}


@parametrize_tesseract
@parametrize_transport
def test_vmap_over_inputs(client, case, transport):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    key = BATCH_KEY[case.name]
    batch = jnp.stack([inputs[key] + 0.1 * j for j in range(3)])

    def call(fn):
        return jax.vmap(lambda x: fn({**inputs, key: x}))(batch)

    assert tree_allclose(call(f), call(case.ref))
    # One `/abstract_eval` for the output shapes of the batch; the points go in one
    # `/batched_apply` where the server says it takes a batch, else one by one.
    points = {"batched_apply": 1} if has_batched(transport) else {"apply": 3}
    assert client.stats == {"abstract_eval": 1, **points}


@parametrize_tesseract
@parametrize_transport
def test_vmap_of_grad_over_inputs(client, case, transport):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    key = BATCH_KEY[case.name]
    batch = jnp.stack([inputs[key] + 0.1 * j for j in range(3)])

    def per_point(fn):
        loss = case.loss(fn, inputs)
        return jax.vmap(lambda x: jax.grad(loss)({**case.split(inputs)[0], key: x}))(
            batch
        )

    assert tree_allclose(per_point(f), per_point(case.ref))
    # A VJP at each of 3 points: no batched endpoint takes several primal points.
    points = {"batched_apply": 1} if has_batched(transport) else {"apply": 3}
    assert client.stats == {"abstract_eval": 1, **points, VJP: 3}


@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_pytree_outputs(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    out = f(inputs)
    assert set(out) == {"y", "stats", "count"}
    assert set(out["stats"]) == {"norm", "mean"}
    assert out["stats"]["norm"].shape == ()
    assert out["count"].dtype == jnp.int64 and int(out["count"]) == 5
    assert tree_allclose(out, case.ref(inputs))
    # A gradient through a nested input to a nested output.
    inner = lambda a, fn: fn({**inputs, "params": {**inputs["params"], "a": a}})[
        "stats"
    ]["norm"]
    a = inputs["params"]["a"]
    grad = jax.grad(inner)(a, f)
    assert tree_allclose(grad, jax.grad(inner)(a, case.ref))
    assert client.stats == {"apply": 2, VJP: 1}


@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_partial_differentiable_paths(client, case, monkeypatch):
    """Only `x` is differentiated: only `x` (and only live outputs) travel."""
    sent = _spy(monkeypatch, client)
    f = tlx.TesseractModule(client)
    inputs = case.inputs()

    def norm(x, fn):
        return fn({**inputs, "x": x})["stats"]["norm"]

    x = inputs["x"]
    assert tree_allclose(jax.grad(norm)(x, f), jax.grad(norm)(x, case.ref))
    assert client.stats == {"apply": 1, VJP: 1}
    (_, payload) = sent[-1]
    assert payload["vjp_inputs"] == ["x"]
    assert payload["vjp_outputs"] == ["stats.norm"]
    assert set(payload["cotangent_vector"]) == {"stats.norm"}

    client.stats.clear()
    dx = _tangents(x)
    out_t = jax.jvp(lambda x: f({**inputs, "x": x}), (x,), (dx,))[1]
    ref_t = jax.jvp(lambda x: case.ref({**inputs, "x": x}), (x,), (dx,))[1]
    assert tree_allclose(case.diff_out(out_t), case.diff_out(ref_t))
    # The integer output's tangent is a symbolic zero (float0).
    assert out_t["count"].dtype == jax.dtypes.float0
    assert client.stats == {"apply": 1, JVP: 1}
    (_, payload) = sent[-1]
    assert payload["jvp_inputs"] == ["x"]
    assert set(payload["tangent_vector"]) == {"x"}
    assert set(payload["jvp_outputs"]) == {"y", "stats.norm", "stats.mean"}


@parametrize_tesseract
@parametrize_transport
def test_symbolic_zero_tangents_cost_nothing(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    # The output does not depend on `s`: no tangent reaches the Tesseract.
    out, out_t = jax.jvp(lambda s: f(inputs), (1.0,), (1.0,))
    assert tree_allclose(out, case.ref(inputs))
    assert client.stats == {"apply": 1}
    client.stats.clear()
    first = lambda out: jax.tree.leaves(case.diff_out(out))[0]
    grad = jax.grad(lambda s: s * jax.lax.stop_gradient(jnp.sum(first(f(inputs)))))
    assert np.allclose(grad(1.0), jnp.sum(first(case.ref(inputs))))
    assert client.stats == {"apply": 1}


@parametrize_tesseract
@parametrize_transport
def test_linear_transpose_of_jvp_is_vjp(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)

    def lin(fn):
        return lambda t: jax.jvp(case.fn(fn, inputs), (diff,), (t,))[1]

    cts = _tangents(case.fn(case.ref, inputs)(diff), seed=3)
    (ct_in,) = jax.linear_transpose(lin(f), diff)(cts)
    (ref,) = jax.linear_transpose(lin(case.ref), diff)(cts)
    assert tree_allclose(ct_in, ref)
    assert client.stats == {"apply": 1, VJP: 1}


@parametrize_tesseract
@parametrize_transport
def test_linear_transpose_of_vjp_is_jvp(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    out, vjp = jax.vjp(case.fn(f, inputs), diff)
    tangents = _tangents(diff, seed=4)
    ct_example = jax.tree.map(jnp.zeros_like, out)
    (out_t,) = jax.linear_transpose(vjp, ct_example)((tangents,))
    ref_t = jax.jvp(case.fn(case.ref, inputs), (diff,), (tangents,))[1]
    assert tree_allclose(out_t, ref_t)
    assert client.stats == {"apply": 1, JVP: 1}


@pytest.mark.parametrize("tesseract", ["bratu"])
@parametrize_transport
def test_hessian_is_refused(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    with pytest.raises(NotImplementedError, match="first derivatives"):
        jax.hessian(case.loss(f, inputs))(diff)


#
# Tesseracts that serve only some gradient endpoints
#


@pytest.mark.parametrize("tesseract", list(PARTIAL_CASES))
@parametrize_transport
def test_partial_tesseract_derivatives(client, case, tesseract):
    f = tlx.TesseractModule(client, batching="sequential")
    inputs = case.inputs()
    u = inputs["u"]

    def g(fn):
        return lambda u: fn({**inputs, "u": u})["residual"]

    du = _tangents(u)
    n_out = u.size
    if tesseract == "bratu_vjp_only":
        # A JVP is the Jacobian assembled from the VJPs of the output basis.
        via = {"jvp": {VJP: n_out}, "vjp": {VJP: 1}}
    else:
        via = {"jvp": {"jacobian": 1}, "vjp": {"jacobian": 1}}

    out_t = jax.jvp(g(f), (u,), (du,))[1]
    assert tree_allclose(out_t, jax.jvp(g(case.ref), (u,), (du,))[1])
    assert client.stats == {"apply": 1, **via["jvp"]}

    client.stats.clear()
    ct = _tangents(u, seed=5)
    assert tree_allclose(jax.vjp(g(f), u)[1](ct), jax.vjp(g(case.ref), u)[1](ct))
    assert client.stats == {"apply": 1, **via["vjp"]}

    client.stats.clear()
    diff, _ = case.split(inputs)
    grad = jax.grad(case.loss(f, inputs))(diff)
    assert tree_allclose(grad, jax.grad(case.loss(case.ref, inputs))(diff))
    assert client.stats == {"apply": 1, **via["vjp"]}


@pytest.mark.parametrize("tesseract", ["bratu_vjp_only"])
@pytest.mark.parametrize("transport", ["stock", "tlx"])
def test_partial_tesseract_jvp_auto(client, case, transport):
    """With `auto`, a JVP from VJPs is one batched VJP request where one exists."""
    f = tlx.TesseractModule(client, batching="auto")
    inputs = case.inputs()
    u = inputs["u"]
    du = _tangents(u)
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    out_t = jax.jvp(g(f), (u,), (du,))[1]
    assert tree_allclose(out_t, jax.jvp(g(case.ref), (u,), (du,))[1])
    if transport == "tlx":
        assert client.stats == {"apply": 1, f"batched_{VJP}": 1}
    else:
        assert client.stats == {"apply": 1, VJP: u.size}


@pytest.mark.parametrize("transport", ["stock", "tlx"])
def test_jvp_from_vjps_between_scalars(served, transport):
    """A JVP assembled from VJPs, where input and output are 0-d arrays: the
    Jacobian block is a 1 x 1 matrix reshaped to shape ()."""
    path = PARTIAL / "pytree_vjp_only" / "tesseract_api.py"
    client = fresh(served.get(path, transport))
    f = tlx.TesseractModule(client, batching="sequential")
    inputs = pytree_inputs(4)

    def g(fn):
        def mean(b):
            params = {**inputs["params"], "b": b}
            return fn({**inputs, "params": params})["stats"]["mean"]

        return mean

    b = inputs["params"]["b"]
    out, dout = jax.jvp(g(f), (b,), (jnp.asarray(0.7),))
    ref, dref = jax.jvp(g(pytree_ref), (b,), (jnp.asarray(0.7),))
    assert jnp.shape(dout) == () and tree_allclose((out, dout), (ref, dref))
    # The Jacobian from the VJPs of the output basis: one per output element.
    n_out = inputs["x"].size + 2
    assert client.stats == {"apply": 1, VJP: n_out}


#
# float32
#

_FLOAT32_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import tesseract_lx as tlx

    assert not jax.config.jax_enable_x64
    url, out_path = sys.argv[1], sys.argv[2]
    f = tlx.TesseractModule(tlx.Client(url))
    rng = np.random.RandomState(0)
    u = jnp.asarray(0.1 * rng.standard_normal((4, 4)), jnp.float32)
    inputs = {"u": u, "k": jnp.float32(1.0), "f": jnp.ones((4, 4), jnp.float32)}
    r = f(inputs)["residual"]
    g = jax.jit(jax.grad(lambda u: jnp.sum(f({**inputs, "u": u})["residual"] ** 2)))(u)
    json.dump(
        {
            "u": np.asarray(u, np.float64).tolist(),
            "r": np.asarray(r, np.float64).tolist(),
            "g": np.asarray(g, np.float64).tolist(),
            "dtypes": [str(r.dtype), str(g.dtype)],
        },
        open(out_path, "w"),
    )
    """
)


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", ["stock"])
def test_float32(client, case, tmp_path):
    """With x64 off, outputs and gradients are float32 and right to ~1e-5.

    In a subprocess: x64 is global, and these tests run with it on.
    """
    out_path = tmp_path / "out.json"
    script = tmp_path / "float32.py"
    script.write_text(_FLOAT32_SCRIPT)
    env = {"PYTHONPATH": str(ROOT), "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), client.urls[0], str(out_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out_path.read_text())
    assert res["dtypes"] == ["float32", "float32"]
    inputs = {**case.inputs(), "u": jnp.asarray(res["u"])}
    ref = case.ref(inputs)["residual"]
    grad = jax.grad(lambda u: jnp.sum(case.ref({**inputs, "u": u})["residual"] ** 2))
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(res["r"], ref, rtol=1e-5, atol=1e-5 * scale)
    gref = grad(inputs["u"])
    gscale = np.max(np.abs(gref))
    np.testing.assert_allclose(res["g"], gref, rtol=1e-5, atol=1e-5 * gscale)


def test_tesseract_core_objects_are_accepted(served):
    """A `tesseract_core.Tesseract` (from_url, from_tesseract_api) works as a client."""
    from tesseract_core import Tesseract

    case = CASES["bratu"]
    stock = served.get(case.path, "stock")
    inputs = case.inputs()
    for tesseract in (
        Tesseract.from_url(stock.urls[0]),
        Tesseract.from_tesseract_api(case.path),
    ):
        f = tlx.TesseractModule(tesseract)
        assert tree_allclose(f(inputs), case.ref(inputs))
        grad = jax.grad(case.loss(f, inputs))(case.split(inputs)[0])
        assert tree_allclose(
            grad, jax.grad(case.loss(case.ref, inputs))(case.split(inputs)[0])
        )
        assert f.client.stats == {"apply": 1 + 1, "vector_jacobian_product": 1}
