"""`tlx.OnServer(optx.Newton(...))`: the whole nonlinear solve next to the Tesseract.

Every optimistix solver `/nonlinear_solve` runs (Newton, Chord; Gauss-Newton,
Levenberg-Marquardt), single and vmapped, gradients through the root, on a JAX
Tesseract and a NumPy one with two outputs (springs), against the same optimistix
solve of the same maths in pure JAX, requests counted exactly: one per solve (per
point under `vmap`). A solve that does not converge reports optimistix's result
(and `throw=True` raises optimistix's message); where the solve cannot go to the
server (a stock server, a residual that is not one Tesseract's), it runs here and
says so. Malformed payloads are 422s naming the field.
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
from tesseract_lx._server.upstream_optimistix import check_optimistix
from tesseract_lx._wire import nonlinear
from tesseract_lx._wire.spec import NONLINEAR_SOLVE

from conftest import fresh
from helpers import BATCHED, JVP, PARTIAL, Tol, VJP
from references import springs_inputs, springs_ref


jax.config.update("jax_enable_x64", True)

SPRINGS = {
    "springs": PARTIAL / "springs" / "tesseract_api.py",
    "springs_numpy": PARTIAL / "springs_numpy" / "tesseract_api.py",
}
# Its JVP checks the point's values in NumPy: it does not trace under `jax.jit`.
SPRINGS_CHECKED = PARTIAL / "springs_checked" / "tesseract_api.py"
N = 8
TOL = Tol(rtol=1e-12, atol=1e-12)
ROOT_FINDERS = {
    "newton_gmres": optx.Newton(rtol=1e-10, atol=1e-10, linear_solver=lx.GMRES(**TOL)),
    "newton_lu": optx.Newton(rtol=1e-10, atol=1e-10),
    "chord": optx.Chord(rtol=1e-10, atol=1e-10),
}
LEAST_SQUARES = {
    "gauss_newton": optx.GaussNewton(rtol=1e-10, atol=1e-10),
    "levenberg_marquardt": optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10),
}
ONE = {NONLINEAR_SOLVE: 1}


def _root_ref(y, args):
    return springs_ref({**args, "x": y})["residual"]


def _fit_ref(y, args):
    return springs_ref({**args, **y})["residual"]


def _calibration(x0, args):
    """Fit the stiffnesses `k`, `c` to forces measured at a displacement `x` (noisy:
    the least residual is not zero): 8 residuals, 2 unknowns, a tall Jacobian."""
    x = jnp.linspace(-1.0, 1.0, N)
    measured = springs_ref({"x": x, "k": 2.0, "c": 0.7, "f": 0.0 * x})["residual"]
    noise = 0.01 * np.random.default_rng(0).normal(size=N)
    data = {"x": x, "f": measured + noise}
    return {"k": args["k"], "c": args["c"]}, data


@pytest.fixture
def springs(served, tesseract, transport):
    client = fresh(served.get(SPRINGS[tesseract], transport))
    f = tlx.TesseractModule(client)
    inputs = springs_inputs(N)
    f(inputs)  # learns the output shapes: no `/abstract_eval` below
    client.stats.clear()
    args = {p: inputs[p] for p in ("k", "c", "f")}
    return client, f, inputs["x"], args


@pytest.mark.parametrize("solver", list(ROOT_FINDERS))
@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_root_find_is_one_request(springs, tesseract, transport, solver):
    """A root find of the residual (the Tesseract also outputs an energy): one
    request, the same root, steps and result as optimistix in pure JAX; jitted too."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    inner = ROOT_FINDERS[solver]
    if solver == "chord":
        # Chord keeps the first Jacobian: from near the root, it converges.
        x0 = optx.root_find(_root_ref, ROOT_FINDERS["newton_lu"], x0, args).value
        x0 = x0 + 0.05
    ref = optx.root_find(_root_ref, inner, x0, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlx.FallbackWarning)
        sol = optx.root_find(fn, tlx.OnServer(inner), x0, args)
        assert client.stats == ONE
        client.stats.clear()
        jitted = jax.jit(lambda y, a: optx.root_find(fn, tlx.OnServer(inner), y, a))
        again = jitted(x0, args)
    assert client.stats == ONE
    assert not client.decisions
    for s in (sol, again):
        np.testing.assert_allclose(s.value, ref.value, rtol=1e-10, atol=1e-12)
        assert int(s.stats["num_steps"]) == int(ref.stats["num_steps"])
        assert s.result == optx.RESULTS.successful


# How the server computes the residual, per Tesseract: a JAX Tesseract's JVP is traced
# into the compiled solve (its `apply` validates its outputs with pydantic, which
# tracers do not pass: a callback); one whose JVP reads values is called back too; a
# NumPy Tesseract is never traced.
WAYS = {
    "springs": "apply called back, JVP traced",
    "checked": "apply and JVP called back",
    "springs_numpy": "apply and JVP called back",
}


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("which", list(WAYS))
def test_traced_where_the_tesseract_traces(served, which, transport, caplog):
    """The server traces what traces into the compiled solve and calls back the rest
    (logged, in process): the same root as optimistix in pure JAX either way, one
    request per solve, at a second point too."""
    path = SPRINGS_CHECKED if which == "checked" else SPRINGS[which]
    client = fresh(served.get(path, transport))
    f = tlx.TesseractModule(client)
    # A size no other test solves at: this test's signature is compiled here.
    inputs = springs_inputs(N + 3)
    f(inputs)  # learns the output shapes: no `/abstract_eval` below
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    args = {p: inputs[p] for p in ("k", "c", "f")}
    inner = ROOT_FINDERS["newton_gmres"]
    caplog.set_level("INFO", logger="tesseract_lx.server")
    for x0 in (inputs["x"], inputs["x"] + 0.3):
        client.stats.clear()
        sol = optx.root_find(fn, tlx.OnServer(inner, allow_local=False), x0, args)
        assert client.stats == ONE
        ref = optx.root_find(_root_ref, inner, x0, args)
        np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
        assert int(sol.stats["num_steps"]) == int(ref.stats["num_steps"])
    if transport == "inprocess":
        compiled = [m for r in caplog.records if "compiled" in (m := r.getMessage())]
        assert compiled == [f"/nonlinear_solve: compiled with the {WAYS[which]}"]


@pytest.mark.parametrize("solver", list(LEAST_SQUARES))
@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_least_squares_is_one_request(springs, tesseract, transport, solver):
    """A calibration (two scalar unknowns `k`, `c`, a dict keyed by path; 8
    residuals: a tall Jacobian, QR steps): one request, against optimistix in pure
    JAX, the same steps."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt=("k", "c"), of="residual")
    inner = LEAST_SQUARES[solver]
    y0, data = _calibration(x0, args)
    ref = optx.least_squares(_fit_ref, inner, y0, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tlx.FallbackWarning)
        sol = optx.least_squares(fn, tlx.OnServer(inner), y0, data)
    assert client.stats == ONE
    for p in y0:
        np.testing.assert_allclose(sol.value[p], ref.value[p], rtol=1e-9, atol=1e-12)
    if solver == "gauss_newton":
        # (Levenberg-Marquardt's trust region accepts or rejects its last steps by
        # differences at round-off level: its step count may differ, not its fit.)
        assert int(sol.stats["num_steps"]) == int(ref.stats["num_steps"])
    assert sol.result == optx.RESULTS.successful


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", [*SPRINGS, "checked"])
def test_vmap_is_one_request(served, tesseract, transport):
    """`jax.vmap` over `args`, over `y0`, over both and nested, jitted or not: one
    request for the whole batch (the server `vmap`s a traced solve, or loops), each
    problem's root and steps as optimistix's in pure JAX."""
    path = SPRINGS_CHECKED if tesseract == "checked" else SPRINGS[tesseract]
    client = fresh(served.get(path, transport))
    assert client.capabilities.nonlinear_batch
    f = tlx.TesseractModule(client)
    inputs = springs_inputs(N)
    f(inputs)  # learns the output shapes: no `/abstract_eval` below
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    x0, args = inputs["x"], {p: inputs[p] for p in ("k", "c", "f")}
    newton = ROOT_FINDERS["newton_gmres"]

    def solve(fn, solver, y, force):
        sol = optx.root_find(fn, solver, y, {**args, "f": force})
        return sol.value, sol.stats["num_steps"]

    forces = jnp.stack([args["f"], 2 * args["f"], -args["f"]])
    starts = jnp.stack([x0, x0 + 0.5, x0 - 0.2])
    cases = {
        "args": (None, 0, x0, forces),
        "y0": (0, None, starts, args["f"]),
        "both": (0, 0, starts, forces),
    }
    for name, (y_axis, f_axis, ys, fs) in cases.items():
        on_server = tlx.OnServer(newton, allow_local=False)
        ours = jax.vmap(lambda y, g: solve(fn, on_server, y, g), (y_axis, f_axis))
        pure = jax.vmap(lambda y, g: solve(_root_ref, newton, y, g), (y_axis, f_axis))
        want, want_steps = jax.jit(pure)(ys, fs)
        for run in (ours, jax.jit(ours)) if name == "args" else (jax.jit(ours),):
            client.stats.clear()
            got, steps = run(ys, fs)
            assert client.stats == ONE, name
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
            np.testing.assert_array_equal(steps, want_steps, err_msg=name)

    # Nested: a 2 x 3 grid of forces and starts, one request.
    client.stats.clear()
    inner = jax.vmap(lambda y, g: solve(fn, tlx.OnServer(newton), y, g)[0], (0, None))
    got = jax.vmap(inner, (None, 0))(starts, forces[:2])
    assert client.stats == ONE
    want = jax.jit(
        jax.vmap(
            jax.vmap(lambda y, g: solve(_root_ref, newton, y, g)[0], (0, None)),
            (None, 0),
        )
    )(starts, forces[:2])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_vmap_follows_the_servers_batch_limit(
    springs, tesseract, transport, monkeypatch
):
    """A batch larger than the server's `max_batch` goes in chunks; to a server that
    does not say it takes a batch, one request per problem. A least-squares fit
    vmapped over its initial values too. Against pure JAX."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    starts = jnp.stack([x0, x0 + 0.5, x0 - 0.2, x0 + 0.1, x0 - 0.4])
    lm = LEAST_SQUARES["levenberg_marquardt"]
    want = jax.jit(
        jax.vmap(lambda y: optx.least_squares(_root_ref, lm, y, args).value)
    )(starts)
    said = client.capabilities
    for limit, batch, sent in ((2, True, 3), (65536, False, 5)):
        caps = dataclasses.replace(said, max_batch=limit, nonlinear_batch=batch)
        monkeypatch.setattr(type(client), "capabilities", property(lambda _: caps))
        client.stats.clear()
        got = jax.vmap(
            lambda y: optx.least_squares(fn, tlx.OnServer(lm), y, args).value
        )(starts)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
        assert client.stats == {NONLINEAR_SOLVE: sent}


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_gradient_through_the_root(springs, tesseract, transport):
    """`jax.grad` through the root with optimistix's `ImplicitAdjoint`: the solve
    (one request), then the Jacobian at the root by the module's batching rule (one
    `/jacobian`, or one batched JVP for a Tesseract without it) and one VJP; with
    `ImplicitAdjoint(linear_solver=tlx.OnServer(lx.GMRES(...)))`, one
    `/linear_solve` and one VJP. Against pure JAX."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    newton = ROOT_FINDERS["newton_gmres"]

    def loss(a, fn, solver, adjoint):
        return jnp.sum(optx.root_find(fn, solver, x0, a, adjoint=adjoint).value ** 2)

    want = jax.grad(loss)(args, _root_ref, newton, optx.ImplicitAdjoint())
    got = jax.grad(loss)(args, fn, tlx.OnServer(newton), optx.ImplicitAdjoint())
    for p in args:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-8, atol=1e-12)
    materialise = "jacobian" if tesseract == "springs" else BATCHED[JVP]
    assert client.stats == {NONLINEAR_SOLVE: 1, materialise: 1, VJP: 1}

    client.stats.clear()
    adjoint = optx.ImplicitAdjoint(linear_solver=tlx.OnServer(lx.GMRES(**TOL)))
    got = jax.grad(loss)(args, fn, tlx.OnServer(newton), adjoint)
    for p in args:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-8, atol=1e-12)
    assert client.stats == {NONLINEAR_SOLVE: 1, "linear_solve": 1, VJP: 1}


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_gradient_through_a_fit_needs_second_derivatives(springs, tesseract, transport):
    """optimistix differentiates a fit through its optimality condition (the
    gradient of the loss), which needs second derivatives of the Tesseract: refused
    as it is without `OnServer`, never a wrong number."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt=("k", "c"), of="residual")
    lm = LEAST_SQUARES["levenberg_marquardt"]
    y0, data = _calibration(x0, args)

    def loss(forces, solver):
        fit = optx.least_squares(fn, solver, y0, {**data, "f": forces})
        return fit.value["k"] + fit.value["c"]

    for solver in (lm, tlx.OnServer(lm)):
        with pytest.raises(NotImplementedError, match="second derivative"):
            jax.grad(loss)(data["f"], solver)


@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_a_solve_that_does_not_converge(springs, tesseract, transport):
    """Two steps are not enough: optimistix's result, as in pure JAX with
    `max_steps=2`; `throw=True` raises optimistix's own message; asked of the server
    with `throw`, its answer carries the same message."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    newton = ROOT_FINDERS["newton_lu"]
    ref = optx.root_find(_root_ref, newton, x0, args, max_steps=2, throw=False)
    assert ref.result == optx.RESULTS.nonlinear_max_steps_reached
    short = tlx.OnServer(newton, max_steps=2)
    sol = optx.root_find(fn, short, x0, args, throw=False)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert int(sol.stats["num_steps"]) == 2
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    message = "maximum number of steps was reached in the nonlinear solver"
    with pytest.raises(Exception, match=message):
        optx.root_find(fn, short, x0, args, throw=True)
    assert client.stats == {NONLINEAR_SOLVE: 2}

    payload = _payload(x0, args, max_steps=2, throw=True)
    with pytest.raises(tlx.TesseractServerError, match=message) as info:
        client.request(NONLINEAR_SOLVE, payload)
    assert info.value.status == 500


@pytest.mark.parametrize("transport", ["stock"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_stock_server_solves_here_and_says_so(springs, tesseract, transport):
    """A stock `tesseract-runtime serve` has no `/nonlinear_solve`: Newton runs here
    (its default LU: one `/apply` and one `/jacobian` per step), with a
    `FallbackWarning` and a `Decision`; `allow_local=False` raises."""
    client, f, x0, args = springs
    assert client.capabilities.nonlinear_solvers == ()
    fn = tlx.residual_fn(f, wrt="x", of="residual")
    newton = ROOT_FINDERS["newton_lu"]
    with pytest.warns(tlx.FallbackWarning, match="does not offer `/nonlinear_solve`"):
        sol = optx.root_find(fn, tlx.OnServer(newton), x0, args)
    ref = optx.root_find(_root_ref, newton, x0, args)
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    steps = int(sol.stats["num_steps"])
    assert steps == int(ref.stats["num_steps"])
    assert client.stats == {"apply": steps, "jacobian": steps}
    (decision,) = [d for d in client.decisions if d.kind == NONLINEAR_SOLVE]
    assert decision.kind == NONLINEAR_SOLVE and decision.chosen == "local"
    assert decision.fallback
    with pytest.raises(ValueError, match="allow_local=False"):
        optx.root_find(fn, tlx.OnServer(newton, allow_local=False), x0, args)


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["springs"])
def test_not_one_tesseracts_residual_solves_here(springs, tesseract, transport):
    """A residual that computes on the Tesseract's output (here `2 r - 1`) is not
    one Tesseract's: the solve runs here, said so, the same numbers as pure JAX."""
    client, f, x0, args = springs
    fn = tlx.residual_fn(f, wrt="x", of="residual")

    def shifted(y, a):
        return 2 * fn(y, a) - 1.0

    newton = ROOT_FINDERS["newton_gmres"]
    with pytest.warns(tlx.FallbackWarning, match="not one Tesseract's outputs"):
        sol = optx.root_find(shifted, tlx.OnServer(newton), x0, args)
    ref = optx.root_find(lambda y, a: 2 * _root_ref(y, a) - 1.0, newton, x0, args)
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    assert NONLINEAR_SOLVE not in client.stats
    (decision,) = client.decisions
    assert decision.kind == NONLINEAR_SOLVE and decision.fallback
    with pytest.raises(ValueError, match="cannot send this solve"):
        strict = tlx.OnServer(newton, allow_local=False)
        optx.root_find(shifted, strict, x0, args)


def _payload(x0, args, **extra) -> dict:
    return {
        "inputs": {"x": np.asarray(x0), **{k: np.asarray(v) for k, v in args.items()}},
        "wrt": ["x"],
        "of": ["residual"],
        "solver": {"name": "Newton", "rtol": 1e-10, "atol": 1e-10},
        **extra,
    }


def _newton(step: dict) -> dict:
    return {"name": "Newton", "rtol": 0, "atol": 0, "linear_solver": step}


MALFORMED = [
    ({"y0": {"x": np.zeros(N + 1)}}, "y0.x", "expected"),
    ({"y0": {"k": np.zeros(())}}, "y0", "exactly the keys of `wrt`"),
    ({"of": ["energy"]}, "solver.name", "Newton finds a root"),
    (
        {
            "solver": {
                "name": "Newton",
                "rtol": 0,
                "atol": 0,
                "linear_solver": {"name": "CG", "rtol": 0, "atol": 0},
            }
        },
        "tags",
        "CG needs the tag",
    ),
    (
        {
            "of": ["residual", "energy"],
            "solver": {
                "name": "GaussNewton",
                "rtol": 0,
                "atol": 0,
                "linear_solver": {"name": "LU"},
            },
        },
        "solver.linear_solver.name",
        "LU needs a square Jacobian",
    ),
    (
        {
            "solver": {
                "name": "LevenbergMarquardt",
                "rtol": 0,
                "atol": 0,
                "linear_solver": {"name": "GMRES", "rtol": 0, "atol": 0},
            }
        },
        "solver.linear_solver.name",
        "damped least-squares",
    ),
    ({"solver": {"name": "Dogleg", "rtol": 0, "atol": 0}}, "solver", ""),
    ({"max_steps": 0}, "max_steps", ""),
    ({"wrt": []}, "wrt", "empty"),
    (
        {"batch": {"size": 2, "inputs": {"f": np.zeros((3, N))}}},
        "batch.inputs.f",
        f"expected (2, {N})",
    ),
    (
        {"batch": {"size": 2, "inputs": {"g": np.zeros((2, N))}}},
        "batch.inputs.g",
        "names no array input",
    ),
    (
        {"batch": {"size": 2, "y0": {"x": np.zeros((2, N + 1))}}},
        "batch.y0.x",
        f"expected (2, {N})",
    ),
    (
        {"y0": {"x": np.zeros(N)}, "batch": {"size": 2, "y0": {"x": np.zeros((2, N))}}},
        "batch.y0",
        "both given",
    ),
    ({"batch": {"size": 2, "y0": {"k": np.zeros(2)}}}, "batch.y0", "keys of `wrt`"),
    ({"batch": {"size": 70000}}, "batch.size", "at most 65536"),
    ({"batch": {"size": 0}}, "batch.size", ""),
]


@pytest.mark.parametrize("change,field,words", MALFORMED)
@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_malformed_payloads_are_422_naming_the_field(
    springs, tesseract, transport, change, field, words
):
    client, f, x0, args = springs
    with pytest.raises(tlx.TesseractValidationError) as info:
        client.request(NONLINEAR_SOLVE, _payload(x0, args, **change))
    assert info.value.status == 422
    assert f"`{field}" in str(info.value), str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", list(SPRINGS))
def test_capabilities_state_the_endpoint(springs, tesseract, transport):
    client, *_ = springs
    assert client.serves(NONLINEAR_SOLVE)
    assert client.capabilities.nonlinear_solvers == nonlinear.NAMES
    assert client.capabilities.nonlinear_step_solvers == nonlinear.STEP_SOLVERS
    assert client.capabilities.nonlinear_batch


def test_solvers_that_do_not_travel_are_refused():
    """Settings the server could not honour are refused when the wrapper is made."""
    with pytest.raises(TypeError, match="`norm` of its own"):
        tlx.OnServer(optx.Newton(rtol=1e-8, atol=1e-8, norm=optx.rms_norm))
    with pytest.raises(TypeError, match="Dogleg cannot run on the server"):
        tlx.OnServer(optx.Dogleg(rtol=1e-8, atol=1e-8))
    with pytest.raises(TypeError, match="cannot run the steps"):
        tlx.OnServer(optx.Newton(rtol=1e-8, atol=1e-8, linear_solver=lx.LSMR(1, 1)))
    with pytest.raises(ValueError, match="`max_steps`"):
        tlx.OnServer(optx.Newton(rtol=1e-8, atol=1e-8), max_steps=0)
    assert isinstance(tlx.OnServer(optx.Chord(1e-8, 1e-8)), optx.AbstractRootFinder)
    lm = tlx.OnServer(optx.LevenbergMarquardt(1e-8, 1e-8))
    assert isinstance(lm, optx.AbstractLeastSquaresSolver)
    assert isinstance(tlx.OnServer(lx.GMRES(1e-8, 1e-8)), lx.AbstractLinearSolver)


def test_upstream_optimistix_names_its_results():
    """The private names of optimistix the server uses are where it looks."""
    check_optimistix()
