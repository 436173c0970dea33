"""`tlx.apply_tesseract`: tesseract-jax's public function, as a drop-in.

Through `tesseract_core.Tesseract` objects (served by a stock server, by
`tesseract-lx serve`, or loaded in process with `from_tesseract_api`, which is
tesseract-core's own in-process client: no batched endpoints), whose own methods every
request goes through; every number against pure JAX.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx
from tesseract_core import Tesseract

from helpers import CASES, PARTIAL, PARTIAL_CASES, tree_allclose
from schema_cases import containers_diff_out, get_path, SCHEMA_CASES, set_path
from test_schemas import assert_outputs, RTOL


TRANSPORTS = ("stock", "tlx", "inprocess")
ELEMENTWISE = PARTIAL / "elementwise" / "tesseract_api.py"
METHODS = (
    "apply",
    "abstract_eval",
    "jacobian",
    "jacobian_vector_product",
    "vector_jacobian_product",
)


def _tesseract(served, path, transport) -> tuple[Tesseract, list[str]]:
    """A `tesseract_core.Tesseract` of `path`, its methods instrumented: the list
    records every call, as a user's own wrapper would."""
    if transport == "inprocess":
        t = Tesseract.from_tesseract_api(path)
    else:
        t = Tesseract.from_url(served.get(path, transport).urls[0])
    calls: list[str] = []
    for name in METHODS:
        method = getattr(t, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            calls.append(_name)
            return _method(*args, **kwargs)

        setattr(t, name, counted)
    return t, calls


@pytest.fixture(params=TRANSPORTS)
def bratu(served, request):
    t, calls = _tesseract(served, CASES["bratu"].path, request.param)
    return request.param, t, calls


def _stats(t: Tesseract) -> dict:
    return dict(tlx.Client.wrap(t).stats)


def test_outputs_through_the_objects_own_methods(served):
    case = CASES["pytree"]
    for transport in TRANSPORTS:
        t, calls = _tesseract(served, case.path, transport)
        inputs = case.inputs()
        out = tlx.apply_tesseract(t, inputs)
        assert tree_allclose(out, case.ref(inputs))
        # Every output, the non-array one included; one request, no `/abstract_eval`.
        assert set(out) == {"y", "stats", "count"}
        assert calls == ["apply"]


def test_every_transformation(bratu):
    transport, t, calls = bratu
    case = CASES["bratu"]
    inputs = case.inputs()
    u = inputs["u"]
    v = jnp.asarray(np.random.default_rng(0).standard_normal(u.shape))

    def run(apply):
        g = lambda u: apply({**inputs, "u": u})["residual"]
        loss = lambda u: jnp.sum(g(u) ** 2)
        y, lin = jax.linearize(g, u)
        _, vjp = jax.vjp(g, u)
        return {
            "jit": jax.jit(g)(u),
            "grad": jax.grad(loss)(u),
            "jvp": jax.jvp(g, (u,), (v,))[1],
            "vjp": vjp(v)[0],
            "linearize": lin(v),
            "linear_transpose": jax.linear_transpose(lin, u)(v)[0],
            "jacfwd": jax.jacfwd(g)(u),
            "jacrev": jax.jacrev(g)(u),
            # Beyond the peer: derivatives of the linear maps themselves.
            "jvp_of_vjp": jax.jvp(lambda c: vjp(c)[0], (v,), (v,))[1],
            "jacfwd_of_linear": jax.jacfwd(lin)(v),
        }

    got = run(lambda x: tlx.apply_tesseract(t, x))
    want = run(case.ref)
    for name in want:
        assert tree_allclose(got[name], want[name]), name
    assert set(calls) <= set(METHODS)


def test_counts_for_a_jacobian(bratu):
    transport, t, calls = bratu
    case = CASES["bratu"]
    inputs = case.inputs()
    g = lambda u: tlx.apply_tesseract(t, {**inputs, "u": u})["residual"]
    jac = jax.jacfwd(g)(inputs["u"])
    assert tree_allclose(
        jac, jax.jacfwd(lambda u: case.ref({**inputs, "u": u})["residual"])(inputs["u"])
    )
    # `materialize_jacobian=None`: the cheapest; 16 tangents of 16: one request.
    gradient = {k: n for k, n in _stats(t).items() if k != "apply"}
    assert sum(gradient.values()) == 1
    assert _stats(t)["apply"] == 1


@pytest.mark.parametrize("materialize", [True, False])
def test_materialize_jacobian(bratu, materialize):
    transport, t, calls = bratu
    case = CASES["bratu"]
    inputs = case.inputs()
    u = inputs["u"]
    T = jnp.asarray(np.random.default_rng(1).standard_normal((4, *u.shape)))

    def vmapped(apply):
        g = lambda u: apply({**inputs, "u": u})["residual"]
        return jax.vmap(lambda v: jax.jvp(g, (u,), (v,))[1])(T)

    got = vmapped(lambda x: tlx.apply_tesseract(t, x, materialize_jacobian=materialize))
    assert tree_allclose(got, vmapped(case.ref))
    if materialize:
        expected = {"jacobian": 1}
    elif transport == "tlx":
        expected = {"batched_jacobian_vector_product": 1}
    else:
        expected = {"jacobian_vector_product": 4}
    assert {k: n for k, n in _stats(t).items() if k != "apply"} == expected


def test_vmap_method_none_refuses_with_the_choices(bratu):
    _, t, _ = bratu
    inputs = CASES["bratu"].inputs()
    points = jnp.stack([inputs["u"], inputs["u"] + 1])
    with pytest.raises(NotImplementedError) as info:
        jax.vmap(lambda u: tlx.apply_tesseract(t, {**inputs, "u": u}))(points)
    for choice in ("'sequential'", "'expand_dims'", "'broadcast_all'"):
        assert choice in str(info.value)
    with pytest.raises(ValueError, match="Unknown vmap_method: 'loop'"):
        tlx.apply_tesseract(t, inputs, vmap_method="loop")


def test_vmap_sequential(bratu):
    transport, t, calls = bratu
    case = CASES["bratu"]
    inputs = case.inputs()
    points = jnp.stack([inputs["u"] + 0.1 * j for j in range(3)])
    run = lambda apply: jax.vmap(lambda u: apply({**inputs, "u": u})["residual"])(
        points
    )
    got = run(lambda x: tlx.apply_tesseract(t, x, vmap_method="sequential"))
    assert tree_allclose(got, run(case.ref))
    # Where the server takes a batch of points: one request, the same numbers.
    points_sent = {"batched_apply": 1} if transport == "tlx" else {"apply": 3}
    assert _stats(t) == {"abstract_eval": 1, **points_sent}


def _elementwise_ref(x, a):
    a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
    return {"y": a * jnp.sin(x) + x**2, "r": x / jnp.sum(x, axis=-1, keepdims=True)}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("method", ["expand_dims", "broadcast_all"])
def test_stacked_vmap_methods(served, transport, method):
    """One stacked `/apply` for a Tesseract that maps over a leading axis."""
    t, calls = _tesseract(served, ELEMENTWISE, transport)
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.uniform(1.0, 2.0, (3, 5)))
    a = jnp.asarray(rng.uniform(size=5))
    if method == "expand_dims":
        # Both batched: nothing to expand; `a` per point as well.
        a_s = jnp.asarray(rng.uniform(size=(3, 5)))
        got = jax.vmap(
            lambda x, a: tlx.apply_tesseract(t, {"x": x, "a": a}, vmap_method=method)
        )(xs, a_s)
        want = jax.vmap(_elementwise_ref)(xs, a_s)
    else:
        got = jax.vmap(
            lambda x: tlx.apply_tesseract(t, {"x": x, "a": a}, vmap_method=method)
        )(xs)
        want = jax.vmap(lambda x: _elementwise_ref(x, a))(xs)
    assert tree_allclose(got, want)
    assert calls.count("apply") == 1
    assert _stats(t) == {"abstract_eval": 1, "apply": 1}


def test_inputs_are_converted_or_refused(bratu):
    _, t, calls = bratu
    case = CASES["bratu"]
    inputs = case.inputs()

    class Field:
        def __init__(self, u):
            self.u = np.asarray(u)

        def __array__(self, dtype=None, copy=None):
            return self.u

    out = tlx.apply_tesseract(t, {**inputs, "u": Field(inputs["u"]), "k": 1.0})
    assert tree_allclose(out, case.ref({**inputs, "k": jnp.asarray(1.0)}))
    with pytest.raises(TypeError, match="jnp.asarray"):
        tlx.apply_tesseract(t, {**inputs, "u": np.asarray(inputs["u"]).tolist()})
    with pytest.raises(ValueError, match="`u`"):
        jax.jit(lambda u: tlx.apply_tesseract(t, {**inputs, "u": u}))(jnp.zeros(3))
    assert calls == ["apply"]


def test_jac_bwd_operator_with_gmres(bratu):
    """lineax `jac="bwd"` transposes the VJP: the JVP, one request per mat-vec."""
    transport, t, _ = bratu
    case = CASES["bratu"]
    inputs = case.inputs()
    b = jnp.ones_like(inputs["u"])
    solver = lx.GMRES(rtol=1e-10, atol=1e-10)

    def solve(apply):
        fn = lambda u, _: apply({**inputs, "u": u})["residual"]
        op = lx.JacobianLinearOperator(fn, inputs["u"], None, jac="bwd")
        return lx.linear_solve(op, b, solver).value

    assert tree_allclose(solve(lambda x: tlx.apply_tesseract(t, x)), solve(case.ref))
    stats = _stats(t)
    assert set(stats) <= {"abstract_eval", "jacobian_vector_product"}
    assert stats["jacobian_vector_product"] > 0


@pytest.mark.parametrize("name", list(SCHEMA_CASES))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_any_schema(served, name, transport):
    """Lists, dicts, optionals, statics in and out, mixed dtypes, outputs that do not
    depend on every input: one `/apply`, every output."""
    case = SCHEMA_CASES[name]
    t, calls = _tesseract(served, case.path, transport)
    inputs = case.make_inputs()
    assert_outputs(tlx.apply_tesseract(t, inputs), case.ref(inputs), RTOL[name])
    assert calls == ["apply"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gradient_wrt_list_items_and_dict_entries(served, transport):
    case = SCHEMA_CASES["containers"]
    t, _ = _tesseract(served, case.path, transport)
    inputs = case.make_inputs()
    paths = ("xs.[1]", "fields.{a}", "s")

    def loss(apply):
        def fn(leaves):
            new = inputs
            for p in paths:
                new = set_path(new, p, leaves[p])
            out = containers_diff_out(apply(new))
            return sum(jnp.sum(x**2) for x in jax.tree.leaves(out))

        return fn

    leaves = {p: jnp.asarray(get_path(inputs, p)) for p in paths}
    got = jax.grad(loss(lambda x: tlx.apply_tesseract(t, x)))(leaves)
    assert tree_allclose(got, jax.grad(loss(case.ref))(leaves))


@pytest.mark.parametrize("name", ["bratu_vjp_only", "bratu_jacobian_only"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_some_derivative_endpoints_only(served, name, transport):
    case = PARTIAL_CASES[name]
    t, _ = _tesseract(served, case.path, transport)
    inputs = case.inputs()

    def both(apply):
        g = lambda u: apply({**inputs, "u": u})["residual"]
        return jax.jacfwd(g)(inputs["u"]), jax.jacrev(g)(inputs["u"])

    assert tree_allclose(both(lambda x: tlx.apply_tesseract(t, x)), both(case.ref))


def test_identical_calls_under_jit_are_sent_once(served):
    case = CASES["pytree"]
    t, calls = _tesseract(served, case.path, "tlx")
    inputs = case.inputs()
    f = lambda x: tlx.apply_tesseract(t, {**inputs, "x": x})
    twice = jax.jit(lambda x: f(x)["y"] + f(x)["y"])
    assert tree_allclose(twice(inputs["x"]), 2 * case.ref(inputs)["y"])
    assert calls.count("apply") == 1
    # An output nobody reads is not asked for: a call whose result is unused, none.
    calls.clear()
    unused = jax.jit(lambda x: (f(x), 2 * x)[1])
    assert tree_allclose(unused(inputs["x"]), 2 * inputs["x"])
    assert calls == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auto_experimental(served, transport):
    """tesseract-jax's guess, only where the server has not said: stacked for
    `Array[..., dtype]` inputs, one point at a time for fixed ranks."""
    t, calls = _tesseract(served, ELEMENTWISE, transport)
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.uniform(1.0, 2.0, (3, 5)))
    a_s = jnp.asarray(rng.uniform(size=(3, 5)))
    run = lambda x, a: tlx.apply_tesseract(
        t, {"x": x, "a": a}, vmap_method="auto_experimental"
    )
    got = jax.vmap(run)(xs, a_s)
    assert tree_allclose(got, jax.vmap(_elementwise_ref)(xs, a_s))
    sent = {"batched_apply": 1} if transport == "tlx" else {"apply": 1}
    assert _stats(t) == {"abstract_eval": 1, **sent}

    case = CASES["bratu"]
    b, _ = _tesseract(served, case.path, transport)
    inputs = case.inputs()
    points = jnp.stack([inputs["u"], inputs["u"] + 1])
    g = lambda apply, **kw: jax.vmap(lambda u: apply({**inputs, "u": u}, **kw))(points)
    got = g(lambda x: tlx.apply_tesseract(b, x, vmap_method="auto_experimental"))
    assert tree_allclose(got, g(case.ref))
    sent = {"batched_apply": 1} if transport == "tlx" else {"apply": 2}
    assert _stats(b) == {"abstract_eval": 1, **sent}


def test_second_derivatives_are_refused(bratu):
    _, t, _ = bratu
    inputs = CASES["bratu"].inputs()
    g = lambda u: tlx.apply_tesseract(t, {**inputs, "u": u})["residual"]
    loss = lambda u: jnp.sum(g(u) ** 2)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        jax.hessian(loss)(inputs["u"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_tesseracts_own_error(served, transport):
    t, _ = _tesseract(served, PARTIAL / "raising" / "tesseract_api.py", transport)
    with pytest.raises(tlx.TesseractServerError) as info:
        tlx.apply_tesseract(t, {"x": jnp.array([-1.0, 2.0])})
    assert info.value.status == 500 and info.value.endpoint == "apply"
    if transport == "stock":
        assert "TESSERACT_DEBUG=1" in str(info.value)
    else:
        assert "ValueError: x[0] must be >= 0" in str(info.value)
