"""`tlx.OnServer`: the Krylov loop next to the Tesseract, one request per solve.

Every lineax iterative solver, single and vmapped right-hand sides, transposed
solves, gradients through the solve, optimistix's Newton and ImplicitAdjoint, on a JAX
Tesseract (the server's compiled linearisation) and on a NumPy one (its JVP/VJP
functions called in process at every iteration), against the same maths in pure JAX
and lineax, with the requests counted exactly. On a stock server the solve runs
locally: the same numbers, one request per mat-vec, and a recorded decision.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
import requests
import tesseract_lx as tlx
from tesseract_lx._wire import binary
from tesseract_lx._wire.encoding import decode_tree, encode_tree

from conftest import fresh
from helpers import ALL_CASES, PARTIAL, Tol, VJP
from references import (
    bratu_inputs,
    bratu_ref,
    poisson_inputs,
    poisson_ref,
    pytree_inputs,
    pytree_ref,
)


jax.config.update("jax_enable_x64", True)

N = 4
TOL = Tol(rtol=1e-12, atol=1e-12)
SOLVERS = {
    "gmres": lx.GMRES(**TOL),
    "bicgstab": lx.BiCGStab(**TOL),
    "lsmr": lx.LSMR(**TOL),
    "normal_cg": lx.Normal(lx.CG(**TOL)),
}
NUMPY = PARTIAL / "numpy_loop" / "tesseract_api.py"


@pytest.fixture
def bratu(served, transport):
    return fresh(served.get(ALL_CASES["bratu"].path, transport))


def _jacobian(ref, inputs, wrt, of):
    """The pure-JAX Jacobian as a matrix."""
    g = lambda x: ref({**inputs, wrt: x})[of]  # noqa: E731
    n = np.size(inputs[wrt])
    return jax.jacfwd(g)(inputs[wrt]).reshape(-1, n)


def _rhs(shape, k=None, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape if k is None else (k, *shape)))


# Every solver both ways on the tesseract-lx server; in process and on a stock server
# (the local fallback), GMRES: the transport is not what differs between solvers.
SOLVE_CASES = [
    *(("tlx", solver, t) for solver in SOLVERS for t in (False, True)),
    ("inprocess", "gmres", False),
    ("stock", "gmres", False),
]


@pytest.mark.parametrize("transport,solver,transpose", SOLVE_CASES)
def test_every_solver_single_and_vmapped(bratu, transport, solver, transpose):
    f = tlx.TesseractModule(bratu)
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    J = J.T if transpose else J
    M = _jacobian(bratu_ref, inputs, "u", "residual")
    M = M.T if transpose else M
    on_server = tlx.OnServer(SOLVERS[solver])
    solve = jax.jit(lambda b: lx.linear_solve(J, b, on_server).value)
    B = _rhs((N, N), k=3)

    bratu.stats.clear()
    x = solve(B[0])
    np.testing.assert_allclose(x.reshape(-1), jnp.linalg.solve(M, B[0].reshape(-1)))
    X = jax.vmap(solve)(B)
    want = jnp.linalg.solve(M, B.reshape(3, -1).T).T
    np.testing.assert_allclose(X.reshape(3, -1), want, rtol=1e-8, atol=1e-10)
    if transport == "stock":
        # No `/linear_solve`: lineax runs here, one request per mat-vec.
        assert "linear_solve" not in bratu.stats and sum(bratu.stats.values()) > 2
        assert any(d.chosen == "local" for d in bratu.decisions)
    else:
        assert bratu.stats == {"linear_solve": 2}


@pytest.mark.parametrize("transport", ["tlx"])
def test_cg_on_a_positive_definite_jacobian(served, transport):
    client = served.get(ALL_CASES["poisson"].path, transport)
    inputs = poisson_inputs(N)
    J = tlx.TesseractJacobianOperator(
        tlx.TesseractModule(client), inputs, "x", "y", tags=lx.positive_semidefinite_tag
    )
    b = _rhs((N, N))
    client.stats.clear()
    x = lx.linear_solve(J, b, tlx.OnServer(lx.CG(**TOL))).value
    M = _jacobian(poisson_ref, inputs, "x", "y")
    np.testing.assert_allclose(x.reshape(-1), jnp.linalg.solve(M, b.reshape(-1)))
    assert client.stats == {"linear_solve": 1}


@pytest.mark.parametrize("transport", ["tlx", "stock"])
def test_linear_operator(served, transport):
    """A `TesseractLinearOperator` (its `mv` an `/apply`): its Jacobian is the
    operator, so the solve goes to the server; a stock server solves locally, one
    `/apply` per iteration, and says so."""
    client = fresh(served.get(ALL_CASES["poisson"].path, transport))
    inputs = poisson_inputs(N)
    A = tlx.TesseractLinearOperator(
        tlx.TesseractModule(client), inputs, "x", "y", tags=lx.positive_semidefinite_tag
    )
    M = _jacobian(poisson_ref, inputs, "x", "y")
    bs = _rhs((N, N), k=3)
    solver = tlx.OnServer(lx.CG(**TOL))
    client.stats.clear()  # the output shapes, learnt for the operator's structure
    local = []
    x = lx.linear_solve(A, bs[0], solver).value
    local += [d.chosen for d in client.decisions if d.kind == "linear_solve"]
    client.decisions.clear()
    xs = jax.vmap(lambda b: lx.linear_solve(A, b, solver).value)(bs)
    local += [d.chosen for d in client.decisions if d.kind == "linear_solve"]
    for got, b in zip((x, *xs), (bs[0], *bs)):
        np.testing.assert_allclose(got.reshape(-1), jnp.linalg.solve(M, b.reshape(-1)))
    if transport == "tlx":
        assert client.stats == {"linear_solve": 2} and local == []
    else:
        assert set(client.stats) == {"apply", "batched_apply"} or set(client.stats) == {
            "apply"
        }
        # Recorded as the solve is traced (a cached trace records nothing more).
        assert client.stats["apply"] > N and local[:1] == ["local"]


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_gradients_through_the_solve(bratu, transport):
    """`jax.grad` and `jax.jvp` of a solve w.r.t. its right-hand side: one more solve
    request each (the transposed solve, resp. the same), never one per iteration."""
    f = tlx.TesseractModule(bratu)
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    M = _jacobian(bratu_ref, inputs, "u", "residual")
    solver = tlx.OnServer(lx.GMRES(**TOL))
    b, t = _rhs((N, N)), _rhs((N, N), seed=2)

    def loss(b, solve):
        return jnp.sum(jnp.sin(solve(b)))

    ours = lambda b: lx.linear_solve(J, b, solver).value.reshape(-1)  # noqa: E731
    ref = lambda b: jnp.linalg.solve(M, b.reshape(-1))  # noqa: E731
    bratu.stats.clear()
    np.testing.assert_allclose(
        jax.grad(loss)(b, ours), jax.grad(loss)(b, ref), rtol=1e-8, atol=1e-12
    )
    assert bratu.stats == {"linear_solve": 2}
    bratu.stats.clear()
    np.testing.assert_allclose(
        jax.jvp(ours, (b,), (t,))[1], jax.jvp(ref, (b,), (t,))[1], rtol=1e-8
    )
    assert bratu.stats == {"linear_solve": 2}


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_newton_and_implicit_adjoint(bratu, transport):
    """optimistix's Newton hands the solver its own operator (`jax.linearize` of the
    residual): recognised as one Tesseract JVP, so a step is 2 requests; the gradient
    through the root costs one solve request (and the VJP w.r.t. the parameter)."""
    f = tlx.TesseractModule(bratu)
    fn = tlx.residual_fn(f, wrt="u", of="residual")
    inputs = bratu_inputs(N)
    args = {"k": inputs["k"], "f": inputs["f"]}
    u0 = jnp.zeros((N, N))
    on_server = tlx.OnServer(lx.GMRES(**TOL))
    newton = optx.Newton(rtol=1e-10, atol=1e-10, linear_solver=on_server)
    ref_fn = lambda y, a: bratu_ref({**a, "u": y})["residual"]  # noqa: E731
    ref_newton = optx.Newton(rtol=1e-10, atol=1e-10)

    f({**args, "u": u0})  # learns the output shapes: no `/abstract_eval` below
    bratu.stats.clear()
    sol = optx.root_find(fn, newton, u0, args)
    ref = optx.root_find(ref_fn, ref_newton, u0, args)
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    steps = int(sol.stats["num_steps"])
    assert bratu.stats == {"apply": steps, "linear_solve": steps}

    adjoint = optx.ImplicitAdjoint(linear_solver=on_server)

    def loss(k, fn, solver, adjoint):
        root = optx.root_find(fn, solver, u0, {**args, "k": k}, adjoint=adjoint)
        return jnp.sum(root.value**2)

    bratu.stats.clear()
    grad = jax.grad(loss)(args["k"], fn, newton, adjoint)
    want = jax.grad(loss)(args["k"], ref_fn, ref_newton, optx.ImplicitAdjoint())
    np.testing.assert_allclose(grad, want, rtol=1e-8)
    assert bratu.stats == {"apply": steps, "linear_solve": steps + 1, VJP: 1}


def test_function_only_tesseract(served):
    """A NumPy Tesseract: the server's Krylov loop calls its JVP in process, and its
    VJP for the transpose (a transposed solve; LSMR and Normal, which need both)."""
    client = served.get(NUMPY, "tlx")
    assert dict(client.capabilities.modes)["linear_solve"] == "function"
    x = jnp.linspace(0.1, 1.0, 6)
    inputs = {"x": x, "a": 2.0}
    f = tlx.TesseractModule(client)
    f(inputs)  # no `/abstract_eval`: one eager call teaches the output shapes
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="x", of="y")
    diag = 2.0 * jnp.cos(x)
    b = _rhs((6,))
    cases = (
        (J, lx.GMRES(**TOL)),
        (J.T, lx.BiCGStab(**TOL)),
        (J, lx.LSMR(**TOL)),
        (J, lx.Normal(lx.CG(**TOL))),
    )
    for op, solver in cases:
        client.stats.clear()
        client.decisions.clear()
        sol = lx.linear_solve(op, b, tlx.OnServer(solver))
        np.testing.assert_allclose(sol.value, b / diag, rtol=1e-8)
        assert client.stats == {"linear_solve": 1} and not client.decisions


def test_both_ways_without_a_vjp_runs_here(served):
    """LSMR needs the transpose inside the solve; a NumPy Tesseract without a VJP
    cannot give it on the server, so `OnServer` runs LSMR here (its VJPs from JVPs of
    the basis) and says why; sent anyway, the server refuses it, naming the solver."""
    client = served.get(PARTIAL / "numpy_jvp_only" / "tesseract_api.py", "tlx")
    x = jnp.linspace(0.1, 1.0, 6)
    inputs = {"x": x, "a": 2.0}
    f = tlx.TesseractModule(client)
    f(inputs)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="x", of="y")
    b = _rhs((6,))
    client.stats.clear()
    client.decisions.clear()
    sol = lx.linear_solve(J, b, tlx.OnServer(lx.LSMR(**TOL)))
    np.testing.assert_allclose(sol.value, b / (2.0 * jnp.cos(x)), rtol=1e-8)
    assert "linear_solve" not in client.stats
    (decision,) = [d for d in client.decisions if d.kind == "linear_solve"]
    assert decision.chosen == "local" and "LSMR needs the transpose" in decision.reason
    payload = {
        "inputs": {"x": np.asarray(x).tolist(), "a": 2.0},
        "jvp_inputs": ["x"],
        "jvp_outputs": ["y"],
        "rhs": {"y": [np.asarray(b).tolist()]},
        "solver": {"name": "LSMR", "rtol": 1e-8, "atol": 1e-8},
    }
    answer = requests.post(f"{client.urls[0]}/linear_solve", json=payload, timeout=60)
    assert answer.status_code == 422, answer.text
    assert "LSMR needs the transpose" in answer.text and "solver" in answer.text


@pytest.mark.parametrize("transport", ["tlx"])
def test_failed_solve_reports_lineax_result(bratu, transport):
    f = tlx.TesseractModule(bratu)
    J = tlx.TesseractJacobianOperator(f, bratu_inputs(N), wrt="u", of="residual")
    solver = tlx.OnServer(lx.GMRES(rtol=1e-14, atol=1e-14, max_steps=1, restart=2))
    sol = lx.linear_solve(J, _rhs((N, N)), solver, throw=False)
    assert sol.result == lx.RESULTS.max_steps_reached
    with pytest.raises(Exception, match="maximum number of solver steps"):
        lx.linear_solve(J, _rhs((N, N)), solver)


def test_solver_that_cannot_travel():
    with pytest.raises(TypeError, match="cannot run on the server"):
        tlx.OnServer(lx.LU())


@pytest.mark.parametrize("transport", ["tlx"])
def test_bad_solve_requests_get_422_naming_the_field(bratu, transport):
    url = bratu.urls[0]
    inputs = {k: np.asarray(v) for k, v in bratu_inputs(N).items()}
    good = {
        "inputs": inputs,
        "jvp_inputs": ["u"],
        "jvp_outputs": ["residual"],
        "rhs": {"residual": np.ones((2, N, N))},
        "solver": {"name": "GMRES", "rtol": 1e-8, "atol": 1e-8},
    }
    cases = {
        "solver": {**good, "solver": {"name": "QR"}},
        "rtol": {**good, "solver": {"name": "CG", "rtol": -1.0, "atol": 0.0}},
        "rhs": {**good, "rhs": {"u": np.ones((2, N, N))}},
        "residual": {**good, "rhs": {"residual": np.ones((2, N + 1, N))}},
    }
    for field, payload in cases.items():
        r = requests.post(
            f"{url}/linear_solve",
            data=binary.encode(payload),
            headers={"Content-Type": binary.MEDIA_TYPE},
            timeout=30,
        )
        assert r.status_code == 422, (field, r.text)
        assert field in str(r.json()["detail"][0]["loc"]), (field, r.text)
    r = requests.post(
        f"{url}/linear_solve",
        data=binary.encode(good),
        headers={"Content-Type": binary.MEDIA_TYPE, "Accept": binary.MEDIA_TYPE},
        timeout=30,
    )
    assert r.status_code == 200
    answer = binary.decode(r.content)
    assert answer["result"] == ["successful", "successful"]
    # tesseract-core's JSON, as any client sends it: the same answer.
    r = requests.post(f"{url}/linear_solve", json=encode_tree(good), timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        decode_tree(r.json())["solution"]["u"], answer["solution"]["u"]
    )


@pytest.mark.parametrize("transport", ["tlx"])
def test_two_operators_of_the_same_shapes(bratu, transport):
    """`d residual / d u` and `d residual / d f` at one point have the same shapes:
    the server compiles a solve per signature, and the paths are part of it."""
    f = tlx.TesseractModule(bratu)
    inputs = bratu_inputs(N)
    b = _rhs((N, N))
    solver = tlx.OnServer(lx.GMRES(**TOL))
    for wrt in ("u", "f"):
        J = tlx.TesseractJacobianOperator(f, inputs, wrt=wrt, of="residual")
        M = _jacobian(bratu_ref, inputs, wrt, "residual")
        x = lx.linear_solve(J, b, solver).value
        np.testing.assert_allclose(x.reshape(-1), jnp.linalg.solve(M, b.reshape(-1)))


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_operator_over_several_paths_with_a_scalar(served, transport):
    """An operator whose vectors are dicts keyed by path, one of them a 0-d array
    (`params.b`, `stats.mean`): single, transposed and vmapped solves, one request
    each, against pure JAX's least squares on the materialised Jacobian."""
    client = fresh(served.get(ALL_CASES["pytree"].path, transport))
    f = tlx.TesseractModule(client)
    inputs = pytree_inputs(5)
    wrt, of = ("params.b", "x"), ("y", "stats.norm", "stats.mean")  # 6 -> 7
    J = tlx.TesseractJacobianOperator(f, inputs, wrt=wrt, of=of)

    def g(b, x):
        params = {**inputs["params"], "b": b}
        out = pytree_ref({**inputs, "params": params, "x": x})
        return jnp.concatenate(
            [out["y"], out["stats"]["norm"][None], out["stats"]["mean"][None]]
        )

    M = jnp.concatenate(
        [
            j.reshape(7, -1)
            for j in jax.jacfwd(g, (0, 1))(inputs["params"]["b"], inputs["x"])
        ],
        axis=1,
    )
    flat = lambda tree, paths: jnp.concatenate(  # noqa: E731
        [jnp.ravel(tree[p]) for p in paths]
    )
    rng = np.random.default_rng(3)
    b = {"y": rng.normal(size=5), "stats.norm": rng.normal(), "stats.mean": 0.5}
    b = jax.tree.map(jnp.asarray, b)
    bs = jax.tree.map(lambda v: jnp.stack([v, 2 * v, -v]), b)
    ct = {"params.b": jnp.asarray(0.3), "x": jnp.asarray(rng.normal(size=5))}
    solvers = (tlx.OnServer(lx.LSMR(**TOL)), tlx.OnServer(lx.Normal(lx.CG(**TOL))))
    for solver in solvers:
        client.stats.clear()
        x = lx.linear_solve(J, b, solver).value
        assert set(x) == set(wrt) and jnp.shape(x["params.b"]) == ()
        ref = jnp.linalg.lstsq(M, flat(b, of))[0]
        np.testing.assert_allclose(flat(x, wrt), ref, rtol=1e-8, atol=1e-10)
        xs = jax.vmap(lambda v: lx.linear_solve(J, v, solver).value)(bs)
        for i, scale in enumerate((1, 2, -1)):
            got = flat(jax.tree.map(lambda v: v[i], xs), wrt)
            np.testing.assert_allclose(got, scale * ref, rtol=1e-8, atol=1e-10)
        assert client.stats == {"linear_solve": 2}
    client.stats.clear()
    y = lx.linear_solve(J.T, ct, tlx.OnServer(lx.LSMR(**TOL))).value
    assert set(y) == set(of) and jnp.shape(y["stats.mean"]) == ()
    ref = jnp.linalg.lstsq(M.T, flat(ct, wrt))[0]
    np.testing.assert_allclose(flat(y, of), ref, rtol=1e-8, atol=1e-10)
    assert client.stats == {"linear_solve": 1}
