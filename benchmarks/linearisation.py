"""Benchmark: Newton-GMRES on the heavy Tesseract with the server's linearisation
compiled once per signature (the default) and traced anew at every point
(`TESSERACT_LX_CACHE_JIT=0`).

Both servers are `tesseract-lx serve` (1 worker, free 127.0.0.1 port) of
`examples/tesseracts/heavy` at N = 16 (n = 256); `optx.Newton(rtol=atol=1e-8)` from
u = 0 on `tlx.residual_fn`, jitted, with `lx.GMRES(rtol=atol=1e-8)` locally (one JVP
request per iteration, each a cache hit but the first of a step) and with
`tlx.OnServer(lx.GMRES(...))` (one `/linear_solve` per step). Both servers run at
once and the four set-ups take turns, 5 runs each after a warm-up run; the median
wall time, and the server's cache counters after them. Writes
`benchmarks/linearisation.md` (or `--out DIR`).

    .venv/bin/python benchmarks/linearisation.py
"""

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _references import INPUTS  # noqa: E402
from _report import log, machine, versions  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
HEAVY = ROOT / "examples" / "tesseracts" / "heavy" / "tesseract_api.py"
N, TOL, RUNS = 16, 1e-8, 5


def measure() -> list[dict]:
    """Both servers up at once, their runs interleaved (A B A B ...), so that the
    machine's load weighs on both alike."""
    point = INPUTS["heavy"](N)
    u0, args = jnp.zeros_like(point["u"]), {"k": point["k"], "f": point["f"]}
    krylov = lx.GMRES(rtol=TOL, atol=TOL)
    solvers = {"lx.GMRES": krylov, "tlx.OnServer(lx.GMRES)": tlx.OnServer(krylov)}
    with contextlib.ExitStack() as stack:
        jobs = []
        for jit in (True, False):
            os.environ["TESSERACT_LX_CACHE_JIT"] = "1" if jit else "0"
            client = stack.enter_context(tlx.serve(HEAVY))
            f = tlx.TesseractModule(client)
            f({**args, "u": u0})  # learns the output shapes
            fn = tlx.residual_fn(f, wrt="u", of="residual")
            for name, linear_solver in solvers.items():
                newton = optx.Newton(rtol=TOL, atol=TOL, linear_solver=linear_solver)
                solve = jax.jit(
                    lambda u, a, fn=fn, newton=newton: optx.root_find(fn, newton, u, a)
                )
                jax.block_until_ready(solve(u0, args).value)  # compiles, both ends
                jobs.append(
                    {"jit": jit, "solver": name, "client": client, "solve": solve}
                )
        os.environ.pop("TESSERACT_LX_CACHE_JIT")
        times: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
        sent: dict[int, collections.Counter] = {}
        for _ in range(RUNS):
            for i, job in enumerate(jobs):
                job["client"].stats.clear()
                start = time.perf_counter()
                sol = job["solve"](u0, args)
                jax.block_until_ready(sol.value)
                times[i].append(time.perf_counter() - start)
                sent[i] = collections.Counter(job["client"].stats)
                job["steps"] = int(sol.stats["num_steps"])
        rows = []
        for i, job in enumerate(jobs):
            cache = job["client"].health()["tesseract_lx"]["linearisation_cache"]
            rows.append(
                {
                    "jit": job["jit"],
                    "solver": job["solver"],
                    "median": statistics.median(times[i]),
                    "steps": job["steps"],
                    "requests": dict(sent[i]),
                    "compiles": cache["compiles"],
                }
            )
            log(rows[-1])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    opts = parser.parse_args(argv)
    rows = measure()
    lines = [
        "# The server's linearisation, compiled once or traced at every point",
        "",
        f"Made by `benchmarks/linearisation.py` (its docstring says how). "
        f"{machine()}; {versions()}.",
        "",
        "| linear solver | linearisation | median wall time | Newton steps | "
        "requests per solve | server compilations |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sent = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
        how = "compiled once (`jit`)" if r["jit"] else "traced per point"
        lines.append(
            f"| `{r['solver']}` | {how} | {r['median'] * 1e3:.0f} ms | {r['steps']} | "
            f"{sent} | {r['compiles']} |"
        )
    for solver in dict.fromkeys(r["solver"] for r in rows):
        on, off = (
            next(r for r in rows if r["solver"] == solver and r["jit"] is j)
            for j in (True, False)
        )
        lines.append("")
        lines.append(
            f"`{solver}`: compiled once is {off['median'] / on['median']:.2f}x as fast "
            "as traced per point."
        )
    (opts.out / "linearisation.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {opts.out / 'linearisation.md'}")


if __name__ == "__main__":
    main()
