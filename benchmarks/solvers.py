"""Benchmark: one `lx.linear_solve` per lineax solver on a served Tesseract, n = 256.

A benchmark, not a test: it serves the `bratu` and `poisson` example Tesseracts over
loopback on grid N = 16 (n = N^2 = 256 unknowns), once on the tesseract-lx server and
once on the stock `tesseract-runtime` server (1 worker each), and writes
`benchmarks/solvers.md` (next to this file).

- bratu, `tlx.TesseractJacobianOperator(f, inputs, "u", "residual")` (non-symmetric
  solvers: LU, QR, SVD, GMRES, BiCGStab, LSMR, Normal(CG), AutoLinearSolver);
- poisson, `tlx.TesseractJacobianOperator(f, inputs, "x", "y", tags=(symmetric,
  positive semidefinite))`: Cholesky and CG, and the others for completeness.

Each solve is `eqx.filter_jit`-ed and called twice: the first call compiles (client
and server) and is not timed; the second is timed, and its requests (`client.stats`)
counted. The solution is compared with `jnp.linalg.solve` of the dense Jacobian of the
pure-JAX reference (`tests/references.py`). Iterative solvers: rtol = atol = 1e-8.

    cd /work/main && PYTHONPATH=. python benchmarks/solvers.py
"""

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import tesseract_lx as tlx
from _report import log, versions


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
from references import (  # noqa: E402
    bratu_inputs,
    bratu_ref,
    poisson_inputs,
    poisson_ref,
)


# `tlx.serve` starts the server with its cwd in the Tesseract's folder: a relative
# `PYTHONPATH=.` would not find `tesseract_lx` there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

TESSERACTS = ROOT / "examples" / "tesseracts"
SERVERS = ("tesseract-lx", "tesseract-runtime")
TOL = 1e-8
SPD = (lx.symmetric_tag, lx.positive_semidefinite_tag)


def solvers():
    return {
        "LU": lx.LU(),
        "QR": lx.QR(),
        "SVD": lx.SVD(),
        "Cholesky": lx.Cholesky(),
        "CG": lx.CG(rtol=TOL, atol=TOL),
        "GMRES": lx.GMRES(rtol=TOL, atol=TOL),
        "BiCGStab": lx.BiCGStab(rtol=TOL, atol=TOL),
        "LSMR": lx.LSMR(rtol=TOL, atol=TOL),
        "Normal(CG)": lx.Normal(lx.CG(rtol=TOL, atol=TOL)),
        "Auto(well_posed=True)": lx.AutoLinearSolver(well_posed=True),
        "Auto(well_posed=False)": lx.AutoLinearSolver(well_posed=False),
    }


NONSYMMETRIC = [
    "LU",
    "QR",
    "SVD",
    "GMRES",
    "BiCGStab",
    "LSMR",
    "Normal(CG)",
    "Auto(well_posed=True)",
    "Auto(well_posed=False)",
]
# Cholesky and CG need the SPD operator; the rest for completeness.
PROBLEMS = {
    "bratu": NONSYMMETRIC,
    "poisson": ["Cholesky", "CG"] + NONSYMMETRIC,
}


def problem(name: str, n_side: int):
    """(inputs, wrt, of, tags, reference function of wrt)."""
    if name == "bratu":
        inputs = bratu_inputs(n_side)
        return (
            inputs,
            "u",
            "residual",
            (),
            lambda u: bratu_ref({**inputs, "u": u})["residual"],
        )
    inputs = poisson_inputs(n_side)
    return inputs, "x", "y", SPD, lambda x: poisson_ref({**inputs, "x": x})["y"]


def reference_solution(ref_fn, x0, b):
    n = b.size
    jac = jax.jacfwd(ref_fn)(x0).reshape(n, n)
    return jnp.linalg.solve(jac, b.ravel()).reshape(b.shape)


def run(server: str, n_side: int):
    rows = []
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal((n_side, n_side)))
    for name, names in PROBLEMS.items():
        inputs, wrt, of, tags, ref_fn = problem(name, n_side)
        x_ref = reference_solution(ref_fn, inputs[wrt], b)
        with tlx.serve(TESSERACTS / name / "tesseract_api.py", server=server) as client:
            f = tlx.TesseractModule(client)
            all_solvers = solvers()
            for sname in names:
                solver = all_solvers[sname]

                @eqx.filter_jit
                def solve(inputs, b, solver=solver):
                    J = tlx.TesseractJacobianOperator(f, inputs, wrt, of, tags=tags)
                    sol = lx.linear_solve(J, b, solver, throw=False)
                    return sol.value, sol.result, sol.stats.get("num_steps")

                start = time.perf_counter()
                jax.block_until_ready(solve(inputs, b))  # compile + warm the server
                first = time.perf_counter() - start
                # Short solves (direct ones) are timed best of 3, the rest once.
                elapsed = float("inf")
                for _ in range(3 if first < 1.0 else 1):
                    client.stats.clear()
                    start = time.perf_counter()
                    x, result, steps = jax.block_until_ready(solve(inputs, b))
                    elapsed = min(elapsed, time.perf_counter() - start)
                    sent = dict(client.stats)
                err = float(jnp.linalg.norm(x - x_ref) / jnp.linalg.norm(x_ref))
                ok = result == lx.RESULTS.successful
                row = {
                    "server": server,
                    "problem": name,
                    "solver": sname,
                    "time": elapsed,
                    "first": first,
                    "sent": sent,
                    "requests": sum(sent.values()),
                    "steps": None if steps is None else int(steps),
                    "error": err,
                    "result": "ok" if ok else str(result),
                }
                rows.append(row)
                log(
                    f"[{server}] {name} {sname}: {elapsed * 1e3:.1f} ms "
                    f"(first call {first:.2f} s), {row['requests']} requests {sent}, "
                    f"steps {row['steps']}, rel. error {err:.1e}, {row['result']}"
                )
    return rows


def table(rows) -> str:
    lines = [
        "| problem | solver | server | requests (by endpoint) | wall time | "
        "iterations | rel. error vs dense solve |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(SERVERS)}
    rows = sorted(
        rows,
        key=lambda r: (
            list(PROBLEMS).index(r["problem"]),
            PROBLEMS[r["problem"]].index(r["solver"]),
            order[r["server"]],
        ),
    )
    for r in rows:
        sent = ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items()))
        steps = "" if r["steps"] is None else str(r["steps"])
        err = f"{r['error']:.1e}" + ("" if r["result"] == "ok" else f" ({r['result']})")
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['server']} | {r['requests']} "
            f"({sent}) | {r['time'] * 1e3:.1f} ms | {steps} | {err} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-side", type=int, default=16, help="grid N (n = N^2)")
    parser.add_argument("--out", type=Path, default=HERE / "solvers.md")
    opts = parser.parse_args()
    start = time.perf_counter()
    n = opts.n_side**2
    header = (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}, {platform.system()}), "
        f"loopback HTTP, 1 server worker, {datetime.date.today().isoformat()}. "
        f"{versions()}. One `lx.linear_solve` at n = {n} (grid N = {opts.n_side}), "
        "jitted; the first call compiles client and server and is not timed; then "
        "timed once, or best of 3 when the first call took under 1 s (direct "
        "solvers, CG); requests are those of one timed call. `TesseractModule(client)` with "
        '`batching="auto"`. Iterative solvers rtol = atol = 1e-8. Error: '
        "`|x - x_ref| / |x_ref|`, `x_ref = jnp.linalg.solve` of the dense Jacobian "
        "of the pure-JAX reference. bratu: `TesseractJacobianOperator(f, inputs, "
        '"u", "residual")` (non-symmetric); poisson: `TesseractJacobianOperator('
        'f, inputs, "x", "y", tags=(symmetric, positive_semidefinite))` (with the '
        "symmetric tag `.T` is the operator itself, so LSMR/Normal send JVPs only). "
        "Iterations: lineax's `num_steps` (GMRES counts restarts, not mat-vecs)."
    )
    log(header)
    rows = []
    for server in SERVERS:
        rows += run(server, opts.n_side)
    text = (
        f"# lineax solvers on served Tesseracts, n = {n}\n\n"
        + header
        + "\n\n"
        + table(rows)
        + f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s.\n"
    )
    opts.out.write_text(text)
    log("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
