"""Benchmark: how K tangents reach a Tesseract server, and what the cache saves.

A benchmark, not a test: it serves real local Tesseracts over loopback, measures wall
times and request counts, and writes `benchmarks/batching.md` and
`benchmarks/batching.png` (next to this file).

1. `jax.vmap` of a JVP over K tangents of the `bratu` Tesseract (n = N^2 = 64, 256,
   1024; K = 1, 4, 16, 64, n), each batching rule, on a stock `tesseract-runtime`
   server (2 workers) and on the tesseract-lx server (1 worker).
2. `concurrent` vs `sequential` for K = 8 JVPs of the `heavy` Tesseract (~35 ms a
   request at N = 32) on a stock server with 2 workers.
3. Newton-GMRES on the `heavy` Tesseract, tesseract-lx server with and without its
   linearisation cache.

    PYTHONPATH=. .venv/bin/python benchmarks/batching.py [--quick]
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import tesseract_lx as tlx
from _report import log, versions


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BRATU = ROOT / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
HEAVY = ROOT / "examples" / "tesseracts" / "heavy" / "tesseract_api.py"
STRATEGIES = ("sequential", "concurrent", "jacobian", "batched", "auto")
SERVERS = (("tesseract-runtime", 2), ("tesseract-lx", 1))
# Above this many requests a cell is timed once and warmed up by compiling only (the
# server has by then compiled the unbatched JVP for this n in a smaller cell).
BIG = 16


#
# 1. Strategies x K x n x server
#


def jvp_batch(client: tlx.Client, batching: str, n_side: int):
    """A jitted `T -> vmap(t -> J(u) t)(T)` for the bratu residual at a fixed u."""
    f = tlx.TesseractModule(client, batching=batching)
    rng = np.random.default_rng(0)
    u = jnp.asarray(0.1 * rng.standard_normal((n_side, n_side)))
    k = jnp.asarray(1.0)
    f0 = jnp.zeros((n_side, n_side))

    def residual(u):
        return f({"u": u, "k": k, "f": f0})["residual"]

    @jax.jit
    def run(tangents):
        return jax.vmap(lambda t: jax.jvp(residual, (u,), (t,))[1])(tangents)

    return run


def time_cell(client, run, tangents, repeats: int, warm: bool):
    """Best wall time of `repeats` runs, requests of one run, decision of `auto`."""
    if warm:
        jax.block_until_ready(run(tangents))
    else:
        run.lower(tangents).compile()  # trace (abstract_eval) and compile, no requests
    best, sent = math.inf, {}
    for _ in range(repeats):
        client.stats.clear()
        client.decisions.clear()
        start = time.perf_counter()
        jax.block_until_ready(run(tangents))
        best = min(best, time.perf_counter() - start)
        sent = dict(client.stats)
    decision = client.decisions[-1] if client.decisions else None
    return best, sent, decision


def used_rule(sent: dict, k: int, decision) -> str:
    """Which rule actually went out, from the requests sent."""
    if sent.get("batched_jacobian_vector_product"):
        return "batched"
    if sent.get("jacobian"):
        return "jacobian"
    if decision is not None and decision.chosen in ("sequential", "concurrent"):
        return decision.chosen
    return "sequential" if k == 1 else "sequential/concurrent"


def check(out, tangents, n_side) -> None:
    """The vmapped JVP against pure JAX (same residual as the bratu Tesseract)."""

    def residual(u):
        p = jnp.pad(u, 1)
        nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        return (4 * u - nb) * (n_side + 1) ** 2 - jnp.exp(u)

    rng = np.random.default_rng(0)
    u = jnp.asarray(0.1 * rng.standard_normal((n_side, n_side)))
    ref = jax.vmap(lambda t: jax.jvp(residual, (u,), (t,))[1])(tangents)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-10, f"wrong JVPs: relative error {err:.2e}"


def strategies_sweep(sides, ks_of, repeats: int):
    rows = []
    for server, workers in SERVERS:
        with tlx.serve(BRATU, server=server, workers=workers) as served:
            for n_side in sides:
                n = n_side**2
                # A fresh client per n: the cost model's latencies are per endpoint,
                # not per size, so sizes would otherwise pollute each other.
                client = tlx.Client(served.urls[0], workers=workers)
                rng = np.random.default_rng(1)
                for k in ks_of(n):
                    tangents = jnp.asarray(rng.standard_normal((k, n_side, n_side)))
                    row = {"server": server, "workers": workers, "n": n, "K": k}
                    for s in STRATEGIES:
                        run = jvp_batch(client, s, n_side)
                        many = s in ("sequential", "concurrent") and k > BIG
                        reps = 1 if many else repeats
                        t, sent, dec = time_cell(client, run, tangents, reps, not many)
                        if s == "auto" or (s == "batched" and k == 64):
                            check(run(tangents), tangents, n_side)
                        row[s] = {
                            "time": t,
                            "requests": sum(sent.values()),
                            "sent": sent,
                            "used": used_rule(sent, k, dec),
                            "decision": dec,
                        }
                    rows.append(row)
                    log(format_row(row))
                client.close()
    return rows


def format_row(row) -> str:
    seq = row["sequential"]["time"]
    cells = []
    for s in STRATEGIES:
        c = row[s]
        cells.append(
            f"{s}={c['time'] * 1e3:.1f}ms/{c['requests']}req(x{seq / c['time']:.1f})"
        )
    return f"[{row['server']} n={row['n']} K={row['K']}] " + " ".join(cells)


#
# 2. concurrent vs sequential on the heavy Tesseract
#


def heavy_jvps(client, batching, n_side):
    f = tlx.TesseractModule(client, batching=batching)
    rng = np.random.default_rng(2)
    u = jnp.asarray(rng.standard_normal((n_side, n_side)))
    k = jnp.asarray(rng.standard_normal((n_side, n_side)))
    f0 = jnp.ones((n_side, n_side))

    @jax.jit
    def run(tangents):
        res = lambda u: f({"u": u, "k": k, "f": f0})["residual"]
        return jax.vmap(lambda t: jax.jvp(res, (u,), (t,))[1])(tangents)

    return run


def concurrency(n_side: int, k: int, repeats: int):
    out = {}
    with tlx.serve(HEAVY, server="tesseract-runtime", workers=2) as client:
        tangents = jnp.asarray(
            np.random.default_rng(3).standard_normal((k, n_side, n_side))
        )
        # One apply alone: how long one request of this Tesseract takes.
        f = tlx.TesseractModule(client)
        inputs = {
            "u": jnp.zeros((n_side,) * 2),
            "k": jnp.zeros((n_side,) * 2),
            "f": jnp.zeros((n_side,) * 2),
        }
        f(inputs)
        start = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(f(inputs))
        out["one_request"] = (time.perf_counter() - start) / 3
        results = {}
        for s in ("sequential", "concurrent"):
            run = heavy_jvps(client, s, n_side)
            results[s] = time_cell(client, run, tangents, repeats, True)
        np.testing.assert_allclose(
            heavy_jvps(client, "sequential", n_side)(tangents),
            heavy_jvps(client, "concurrent", n_side)(tangents),
            rtol=1e-12,
        )
    out.update(
        {s: {"time": r[0], "requests": sum(r[1].values())} for s, r in results.items()}
    )
    out["speedup"] = out["sequential"]["time"] / out["concurrent"]["time"]
    log(
        f"[heavy N={n_side} K={k}] one request {out['one_request'] * 1e3:.1f} ms; "
        f"sequential {out['sequential']['time'] * 1e3:.0f} ms, concurrent "
        f"{out['concurrent']['time'] * 1e3:.0f} ms: x{out['speedup']:.2f}"
    )
    return out


#
# 3. Newton-GMRES with and without the linearisation cache
#


def newton_gmres(n_side: int, repeats: int):
    rng = np.random.default_rng(4)
    args = {
        "k": jnp.asarray(rng.standard_normal((n_side, n_side))),
        "f": jnp.asarray(5.0 * np.ones((n_side, n_side))),
    }
    u0 = jnp.zeros((n_side, n_side))
    out = {}
    for cache in (True, False):
        with tlx.serve(HEAVY, server="tesseract-lx", cache=cache) as client:
            fn = tlx.residual_fn(tlx.TesseractModule(client), "u", "residual")
            solver = optx.Newton(
                rtol=1e-8, atol=1e-8, linear_solver=lx.GMRES(rtol=1e-8, atol=1e-8)
            )

            @jax.jit
            def solve(u0, args):
                return optx.root_find(fn, solver, u0, args, max_steps=50)

            sol = solve(u0, args)  # warm-up: compile here and on the server
            jax.block_until_ready(sol.value)
            best, sent = math.inf, {}
            for _ in range(repeats):
                client.stats.clear()
                start = time.perf_counter()
                sol = solve(u0, args)
                jax.block_until_ready(sol.value)
                best = min(best, time.perf_counter() - start)
                sent = dict(client.stats)
            norm = float(jnp.linalg.norm(fn(sol.value, args)))
            steps = int(sol.stats["num_steps"])
            out[cache] = {
                "time": best,
                "sent": sent,
                "requests": sum(sent.values()),
                "steps": steps,
                "residual": norm,
                "u": np.asarray(sol.value),
            }
            log(
                f"[newton-gmres N={n_side} cache={cache}] {best:.2f} s, {steps} Newton "
                f"steps, |r|={norm:.1e}, requests {sent}"
            )
    np.testing.assert_allclose(out[True]["u"], out[False]["u"], rtol=1e-6, atol=1e-8)
    out["speedup"] = out[False]["time"] / out[True]["time"]
    return out


#
# Report
#


def fmt_cell(row, s) -> str:
    c = row[s]
    if row["server"] == "tesseract-runtime" and s == "batched":
        return f"n/a (fell back to {c['used']}: {c['requests']} req, {c['time'] * 1e3:.1f} ms)"
    ratio = row["sequential"]["time"] / c["time"]
    return f"{c['time'] * 1e3:.1f} ms / {c['requests']} req / x{ratio:.1f}"


def auto_note(row) -> str:
    d = row["auto"]["decision"]
    if d is None:
        return f"{row['auto']['used']} (K=1 rule, no cost estimate)"
    est = ", ".join(
        f"{r} {v * 1e3:.1f}" for r, v in sorted(d.estimates.items(), key=lambda x: x[1])
    )
    return f"{d.chosen} (est. ms: {est})"


def best_of(row):
    allowed = [s for s in STRATEGIES if s != "auto"]
    if row["server"] == "tesseract-runtime":
        allowed.remove("batched")
    best = min(allowed, key=lambda s: row[s]["time"])
    return best, row["auto"]["time"] / row[best]["time"]


def tables(rows, heavy, newton, header) -> str:
    lines = [header, ""]
    for server, workers in SERVERS:
        lines += [
            f"### `jax.vmap` of a JVP over K tangents, bratu, `{server}` server "
            f"({workers} worker{'s' if workers > 1 else ''})",
            "",
            "Each cell: wall time / requests sent / speed-up over `sequential`.",
            "",
            "| n | K | "
            + " | ".join(STRATEGIES)
            + " | auto picked | best | auto / best |",
            "|---|---|" + "---|" * (len(STRATEGIES) + 3),
        ]
        for row in rows:
            if row["server"] != server:
                continue
            best, ratio = best_of(row)
            cells = " | ".join(fmt_cell(row, s) for s in STRATEGIES)
            lines.append(
                f"| {row['n']} | {row['K']} | {cells} | {auto_note(row)} | {best} | "
                f"{ratio:.2f} |"
            )
        lines.append("")
    lines += [
        f"### `concurrent` vs `sequential`, heavy Tesseract (N={heavy['N']}, "
        f"K={heavy['K']} JVPs), `tesseract-runtime` server, 2 workers",
        "",
        f"One request alone: {heavy['one_request'] * 1e3:.1f} ms.",
        "",
        "| strategy | wall time | requests |",
        "|---|---|---|",
        f"| sequential | {heavy['sequential']['time'] * 1e3:.0f} ms | {heavy['sequential']['requests']} |",
        f"| concurrent | {heavy['concurrent']['time'] * 1e3:.0f} ms | {heavy['concurrent']['requests']} |",
        f"| speed-up | x{heavy['speedup']:.2f} | |",
        "",
        f"### Newton-GMRES on the heavy Tesseract (N={newton['N']}), `tesseract-lx` "
        "server, 1 worker, with and without the linearisation cache",
        "",
        "| cache | wall time | Newton steps | final residual | requests |",
        "|---|---|---|---|---|",
    ]
    for cache in (True, False):
        r = newton[cache]
        sent = ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items()))
        lines.append(
            f"| {'on' if cache else 'off'} | {r['time']:.2f} s | {r['steps']} | "
            f"{r['residual']:.1e} | {r['requests']} ({sent}) |"
        )
    lines += [f"| speed-up | x{newton['speedup']:.2f} | | | |", ""]
    return "\n".join(lines)


def targets(rows, heavy, newton) -> str:
    def find(server, n, k):
        return next(
            r for r in rows if r["server"] == server and r["n"] == n and r["K"] == k
        )

    lines = ["### Targets", "", "| target | measured | |", "|---|---|---|"]

    def add(text, value, ok):
        lines.append(f"| {text} | {value} | {'met' if ok else '**not met**'} |")

    r = find("tesseract-lx", 64, 64)
    x = r["sequential"]["time"] / r["batched"]["time"]
    add("`batched` >= 10x faster than `sequential` at K=64, n=64", f"x{x:.1f}", x >= 10)
    if any(r["n"] == 1024 for r in rows):
        r = find("tesseract-lx", 1024, 4)
        x = r["jacobian"]["time"] / r["batched"]["time"]
        add(
            "`batched` >= 10x faster than `jacobian` at K=4, n=1024",
            f"x{x:.1f}",
            x >= 10,
        )
    x = heavy["speedup"]
    add(
        "`concurrent` (2 workers) >= 1.6x faster than `sequential`, heavy Tesseract",
        f"x{x:.2f}",
        x >= 1.6,
    )
    worst = max(rows, key=lambda r: best_of(r)[1])
    best, ratio = best_of(worst)
    add(
        "`auto` within 1.2x of the best strategy in every row",
        f"worst row: {worst['server']} n={worst['n']} K={worst['K']}, auto "
        f"({worst['auto']['used']}) {ratio:.2f}x of {best}; "
        f"{sum(best_of(r)[1] > 1.2 for r in rows)} of {len(rows)} rows over 1.2x",
        ratio <= 1.2,
    )
    x = newton["speedup"]
    add(
        "Newton-GMRES >= 1.8x faster with the linearisation cache",
        f"x{x:.2f}",
        x >= 1.8,
    )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(
        len(SERVERS),
        len(ns),
        figsize=(4.2 * len(ns), 3.6 * len(SERVERS)),
        squeeze=False,
    )
    markers = dict(zip(STRATEGIES, "osD^x"))
    for i, (server, workers) in enumerate(SERVERS):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            sub = sorted(
                (r for r in rows if r["server"] == server and r["n"] == n),
                key=lambda r: r["K"],
            )
            ks = [r["K"] for r in sub]
            for s in STRATEGIES:
                if server == "tesseract-runtime" and s == "batched":
                    continue  # not available: the library falls back
                ax.loglog(
                    ks,
                    [r[s]["time"] * 1e3 for r in sub],
                    marker=markers[s],
                    label=s,
                    linestyle="--" if s == "auto" else "-",
                )
            ax.set_title(
                f"{server} ({workers} worker{'s' if workers > 1 else ''}), n={n}",
                fontsize=9,
            )
            ax.set_xlabel("K (tangents)")
            ax.set_ylabel("wall time [ms]")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("jax.vmap of a JVP over K tangents (bratu, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    log(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {64, 256} only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heavy-n", type=int, default=32)
    parser.add_argument("--newton-n", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE)
    opts = parser.parse_args()
    start = time.perf_counter()
    sides = (8, 16) if opts.quick else (8, 16, 32)
    ks_of = lambda n: sorted({1, 4, 16, 64, n})
    header = (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}, {platform.system()}), "
        f"loopback HTTP, {datetime.date.today().isoformat()}. {versions()}. Best of "
        f"{opts.repeats} timed runs after a warm-up (one run, warmed by compiling only, "
        f"for `sequential`/`concurrent` with K > {BIG}); jitted, so no tracing or "
        "`/abstract_eval` is timed."
    )
    log(header)
    rows = strategies_sweep(sides, ks_of, opts.repeats)
    heavy = concurrency(opts.heavy_n, 8, opts.repeats)
    heavy.update(N=opts.heavy_n, K=8)
    newton = newton_gmres(opts.newton_n, max(1, opts.repeats - 1))
    newton.update(N=opts.newton_n)
    text = "# Batching benchmark\n\n" + tables(rows, heavy, newton, header)
    text += "\n" + targets(rows, heavy, newton)
    text += f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s.\n"
    (opts.out / "batching.md").write_text(text)
    log("\n" + text)
    plot(rows, opts.out / "batching.png")


if __name__ == "__main__":
    sys.exit(main())
