"""Bad and unusual input, row by row, on a stock tesseract-runtime server, on
`tesseract-lx serve` and in process, against the pure-JAX references.

What the user sees:

- wrong shape, wrong dtype, a missing or an extra key: a `ValueError` or `TypeError`
    naming the field and what it expects, before any request;
- `jax.vmap` with mismatched batch axes: JAX's own `ValueError`, or ours naming the
    field, before any request;
- empty arrays: the reference's results and derivatives where the schema allows no
    elements; where it does not, an error naming the field;
- ints (or bools) where floats are asked: converted on the client, the same answer;
- non-contiguous, Fortran-ordered and big-endian arrays: the same answer, bit for bit;
- NaN and Inf in inputs and outputs: passed through unchanged (plain `float` fields,
    JSON numbers, too);
- `check_finite=True`: NaN or Inf in an answer raises, naming the endpoint and the
    path, under `jax.jit` too;
- a 100 MB payload: works, in a few times its size of client memory;
- dict keys with dots, braces and slashes: apply and derivatives at those entries.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx

from conftest import fresh
from helpers import CASES, JVP, PARTIAL, SERVERS, TRANSPORTS, tree_allclose, VJP
from references import pytree_inputs, pytree_ref
from schema_cases import containers_inputs, containers_ref, SCHEMA_CASES


PYTREE = CASES["pytree"].path
BRATU = CASES["bratu"].path
CONTAINERS = SCHEMA_CASES["containers"].path
MIXED = SCHEMA_CASES["mixed_dtypes"].path
PLAIN_FLOAT = PARTIAL / "plain_float" / "tesseract_api.py"

parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)


@pytest.fixture(scope="module", autouse=True)
def _start_servers(served):
    """Start this module's servers together: each takes seconds to start."""
    served.start(
        [(str(p), t, 1) for p in (PYTREE, CONTAINERS) for t in SERVERS]
        + [(str(PLAIN_FLOAT), "stock", 1)]
    )


@pytest.fixture
def connect(served, transport):
    """`connect(path)`: a client of that Tesseract over `transport`, `stats` at zero."""
    return lambda path: fresh(served.get(path, transport))


def same(a, b, rtol: float = 1e-8) -> bool:
    """`tree_allclose`, where NaN equals NaN and each Inf its own sign (and strings
    are equal)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        x == y
        if isinstance(x, str) or isinstance(y, str)
        else np.shape(x) == np.shape(y)
        and np.allclose(np.asarray(x), np.asarray(y), rtol, 1e-10, equal_nan=True)
        for x, y in zip(la, lb)
    )


def identical(a, b) -> bool:
    """Bit for bit (NaN equal to NaN)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb)
    )


def _jnp(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _apply_jit(f, inputs):
    # `filter_jit`: the pytree example's `power` is a Python int.
    return eqx.filter_jit(lambda inp: f(inp))(inputs)


#
# Refused before any request, naming the field and what it expects
#


def _pytree_bad() -> dict[str, tuple]:
    """`what -> (inputs, error, message)` for the pytree example."""
    inputs = pytree_inputs(5)
    params = inputs["params"]
    with_x = lambda x: {**inputs, "x": x}
    expects_x = r"`x` must be an array of shape \(\*,\), dtype float64"
    return {
        "wrong shape": (
            {**inputs, "params": {**params, "a": jnp.zeros(4)}},
            ValueError,
            r"`params.a` must be an array of shape \(3,\), dtype float64; got shape "
            r"\(4,\)",
        ),
        "wrong rank": (
            with_x(jnp.zeros((5, 1))),
            ValueError,
            expects_x + r"; got shape \(5, 1\)",
        ),
        "empty where a fixed size is asked": (
            {**inputs, "params": {**params, "a": jnp.zeros(0)}},
            ValueError,
            r"`params.a` must be an array of shape \(3,\).*got shape \(0,\)",
        ),
        "strings of digits": (
            with_x(np.array(["1", "2", "3", "4", "5"])),
            TypeError,
            expects_x + "; got an array of dtype <U1, which is not numeric",
        ),
        "objects (None would become NaN)": (
            with_x(np.array([1.0, None, 2.0, 3.0, 4.0], dtype=object)),
            TypeError,
            expects_x + "; got an array of dtype object, which is not numeric",
        ),
        "dates": (
            with_x(np.arange(5).astype("datetime64[s]")),
            TypeError,
            expects_x + r"; got an array of dtype datetime64\[s\], which is not",
        ),
        "complex for float": (
            with_x(jnp.ones(5) + 1j),
            TypeError,
            "`x` must have dtype float64; got complex128, which does not convert "
            "without loss",
        ),
        "a string for an array": (
            with_x("1 2 3"),
            TypeError,
            expects_x + "; got str '1 2 3'",
        ),
        "a list for an array": (
            with_x([1.0, 2.0]),
            TypeError,
            expects_x + "; got a Python list: convert it with `jnp.asarray`",
        ),
        "float for an int": (
            {**inputs, "power": 2.5},
            TypeError,
            "`power` must be an int",
        ),
        "missing key": (
            {k: v for k, v in inputs.items() if k != "offset"},
            ValueError,
            "Missing input `offset`; the Tesseract takes: `params`, `x`, `offset`, "
            "`power`",
        ),
        "missing nested key": (
            {**inputs, "params": {"a": params["a"]}},
            ValueError,
            "Missing input `params.b`; `params` takes: `a`, `b`",
        ),
        "extra key": (
            {**inputs, "y": jnp.ones(5)},
            ValueError,
            "Unknown input `y`; the Tesseract takes: `params`, `x`, `offset`, `power`",
        ),
        "extra nested key": (
            {**inputs, "params": {**params, "c": 1.0}},
            ValueError,
            "Unknown input `params.c`; `params` takes: `a`, `b`",
        ),
    }


@pytest.mark.parametrize("what", list(_pytree_bad()))
@parametrize_transport
def test_refused_before_any_request(connect, what):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs, error, message = _pytree_bad()[what]
    with pytest.raises(error, match=message):
        f(inputs)
    with pytest.raises(error, match=message):
        jax.jit(lambda: f(inputs))()
    assert client.stats == {}


@pytest.mark.parametrize("transport", ["inprocess"])
def test_wrong_dtype_of_an_int_array(connect):
    """Floats (or bools from ints) would lose information: refused."""
    client = connect(MIXED)
    f = tlx.TesseractModule(client)
    inputs = SCHEMA_CASES["mixed_dtypes"].make_inputs()
    with pytest.raises(TypeError, match="`i` must have dtype int64; got float64"):
        f({**inputs, "i": jnp.asarray([3.0, 1.0, 4.0, 1.5])})
    assert client.stats == {}


@parametrize_transport
def test_vmap_with_mismatched_batch_axes(connect):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs = pytree_inputs(5)

    def g(x, offset):
        return f({**inputs, "x": x, "offset": offset})["y"]

    sizes = "vmap got inconsistent sizes for array axes to be mapped"
    with pytest.raises(ValueError, match=sizes):
        jax.vmap(g)(jnp.ones((3, 5)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=sizes):
        jax.vmap(g, in_axes=(0, 1))(jnp.ones((3, 5)), jnp.ones((3, 5)))
    # The batch axis taken from the wrong side leaves the wrong shape inside.
    with pytest.raises(
        ValueError, match=r"`params.a` must be an array of shape \(3,\)"
    ):
        jax.vmap(lambda a: f({**inputs, "params": {**inputs["params"], "a": a}}))(
            jnp.ones((3, 4))
        )
    # Tangents batched differently from their points.
    jvp = lambda x, t: jax.jvp(lambda x: g(x, inputs["offset"]), (x,), (t,))
    with pytest.raises(ValueError, match=sizes):
        jax.vmap(jvp)(jnp.ones((3, 5)), jnp.ones((2, 5)))
    assert client.stats == {}


#
# Empty arrays
#


@parametrize_transport
def test_empty_arrays_where_the_schema_allows_them(connect):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs = {**pytree_inputs(5), "x": jnp.zeros(0), "offset": jnp.zeros(0)}
    out = f(inputs)
    ref = pytree_ref(inputs)
    # `mean` of nothing is NaN on both sides; `count` is 0.
    assert same(out, ref) and out["y"].shape == (0,)
    assert client.stats == {"apply": 1}

    def y(x):
        return f({**inputs, "x": x})["y"]

    def y_ref(x):
        return pytree_ref({**inputs, "x": x})["y"]

    def norm(x):
        return f({**inputs, "x": x})["stats"]["norm"]

    def norm_ref(x):
        return pytree_ref({**inputs, "x": x})["stats"]["norm"]

    client.stats.clear()
    x = jnp.zeros(0)
    assert same(jax.jvp(y, (x,), (x,)), jax.jvp(y_ref, (x,), (x,)))
    assert same(jax.grad(norm)(x), jax.grad(norm_ref)(x))
    assert client.stats == {"apply": 2, JVP: 1, VJP: 1}
    # A Jacobian with no columns is 0 tangents: nothing to ask for.
    client.stats.clear()
    jac = jax.jacfwd(y)(x)
    assert jac.shape == (0, 0) and same(jac, jax.jacfwd(y_ref)(x))
    assert client.stats == {"apply": 1}
    # A vmap over no points sends no point (`/abstract_eval` tells the shapes).
    client.stats.clear()
    ys = jax.vmap(lambda x: f({**pytree_inputs(5), "x": x})["y"])(jnp.zeros((0, 5)))
    assert ys.shape == (0, 5)
    assert client.stats == {"abstract_eval": 1}


@pytest.mark.parametrize("transport", list(SERVERS))
def test_empty_list_and_empty_list_item(connect):
    client = connect(CONTAINERS)
    f = tlx.TesseractModule(client)
    for xs in ([], [jnp.zeros(0), jnp.ones(2)]):
        inputs = {**containers_inputs(), "xs": xs}
        assert same(f(inputs), containers_ref(inputs))
    assert client.stats == {"apply": 2}


#
# Converted on the client, or sent as they are: the same answer
#


def _sent_dtypes(monkeypatch, client) -> list:
    """The dtypes of the `x` arrays the client sends."""
    sent = []
    request = client.request

    def spy(endpoint, payload, **kwargs):
        sent.append(np.asarray(payload["inputs"]["x"]).dtype)
        return request(endpoint, payload, **kwargs)

    monkeypatch.setattr(client, "request", spy)
    return sent


@parametrize_transport
def test_ints_where_floats_are_asked_are_converted(connect, monkeypatch):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs = pytree_inputs(5)
    as_floats = {
        **inputs,
        "x": jnp.arange(5.0),
        "params": {**inputs["params"], "b": jnp.asarray(2.0)},
    }
    expected = f(as_floats)
    assert tree_allclose(expected, pytree_ref(as_floats))
    sent = _sent_dtypes(monkeypatch, client)
    for x in (np.arange(5), jnp.arange(5, dtype=jnp.int32), np.arange(5, dtype=">i2")):
        for b in (2, np.int64(2), jnp.asarray(2)):
            ints = {**inputs, "x": x, "params": {**inputs["params"], "b": b}}
            assert identical(f(ints), expected)
    assert identical(
        _apply_jit(f, {**inputs, "x": np.arange(5)}), f(inputs | {"x": jnp.arange(5.0)})
    )
    assert set(sent) == {np.dtype("float64")}
    bools = {**inputs, "x": np.array([True, False, True, True, False])}
    assert tree_allclose(
        f(bools), pytree_ref({**inputs, "x": jnp.asarray([1.0, 0, 1, 1, 0])})
    )


@parametrize_transport
def test_non_contiguous_and_big_endian_arrays(connect):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs = pytree_inputs(5)
    data = np.random.default_rng(3).standard_normal(10)
    native = np.ascontiguousarray(data[::2])
    expected = f({**inputs, "x": native})
    assert tree_allclose(expected, pytree_ref({**inputs, "x": jnp.asarray(native)}))
    variants = {
        "strided": data[::2],
        "reversed": np.ascontiguousarray(native[::-1])[::-1],
        "big-endian": native.astype(">f8"),
        "big-endian strided": data.astype(">f8")[::2],
    }
    for name, x in variants.items():
        assert not x.flags.c_contiguous or not x.dtype.isnative, name
        assert identical(f({**inputs, "x": x}), expected), name
    # (`jax.jit` itself refuses big-endian arguments.)
    assert identical(_apply_jit(f, {**inputs, "x": variants["strided"]}), expected)
    # A derivative at, and along, strided arrays (JAX refuses big-endian ones).
    tangent = data[1::2]
    fn = lambda x: f({**inputs, "x": x})["y"]
    assert identical(
        jax.jvp(fn, (variants["strided"],), (tangent,)),
        jax.jvp(fn, (native,), (np.ascontiguousarray(tangent),)),
    )


@pytest.mark.parametrize("transport", ["inprocess"])
def test_fortran_ordered_and_transposed_2d_arrays(connect):
    client = connect(BRATU)
    f = tlx.TesseractModule(client)
    rng = np.random.default_rng(4)
    u = 0.1 * rng.standard_normal((4, 4))
    inputs = {"u": u, "k": 1.0, "f": np.ones((4, 4))}
    expected = f(inputs)
    assert tree_allclose(expected, CASES["bratu"].ref(_jnp(inputs)))
    for x in (np.asfortranarray(u), np.ascontiguousarray(u.T).T, u.astype(">f8").T.T):
        assert identical(f({**inputs, "u": x}), expected)
    assert identical(
        f({**inputs, "u": np.asfortranarray(u), "f": np.ones((8, 4))[::2]}), expected
    )


#
# NaN and Inf: passed through unchanged, unless `check_finite=True`
#

NON_FINITE = np.array([np.nan, np.inf, -np.inf, 0.5, -2.0])


@parametrize_transport
def test_nan_and_inf_pass_through(connect):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    inputs = {**pytree_inputs(5), "x": NON_FINITE}
    ref = pytree_ref(_jnp(inputs))
    out = f(inputs)
    assert same(out, ref) and np.isnan(out["stats"]["norm"])
    assert same(_apply_jit(f, inputs), ref)
    # In tangents and cotangents too.
    fn = lambda x: f({**inputs, "x": x})["y"]
    fn_ref = lambda x: pytree_ref({**_jnp(inputs), "x": x})["y"]
    x = jnp.linspace(0.1, 0.5, 5)
    assert same(jax.jvp(fn, (x,), (NON_FINITE,)), jax.jvp(fn_ref, (x,), (NON_FINITE,)))
    _, vjp = jax.vjp(fn, x)
    _, vjp_ref = jax.vjp(fn_ref, x)
    assert same(vjp(jnp.asarray(NON_FINITE)), vjp_ref(jnp.asarray(NON_FINITE)))
    # The eager call taught the output shapes: no `/abstract_eval` under jit.
    assert client.stats == {"apply": 4, JVP: 1, VJP: 1}


@pytest.mark.parametrize("transport", ["stock", "inprocess"])
def test_nan_and_inf_in_plain_float_fields(connect):
    """`float` fields travel as JSON numbers, and JSON has no NaN or Infinity."""
    client = connect(PLAIN_FLOAT)
    f = tlx.TesseractModule(client)
    x = np.array([1.0, -3.0])
    # Eagerly at a traced-like scale first: the Tesseract has no `/abstract_eval`.
    assert same(f({"x": x, "scale": jnp.asarray(2.0)})["y"], 2.0 * x)
    for scale in (np.nan, np.inf, -np.inf):
        out = f({"x": x, "scale": scale})
        assert same(out["y"], scale * x)
        # Traced, as optimistix and lineax pass floats.
        out = jax.jit(lambda s: f({"x": x, "scale": s}))(jnp.asarray(scale))
        assert same(out["y"], scale * x)
    # A NaN answer to a `float` output comes back NaN (not `None`); an Inf one is
    # written `null` by the server (pydantic's JSON), so it is non-finite but NaN.
    assert np.isnan(f({"x": np.array([np.nan]), "scale": 1.0})["peak"])
    assert not np.isfinite(f({"x": np.array([np.inf]), "scale": 1.0})["peak"])
    assert f({"x": x, "scale": 2.0})["peak"] == 2.0


@pytest.mark.parametrize("transport", list(SERVERS))
def test_check_finite_names_endpoint_and_path(connect, transport):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client, check_finite=True)
    assert not tlx.TesseractModule(client).check_finite
    inputs = pytree_inputs(5)
    bad = {**inputs, "x": NON_FINITE}
    fn = lambda x: f({**inputs, "x": x})["y"]
    x = jnp.linspace(0.1, 0.5, 5)
    # Finite answers pass, and nothing more is sent.
    assert tree_allclose(f(inputs), pytree_ref(inputs))
    assert client.stats == {"apply": 1}

    message = r"`/apply` at http://127\.0\.0\.1:\d+ failed: the answer holds NaN at `y`"
    with pytest.raises(tlx.TesseractError, match=message) as info:
        f(bad)
    assert isinstance(info.value, FloatingPointError)
    assert info.value.endpoint == "apply" and client.last_error is info.value
    assert "(3 of 5 values, the first at index (0,))" in str(info.value)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        _apply_jit(f, bad)
    assert isinstance(client.last_error, FloatingPointError)
    jvp = r"`/jacobian_vector_product` at .* the answer holds NaN and Inf at `y`"
    with pytest.raises(tlx.TesseractError, match=jvp):
        jax.jvp(fn, (x,), (NON_FINITE,))
    with pytest.raises(jax.errors.JaxRuntimeError, match=jvp):
        jax.jit(lambda t: jax.jvp(fn, (x,), (t,))[1])(NON_FINITE)
    # A VJP's answer is a cotangent of the inputs: the path is the input's.
    vjp = r"`/vector_jacobian_product` at .* the answer holds NaN and Inf at `x`"
    with pytest.raises(tlx.TesseractError, match=vjp):
        jax.vjp(fn, x)[1](jnp.asarray(NON_FINITE))
    # A batch says which item, whichever way it goes.
    batch = jnp.stack([jnp.ones(5), jnp.asarray(NON_FINITE)])
    item = "item 1 of the batch of 2, index (0,)"
    rules = [tlx.Sequential(), tlx.Jacobian()]
    rules += [tlx.Batched()] if transport == "tlx" else []
    for rule in rules:
        g = tlx.TesseractModule(client, rule, check_finite=True)
        tangents = lambda t: jax.jvp(lambda x: g({**inputs, "x": x})["y"], (x,), (t,))
        with pytest.raises(tlx.TesseractError, match=re.escape(item)):
            jax.vmap(lambda t: tangents(t)[1])(batch)


#
# A 100 MB payload
#


# Shared by the transports: compiled once at 100 MB.
_PYTREE_REF = jax.jit(pytree_ref)


def _rss_peak_reset() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


@pytest.mark.parametrize("transport", list(SERVERS))
def test_100_mb_payload(connect):
    client = connect(PYTREE)
    f = tlx.TesseractModule(client)
    m = 6_250_000  # `x` and `offset`: 50 MB each
    rng = np.random.default_rng(5)
    inputs = {
        **pytree_inputs(5),
        "x": rng.standard_normal(m),
        "offset": rng.standard_normal(m),
    }
    payload_mb = (inputs["x"].nbytes + inputs["offset"].nbytes) / 2**20
    expected = _PYTREE_REF(inputs)
    reset = _rss_peak_reset()
    before = _status_mb("VmRSS") if reset else _status_mb("VmHWM")
    out = f(inputs)
    jax.block_until_ready(out)
    peak = _status_mb("VmHWM") - before
    assert tree_allclose(out, expected)
    assert client.stats == {"apply": 1}
    # Base64 strings and the JSON body at once on the way out, the answer (50 MB)
    # decoded on the way back: measured 3.3x to 4.2x the payload.
    print(
        f"\n100 MB payload: peak client RSS +{peak:.0f} MB ({peak / payload_mb:.1f}x)"
    )
    assert peak < 5 * payload_mb


#
# Dict keys with dots, braces, slashes
#

KEYS = ["a.b", "{c}", "d/e", "x\\y", "}{", "[0]", "f.{g}.[1]", " "]


def _path(key: str) -> str:
    """tesseract-core's path segment of a dict key: `{`, `}` and `\\` escaped."""
    escaped = key.replace("\\", "\\\\").replace("{", "\\{").replace("}", "\\}")
    return "{" + escaped + "}"


@parametrize_transport
def test_dict_keys_with_path_characters(connect):
    client = connect(CONTAINERS)
    f = tlx.TesseractModule(client)
    inputs = containers_inputs()
    rng = np.random.default_rng(6)
    entries = {key: jnp.asarray(rng.standard_normal(3)) for key in KEYS}
    fields = {**inputs["fields"], **entries}
    inputs = {**inputs, "fields": fields}
    assert same(f(inputs), containers_ref(inputs))

    def totals(fn):
        """The entries with those keys -> the totals at those keys."""

        def g(entries: dict) -> dict:
            out = fn({**inputs, "fields": {**fields, **entries}})["totals"]
            return {key: out[key] for key in KEYS}

        return g

    loss = lambda fn: lambda e: sum(t**2 for t in totals(fn)(e).values())
    assert same(jax.grad(loss(f))(entries), jax.grad(loss(containers_ref))(entries))
    tangents = {key: jnp.asarray(rng.standard_normal(3)) for key in KEYS}
    assert same(
        jax.jvp(totals(f), (entries,), (tangents,)),
        jax.jvp(totals(containers_ref), (entries,), (tangents,)),
    )
    assert client.stats == {"apply": 3, VJP: 1, JVP: 1}
    # As an operator's `wrt` and `of`, in tesseract-core's path syntax.
    wrt = tuple(f"fields.{_path(key)}" for key in KEYS)
    of = tuple(f"totals.{_path(key)}" for key in KEYS)
    op = tlx.TesseractJacobianOperator(f, inputs, wrt=wrt, of=of)
    _, ref = jax.jvp(totals(containers_ref), (entries,), (tangents,))
    out = op.mv({p: tangents[key] for p, key in zip(wrt, KEYS)})
    assert same(out, {p: ref[key] for p, key in zip(of, KEYS)})


@pytest.mark.parametrize("transport", list(SERVERS))
def test_empty_dict_key(connect):
    """Applied fine; a derivative at it cannot be asked of tesseract-core (its paths
    cannot name an empty key): refused before that request, saying so."""
    client = connect(CONTAINERS)
    f = tlx.TesseractModule(client)
    inputs = containers_inputs()
    fields = {**inputs["fields"], "": jnp.ones(3)}
    inputs = {**inputs, "fields": fields}
    assert same(f(inputs), containers_ref(inputs))
    loss = lambda v: f({**inputs, "fields": {**fields, "": v}})["totals"][""]
    client.stats.clear()
    message = r"Cannot differentiate at `fields\.\{\}`, `totals\.\{\}`: .* empty"
    with pytest.raises(ValueError, match=message):
        jax.grad(loss)(jnp.ones(3))
    assert client.stats == {"apply": 1}
