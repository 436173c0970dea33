"""Benchmark: batching planned when traced, before and after, on real local servers.

Two measurements, each run against `tesseract_lx` as it was before the redesign (a
git worktree of `--before`, 5da38a5 by default) and as it is now (a copy of this
checkout's `tesseract_lx/`, taken once at the start so that edits made meanwhile do not
mix into a run), float64, each side with its own `tlx.serve` and the same Tesseracts
(this checkout's `tesseract_api.py` files):

1. `jax.vmap` of `lx.linear_solve(op, b, lx.GMRES(rtol=1e-8, atol=1e-8))` over K=4
   right-hand sides, the `springs` Tesseract at n=512 (`tests/tesseracts/springs`),
   `op` an `lx.JacobianLinearOperator` of the module's residual or a
   `tlx.TesseractJacobianOperator`, built inside the jitted function; rules
   `tlx.Auto()`, `tlx.Jacobian()`, `tlx.Batched()`. Two points: a well-conditioned
   one and one that takes twice the GMRES restart cycles, so that a request count
   that follows the iteration count shows. Per call (one vmapped solve of the 4
   right-hand sides): median wall time after a warm-up call, the requests
   (`client.stats`, a fresh client per cell) and the max abs error against
   `jnp.linalg.solve` of the pure-JAX Jacobian.
2. `jax.jit(jax.vmap(jax.jacfwd(g)))` over P points of the `bratu` Tesseract at
   n=1024 (u of shape (32, 32)), P in {1, 16, 64}, each P in a fresh process (its
   own client of the side's one server): time per point (median of the timed calls
   after a warm-up) and the process's peak RSS (`VmHWM`, read before the result is
   checked against pure JAX), against the result's size P * 1024 * 1024 * 8 bytes.

The sides alternate (`--rounds` times each) so that the machine's load falls on both;
every cell notes the 1-minute load average around it. Writes `planning.md` next to
this file (or into `--out`); the worktree is removed at the end.

    .venv/bin/python benchmarks/planning.py [--out DIR] [--rounds 2] [--before REV]
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _report import log, machine, versions


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SPRINGS = ROOT / "tests" / "tesseracts" / "springs" / "tesseract_api.py"
BRATU = ROOT / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
SIDES = ("before", "after")
N, K, SIDE, PS = 512, 4, 32, (1, 16, 64)
# Measurement 2 with `tlx.Auto()` at every P, and `tlx.Jacobian()` at the largest.
JACFWD = tuple((p, "Auto") for p in PS) + ((PS[-1], "Jacobian"),)
# (lowest, highest) value of x0 = linspace: condition numbers ~5 and ~45, 3 and 6
# GMRES(restart=20) cycles at rtol = atol = 1e-8.
POINTS = {"easy": (1.0, 2.0), "harder": (0.2, 1.0)}
RULES = ("Auto", "Jacobian", "Batched")
JLO, TJO = "lx.JacobianLinearOperator", "tlx.TesseractJacobianOperator"
SHORT = {
    "jacobian": "jac",
    "jacobian_vector_product": "JVP",
    "vector_jacobian_product": "VJP",
    "batched_jacobian_vector_product": "bJVP",
    "batched_vector_jacobian_product": "bVJP",
    "batched_apply": "bapply",
}
TIMEOUT = 1800.0  # seconds a side process may take
POINT_TIMEOUT = 600.0  # seconds one P of measurement 2 may take


def load() -> float:
    return os.getloadavg()[0]


def hwm_kb() -> int:
    """Peak resident set of this process (`VmHWM`), in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


#
# Pure JAX: the same maths as the Tesseracts
#


def springs_residual(x, a):
    p = jnp.pad(x, 1)
    return a["k"] * (2 * x - p[:-2] - p[2:]) + a["c"] * x**3 - a["f"]


def bratu_residual(u, k, f):
    p = jnp.pad(u, 1)
    nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4 * u - nb) * (u.shape[0] + 1) ** 2 - k * jnp.exp(u) - f


def springs_point(name: str):
    lo, hi = POINTS[name]
    x0 = jnp.linspace(lo, hi, N)
    args = {"k": jnp.asarray(1.0), "c": jnp.asarray(1.0), "f": jnp.ones(N)}
    bs = jnp.asarray(np.random.default_rng(0).standard_normal((K, N)))
    return x0, args, bs


#
# 1. Vmapped GMRES (in a side process)
#


def gmres_cell(url: str, rule: str, operator: str, point: str, repeats: int) -> dict:
    import tesseract_lx as tlx  # whichever tree PYTHONPATH gives this process

    x0, args, bs = springs_point(point)
    jac = jax.jacfwd(springs_residual)(x0, args)
    ref = jnp.linalg.solve(jac, bs.T).T
    cell = {"rule": rule, "operator": operator, "point": point, "load": [load()]}
    # A fresh client per cell: `Auto` may plan from latencies measured earlier.
    with tlx.Client(url) as client:
        f = tlx.TesseractModule(client, batching=getattr(tlx, rule)())

        @jax.jit
        def solve(x0, args, bs):
            if operator == JLO:
                fn = lambda y, a: f({**a, "x": y})["residual"]
                op = lx.JacobianLinearOperator(fn, x0, args)
            else:
                inputs = {**args, "x": x0}
                op = tlx.TesseractJacobianOperator(f, inputs, wrt="x", of="residual")

            def one(b):
                sol = lx.linear_solve(op, b, lx.GMRES(rtol=1e-8, atol=1e-8))
                return sol.value, sol.stats["num_steps"]

            return jax.vmap(one)(bs)

        try:
            jax.block_until_ready(solve(x0, args, bs))  # compile, trace, warm up
            times, sent = [], []
            for _ in range(repeats):
                client.stats.clear()
                start = time.perf_counter()
                value, cycles = jax.block_until_ready(solve(x0, args, bs))
                times.append(time.perf_counter() - start)
                sent.append(dict(client.stats))
        except Exception as e:  # noqa: BLE001 - a cell that fails is a result
            cell["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return cell
        finally:
            cell["decisions"] = [
                f"{d.kind} k={d.k}: {d.chosen} ({d.reason})"[:300]
                for d in list(client.decisions)[-4:]
            ]
    cell.update(
        times=times,
        sent=sent,
        cycles=np.asarray(cycles).tolist(),
        err=float(jnp.max(jnp.abs(value - ref))),
    )
    cell["load"].append(load())
    return cell


def gmres(repeats: int) -> list[dict]:
    import tesseract_lx as tlx

    cells = []
    with tlx.serve(SPRINGS) as served:
        for point in POINTS:
            for operator in (JLO, TJO):
                for rule in RULES:
                    cells.append(
                        gmres_cell(served.urls[0], rule, operator, point, repeats)
                    )
                    log(f"  gmres {point} {operator} {rule}: {brief(cells[-1])}")
    return cells


def brief(cell: dict) -> str:
    if "error" in cell:
        return cell["error"]
    ms = ", ".join(f"{t * 1e3:.0f}" for t in cell["times"])
    return f"{ms} ms, {cell['sent'][-1]}, cycles {cell.get('cycles')}, err {cell['err']:.1e}"


#
# 2. jit(vmap(jacfwd)) over P points (a process per P)
#


def jacfwd_point(p: int, rule: str, url: str, repeats: int) -> dict:
    """In a fresh process: time and peak memory of `jit(vmap(jacfwd(g)))` at P points."""
    import tesseract_lx as tlx

    out = {"P": p, "rule": rule, "load": [load()], "file": tlx.__file__}
    ones = jnp.ones((SIDE, SIDE))
    us = jnp.asarray(0.1 * np.random.default_rng(p).standard_normal((p, SIDE, SIDE)))
    with tlx.Client(url) as client:
        f = tlx.TesseractModule(client, batching=getattr(tlx, rule)())
        g = lambda u: f({"u": u, "k": 1.0, "f": ones})["residual"]
        run = jax.jit(jax.vmap(jax.jacfwd(g)))
        jac = jax.block_until_ready(run(us))  # compile, trace, warm up
        out["hwm_warm_kb"] = hwm_kb()
        times, sent = [], []
        for _ in range(repeats):
            jac = None  # not two results alive at once
            client.stats.clear()
            start = time.perf_counter()
            jac = jax.block_until_ready(run(us))
            times.append(time.perf_counter() - start)
            sent.append(dict(client.stats))
        out["decisions"] = [
            f"{d.kind} k={d.k}: {d.chosen} ({d.reason})"[:300]
            for d in list(client.decisions)[-4:]
        ]
    out.update(hwm_kb=hwm_kb(), times=times, sent=sent, shape=list(jac.shape))
    out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Checked after the peak was read, one point at a time.
    ref = jax.jit(jax.jacfwd(lambda u: bratu_residual(u, 1.0, ones)))
    out["err"] = max(float(jnp.max(jnp.abs(jac[i] - ref(us[i])))) for i in range(p))
    out["load"].append(load())
    return out


def jacfwd(repeats: int, tmp: Path) -> list[dict]:
    import tesseract_lx as tlx

    rows = []
    with tlx.serve(BRATU) as served:
        for p, rule in JACFWD:
            path = tmp / f"point-{p}-{rule}.json"
            cmd = [sys.executable, __file__, "--point", str(p), "--rule", rule]
            cmd += ["--url", served.urls[0], "--json", str(path)]
            cmd += ["--point-repeats", str(repeats)]
            rows.append(child(cmd, path, POINT_TIMEOUT, {"P": p, "rule": rule}))
            r = rows[-1]
            what = r.get("error") or (
                f"{np.median(r['times']) / p * 1e3:.1f} ms/point, "
                f"peak {r['hwm_kb'] / 1024:.0f} MiB, {r['sent'][-1]}, err {r['err']:.1e}"
            )
            log(f"  jacfwd P={p} {rule}: {what}")
    return rows


def child(cmd: list[str], path: Path, timeout: float, blank: dict, env=None) -> dict:
    """Run `cmd`, which writes one JSON document to `path`: that, or why not. Its
    progress lines pass through; its stderr (JAX's warnings) is kept for errors."""
    path.unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            cmd, cwd=HERE, env=env, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**blank, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not path.exists():
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        return {**blank, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(path.read_text())


#
# A side: one round of both measurements with one tree's tesseract_lx
#


def side(opts) -> dict:
    import tesseract_lx as tlx

    log(f"[{opts.side}] tesseract_lx from {tlx.__file__}, load {load():.2f}")
    with tempfile.TemporaryDirectory(prefix="tlx_planning_") as tmp:
        return {
            "side": opts.side,
            "file": tlx.__file__,
            "gmres": gmres(opts.repeats),
            "jacfwd": jacfwd(opts.point_repeats, Path(tmp)),
        }


def snapshot(tree: Path, dest: Path) -> str:
    """Copy `tree/tesseract_lx` to `dest/tesseract_lx` once it imports (other work
    may be editing it): returns a digest of the copied sources."""
    for attempt in range(6):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(
            tree / "tesseract_lx",
            dest / "tesseract_lx",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        env = {**os.environ, "PYTHONPATH": str(dest)}
        code = "import tesseract_lx, tesseract_lx._server.app"
        ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
        if ok.returncode == 0:
            digest = hashlib.sha256()
            for f in sorted((dest / "tesseract_lx").rglob("*.py")):
                digest.update(f.read_bytes())
            return digest.hexdigest()[:12]
        log(f"{tree}/tesseract_lx does not import (attempt {attempt + 1}); waiting")
        time.sleep(30)
    raise RuntimeError(f"{tree}/tesseract_lx did not import: {ok.stderr[-500:]!r}")


def run_side(name: str, tree: Path, tmp: Path, opts, round_: int) -> dict:
    path = tmp / f"{name}-{round_}.json"
    cmd = [sys.executable, __file__, "--side", name, "--json", str(path)]
    cmd += ["--repeats", str(opts.repeats), "--point-repeats", str(opts.point_repeats)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start, before = time.perf_counter(), load()
    log(f"round {round_ + 1}, {name}: {tree}, load {before:.2f}")
    out = child(cmd, path, TIMEOUT, {"side": name}, env)
    if "error" in out:
        log(f"  {name} failed: {out['error']}")
    elif not Path(out["file"]).is_relative_to(tree):
        raise RuntimeError(f"{name} ran {out['file']}, not the code in {tree}")
    out["seconds"] = time.perf_counter() - start
    return out


#
# Report
#


def span(values, scale=1.0, fmt="{:.0f}") -> str:
    """Median [min-max] of `values` times `scale`."""
    v = np.asarray(values, dtype=float) * scale
    if v.size == 0:
        return "-"
    med = fmt.format(np.median(v))
    if v.size == 1 or v.min() == v.max():
        return med
    return f"{med} [{fmt.format(v.min())}-{fmt.format(v.max())}]"


def requests(sent: list[dict]) -> str:
    """Requests per call by endpoint; every distinct count if they vary."""
    seen = []
    for s in sent:
        text = ", ".join(f"{v} {SHORT.get(k, k)}" for k, v in sorted(s.items()))
        if (text := text or "0") not in seen:
            seen.append(text)
    if not seen:
        return "-"
    return seen[0] if len(seen) == 1 else " / ".join(seen) + " (**varies**)"


def loads(cells: list[dict]) -> str:
    values = [x for c in cells for x in c.get("load", [])]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def errors(cells: list[dict]) -> str:
    errs = [c["err"] for c in cells if "err" in c]
    return f"{max(errs):.1e}" if errs else "-"


def failed(cells: list[dict]) -> str:
    return "; ".join(sorted({c["error"] for c in cells if "error" in c}))


def gmres_table(runs: dict) -> list[str]:
    def cells(name, point, operator, rule):
        return [
            c
            for run in runs[name]
            for c in run.get("gmres", [])
            if (c["point"], c["operator"], c["rule"]) == (point, operator, rule)
        ]

    lines = [
        "| point | operator | rule | ms per call, before | after | requests per call, "
        "before | after | GMRES cycles (per RHS) | max abs err, before / after | "
        "load, before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for point in POINTS:
        for operator in (JLO, TJO):
            for rule in RULES:
                b, a = (
                    cells("before", point, operator, rule),
                    cells("after", point, operator, rule),
                )
                row = [f"{point}", f"`{operator}`", f"`tlx.{rule}()`"]
                for group in (b, a):
                    times = [t for c in group for t in c.get("times", [])]
                    gone = "**failed**" if group else "-"
                    row.append(span(times, 1e3) if times else gone)
                for group in (b, a):
                    row.append(requests([s for c in group for s in c.get("sent", [])]))
                cycles = sorted(
                    {x for c in b + a for x in c.get("cycles", [])} or {"-"}, key=str
                )
                row.append(", ".join(map(str, cycles)))
                row.append(f"{errors(b)} / {errors(a)}")
                row.append(f"{loads(b)} / {loads(a)}")
                lines.append("| " + " | ".join(row) + " |")
                for name, group in (("before", b), ("after", a)):
                    if why := failed(group):
                        notes.append(f"- {point}, {operator}, {rule}, {name}: {why}")
    return lines + ([""] + notes if notes else [])


def jacfwd_rows(runs: dict, name: str, p: int, rule: str = "Auto") -> list[dict]:
    return [
        r
        for run in runs[name]
        for r in run.get("jacfwd", [])
        if (r["P"], r["rule"]) == (p, rule)
    ]


def peaks(runs: dict, name: str, p: int, rule: str = "Auto") -> list[float]:
    rows = jacfwd_rows(runs, name, p, rule)
    return [r["hwm_kb"] * 1024 for r in rows if "hwm_kb" in r]


def per_point(runs: dict, name: str, p: int, rule: str = "Auto") -> list[float]:
    """The time per point of every timed call of every process."""
    return [t / p for r in jacfwd_rows(runs, name, p, rule) for t in r.get("times", [])]


def jacfwd_table(runs: dict) -> list[str]:
    lines = [
        "| P | rule | result | ms per point, before | after | requests per call, "
        "before | after | peak RSS MiB, before | after | (peak - P=1 peak) / result, "
        "before | after | max abs err, before / after | load, before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    base = {s: np.median(peaks(runs, s, 1) or [np.nan]) for s in SIDES}
    for p, rule in JACFWD:
        size = p * (SIDE * SIDE) ** 2 * 8
        row = [str(p), f"`tlx.{rule}()`", f"{size / 2**20:.0f} MiB"]
        rows = {s: jacfwd_rows(runs, s, p, rule) for s in SIDES}
        for s in SIDES:
            times = per_point(runs, s, p, rule)
            gone = "**failed**" if rows[s] else "-"
            row.append(span(times, 1e3, "{:.1f}") if times else gone)
        for s in SIDES:
            row.append(requests([x for r in rows[s] for x in r.get("sent", [])]))
        for s in SIDES:
            peak = peaks(runs, s, p, rule)
            row.append(span(peak, 2.0**-20) if peak else "-")
        for s in SIDES:
            above = [(x - base[s]) / size for x in peaks(runs, s, p, rule)]
            row.append("-" if p == 1 or not above else span(above, 1, "{:.2f}"))
        row.append(f"{errors(rows['before'])} / {errors(rows['after'])}")
        row.append(f"{loads(rows['before'])} / {loads(rows['after'])}")
        lines.append("| " + " | ".join(row) + " |")
        for s in SIDES:
            if why := failed(rows[s]):
                notes.append(f"- P={p}, {rule}, {s}: {why}")
    return lines + ([""] + notes if notes else [])


def targets(runs: dict) -> list[str]:
    lines = ["| target | before | after |", "|---|---|---|"]

    def gmres_cells(name, point, operator):
        return [
            c
            for run in runs[name]
            for c in run.get("gmres", [])
            if (c["point"], c["operator"], c["rule"]) == (point, operator, "Jacobian")
        ]

    def gmres_requests(name, point, operator):
        cells = gmres_cells(name, point, operator)
        return sorted({sum(s.values()) for c in cells for s in c.get("sent", [])})

    def per_cycle(name, operator):
        """Whether every call sent one request per GMRES restart cycle."""
        return all(
            sum(s.values()) == max(c["cycles"])
            for point in POINTS
            for c in gmres_cells(name, point, operator)
            for s in c.get("sent", [])
        )

    for operator in (JLO, TJO):
        row = [
            f"`tlx.Jacobian()`, `{operator}`: requests per call independent of the "
            f"GMRES iteration count ({' vs '.join(POINTS)} point)"
        ]
        for name in SIDES:
            counts = [gmres_requests(name, point, operator) for point in POINTS]
            if not all(counts):
                row.append("no data")
                continue
            same = all(len(c) == 1 for c in counts) and len({c[0] for c in counts}) == 1
            shown = " vs ".join("/".join(map(str, c)) for c in counts)
            cycle = " (one per restart cycle)" if per_cycle(name, operator) else ""
            row.append(f"{shown}{cycle}: {'met' if same else '**not met**'}")
        lines.append("| " + " | ".join(row) + " |")
    row = [
        "`tlx.Auto()`: peak RSS above the P=1 baseline <= 3x the result "
        "(median at P=16, P=64)"
    ]
    for name in SIDES:
        base = np.median(peaks(runs, name, 1) or [np.nan])
        above = [
            np.median([(x - base) / (p * (SIDE * SIDE) ** 2 * 8) for x in peak])
            for p in PS[1:]
            if (peak := peaks(runs, name, p))
        ]
        if len(above) < len(PS) - 1 or np.isnan(base):
            row.append("no data")
        else:
            ok = max(above) <= 3
            shown = ", ".join(f"{w:.2f}x" for w in above)
            row.append(f"{shown}: {'met' if ok else '**not met**'}")
    lines.append("| " + " | ".join(row) + " |")
    row = ["`tlx.Auto()`: time per point flat within 20% from P=16 to P=64"]
    for name in SIDES:
        a, b = per_point(runs, name, PS[1]), per_point(runs, name, PS[2])
        if not a or not b:
            row.append("no data")
            continue
        ratio = np.median(b) / np.median(a)
        ok = abs(ratio - 1) <= 0.2
        row.append(f"P=64 / P=16 = {ratio:.2f}: {'met' if ok else '**not met**'}")
    lines.append("| " + " | ".join(row) + " |")
    return lines


def plans(runs: dict) -> list[str]:
    """What `tlx.Auto()` planned for each row (its last decision, first round)."""
    lines = []
    for name in SIDES:
        run = next((r for r in runs[name] if "gmres" in r), {})
        for c in run.get("gmres", []):
            if c["rule"] == "Auto" and c.get("decisions"):
                what = f"GMRES, {c['point']}, `{c['operator']}`"
                lines.append(f"- {name}, {what}: {c['decisions'][-1]}")
        for r in run.get("jacfwd", []):
            if r.get("decisions"):
                what = f"jacfwd, P={r['P']}, `tlx.{r['rule']}()`"
                lines.append(f"- {name}, {what}: {r['decisions'][-1]}")
    return lines


def report(runs: dict, meta: dict) -> str:
    lines = [
        "# Planning when traced: before and after",
        "",
        f"{meta['date']}. {meta['machine']}. {meta['versions']}. Loopback HTTP, one "
        "`tesseract-lx serve` server (1 worker) per side and Tesseract, started with "
        "that side's `tlx.serve`; float64.",
        "",
        f"- before: `tesseract_lx` of {meta['before']} (a git worktree);",
        f"- after: this checkout's working tree, copied when the run started "
        f"(sources sha256 {meta['after_digest']}).",
        "",
        f"{meta['rounds']} rounds, before and after alternating; "
        f"{meta['seconds']:.0f} s in all. Cells: median [min-max] over every timed "
        "call of every round; load: the 1-minute load average around each cell "
        f"(the machine has {os.cpu_count()} cores and other work ran beside). "
        "Requests: `jac` = `/jacobian`, `bJVP` = `/batched_jacobian_vector_product`, "
        "`JVP` = `/jacobian_vector_product`.",
        "",
        f"## 1. `jax.vmap` of GMRES over K={K} right-hand sides, springs, n={N}",
        "",
        "`lx.GMRES(rtol=1e-8, atol=1e-8)` (restart 20) in a jitted function that "
        "builds the operator; a call solves all 4 right-hand sides. Points: "
        + "; ".join(
            f"{k}: x0 = linspace({lo}, {hi}, {N}), k = c = 1, f = 1"
            for k, (lo, hi) in POINTS.items()
        )
        + f". {meta['gmres_repeats']} timed calls per cell and round after a warm-up; "
        "GMRES cycles: lineax's `num_steps` (restart cycles) of each right-hand side; "
        "error against `jnp.linalg.solve` of the pure-JAX Jacobian.",
        "",
        *gmres_table(runs),
        "",
        f"## 2. `jax.jit(jax.vmap(jax.jacfwd(g)))` over P points, bratu, n={SIDE**2}",
        "",
        "`g = lambda u: f({'u': u, 'k': 1.0, 'f': ones})['residual']` with "
        "`tlx.TesseractModule(client, batching=rule)`, u of shape (32, 32); "
        "`tlx.Auto()` (the default) at every P, and `tlx.Jacobian()` at the largest "
        "to compare with; a fresh process (and client) per row and round; "
        f"{meta['point_repeats']} timed calls after a "
        "warm-up. Peak RSS: the process's `VmHWM` after the timed calls (the result of "
        "the previous call dropped before each), before the check against pure JAX.",
        "",
        *jacfwd_table(runs),
        "",
        "## Targets",
        "",
        *targets(runs),
        "",
        "## What the rules planned",
        "",
        "The last entry of `client.decisions` of each cell (first round):",
        "",
        *plans(runs),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where results go")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side")
    parser.add_argument("--before", default="5da38a5", help="the commit before")
    parser.add_argument(
        "--before-tree", type=Path, help="an existing checkout of --before to use"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed GMRES calls")
    parser.add_argument("--point-repeats", type=int, default=3, help="timed jacfwd")
    parser.add_argument(
        "--raw", type=Path, help="also write every measurement, as JSON, here"
    )
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--rule", default="Auto", help=argparse.SUPPRESS)
    parser.add_argument(
        "--render", type=Path, help="only write the tables again from a --raw file"
    )
    opts = parser.parse_args(argv)
    if opts.render is not None:
        raw = json.loads(opts.render.read_text())
        (opts.out / "planning.md").write_text(report(raw["runs"], raw["meta"]))
        return
    if opts.point is not None:  # one P of measurement 2, in its own process
        out = jacfwd_point(opts.point, opts.rule, opts.url, opts.point_repeats)
        opts.json.write_text(json.dumps(out))
        return
    if opts.side is not None:  # one side, with whatever tree PYTHONPATH gives
        opts.json.write_text(json.dumps(side(opts)))
        return
    start = time.perf_counter()
    runs = {name: [] for name in SIDES}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tlx_plan_")))
        trees = {"after": tmp / "after"}
        digest = snapshot(ROOT, trees["after"])
        if opts.before_tree is not None:
            trees["before"] = opts.before_tree.resolve()
        else:
            trees["before"] = tmp / "before"
            git = ["git", "-C", str(ROOT), "worktree"]
            subprocess.run(
                [*git, "add", "--detach", str(trees["before"]), opts.before],
                check=True,
                capture_output=True,
            )
            stack.callback(
                subprocess.run,
                [*git, "remove", "--force", str(trees["before"])],
                check=False,
            )
        for round_ in range(opts.rounds):
            for name in SIDES:
                runs[name].append(run_side(name, trees[name], tmp, opts, round_))
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "machine": machine(),
        "versions": versions(),
        "before": opts.before,
        "after_digest": digest,
        "rounds": opts.rounds,
        "seconds": time.perf_counter() - start,
        "gmres_repeats": opts.repeats,
        "point_repeats": opts.point_repeats,
    }
    text = report(runs, meta)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "planning.md").write_text(text)
    if opts.raw is not None:
        opts.raw.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    log("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
