"""The scenarios of the benchmark suite, written once for every contender.

A contender is the Tesseract as JAX sees it: `apply(inputs) -> outputs`, the residual
as optimistix's `fn(y, args)`, and its Jacobian with respect to `u` as a lineax
operator. `Functional` builds all three from a function of the inputs (the pure-JAX
reference, or tesseract-jax's `apply_tesseract`). A scenario turns a `Case` (Tesseract, grid side N, K) and a
contender into a jitted function and its arguments; `run_case` warms it up, times it
and counts its requests. This module imports no tesseract_lx (`benchmarks/_worker.py`
subclasses `Functional` for it).
"""

import dataclasses
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from _references import INPUTS, START, UNKNOWN


jax.config.update("jax_enable_x64", True)

TOL = 1e-8
MAX_STEPS = 50


@dataclasses.dataclass(frozen=True)
class Case:
    """One scenario at one size: grid `n_side` (n = n_side^2 unknowns), `k`
    tangents or right-hand sides (0: none); `rtt_ms`: the round trip every request
    pays through the delaying proxy (`benchmarks/_proxy.py`; 0: no proxy)."""

    scenario: str
    tesseract: str
    n_side: int
    k: int = 0
    rtt_ms: float = 0.0

    @property
    def n(self) -> int:
        return self.n_side**2

    @property
    def key(self) -> str:
        k = f" K={self.k}" if self.k else ""
        far = f" @ {self.rtt_ms:g} ms" if self.rtt_ms else ""
        return f"{self.scenario} {self.tesseract} n={self.n}{k}{far}"

    @property
    def near(self) -> "Case":
        """The same case without the proxy (what pure JAX runs)."""
        return dataclasses.replace(self, rtt_ms=0.0)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a contender is set up: `apply_tesseract`'s keyword arguments and `jac` of
    `lx.JacobianLinearOperator` (tesseract-jax), or the batching rule (tesseract_lx,
    in `label` only)."""

    label: str = "defaults"
    apply: dict = dataclasses.field(default_factory=dict)
    jac: str | None = "bwd"


class Functional:
    """A contender given as a function of the Tesseract's inputs; `unknown`: the
    input of `residual` it differentiates and solves for."""

    def __init__(
        self,
        apply: Callable[[dict], dict],
        *,
        jac: str | None = "bwd",
        unknown: str = "u",
    ):
        self.apply = apply
        self.jac = jac
        self.unknown = unknown

    def residual_fn(self) -> Callable:
        apply, unknown = self.apply, self.unknown
        return lambda u, args: apply({**args, unknown: u})["residual"]

    def jacobian_operator(self, inputs: dict) -> lx.AbstractLinearOperator:
        u, args = _split(inputs, self.unknown)
        fn = self.residual_fn()
        return lx.JacobianLinearOperator(fn, u, args, jac=self.jac)

    def on_server(self, solver: Any) -> Any:
        """`solver` (lineax's or optimistix's) as the contender runs a solve next to
        the Tesseract: itself here; `tlx.OnServer(solver)` for tesseract_lx."""
        return solver


#
# The scenarios: each returns (jitted function, its arguments); the function returns
# a dict whose "value" is compared with the pure-JAX reference.
#


def _split(inputs: dict, unknown: str) -> tuple[Any, dict]:
    return inputs[unknown], {k: v for k, v in inputs.items() if k != unknown}


def _point(case: Case) -> dict:
    return INPUTS[case.tesseract](case.n_side)


def _random(case: Case, *shape: int) -> jax.Array:
    rng = np.random.default_rng(case.n_side * 1000 + case.k)
    unknown = _point(case)[UNKNOWN[case.tesseract]]
    return jnp.asarray(rng.standard_normal(shape + unknown.shape))


def _of_u(c, inputs: dict) -> Callable:
    return lambda u: c.apply({**inputs, c.unknown: u})["residual"]


def _root_problem(case: Case):
    u, args = _split(_point(case), UNKNOWN[case.tesseract])
    return jnp.full_like(u, START.get(case.tesseract, 0.0)), args


def jvp(case: Case, c):
    @jax.jit
    def fn(inputs, t):
        u = inputs[c.unknown]
        return {"value": jax.jvp(_of_u(c, inputs), (u,), (t,))[1]}

    return fn, (_point(case), _random(case))


def jacfwd(case: Case, c):
    @jax.jit
    def fn(inputs):
        return {"value": jax.jacfwd(_of_u(c, inputs))(inputs[c.unknown])}

    return fn, (_point(case),)


def jacrev(case: Case, c):
    @jax.jit
    def fn(inputs):
        return {"value": jax.jacrev(_of_u(c, inputs))(inputs[c.unknown])}

    return fn, (_point(case),)


def vmap_jvp(case: Case, c):
    @jax.jit
    def fn(inputs, tangents):
        g, u = _of_u(c, inputs), inputs[c.unknown]
        return {"value": jax.vmap(lambda t: jax.jvp(g, (u,), (t,))[1])(tangents)}

    return fn, (_point(case), _random(case, case.k))


def _newton(solver: Callable[[Any], Any]):
    """A root find with `solver(contender)`, from the problem's start."""

    def scenario(case: Case, c):
        fn, newton = c.residual_fn(), solver(c)

        @jax.jit
        def solve(u0, args):
            sol = optx.root_find(fn, newton, u0, args, max_steps=MAX_STEPS, throw=False)
            ok = sol.result == optx.RESULTS.successful
            return {"value": sol.value, "steps": sol.stats["num_steps"], "ok": ok}

        return solve, _root_problem(case)

    return scenario


def _gmres() -> lx.GMRES:
    return lx.GMRES(rtol=TOL, atol=TOL)


newton_lu = _newton(lambda c: optx.Newton(rtol=TOL, atol=TOL))
newton_gmres = _newton(
    lambda c: optx.Newton(rtol=TOL, atol=TOL, linear_solver=_gmres())
)
# The Krylov loop where the contender runs a solve next to the Tesseract.
newton_onserver = _newton(
    lambda c: optx.Newton(rtol=TOL, atol=TOL, linear_solver=c.on_server(_gmres()))
)
# The whole Newton solve there: `tlx.OnServer(optx.Newton(...))`, one request.
newton_whole = _newton(
    lambda c: c.on_server(optx.Newton(rtol=TOL, atol=TOL, linear_solver=_gmres()))
)


def _solve(solver):
    def scenario(case: Case, c):
        @jax.jit
        def fn(inputs, b):
            sol = lx.linear_solve(c.jacobian_operator(inputs), b, solver, throw=False)
            ok = sol.result == lx.RESULTS.successful
            return {"value": sol.value, "steps": sol.stats["num_steps"], "ok": ok}

        return fn, (_point(case), _random(case))

    return scenario


gmres = _solve(lx.GMRES(rtol=TOL, atol=TOL))
lsmr = _solve(lx.LSMR(rtol=TOL, atol=TOL))


def vmap_gmres(case: Case, c, on_server: bool = False):
    solver = lx.GMRES(rtol=TOL, atol=TOL)
    if on_server:
        solver = c.on_server(solver)

    @jax.jit
    def fn(inputs, rhs):
        op = c.jacobian_operator(inputs)

        def solve(b):
            sol = lx.linear_solve(op, b, solver, throw=False)
            return sol.value, sol.result == lx.RESULTS.successful

        value, ok = jax.vmap(solve)(rhs)
        return {"value": value, "ok": jnp.all(ok)}

    return fn, (_point(case), _random(case, case.k))


def vmap_onserver(case: Case, c):
    return vmap_gmres(case, c, on_server=True)


def grad_root(case: Case, c):
    fn = c.residual_fn()
    solver = optx.Newton(rtol=TOL, atol=TOL)
    u0, args = _root_problem(case)

    def loss(k, f):
        sol = optx.root_find(
            fn, solver, u0, {"k": k, "f": f}, adjoint=optx.ImplicitAdjoint()
        )
        return jnp.mean(sol.value**2)

    @jax.jit
    def grad(k, f):
        return {"value": jax.grad(loss)(k, f)}

    return grad, (args["k"], args["f"])


#
# The table of scenarios: what runs, at which sizes, set up in which ways.
#


EVERY_RULE = ("auto", "sequential", "concurrent", "jacobian", "batched")
# tesseract-jax's settings where a batch of (co)tangents at one point is sent
# (`jax.vmap` of a JVP, `jax.jacfwd` inside Newton's LU, a vmapped solve): every one
# that changes how, the fastest that works is the one compared.
PEER_VMAP = (
    Variant(),
    Variant("materialize_jacobian=True", {"materialize_jacobian": True}),
    Variant("materialize_jacobian=False", {"materialize_jacobian": False}),
    Variant("vmap_method='sequential'", {"vmap_method": "sequential"}),
    Variant(
        "vmap_method='sequential', materialize_jacobian=False",
        {"vmap_method": "sequential", "materialize_jacobian": False},
    ),
)
PEER_SOLVE = (Variant("jac='bwd'"), Variant("jac=None", jac=None))
PEER_VMAP_SOLVE = (Variant("jac='bwd'"),) + tuple(
    Variant("jac=None" + (f", {v.label}" if v.apply else ""), v.apply, jac=None)
    for v in PEER_VMAP
)
# Round trips (ms) of the far rows, through the delaying proxy.
FAR = (1.0, 10.0, 50.0)
# At smallest: one round trip, and the scenario that shows the rest (a proxy per
# server, a solve moved to the server and one that falls back to the client).
FAR_SMALLEST = (1.0,)
FAR_SMALLEST_SCENARIOS = ("newton_onserver", "newton_whole")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """`sizes`: (Tesseract, N, K) of the full run, K = -1 for K = n; the smallest
    run takes N = 3 of each. `far`: the sizes run again through the delaying proxy
    at each round trip of `FAR`. `rules` / `peer`: the variants of tesseract_lx and
    tesseract-jax (the first is the one the ratios use for tesseract_lx).
    `peer_from`: tesseract-jax runs the same maths in that scenario (the Krylov loop
    `tlx.OnServer` moves to the server is its local one): its rows are reused where
    that scenario ran at the same size."""

    family: str
    title: str
    build: Callable
    sizes: tuple[tuple[str, int, int], ...]
    rules: tuple[str, ...] = ("auto",)
    peer: tuple[Variant, ...] = (Variant(),)
    far: tuple[tuple[str, int, int], ...] = ()
    peer_from: str | None = None


FAMILIES = {
    "one": "One request",
    "derivatives": "Derivatives",
    "vmap": "vmap of a JVP",
    "newton": "Newton",
    "solve": "Linear solves",
    "grad": "Gradient through a root",
    "far": "Far away: every request through a delaying proxy",
}

SCENARIOS = {
    "jvp": Scenario(
        "one",
        "one `jax.jvp` of the residual w.r.t. `u` (and an empty `GET /health` between "
        "timed calls, same client and server)",
        jvp,
        (("bratu", 3, 0), ("bratu", 31, 0), ("bratu", 316, 0)),
    ),
    "jacfwd": Scenario(
        "derivatives",
        "`jax.jacfwd` of the residual w.r.t. `u`",
        jacfwd,
        (("bratu", 8, 0), ("bratu", 32, 0)),
        peer=PEER_VMAP,
    ),
    "jacrev": Scenario(
        "derivatives",
        "`jax.jacrev` of the residual w.r.t. `u`",
        jacrev,
        (("bratu", 8, 0), ("bratu", 32, 0)),
        peer=PEER_VMAP,
    ),
    "vmap_jvp": Scenario(
        "vmap",
        "`jax.vmap` of `jax.jvp` over K tangents",
        vmap_jvp,
        (("bratu", 16, 4), ("bratu", 16, -1), ("heavy", 16, 4)),
        rules=EVERY_RULE,
        peer=PEER_VMAP,
    ),
    "newton_lu": Scenario(
        "newton",
        "`optx.root_find` with `optx.Newton` (default linear solver: LU), from u = 0",
        newton_lu,
        (("bratu", 11, 0), ("bratu", 16, 0)),
        peer=PEER_VMAP,
        far=(("bratu", 8, 0),),
    ),
    "newton_gmres": Scenario(
        "newton",
        "`optx.root_find` with `optx.Newton(linear_solver=lx.GMRES(...))`, from u = 0",
        newton_gmres,
        (("bratu", 16, 0), ("bratu", 32, 0), ("heavy", 16, 0), ("bratu_numpy", 16, 0)),
        far=(("bratu", 16, 0),),
    ),
    "newton_onserver": Scenario(
        "newton",
        "`optx.Newton(linear_solver=tlx.OnServer(lx.GMRES(...)))`: the Krylov loop on "
        "the server where it serves `/linear_solve`, else here, saying so "
        "(tesseract-jax and pure JAX: the same maths, `lx.GMRES` locally); `springs` "
        "has two outputs, `residual` and `energy` (and starts from x = 1)",
        newton_onserver,
        (
            ("bratu", 16, 0),
            ("bratu", 32, 0),
            ("heavy", 16, 0),
            ("bratu_numpy", 16, 0),
            ("springs", 16, 0),
        ),
        far=(("bratu", 16, 0),),
        peer_from="newton_gmres",
    ),
    "newton_whole": Scenario(
        "newton",
        "`tlx.OnServer(optx.Newton(linear_solver=lx.GMRES(...)))`: the whole Newton "
        "solve on the server where it serves `/nonlinear_solve`, one request "
        "(tesseract-jax and pure JAX: the same maths, locally)",
        newton_whole,
        (
            ("bratu", 16, 0),
            ("bratu", 32, 0),
            ("bratu_numpy", 16, 0),
            ("springs", 16, 0),
        ),
        far=(("bratu", 16, 0),),
        peer_from="newton_gmres",
    ),
    "gmres": Scenario(
        "solve",
        "`lx.linear_solve` with `lx.GMRES`",
        gmres,
        (("bratu", 16, 0),),
        peer=PEER_SOLVE,
    ),
    "lsmr": Scenario(
        "solve",
        "`lx.linear_solve` with `lx.LSMR`",
        lsmr,
        (("bratu", 16, 0),),
        peer=PEER_SOLVE,
    ),
    "vmap_gmres": Scenario(
        "solve",
        "`jax.vmap` of `lx.linear_solve` with `lx.GMRES` over K right-hand sides",
        vmap_gmres,
        (("bratu", 22, 4),),
        rules=("auto", "sequential", "jacobian", "batched"),
        peer=PEER_VMAP_SOLVE,
        far=(("bratu", 8, 4),),
    ),
    "vmap_onserver": Scenario(
        "solve",
        "`jax.vmap` of `lx.linear_solve` with `tlx.OnServer(lx.GMRES(...))` over K "
        "right-hand sides (tesseract-jax and pure JAX: `lx.GMRES` locally)",
        vmap_onserver,
        (("bratu", 22, 4),),
        peer=PEER_VMAP_SOLVE,
        peer_from="vmap_gmres",
    ),
    "grad_root": Scenario(
        "grad",
        "`jax.grad` of mean(u*^2) w.r.t. `k` through `optx.root_find` (Newton, "
        "`optx.ImplicitAdjoint`)",
        grad_root,
        (("bratu", 16, 0),),
        peer=PEER_VMAP,
    ),
}


def cases(*, smallest: bool = False, only: str | None = None) -> list[Case]:
    """Every case to run: each scenario at each size, then the far ones (each far
    size at each round trip), those whose name holds `only`."""
    out = []
    sizes = [(name, s.sizes, (0.0,)) for name, s in SCENARIOS.items()]
    trips = FAR_SMALLEST if smallest else FAR
    sizes += [
        (name, s.far, trips)
        for name, s in SCENARIOS.items()
        if not smallest or name in FAR_SMALLEST_SCENARIOS
    ]
    for name, where, rtts in sizes:
        for rtt in rtts:
            for tesseract, n_side, k in where:
                if smallest:
                    n_side = 3
                case = Case(name, tesseract, n_side, n_side**2 if k == -1 else k, rtt)
                family = FAMILIES["far" if rtt else SCENARIOS[name].family]
                text = f"{case.key} {family}".lower()
                if case not in out and (only is None or only.lower() in text):
                    out.append(case)
    return out


def family(case: Case) -> str:
    return "far" if case.rtt_ms else SCENARIOS[case.scenario].family


#
# Running one case
#


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def failure(e: BaseException) -> str:
    """An exception in one line: type, message (shortened), where it was raised."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    text = " ".join(str(e).split())
    if len(text) > 400:
        text = text[:400] + " [...]"
    return (
        f"{type(e).__name__}: {text} (raised at {Path(where.filename).name}:"
        f"{where.lineno} in {where.name})"
    )


def blank(error: str | None = None) -> dict[str, Any]:
    """A row with nothing measured (yet): `error` says why."""
    return {
        "time": None,
        "times": [],
        "sent": {},
        "requests": [],
        "err": None,
        "steps": None,
        "ok": None,
        "error": error,
        "companion": [],
    }


def run_case(
    case: Case,
    contender,
    *,
    sent: Callable[[], dict],
    clear: Callable[[], None],
    reference: list[np.ndarray] | None,
    repeats: int,
    budget: float,
    companion: Callable[[], Any] | None = None,
) -> dict:
    """Warm up (compile; the server's first call; up to two more calls within a
    second), then time up to `repeats`
    calls, fewer once `budget` seconds went into timing. `sent()` counts the requests
    since `clear()`, which runs before every timed call. `companion` (if any) is timed
    after each timed call. Returns a row: median time, requests of every timed call,
    max abs difference of "value" from `reference`, steps, error text."""
    row = blank()
    try:
        fn, args = SCENARIOS[case.scenario].build(case, contender)
        # Warm up: compile, the server's first call, then (for a fast case) two more,
        # as the first calls after compiling still run slower.
        warm = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        for _ in range(2):
            if time.perf_counter() - warm > 1.0:
                break
            out = jax.block_until_ready(fn(*args))
        while len(row["times"]) < repeats and sum(row["times"]) < budget:
            clear()
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            row["times"].append(time.perf_counter() - start)
            row["sent"] = dict(sent())
            row["requests"].append(sum(row["sent"].values()))
            if companion is not None:
                start = time.perf_counter()
                companion()
                row["companion"].append(time.perf_counter() - start)
    except Exception as e:  # a failing contender is a result
        row["error"] = failure(e)
        return row
    row["time"] = statistics.median(row["times"])
    if "steps" in out:
        row["steps"] = int(out["steps"])
    if "ok" in out:
        row["ok"] = bool(out["ok"])
    if reference is not None:
        row["err"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(leaves(out["value"]), reference, strict=True)
        )
    row["value"] = leaves(out["value"])
    return row
