"""Never silent: what was asked is done, or the nearest correct thing is done and
said (a `tlx.FallbackWarning` and a `Decision`), or it is refused.

- `OnServer` recognises optimistix's operators on any Tesseract (two outputs, several
  inputs and outputs, nested paths, static arguments, float32, NumPy): a Newton step
  is 2 requests, against pure JAX;
- where it cannot send a solve, it solves here and says why; `allow_local=False`
  raises; options (`y0`, a preconditioner) are honoured or the solve runs here;
- an output nobody uses is not asked for (dead-code rules of the primitives);
- settings survive every rebuilt module (`as_matrix` keeps `check_finite`);
- complex arrays are refused for derivatives before any request.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
import tesseract_lx as tlx
from jax.interpreters import partial_eval as pe

from conftest import fresh
from helpers import ALL_CASES, PARTIAL, Tol, VJP
from references import (
    bratu_inputs,
    pytree_inputs,
    pytree_ref,
    springs_inputs,
    springs_ref,
)


jax.config.update("jax_enable_x64", True)

SPRINGS = {
    "springs": PARTIAL / "springs" / "tesseract_api.py",
    "springs_numpy": PARTIAL / "springs_numpy" / "tesseract_api.py",
}
TOL = Tol(rtol=1e-12, atol=1e-12)


def _ref_fn(y, args):
    return springs_ref({**args, "x": y})["residual"]


@pytest.fixture
def springs(served, tesseract, transport):
    client = fresh(served.get(SPRINGS[tesseract], transport))
    f = tlx.TesseractModule(client)
    inputs = springs_inputs()
    f(inputs)  # learns the output shapes: no `/abstract_eval` below
    client.stats.clear()
    return client, f, inputs


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_newton_on_server_with_two_outputs(springs, tesseract, transport):
    """Newton + `OnServer(GMRES)` on the residual of a Tesseract that also outputs an
    energy: 2 requests per step (the linearised map asks for the residual only), and
    the implicit gradient one more solve and one VJP; against pure JAX."""
    client, f, inputs = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    args = {p: inputs[p] for p in ("k", "c", "f")}
    x0 = inputs["x"]
    on_server = tlx.OnServer(lx.GMRES(**TOL))
    newton = optx.Newton(rtol=1e-10, atol=1e-10, linear_solver=on_server)
    ref_newton = optx.Newton(rtol=1e-10, atol=1e-10)

    with warnings.catch_warnings():
        warnings.simplefilter("error", tlx.FallbackWarning)
        sol = optx.root_find(fn, newton, x0, args)
    ref = optx.root_find(_ref_fn, ref_newton, x0, args)
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    steps = int(sol.stats["num_steps"])
    assert steps == int(ref.stats["num_steps"])
    assert client.stats == {"apply": steps, "linear_solve": steps}
    assert not client.decisions

    def loss(k, fn, solver, adjoint):
        root = optx.root_find(fn, solver, x0, {**args, "k": k}, adjoint=adjoint)
        return jnp.sum(root.value**2)

    client.stats.clear()
    adjoint = optx.ImplicitAdjoint(linear_solver=on_server)
    grad = jax.grad(loss)(args["k"], fn, newton, adjoint)
    want = jax.grad(loss)(args["k"], _ref_fn, ref_newton, optx.ImplicitAdjoint())
    np.testing.assert_allclose(grad, want, rtol=1e-8)
    assert client.stats == {"apply": steps, "linear_solve": steps + 1, VJP: 1}


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_several_inputs_and_outputs_on_server(springs, tesseract, transport):
    """The operator optimistix would build for `y = {x, k}` and both outputs (a dict
    keyed by path each way, 17 -> 17): one `/linear_solve`, against pure JAX."""
    client, f, inputs = springs
    fn = tlx.residual_fn(f, wrt=("x", "k"), of=("residual", "energy"))
    y = {"x": inputs["x"] + 0.3, "k": inputs["k"]}
    args = {"c": inputs["c"], "f": inputs["f"]}
    J = lx.JacobianLinearOperator(fn, y, args)

    def ref(y):
        out = springs_ref({**args, **y})
        return jnp.concatenate([out["residual"], out["energy"][None]])

    flat = lambda d: jnp.concatenate([jnp.ravel(d["x"]), jnp.ravel(d["k"])])  # noqa: E731
    M = jnp.concatenate([jax.jacfwd(ref)(y)[p].reshape(17, -1) for p in ("x", "k")], 1)
    b = {"residual": jnp.linspace(-1.0, 1.0, 16), "energy": jnp.asarray(0.5)}
    client.stats.clear()
    x = lx.linear_solve(J, b, tlx.OnServer(lx.LSMR(**TOL))).value
    want = jnp.linalg.solve(M, jnp.concatenate([b["residual"], b["energy"][None]]))
    np.testing.assert_allclose(flat(x), want, rtol=1e-8, atol=1e-10)
    assert client.stats == {"linear_solve": 1} and not client.decisions


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_nested_paths_and_static_arguments_on_server(served, transport):
    """`params.b` and `x` in, `y` and `stats.*` out, a static int `power` and a
    non-differentiable `offset` in `args`: optimistix's linearised operator goes to
    the server (LSMR: 6 -> 7), vmapped too."""
    client = fresh(served.get(ALL_CASES["pytree"].path, transport))
    f = tlx.TesseractModule(client)
    inputs = pytree_inputs(5)
    f(inputs)
    fn = tlx.residual_fn(f, wrt=("params.b", "x"), of=("y", "stats.norm", "stats.mean"))
    y = {"params.b": inputs["params"]["b"], "x": inputs["x"]}
    args = {**inputs, "params": {"a": inputs["params"]["a"], "b": None}}
    J = lx.linearise(lx.JacobianLinearOperator(fn, y, args))

    def ref(b, x):
        out = pytree_ref({**inputs, "params": {**inputs["params"], "b": b}, "x": x})
        return jnp.concatenate(
            [out["y"], out["stats"]["norm"][None], out["stats"]["mean"][None]]
        )

    M = jnp.concatenate(
        [j.reshape(7, -1) for j in jax.jacfwd(ref, (0, 1))(y["params.b"], y["x"])], 1
    )
    rng = np.random.default_rng(0)
    b = {
        "y": jnp.asarray(rng.normal(size=5)),
        "stats.norm": jnp.asarray(1.0),
        "stats.mean": jnp.asarray(-0.5),
    }
    flat_b = jnp.concatenate([b["y"], b["stats.norm"][None], b["stats.mean"][None]])
    solver = tlx.OnServer(lx.LSMR(**TOL), allow_local=False)
    client.stats.clear()
    x = lx.linear_solve(J, b, solver).value
    got = jnp.concatenate([x["params.b"][None], x["x"]])
    np.testing.assert_allclose(
        got, jnp.linalg.lstsq(M, flat_b)[0], rtol=1e-8, atol=1e-10
    )
    xs = jax.vmap(lambda v: lx.linear_solve(J, v, solver).value)(
        jax.tree.map(lambda v: jnp.stack([v, -2 * v]), b)
    )
    np.testing.assert_allclose(xs["x"][1], -2 * x["x"], rtol=1e-8, atol=1e-10)
    assert client.stats == {"linear_solve": 2}


@pytest.mark.parametrize("transport", ["tlx"])
def test_float32_operator_on_server(served, transport):
    """A float32 input and output of a Tesseract that mixes dtypes: optimistix's
    operator in float32, one `/linear_solve`, the solution in float32."""
    from schema_cases import SCHEMA_CASES

    case = SCHEMA_CASES["mixed_dtypes"]
    client = fresh(served.get(case.path, transport))
    f = tlx.TesseractModule(client)
    inputs = case.make_inputs()
    f(inputs)
    fn = tlx.residual_fn(f, wrt="a", of="y32")
    args = {k: v for k, v in inputs.items() if k != "a"}
    J = lx.linearise(lx.JacobianLinearOperator(fn, inputs["a"], args))
    M = jax.jacfwd(lambda a: case.ref({**inputs, "a": a})["y32"])(inputs["a"])
    b = jnp.linspace(0.5, 1.5, M.shape[0], dtype=jnp.float32)
    client.stats.clear()
    x = lx.linear_solve(J, b, tlx.OnServer(lx.GMRES(rtol=1e-5, atol=1e-5))).value
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, jnp.linalg.solve(M, b), rtol=1e-3)
    assert client.stats == {"linear_solve": 1} and not client.decisions


def test_dead_outputs_are_not_asked_for(served):
    """`jax.linearize` of one output of a two-output Tesseract: the linear map's JVP
    asks for that output only, once dead code is eliminated (as jit does)."""
    client = fresh(served.get(SPRINGS["springs"], "tlx"))
    f = tlx.TesseractModule(client)
    inputs = springs_inputs()
    g = lambda x: f({**inputs, "x": x})["residual"]  # noqa: E731
    _, lin = jax.linearize(g, inputs["x"] + 0.1)
    closed = jax.make_jaxpr(lin)(inputs["x"])
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True], True)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "tesseract_jvp"]
    assert eqn.params["jvp_out"] == (0,)  # `residual`, not `energy`
    # A VJP of which one input cotangent is used asks for that one only.
    _, vjp = jax.vjp(
        lambda x, k: f({**inputs, "x": x, "k": k})["energy"], inputs["x"], inputs["k"]
    )
    closed = jax.make_jaxpr(lambda ct: vjp(ct)[1])(jnp.asarray(1.0))
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True], True)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "tesseract_vjp"]
    assert [
        client_path
        for client_path in (
            eqn.params["call"].in_paths[i] for i in eqn.params["vjp_in"]
        )
    ] == ["k"]
    client.stats.clear()
    np.testing.assert_allclose(
        jax.jit(lambda ct: vjp(ct)[1])(jnp.asarray(1.0)),
        jax.grad(lambda k: springs_ref({**inputs, "k": k})["energy"])(inputs["k"]),
    )
    assert client.stats == {VJP: 1}


#
# Fallbacks: said, recorded, or refused
#


@pytest.mark.parametrize("transport", ["stock"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_stock_server_solves_here_and_says_so(springs, tesseract, transport):
    """No `/linear_solve`: one warning and one decision per compiled solve, the same
    numbers; `allow_local=False` raises, naming the reason, before any request."""
    client, f, inputs = springs
    J = tlx.TesseractJacobianOperator(
        f, {**inputs, "x": inputs["x"] + 0.2}, "x", "residual"
    )
    b = jnp.linspace(0.0, 1.0, 16)
    solve = jax.jit(
        lambda b: lx.linear_solve(J, b, tlx.OnServer(lx.GMRES(**TOL))).value
    )
    with pytest.warns(tlx.FallbackWarning, match="does not offer `/linear_solve`"):
        x = solve(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlx.FallbackWarning)
        solve(2 * b)  # compiled: nothing more to say
    (decision,) = [d for d in client.decisions if d.kind == "linear_solve"]
    assert decision.chosen == "local" and "/linear_solve" in decision.reason
    M = jax.jacfwd(lambda x: springs_ref({**inputs, "x": x})["residual"])(
        inputs["x"] + 0.2
    )
    np.testing.assert_allclose(x, jnp.linalg.solve(M, b), rtol=1e-8)
    client.stats.clear()
    strict = tlx.OnServer(lx.GMRES(**TOL), allow_local=False)
    with pytest.raises(
        ValueError, match="allow_local=False.*does not offer `/linear_solve`"
    ):
        lx.linear_solve(J, b, strict)
    assert not client.stats


def test_an_operator_of_no_tesseract_solves_here_and_says_so():
    A = lx.MatrixLinearOperator(jnp.eye(3) * 2.0)
    with pytest.warns(tlx.FallbackWarning, match="not a Tesseract's Jacobian"):
        x = lx.linear_solve(A, jnp.ones(3), tlx.OnServer(lx.GMRES(**TOL))).value
    np.testing.assert_allclose(x, 0.5 * jnp.ones(3))
    with pytest.raises(ValueError, match="not a Tesseract's Jacobian"):
        lx.linear_solve(
            A, jnp.ones(3), tlx.OnServer(lx.GMRES(**TOL), allow_local=False)
        )


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_a_map_that_is_not_one_jvp_solves_here(springs, tesseract, transport):
    """`J + I` is not a Tesseract's Jacobian: solved here, said, with the client's
    decision recorded."""
    client, f, inputs = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    args = {p: inputs[p] for p in ("k", "c", "f")}
    shifted = lambda y, a: fn(y, a) + y  # noqa: E731
    J = lx.linearise(lx.JacobianLinearOperator(shifted, inputs["x"], args))
    with pytest.warns(tlx.FallbackWarning, match="not a single Tesseract JVP"):
        lx.linear_solve(J, jnp.ones(16), tlx.OnServer(lx.GMRES(**TOL)))
    assert [d.chosen for d in client.decisions] == ["local"]
    assert "linear_solve" not in client.stats


@pytest.mark.parametrize("transport", ["tlx", "stock"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_initial_guess_goes_with_the_solve(springs, tesseract, transport):
    """`options={"y0": ...}`: sent with the solve where the server says it takes one
    (the exact solution as the guess: at most one step), solved here and said
    otherwise; a misshapen `y0` is refused as lineax refuses it."""
    client, f, inputs = springs
    point = {**inputs, "x": inputs["x"] + 0.2}
    J = tlx.TesseractJacobianOperator(f, point, "x", "residual")
    M = jax.jacfwd(lambda x: springs_ref({**point, "x": x})["residual"])(point["x"])
    b = jnp.linspace(0.0, 1.0, 16)
    exact = jnp.linalg.solve(M, b)
    solver = tlx.OnServer(lx.GMRES(**TOL))
    takes_y0 = "y0" in client.capabilities.linear_solve_options
    assert takes_y0 == (transport == "tlx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = lx.linear_solve(J, b, solver, options={"y0": exact})
    np.testing.assert_allclose(sol.value, exact, rtol=1e-8, atol=1e-12)
    said = [w for w in caught if issubclass(w.category, tlx.FallbackWarning)]
    if takes_y0:
        assert client.stats == {"linear_solve": 1} and not said
        # As many steps as lineax takes from the same guess, fewer than from zero.
        ref = lambda **o: lx.linear_solve(  # noqa: E731
            lx.MatrixLinearOperator(M), b, lx.GMRES(**TOL), **o
        )
        steps = int(sol.stats["num_steps"])
        assert steps == int(ref(options={"y0": exact}).stats["num_steps"])
        assert steps < int(ref().stats["num_steps"])
    else:
        assert "linear_solve" not in client.stats and said
    with pytest.raises(ValueError, match="`y0` must have the same structure"):
        lx.linear_solve(J, b, solver, options={"y0": jnp.zeros(15)})


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_a_preconditioner_solves_here(springs, tesseract, transport):
    """A preconditioner is an operator of this process: the solve runs here with it,
    and says so (or raises with `allow_local=False`, naming the option)."""
    client, f, inputs = springs
    point = {**inputs, "x": inputs["x"] + 0.2}
    J = tlx.TesseractJacobianOperator(
        f, point, "x", "residual", tags=lx.positive_semidefinite_tag
    )
    P = lx.MatrixLinearOperator(jnp.eye(16) * 0.5, lx.positive_semidefinite_tag)
    b = jnp.linspace(0.0, 1.0, 16)
    options = {"preconditioner": P}
    with pytest.warns(tlx.FallbackWarning, match="preconditioner"):
        x = lx.linear_solve(J, b, tlx.OnServer(lx.CG(**TOL)), options=options).value
    M = jax.jacfwd(lambda x: springs_ref({**point, "x": x})["residual"])(point["x"])
    np.testing.assert_allclose(x, jnp.linalg.solve(M, b), rtol=1e-8)
    assert "linear_solve" not in client.stats
    with pytest.raises(ValueError, match="preconditioner"):
        lx.linear_solve(
            J, b, tlx.OnServer(lx.CG(**TOL), allow_local=False), options=options
        )


@pytest.mark.parametrize("transport", ["stock"])
@pytest.mark.parametrize("tesseract", ["springs"])
@pytest.mark.parametrize("rule", [tlx.Batched(), tlx.Batched(max_batch=2)])
def test_a_rule_the_server_does_not_serve_is_said(springs, tesseract, transport, rule):
    """`Batched` on a stock server: the cheapest rule it serves instead, one warning,
    a decision naming why; the numbers are right."""
    client, _, inputs = springs
    f = tlx.TesseractModule(client, batching=rule)
    g = lambda x: f({**inputs, "x": x})["residual"]  # noqa: E731
    with pytest.warns(
        tlx.FallbackWarning, match="`batched` .asked by `batched`. is not served here"
    ):
        jac = jax.jacfwd(g)(inputs["x"] + 0.1)
    want = jax.jacfwd(lambda x: springs_ref({**inputs, "x": x})["residual"])(
        inputs["x"] + 0.1
    )
    np.testing.assert_allclose(jac, want, rtol=1e-10, atol=1e-12)
    assert [d.chosen for d in client.decisions] != []
    assert all(
        "is not served here" in d.reason and d.fallback for d in client.decisions
    )


#
# Settings survive; complex numbers are refused
#


def test_with_batching_keeps_every_other_setting(served):
    client = served.get(ALL_CASES["bratu"].path, "tlx")
    f = tlx.TesseractModule(
        client,
        "concurrent",
        strict_dtype=False,
        vmap_method="sequential",
        check_finite=True,
    )
    g = f.with_batching(tlx.Jacobian())
    assert isinstance(g.batching, tlx.Jacobian)
    for field in dataclasses.fields(f):
        if field.name != "batching":
            assert getattr(g, field.name) == getattr(f, field.name), field.name


@pytest.mark.parametrize("transport", ["tlx", "stock"])
def test_as_matrix_keeps_check_finite(served, transport):
    """An Inf in the Jacobian (exp overflows) with `check_finite=True`: `lx.LU()`
    materialises the operator and refuses the answer, naming the path, rather than
    returning a solution."""
    client = fresh(served.get(ALL_CASES["bratu"].path, transport))
    f = tlx.TesseractModule(client, check_finite=True)
    inputs = {**bratu_inputs(3), "u": jnp.full((3, 3), 800.0)}
    J = tlx.TesseractJacobianOperator(f, inputs, "u", "residual")
    with pytest.raises(Exception, match="Inf at `residual`.*check_finite=True"):
        lx.linear_solve(J, jnp.ones((3, 3)), lx.LU())
    with pytest.raises(Exception, match="Inf at `residual`"):
        lx.linear_solve(J.T, jnp.ones((3, 3)), lx.LU())
    with pytest.raises(Exception, match="Inf at `residual`"):
        lx.diagonal(J)


COMPLEX = PARTIAL / "complex" / "tesseract_api.py"


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_complex_derivatives_are_refused_before_any_request(served, transport):
    client = fresh(served.get(COMPLEX, transport))
    f = tlx.TesseractModule(client)
    z = jnp.array([1 + 2j, 3 - 1j])
    inputs = {"z": z, "a": jnp.asarray(2.0)}
    np.testing.assert_allclose(f(inputs)["w"], z**2 + 2.0 * z)  # applying is fine
    client.stats.clear()
    w = lambda a: f({**inputs, "a": a})["w"]  # noqa: E731
    attempts = (
        lambda: jax.jvp(w, (inputs["a"],), (jnp.asarray(1.0),)),
        lambda: jax.jacfwd(w)(inputs["a"]),
        lambda: jax.vjp(lambda z: f({**inputs, "z": z})["w"], z),
        lambda: tlx.TesseractJacobianOperator(f, inputs, "z", "w"),
        lambda: tlx.TesseractJacobianOperator(f, inputs, "a", "w"),
    )
    for attempt in (*attempts, *map(jax.jit, attempts[:3])):
        with pytest.raises(TypeError, match="complex arrays: `"):
            attempt()
    # Eagerly, the forward `/apply` goes first (it is no derivative); nothing else.
    assert set(client.stats) <= {"apply"}
    client.stats.clear()
    with pytest.raises(TypeError, match="complex arrays: `w`"):
        jax.jit(jax.jacrev(lambda a: f({**inputs, "a": a})["w"].real))(inputs["a"])
    assert not client.stats
