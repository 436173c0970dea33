"""Every schema tesseract-core allows, through `TesseractModule`, against pure-JAX
references (`schema_cases.py`).

The Tesseracts in `tests/tesseracts/`: `normalize` (any rank, not elementwise: a
stacked batch is silently wrong), `containers` (lists, dicts, an optional, a scalar,
a `Literal`, a `str`, an `int`, a nested model), `mixed_dtypes` (float32, float64 and
int64) and `partial_outputs` (outputs independent of inputs; no JVP endpoint). Each
test runs over a stock tesseract-runtime server, a tesseract-lx server and in process,
and asserts the requests sent wherever the contract fixes them.

The contract: inputs and outputs are plain containers shaped as the schema says;
arrays and numeric scalars come back as JAX arrays, strings as `str`, an absent
optional as `None`; paths use tesseract-core's syntax (`xs.[1]`, `fields.{a}`).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx

from conftest import fresh, Servers
from helpers import JVP, SERVERS, TRANSPORTS, tree_allclose, VJP
from schema_cases import (
    CONTAINER_DIFF_PATHS,
    containers_diff_out,
    containers_inputs,
    containers_ref,
    get_path,
    mixed_dtypes_inputs,
    mixed_dtypes_ref,
    normalize_inputs,
    normalize_ref,
    partial_outputs_inputs,
    partial_outputs_ref,
    SCHEMA_CASES,
    set_path,
)


# float32 outputs (and gradients through them) are compared at float32 precision.
RTOL = {
    "normalize": 1e-8,
    "containers": 1e-8,
    "mixed_dtypes": 1e-5,
    "partial_outputs": 1e-8,
}

parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)
parametrize_mode = pytest.mark.parametrize("mode", ["sum", "max"])


@pytest.fixture(scope="module")
def schema_servers():
    """This module's servers, started together (each takes seconds to start) and
    stopped when the module is done: nothing else uses them."""
    servers = Servers()
    try:
        transports = list(SERVERS)
        servers.start(
            [(str(c.path), t, 1) for c in SCHEMA_CASES.values() for t in transports]
        )
        yield servers
    finally:
        servers.close()


@pytest.fixture
def connect(schema_servers, transport):
    """`connect(name)`: a client of the schema Tesseract `name`, its `stats` at zero."""
    return lambda name: fresh(schema_servers.get(SCHEMA_CASES[name].path, transport))


def _sent(client: tlx.Client) -> dict[str, int]:
    """`client.stats` without `abstract_eval` (sent only where shapes are unknown)."""
    return {k: v for k, v in client.stats.items() if k != "abstract_eval" and v}


def _random_like(tree, seed: int = 1):
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x)),
        tree,
    )


def _loss(tree) -> jax.Array:
    return jnp.asarray(
        sum(jnp.sum(jnp.asarray(x, jnp.float64) ** 2) for x in jax.tree.leaves(tree))
    )


def assert_outputs(out, ref, rtol: float = 1e-8) -> None:
    """`out` is `ref` as plain containers: the same dicts, lists and `None`s, the same
    strings as `str`, and every numeric leaf a JAX array of the reference's shape."""
    is_str = lambda x: isinstance(x, str)
    strings = lambda t: [x for x in jax.tree.leaves(t) if is_str(x)]
    numbers = lambda t: jax.tree.map(lambda x: None if is_str(x) else x, t)
    assert strings(out) == strings(ref)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(numbers(out))), out
    assert tree_allclose(numbers(out), numbers(ref), rtol=rtol), (out, ref)


def _along(fn, inputs: dict, paths: tuple[str, ...], select=containers_diff_out):
    """`select(fn(inputs))` as a function of a dict `{path: leaf}` of input leaves."""

    def g(leaves: dict):
        new = inputs
        for path in paths:
            new = set_path(new, path, leaves[path])
        return select(fn(new))

    return g


#
# Eager calls and jit: plain containers in, plain containers out
#


@pytest.mark.parametrize("name", list(SCHEMA_CASES))
@parametrize_transport
def test_apply(connect, name):
    case, client = SCHEMA_CASES[name], connect(name)
    f = tlx.TesseractModule(client)
    inputs = case.make_inputs()
    assert_outputs(f(inputs), case.ref(inputs), RTOL[name])
    assert client.stats == {"apply": 1}


@pytest.mark.parametrize("name", list(SCHEMA_CASES))
@parametrize_transport
def test_filter_jit(connect, name):
    case, client = SCHEMA_CASES[name], connect(name)
    f = tlx.TesseractModule(client)
    inputs = case.make_inputs()
    # `filter_jit`: `containers` takes and returns `str`s, static under jit.
    assert_outputs(eqx.filter_jit(f)(inputs), case.ref(inputs), RTOL[name])
    assert _sent(client) == {"apply": 1}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("opt", ["value", "none", "omitted"])
@parametrize_mode
@parametrize_transport
def test_containers_apply(connect, mode, opt, n):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs = containers_inputs(mode=mode, opt=opt, n=n, label="lbl")
    out = f(inputs)
    assert_outputs(out, containers_ref(inputs))
    assert type(out["ys"]) is list and type(out["totals"]) is dict
    assert out["message"] == f"lbl:{mode}" and type(out["message"]) is str
    assert out["count"].shape == () and int(out["count"]) == 2
    assert out["totals"]["a"].shape == ()
    assert (out["maybe"] is None) == (opt != "value")
    assert client.stats == {"apply": 1}


@parametrize_transport
def test_containers_plain_python_values(connect):
    """numpy arrays, a Python float for the scalar `s`, defaults left out."""
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs = containers_inputs(opt="omitted")
    plain = {
        "xs": [np.asarray(x) for x in inputs["xs"]],
        "fields": {k: np.asarray(v) for k, v in inputs["fields"].items()},
        "s": 0.7,
        "sub": {"w": np.asarray(inputs["sub"]["w"])},
    }
    out = f(plain)
    assert_outputs(out, containers_ref(plain))
    assert out["message"] == "run:sum" and out["maybe"] is None
    assert client.stats == {"apply": 1}


@parametrize_transport
def test_containers_jit_statics(connect):
    """Statics (`mode`, `n`, `label`) change the numbers: jit must not mix them up."""
    client = connect("containers")
    f = tlx.TesseractModule(client)
    fn = eqx.filter_jit(lambda inputs: f(inputs))
    for mode, n, label in [("sum", 2, "a"), ("max", 2, "a"), ("max", 3, "b")]:
        inputs = containers_inputs(mode=mode, n=n, label=label)
        assert_outputs(fn(inputs), containers_ref(inputs))
    # `jax.jit` over the arrays only, statics closed over.
    inputs = containers_inputs(mode="max", n=3)
    paths = CONTAINER_DIFF_PATHS + ("opt",)
    leaves = {p: get_path(inputs, p) for p in paths}
    out = jax.jit(_along(f, inputs, paths))(leaves)
    assert_outputs(out, containers_diff_out(containers_ref(inputs)))


#
# Derivatives with respect to any differentiable leaf of the containers
#

WRT: dict[str, tuple[str, ...]] = {
    path: (path,) for path in ("xs.[1]", "fields.{a}", "opt", "s", "sub.w")
}
WRT["all"] = CONTAINER_DIFF_PATHS + ("opt",)
parametrize_wrt = pytest.mark.parametrize("wrt", list(WRT))


def _containers_case(mode: str, wrt: str):
    inputs = containers_inputs(mode=mode)
    paths = WRT[wrt]
    return inputs, paths, {p: get_path(inputs, p) for p in paths}


@parametrize_wrt
@parametrize_mode
@parametrize_transport
def test_containers_grad(connect, mode, wrt):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs, paths, leaves = _containers_case(mode, wrt)
    loss = lambda fn: lambda x: _loss(_along(fn, inputs, paths)(x))
    grad = jax.grad(loss(f))(leaves)
    assert tree_allclose(grad, jax.grad(loss(containers_ref))(leaves))
    assert client.stats == {"apply": 1, VJP: 1}

    client.stats.clear()
    grad = jax.jit(jax.grad(loss(f)))(leaves)
    assert tree_allclose(grad, jax.grad(loss(containers_ref))(leaves))
    assert _sent(client) == {"apply": 1, VJP: 1}


@parametrize_wrt
@parametrize_mode
@parametrize_transport
def test_containers_jvp(connect, mode, wrt):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs, paths, leaves = _containers_case(mode, wrt)
    tangents = _random_like(leaves)
    out, out_t = jax.jvp(_along(f, inputs, paths), (leaves,), (tangents,))
    ref, ref_t = jax.jvp(_along(containers_ref, inputs, paths), (leaves,), (tangents,))
    assert_outputs(out, ref)
    assert tree_allclose(out_t, ref_t)
    assert client.stats == {"apply": 1, JVP: 1}


@parametrize_wrt
@parametrize_transport
def test_containers_vjp(connect, wrt):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs, paths, leaves = _containers_case("max", wrt)
    out, vjp = jax.vjp(_along(f, inputs, paths), leaves)
    ref, ref_vjp = jax.vjp(_along(containers_ref, inputs, paths), leaves)
    assert tree_allclose(out, ref)
    cts = _random_like(ref, seed=2)
    assert tree_allclose(vjp(cts), ref_vjp(cts))
    assert client.stats == {"apply": 1, VJP: 1}


@parametrize_transport
def test_containers_zero_tangents_cost_nothing(connect):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs = containers_inputs()
    x = get_path(inputs, "xs.[1]")
    # A symbolic-zero tangent: no derivative request.
    stopped = lambda fn: (
        lambda x: containers_diff_out(
            fn(set_path(inputs, "xs.[1]", jax.lax.stop_gradient(x)))
        )
    )
    out, out_t = jax.jvp(stopped(f), (x,), (jnp.ones_like(x),))
    assert tree_allclose(out, stopped(containers_ref)(x))
    assert tree_allclose(out_t, jax.tree.map(jnp.zeros_like, out))
    assert client.stats == {"apply": 1}
    # One output of one list item: one VJP, whatever else the inputs hold.
    client.stats.clear()
    only = lambda fn: lambda x: jnp.sum(fn(set_path(inputs, "xs.[1]", x))["ys"][1])
    assert tree_allclose(jax.grad(only(f))(x), jax.grad(only(containers_ref))(x))
    assert client.stats == {"apply": 1, VJP: 1}


#
# Paths in tesseract-core's syntax: operators and residual functions
#


@pytest.mark.parametrize(
    "wrt, of",
    [
        ("xs.[1]", "ys.[1]"),
        ("fields.{a}", "totals.{a}"),
        ("sub.w", "totals.{b}"),
        ("opt", "maybe"),
        ("s", "ys.[0]"),
    ],
)
@parametrize_transport
def test_containers_operator(connect, wrt, of):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    inputs = containers_inputs(mode="max")
    x = get_path(inputs, wrt)
    ref = lambda v: get_path(containers_ref(set_path(inputs, wrt, v)), of)
    op = tlx.TesseractJacobianOperator(f, inputs, wrt=wrt, of=of)
    v, ct = _random_like(x, seed=3), _random_like(ref(x), seed=4)

    client.stats.clear()
    assert tree_allclose(op.mv(v), jax.jvp(ref, (x,), (v,))[1])
    assert client.stats == {JVP: 1}

    client.stats.clear()
    assert tree_allclose(op.T.mv(ct), jax.vjp(ref, x)[1](ct)[0])
    assert client.stats == {VJP: 1}

    jac = jnp.reshape(jax.jacfwd(ref)(x), (np.size(ref(x)), np.size(x)))
    np.testing.assert_allclose(op.as_matrix(), jac, rtol=1e-8, atol=1e-10)


@parametrize_transport
def test_containers_residual_fn(connect):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    fn = tlx.residual_fn(f, wrt="fields.{a}", of="totals.{a}")
    args = containers_inputs(mode="max")
    y = get_path(args, "fields.{a}") + 0.25

    def ref(y, args):
        return get_path(containers_ref(set_path(args, "fields.{a}", y)), "totals.{a}")

    assert tree_allclose(fn(y, args), ref(y, args))
    assert client.stats == {"apply": 1}
    client.stats.clear()
    assert tree_allclose(jax.grad(fn)(y, args), jax.grad(ref)(y, args))
    assert client.stats == {"apply": 1, VJP: 1}


#
# normalize: vmap over primal points must not stack them into one request
#


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4)])
@parametrize_transport
def test_normalize_vmap_over_points(connect, transport, shape, jit):
    client = connect("normalize")
    f = tlx.TesseractModule(client)
    X = normalize_inputs(shape)["x"]

    def per_point(fn):
        g = jax.vmap(lambda x: fn({"x": x}))
        return jax.jit(g)(X) if jit else g(X)

    ref = per_point(normalize_ref)
    # The trap is real: one call on the stacked points is not the answer.
    assert not tree_allclose(normalize_ref({"x": X}), ref)
    assert tree_allclose(per_point(f), ref)
    assert _sent(client) == (
        {"apply": 3} if transport == "stock" else {"batched_apply": 1}
    )


@parametrize_transport
def test_normalize_vmap_derivatives_over_points(connect):
    client = connect("normalize")
    f = tlx.TesseractModule(client)
    X = normalize_inputs((3, 5))["x"]
    T = _random_like(X)

    def jvps(fn):
        jvp = lambda x, t: jax.jvp(lambda x: fn({"x": x}), (x,), (t,))
        return jax.vmap(jvp)(X, T)

    assert tree_allclose(jvps(f), jvps(normalize_ref))

    def grads(fn):
        def loss(x):
            out = fn({"x": x})
            return jnp.sum(out["y"] ** 3) + jnp.sum(out["z"] ** 2)

        return jax.vmap(jax.grad(loss))(X)

    assert tree_allclose(grads(f), grads(normalize_ref))


#
# mixed_dtypes: float32, float64 and int64 side by side
#

_DTYPES = {"y32": jnp.float32, "y64": jnp.float64, "idx": jnp.int64}


def _floats(out: dict) -> dict:
    return {"y32": out["y32"], "y64": out["y64"]}


@parametrize_transport
def test_mixed_dtypes(connect):
    client = connect("mixed_dtypes")
    f = tlx.TesseractModule(client)
    inputs = mixed_dtypes_inputs()
    out = f(inputs)
    assert {k: v.dtype for k, v in out.items()} == _DTYPES
    assert_outputs(out, mixed_dtypes_ref(inputs), rtol=1e-6)
    assert client.stats == {"apply": 1}

    client.stats.clear()
    diff = {"a": inputs["a"], "b": inputs["b"]}
    loss = lambda fn: lambda d: _loss(_floats(fn({**inputs, **d})))
    grad = jax.grad(loss(f))(diff)
    assert {k: v.dtype for k, v in grad.items()} == {"a": jnp.float32, "b": jnp.float64}
    assert tree_allclose(grad, jax.grad(loss(mixed_dtypes_ref))(diff), rtol=1e-5)
    assert client.stats == {"apply": 1, VJP: 1}

    # `i` is not differentiable: it costs nothing.
    client.stats.clear()
    tangents = _random_like(diff)
    fn = lambda fn: lambda d: _floats(fn({**inputs, **d}))
    out, out_t = jax.jvp(fn(f), (diff,), (tangents,))
    ref, ref_t = jax.jvp(fn(mixed_dtypes_ref), (diff,), (tangents,))
    assert {k: v.dtype for k, v in out_t.items()} == {
        "y32": jnp.float32,
        "y64": jnp.float64,
    }
    assert tree_allclose(out, ref, rtol=1e-6)
    assert tree_allclose(out_t, ref_t, rtol=1e-5)
    assert client.stats == {"apply": 1, JVP: 1}


#
# partial_outputs: outputs independent of inputs; only a VJP endpoint
#


@parametrize_transport
def test_partial_outputs(connect):
    client = connect("partial_outputs")
    f = tlx.TesseractModule(client)
    inputs = partial_outputs_inputs()

    # No JVP endpoint (and no /jacobian): the library builds the JVP from VJPs.
    tangents = _random_like(inputs)
    out, out_t = jax.jvp(f, (inputs,), (tangents,))
    ref, ref_t = jax.jvp(partial_outputs_ref, (inputs,), (tangents,))
    assert_outputs(out, ref)
    assert tree_allclose(out_t, ref_t)
    assert JVP not in client.stats and "jacobian" not in client.stats

    cts = _random_like(ref, seed=2)
    assert tree_allclose(
        jax.vjp(f, inputs)[1](cts), jax.vjp(partial_outputs_ref, inputs)[1](cts)
    )

    const = jax.grad(lambda inp: jnp.sum(f(inp)["const"] ** 2))(inputs)
    assert tree_allclose(const, jax.tree.map(jnp.zeros_like, inputs))

    client.stats.clear()
    only_fa = lambda fn: lambda inp: jnp.sum(jnp.cos(fn(inp)["fa"]))
    grad = jax.grad(only_fa(f))(inputs)
    assert tree_allclose(grad, jax.grad(only_fa(partial_outputs_ref))(inputs))
    assert client.stats == {"apply": 1, VJP: 1}


#
# Bad inputs: refused before any request, naming the path
#

BAD_INPUTS = {
    "list for an array": (lambda i: set_path(i, "sub.w", [1.0, 2.0]), "`sub.w`"),
    "wrong shape in a dict": (
        lambda i: set_path(i, "fields.{a}", jnp.ones(4)),
        "`fields.{a}`",
    ),
    "wrong rank in a list": (
        lambda i: set_path(i, "xs.[0]", jnp.ones((2, 2))),
        "`xs.[0]`",
    ),
    "missing key": (lambda i: {k: v for k, v in i.items() if k != "s"}, "`s`"),
    "missing nested key": (lambda i: {**i, "sub": {}}, "`sub.w`"),
    "unknown key": (lambda i: {**i, "bogus": 1.0}, "`bogus`"),
    "str for an int": (lambda i: {**i, "n": "2"}, "`n`"),
    "not a Literal": (lambda i: {**i, "mode": "min"}, "`mode`"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@parametrize_transport
def test_bad_inputs(connect, bad):
    client = connect("containers")
    f = tlx.TesseractModule(client)
    mutate, path = BAD_INPUTS[bad]
    with pytest.raises((TypeError, ValueError), match=re.escape(path)) as error:
        f(mutate(containers_inputs()))
    if bad == "list for an array":
        assert "array" in str(error.value)
    assert client.stats == {}
