"""Benchmark: optimistix solvers on served Tesseracts: steps, requests, wall time.

A benchmark, not a test: it serves the example Tesseracts over loopback (1 worker) and
writes `benchmarks/nonlinear_solvers.md` (next to this file). (Not named
`optimistix.py`: a script's folder comes first on `sys.path`, so that name would shadow
the optimistix package for every script in `benchmarks/`.) At N = 16 and N = 32:

- root finding on `bratu` (k = 1, f = 1, from u = 0): Newton (LU), Newton (GMRES),
  Chord (LU) on the tesseract-lx server, and Newton (LU) on the stock server too;
- least squares on the calibration problem of `examples/calibrate.py` /
  `tests/test_optimistix.py` (recover u and k from u_obs = u(k=2) + 1e-3 noise;
  2 N^2 residuals, N^2 + 1 unknowns): GaussNewton, LevenbergMarquardt, Dogleg;
- minimisation on `pytree`: BFGS on `stats.norm` with respect to `x` (m = N^2);
- the implicit gradient d mean(u*^2)/dk through Newton (LU) + `ImplicitAdjoint`,
  against the same on the pure-JAX reference;
- Newton (GMRES) at N = 32 on the tesseract-lx server with and without its
  linearisation cache.

Each solve is `eqx.filter_jit`-ed and run twice; the first run compiles (client and
server) and is not timed, the second is timed and its requests counted. Every solution
is compared with the same optimistix solver on the pure-JAX reference.

    cd /work/main && PYTHONPATH=. python benchmarks/nonlinear_solvers.py
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
import tesseract_lx as tlx
from _report import log, versions


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
from references import bratu_ref, pytree_inputs, pytree_ref  # noqa: E402


# `tlx.serve` starts the server with its cwd in the Tesseract's folder: a relative
# `PYTHONPATH=.` would not find `tesseract_lx` there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

TESSERACTS = ROOT / "examples" / "tesseracts"
BRATU = TESSERACTS / "bratu" / "tesseract_api.py"
PYTREE = TESSERACTS / "pytree" / "tesseract_api.py"
SIDES = (16, 32)
TOL = 1e-8
MAX_STEPS = 256


#
# Problems
#


def root_solvers():
    return {
        "Newton (LU)": optx.Newton(rtol=TOL, atol=TOL),
        "Newton (GMRES)": optx.Newton(
            rtol=TOL, atol=TOL, linear_solver=lx.GMRES(rtol=TOL, atol=TOL)
        ),
        "Chord (LU)": optx.Chord(rtol=TOL, atol=TOL),
    }


def lsq_solvers():
    return {
        "GaussNewton": optx.GaussNewton(rtol=TOL, atol=TOL),
        "LevenbergMarquardt": optx.LevenbergMarquardt(rtol=TOL, atol=TOL),
        "Dogleg": optx.Dogleg(rtol=TOL, atol=TOL),
    }


def bratu_fn(y, args):
    """The pure-JAX residual, as `residual_fn(f, "u", "residual")` gives it."""
    return bratu_ref({"u": y, **args})["residual"]


def bratu_args(n: int, k: float = 1.0) -> dict:
    return {"k": jnp.asarray(k), "f": jnp.ones((n, n))}


def calibration_problem(n: int):
    k_true = 2.0
    truth = optx.root_find(
        bratu_fn,
        optx.Newton(rtol=1e-10, atol=1e-10),
        jnp.zeros((n, n)),
        bratu_args(n, k_true),
    ).value
    noise = 1e-3 * jax.random.normal(jax.random.key(0), truth.shape)
    args = {"f": jnp.ones((n, n)), "u_obs": truth + noise}
    y0 = {"u": args["u_obs"], "k": jnp.asarray(1.0)}
    return args, y0


def calibration_fn(residual):
    """`(h^2 r(u, k), u - u_obs)` around `residual(y, {"f": ...})`, y = {"u", "k"}."""

    def fn(y, args):
        h2 = 1.0 / (args["f"].shape[0] + 1) ** 2
        return residual(y, {"f": args["f"]}) * h2, y["u"] - args["u_obs"]

    return fn


def calibration_ref(y, args):
    return bratu_ref({"u": y["u"], "k": y["k"], "f": args["f"]})["residual"]


def bfgs_problem(m: int):
    inputs = pytree_inputs(m)
    x0 = inputs.pop("x")
    inputs.pop("power")
    return x0, inputs


def bfgs_ref(x, args):
    return pytree_ref({**args, "x": x})["stats"]["norm"]


#
# Timing
#


def timed(client: tlx.Client, fn, *args, repeats: int = 1):
    """Warm up (compile), then best of `repeats` runs: (outputs, seconds, sent)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best, sent, out = math.inf, {}, None
    for _ in range(repeats):
        client.stats.clear()
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
        sent = dict(client.stats)
    return out, best, sent, first


def max_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def row(kind, solver, server, n_side, out, elapsed, sent, first, ref):
    value, result, steps = out
    r = {
        "kind": kind,
        "solver": solver,
        "server": server,
        "N": n_side,
        "steps": int(steps),
        "sent": sent,
        "requests": sum(sent.values()),
        "time": elapsed,
        "first": first,
        "diff": max_diff(value, ref.value),
        "ref_steps": int(ref.stats["num_steps"]),
        "result": "ok" if result == optx.RESULTS.successful else str(result),
    }
    log(
        f"[{server} N={n_side}] {solver}: {r['steps']} steps (reference "
        f"{r['ref_steps']}), {r['requests']} requests {sent}, {elapsed:.2f} s (first "
        f"{first:.1f} s), max |y - y_ref| {r['diff']:.1e}, {r['result']}"
    )
    return r


def root_rows(client, server, n_side, names, repeats=1):
    f = tlx.TesseractModule(client)
    fn = tlx.residual_fn(f, wrt="u", of="residual")
    rows = []
    for name in names:
        solver = root_solvers()[name]

        @eqx.filter_jit
        def solve(u0, args, solver=solver):
            sol = optx.root_find(fn, solver, u0, args, throw=False, max_steps=MAX_STEPS)
            return sol.value, sol.result, sol.stats["num_steps"]

        u0, args = jnp.zeros((n_side, n_side)), bratu_args(n_side)
        out, elapsed, sent, first = timed(client, solve, u0, args, repeats=repeats)
        ref = optx.root_find(bratu_fn, solver, u0, args, max_steps=MAX_STEPS)
        rows.append(row("root", name, server, n_side, out, elapsed, sent, first, ref))
    return rows


def lsq_rows(client, server, n_side):
    f = tlx.TesseractModule(client)
    fn = calibration_fn(tlx.residual_fn(f, wrt=("u", "k"), of="residual"))
    args, y0 = calibration_problem(n_side)
    rows = []
    for name, solver in lsq_solvers().items():

        @eqx.filter_jit
        def solve(y0, args, solver=solver):
            sol = optx.least_squares(
                fn, solver, y0, args, throw=False, max_steps=MAX_STEPS
            )
            return sol.value, sol.result, sol.stats["num_steps"]

        out, elapsed, sent, first = timed(client, solve, y0, args)
        ref = optx.least_squares(
            calibration_fn(calibration_ref), solver, y0, args, max_steps=MAX_STEPS
        )
        r = row("least squares", name, server, n_side, out, elapsed, sent, first, ref)
        r["k_fit"] = float(out[0]["k"])
        rows.append(r)
    return rows


def bfgs_row(client, server, n_side):
    f = tlx.TesseractModule(client)
    fn = tlx.residual_fn(f, wrt="x", of="stats.norm")
    x0, inputs = bfgs_problem(n_side * n_side)
    solver = optx.BFGS(rtol=TOL, atol=TOL)

    @eqx.filter_jit
    def solve(x0, inputs):
        sol = optx.minimise(fn, solver, x0, inputs, throw=False, max_steps=MAX_STEPS)
        return sol.value, sol.result, sol.stats["num_steps"]

    out, elapsed, sent, first = timed(client, solve, x0, inputs)
    ref = optx.minimise(bfgs_ref, solver, x0, inputs, max_steps=MAX_STEPS)
    return row("minimise", "BFGS", server, n_side, out, elapsed, sent, first, ref)


def root_loss(k, fn, n: int):
    args = {"k": k, "f": jnp.ones((n, n))}
    sol = optx.root_find(fn, optx.Newton(rtol=TOL, atol=TOL), jnp.zeros((n, n)), args)
    return jnp.mean(sol.value**2)


def gradient_check(client, n_side):
    f = tlx.TesseractModule(client)
    fn = tlx.residual_fn(f, wrt="u", of="residual")
    k = jnp.asarray(1.0)
    grad = jax.jit(jax.grad(lambda k: root_loss(k, fn, n_side)))
    g, elapsed, sent, _ = timed(client, grad, k)
    g_ref = jax.grad(lambda k: root_loss(k, bratu_fn, n_side))(k)
    err = abs(float(g - g_ref))
    out = {
        "N": n_side,
        "grad": float(g),
        "ref": float(g_ref),
        "abs": err,
        "rel": err / abs(float(g_ref)),
        "time": elapsed,
        "sent": sent,
    }
    log(
        f"[gradient N={n_side}] d mean(u*^2)/dk = {out['grad']:.12e}, reference "
        f"{out['ref']:.12e}: abs {out['abs']:.1e}, rel {out['rel']:.1e}; "
        f"{elapsed:.2f} s, requests {sent}"
    )
    return out


def cache_rows(n_side: int, repeats: int):
    rows = []
    for cache in (True, False):
        with tlx.serve(BRATU, server="tesseract-lx", cache=cache) as client:
            (r,) = root_rows(
                client, "tesseract-lx", n_side, ["Newton (GMRES)"], repeats=repeats
            )
            r["cache"] = cache
            rows.append(r)
    return rows


#
# Report
#


def fmt_sent(sent: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(sent.items()))


def tables(rows, grads, cache) -> str:
    lines = [
        "### Solvers",
        "",
        "| problem | solver | server | N (unknowns) | steps (reference) | requests "
        "(by endpoint) | requests / step | wall time | max abs diff vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unknowns = r["N"] ** 2 + (1 if r["kind"] == "least squares" else 0)
        diff = f"{r['diff']:.1e}" + ("" if r["result"] == "ok" else f" ({r['result']})")
        if "k_fit" in r:
            diff += f" (k_fit {r['k_fit']:.4f})"
        lines.append(
            f"| {r['kind']} | {r['solver']} | {r['server']} | {r['N']} ({unknowns}) "
            f"| {r['steps']} ({r['ref_steps']}) | {r['requests']} "
            f"({fmt_sent(r['sent'])}) | {r['requests'] / max(r['steps'], 1):.1f} | "
            f"{r['time']:.2f} s | {diff} |"
        )
    lines += [
        "",
        "### Implicit gradient: `jax.grad` of mean(u*^2) w.r.t. k, Newton (LU), "
        "`ImplicitAdjoint`, tesseract-lx server",
        "",
        "| N | served | pure-JAX reference | abs error | rel error | requests | "
        "wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in grads:
        lines.append(
            f"| {g['N']} | {g['grad']:.12e} | {g['ref']:.12e} | {g['abs']:.1e} | "
            f"{g['rel']:.1e} | {sum(g['sent'].values())} ({fmt_sent(g['sent'])}) | "
            f"{g['time']:.2f} s |"
        )
    on, off = cache
    lines += [
        "",
        f"### Newton (GMRES) at N = {on['N']}, tesseract-lx server, linearisation "
        "cache on / off (best of the timed runs)",
        "",
        "| cache | Newton steps | requests | wall time |",
        "|---|---|---|---|",
    ]
    for r in cache:
        lines.append(
            f"| {'on' if r['cache'] else 'off'} | {r['steps']} | {r['requests']} "
            f"({fmt_sent(r['sent'])}) | {r['time']:.2f} s |"
        )
    lines.append(f"| speed-up | | | x{off['time'] / on['time']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "nonlinear_solvers.md")
    opts = parser.parse_args()
    start = time.perf_counter()
    header = (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}, {platform.system()}), "
        f"loopback HTTP, 1 server worker, {datetime.date.today().isoformat()}. "
        f"{versions()}. Each solve `eqx.filter_jit`-ed, timed on the second call "
        "(the first compiles client and server; the one `/abstract_eval` of tracing "
        "falls there too); requests are those of the timed call. "
        '`TesseractModule(client)` with `batching="auto"`. rtol = atol = 1e-8 '
        "(solvers and GMRES). Steps: optimistix's `num_steps`; in brackets the same "
        "solver's on the pure-JAX reference. Requests / step counts all requests "
        "(a least-squares or Chord run includes accepted and rejected steps alike)."
    )
    log(header)
    rows, grads = [], []
    with tlx.serve(BRATU, server="tesseract-lx") as client:
        for n_side in SIDES:
            rows += root_rows(client, "tesseract-lx", n_side, list(root_solvers()))
            rows += lsq_rows(client, "tesseract-lx", n_side)
            grads.append(gradient_check(client, n_side))
    with tlx.serve(PYTREE, server="tesseract-lx") as client:
        for n_side in SIDES:
            rows.append(bfgs_row(client, "tesseract-lx", n_side))
    with tlx.serve(BRATU, server="tesseract-runtime") as client:
        for n_side in SIDES:
            rows += root_rows(client, "tesseract-runtime", n_side, ["Newton (LU)"])
    cache = cache_rows(32, opts.cache_repeats)
    kinds = ["root", "least squares", "minimise"]
    rows.sort(key=lambda r: (kinds.index(r["kind"]), r["N"]))
    text = (
        "# optimistix on served Tesseracts\n\n"
        + header
        + "\n\n"
        + tables(rows, grads, cache)
        + f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s.\n"
    )
    opts.out.write_text(text)
    log("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
