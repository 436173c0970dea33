"""Benchmark suite: tesseract_lx against tesseract-jax and pure JAX, near and far.

    bash dev.sh bench [--quick] [--no-peer] [--only SUBSTRING] [--out DIR]

Every contender runs the same scenarios (`benchmarks/_scenarios.py`) on the example
Tesseracts `bratu` (cheap), `heavy` (a forward pass of tens of ms), `bratu_numpy`
(NumPy code) and the test Tesseract `springs` (two outputs), float64, under one JAX:

- the run has a venv of its own (`benchmarks/_peer.py`): tesseract-jax 0.5.1 on
  Python 3.12 where the machine has one (else 0.4.0 on this venv's Python, and the
  page says so), and this checkout of tesseract_lx installed in it too; every job
  runs there, in a child process (`benchmarks/_worker.py`) killed past a time limit
  per job and started again for the jobs left;
- tesseract_lx: `tlx.TesseractModule(client, batching=tlx.Auto())` (and every
  batching rule for the vmapped scenarios), `tlx.residual_fn`,
  `tlx.TesseractJacobianOperator`, `tlx.OnServer`, on `tesseract-lx serve` (the
  library and its server) and on a stock `tesseract-runtime serve` (the library
  alone), 1 worker each;
- tesseract-jax: `apply_tesseract` on `Tesseract.from_url` to the stock server, with
  every setting that changes how it sends a batch (`materialize_jacobian`,
  `vmap_method`, `jac` of `lx.JacobianLinearOperator`); the fastest that works is
  the one compared;
- pure JAX (the floor): the same maths (`benchmarks/_references.py`), and the outputs
  every other row is checked against (max abs error).

Far rows: the same scenarios at a smaller size, every request through a delaying TCP
proxy (`benchmarks/_proxy.py`, 127.0.0.1 only) at round trips of 1, 10 and 50 ms,
every contender through the same proxy; tesseract_lx with `tlx.Auto()`, tesseract-jax
with its settings that were fastest, or sent the fewest requests, near.

Each job is `jax.jit`-ed, called once to warm up (compilation, the server's first
call, tracing's requests; up to two more while under a second), then timed up to 5
times (30 for the one-JVP scenario, each followed by a timed `GET /health` on the
same client and server), fewer once 10 s went into timing: the tables give the
median, the requests of a timed call by endpoint (tesseract_lx: `client.stats`;
tesseract-jax: calls of its `_client.run_tesseract`) and the max abs difference from
pure JAX. Writes `RESULTS.md`, `results_time.png` and `results_requests.png` next to
this file, and the generated parts of `docs/benchmarks/index.md` and
`docs/migration.md` (between `<!-- bench:NAME -->` markers), naming the commit
measured; with `--out DIR`, all of them into DIR (the docs pages as copies).

`--quick` (`--smallest`): every scenario at its smallest size, the far rows at a 1 ms
round trip only, 3 repeats, `tlx.Auto()` only; tesseract-jax too unless `--no-peer`
(what the tests run, in this process; then tesseract_lx runs on a stock server only
the one-JVP and `OnServer` scenarios, and far only Newton with `OnServer`).
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _docs import write_docs
from _peer import bench_python
from _report import commit, log, machine
from _results import write_results
from _scenarios import (
    blank,
    Case,
    cases,
    FAMILIES,
    family,
    SCENARIOS,
    Variant,
)


ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
LABELS = {
    "auto": "tlx.Auto()",
    "sequential": "tlx.Sequential()",
    "concurrent": "tlx.Concurrent()",
    "jacobian": "tlx.Jacobian()",
    "batched": "tlx.Batched()",
}
OURS, STOCK = "tesseract_lx", "tesseract_lx, stock server"
PEER, FLOOR = "tesseract-jax", "pure JAX"
WHO = {OURS: 0, STOCK: 1, PEER: 2, FLOOR: 3}
LX, RUNTIME = "tesseract-lx", "tesseract-runtime"


class Settings:
    """How much to measure: timed calls, seconds of timing per job, rules tried."""

    def __init__(self, opts):
        self.repeats = 3 if opts.smallest else 5
        self.budget = 0.5 if opts.smallest else 10.0
        # The batching rules of tesseract_lx tried per case (`Auto` alone at smallest).
        self.rules = 1 if opts.smallest else len(LABELS)
        self.quick = opts.smallest
        self.timeout = opts.peer_timeout
        # tesseract_lx on a stock server: every case; at smallest without
        # tesseract-jax, those that show what differs there (one JVP; `OnServer`
        # falling back, on two outputs too).
        self.stock = ("jvp", "newton_onserver", "newton_whole") if opts.smallest else None

    def on_stock(self, case: Case) -> bool:
        return self.stock is None or case.scenario in self.stock


#
# Jobs: one contender, one setting, one case
#


def _ref(case: Case) -> str:
    return re.sub(r"\W+", "_", case.near.key)


def _job(case: Case, who: str, server: str | None, **more) -> dict:
    return {"case": vars(case), "who": who, "server": server, "ref": _ref(case), **more}


def _reused(case: Case, todo: list[Case]) -> Case | None:
    """The case whose tesseract-jax rows `case` reuses (the same maths), if run."""
    source = SCENARIOS[case.scenario].peer_from
    if source is None:
        return None
    other = dataclasses.replace(case, scenario=source)
    return other if other in todo else None


def near_jobs(todo: list[Case], settings: Settings, peer: bool) -> list[dict]:
    """Pure JAX on every case's size (far ones too), then each Tesseract's cases."""
    jobs = [_job(c, "floor", None) for c in dict.fromkeys(c.near for c in todo)]
    for case in (c for c in todo if not c.rtt_ms):
        scenario = SCENARIOS[case.scenario]
        for rule in scenario.rules[: settings.rules]:
            jobs.append(_job(case, "ours", LX, rule=rule))
        if peer or settings.on_stock(case):
            jobs.append(_job(case, "ours", RUNTIME, rule="auto"))
        if peer and _reused(case, todo) is None:
            for variant in scenario.peer:
                jobs.append(_job(case, "peer", RUNTIME, variant=vars(variant)))
    return sorted(jobs, key=lambda j: j["case"]["tesseract"])


def _best_near(case: Case, rows: list[dict]) -> list[dict]:
    """tesseract-jax's settings to run far: of its near rows of the same scenario and
    Tesseract (the same size where there is one), the fastest that worked, and the
    one that sent the fewest requests."""
    near = [
        r
        for r in rows
        if r["contender"] == PEER
        and r["scenario"] == case.scenario
        and r["tesseract"] == case.tesseract
        and r["time"] is not None
    ]
    same = [r for r in near if r["n_side"] == case.n_side and r["k"] == case.k]
    near = same or near
    if not near:
        return [vars(v) for v in SCENARIOS[case.scenario].peer]
    picks = [
        min(near, key=lambda r: r["time"]),
        min(near, key=lambda r: (sum(r["sent"].values()), r["time"])),
    ]
    return list({p["variant"]: p["setting"] for p in picks}.values())


def far_jobs(
    todo: list[Case], rows: list[dict], settings: Settings, peer: bool
) -> list[dict]:
    jobs = []
    for case in (c for c in todo if c.rtt_ms):
        jobs.append(_job(case, "ours", LX, rule="auto"))
        if peer or settings.on_stock(case):
            jobs.append(_job(case, "ours", RUNTIME, rule="auto"))
        if peer and _reused(case, todo) is None:
            for variant in _best_near(case, rows):
                jobs.append(_job(case, "peer", RUNTIME, variant=variant))
    return jobs


def row(job: dict, measured: dict) -> dict:
    case = Case(**job["case"])
    scenario = SCENARIOS[case.scenario]
    who, variant = job["who"], Variant(**job.get("variant", {}))
    if who == "floor":
        contender, label, main = FLOOR, "defaults", True
    elif who == "ours":
        contender = OURS if job["server"] == LX else STOCK
        label = LABELS[job["rule"]]
        main = job["rule"] == scenario.rules[0]
    else:
        contender, label = PEER, variant.label
        main = variant == scenario.peer[0]
    measured.pop("value", None)
    return {
        "key": case.key,
        "scenario": case.scenario,
        "family": family(case),
        "tesseract": case.tesseract,
        "n_side": case.n_side,
        "n": case.n,
        "k": case.k,
        "rtt_ms": case.rtt_ms,
        "contender": contender,
        "server": job["server"],
        "variant": label,
        "setting": vars(variant),
        "main": main,
        "note": None,
        "fallback": None,
        **measured,
    }


#
# Running jobs: in this process, or in the run's venv
#


def execute(jobs: list[dict], python: Path | None, tmp: Path, settings: Settings):
    """Rows of `jobs` (in order), and the versions they ran with."""
    if python is None:
        from _worker import run_jobs, versions

        rows = []

        def emit(doc: dict) -> None:
            if "row" in doc:
                rows.append(row(jobs[doc["job"]], doc["row"]))
                log_row(rows[-1])

        run_jobs(
            jobs,
            tmp / "refs",
            repeats=settings.repeats,
            budget=settings.budget,
            emit=emit,
            wait=not settings.quick,
        )
        return rows, versions()
    rows, found, remaining = [], {}, jobs
    while remaining:
        done, said = worker_process(python, remaining, tmp, settings)
        found.update(said)
        for job, measured in done:
            rows.append(row(job, measured))
            log_row(rows[-1])
        remaining = remaining[len(done) :]
    return rows, found


def worker_process(python: Path, jobs: list, tmp: Path, settings: Settings):
    """Run `jobs` in one worker process until all are done, one overruns its time
    limit (killed, with its servers) or the process dies: (finished jobs with their
    rows, the versions it ran with)."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    cmd = [str(python), str(HERE / "_worker.py"), "--jobs", str(tmp / "jobs.json")]
    cmd += ["--refs", str(tmp / "refs")]
    cmd += ["--repeats", str(settings.repeats), "--budget", str(settings.budget)]
    done, versions, buffer = [], {}, b""
    with open(tmp / "worker.log", "a+b") as err:
        proc = subprocess.Popen(
            cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 180 + settings.timeout
        try:
            while len(done) < len(jobs):
                left = deadline - time.monotonic()
                ready = left > 0 and select.select([proc.stdout], [], [], left)[0]
                chunk = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
                if not chunk:
                    if ready or proc.poll() is not None:
                        err.seek(0)
                        tail = err.read().decode(errors="replace").splitlines()[-5:]
                        why = f"the process died: {' '.join(tail)}"
                    else:
                        why = f"timed out after {settings.timeout:.0f} s"
                    # Dead before it could run anything: so would be every restart;
                    # else the job that was running, and a restart runs the rest.
                    for job in jobs[len(done) : len(done) + 1 if versions else None]:
                        done.append((job, blank(why)))
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        doc = json.loads(line)
                    except ValueError:  # something else printed: not ours
                        continue
                    if not isinstance(doc, dict):
                        continue
                    if "versions" in doc:
                        versions = doc["versions"]
                    elif "start" in doc:
                        deadline = time.monotonic() + settings.timeout
                    elif "row" in doc:
                        done.append((jobs[doc["job"]], doc["row"]))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
    return done, versions


#
# Rows the run did not measure again: reused, and the GET /health companions
#


def reused_rows(rows: list[dict], todo: list[Case]) -> list[dict]:
    """tesseract-jax's rows of the scenario with the same maths (see `peer_from`),
    and pure JAX's near rows for each far case."""
    out = []
    for case in todo:
        source = _reused(case, todo)
        for r in rows:
            if source is not None and r["key"] == source.key and r["contender"] == PEER:
                same = f"the same run as `{source.key}` (the same maths)"
                out.append({**r, "key": case.key, "scenario": case.scenario})
                out[-1]["note"] = same
            if case.rtt_ms and r["key"] == case.near.key and r["contender"] == FLOOR:
                out.append({**r, "key": case.key, "family": "far"})
                out[-1].update(rtt_ms=case.rtt_ms, note="in process: no proxy")
    return out


def health_row(jvp_row: dict) -> dict | None:
    """The `GET /health` calls timed between a JVP row's calls, as a row."""
    if not jvp_row["companion"]:
        return None
    times = jvp_row["companion"]
    return {
        **jvp_row,
        "key": jvp_row["key"].replace("jvp", "health", 1),
        "scenario": "health",
        "variant": "tesseract.health()"
        if jvp_row["contender"] == PEER
        else "client.health()",
        "times": times,
        "time": float(np.median(times)),
        "sent": {"health": 1},
        "requests": [1] * len(times),
        "err": None,
        "companion": [],
    }


def ordered(rows: list[dict], todo: list[Case]) -> list[dict]:
    """`rows` and the `GET /health` rows in the order of `todo` (each health case
    after its JVP), then tesseract_lx, its stock-server rows, tesseract-jax, pure
    JAX."""
    rows = rows + [h for r in rows if r["scenario"] == "jvp" if (h := health_row(r))]
    place = {c.key: i for i, c in enumerate(todo)}
    place.update({k.replace("jvp", "health", 1): i + 0.5 for k, i in place.items()})
    rows = [r for r in rows if r["key"] in place]
    return sorted(rows, key=lambda r: (place[r["key"]], WHO[r["contender"]]))


#
# Driver
#


def log_row(r: dict) -> None:
    sent = ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items()))
    what = f"[{r['contender']} {r['variant']}] {r['key']}:"
    if r["time"] is None:
        log(what, r["error"])
        return
    err = "" if r["err"] is None else f", max abs err {r['err']:.1e}"
    steps = "" if r["steps"] is None else f", {r['steps']} steps"
    log(f"{what} {r['time'] * 1e3:.2f} ms, requests {sent or '-'}{steps}{err}")


def _words(found: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in found.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        "--smallest",
        dest="smallest",
        action="store_true",
        help="the smallest size of every scenario, far at 1 ms only, 3 repeats",
    )
    parser.add_argument("--no-peer", action="store_true", help="no tesseract-jax")
    parser.add_argument(
        "--only", metavar="SUBSTRING", help="the scenarios whose name contains it"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where results go")
    parser.add_argument(
        "--json", type=Path, help="also write every row, machine-readable, here"
    )
    parser.add_argument(
        "--venv",
        "--peer-venv",
        dest="venv",
        type=Path,
        default=ROOT / "out" / "bench-venv",
        help="the venv of the run (tesseract-jax and tesseract_lx), made if needed",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=120.0,
        help="seconds one job may take, warm-up included",
    )
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    settings = Settings(opts)
    todo = cases(smallest=opts.smallest, only=opts.only)
    if not todo:
        parser.error(f"no scenario matches `--only {opts.only}`")
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "commit": commit(),
        "machine": machine(),
        "load": [os.getloadavg()[0]],
        "smallest": opts.smallest,
        "scenarios": list(SCENARIOS),
        "families": list(FAMILIES.values()),
        "peer": None,
    }
    log(f"{meta['machine']}; tesseract_lx @ {meta['commit']}; {len(todo)} cases")
    python = None
    if opts.no_peer:
        meta["peer"] = "not run (`--no-peer`)"
    else:
        try:
            python, meta["peer"] = bench_python(opts.venv, log)
        except RuntimeError as e:
            meta["peer"] = f"not run: the venv of the run could not be made: {e}"
    peer = python is not None
    with tempfile.TemporaryDirectory(prefix="tlx_bench_") as tmp:
        (Path(tmp) / "refs").mkdir()
        rows, found = execute(
            near_jobs(todo, settings, peer), python, Path(tmp), settings
        )
        far = far_jobs(todo, rows, settings, peer)
        meta["far_seconds"] = 0.0
        if far:
            far_start = time.perf_counter()
            more, said = execute(far, python, Path(tmp), settings)
            meta["far_seconds"] = time.perf_counter() - far_start
            rows += more
            found.update(said)
    meta["versions"] = _words(found)
    if peer and "tesseract-jax" not in found:
        meta["peer"] += " (it did not start: see the rows)"
    rows = ordered(rows + reused_rows(rows, todo), todo)
    meta["seconds"] = time.perf_counter() - start
    meta["load"].append(os.getloadavg()[0])
    opts.out.mkdir(parents=True, exist_ok=True)
    write_results(rows, meta, opts.out, profile=HERE / "PROFILE.md")
    write_docs(rows, meta, opts.out if opts.out.resolve() != HERE else None)
    if opts.json is not None:
        opts.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(f"wrote {opts.out / 'RESULTS.md'} in {meta['seconds']:.0f} s")
    if not opts.smallest and opts.only is None:
        import linearisation  # the server's linearisation, compiled or not

        linearisation.main(["--out", str(opts.out)])


if __name__ == "__main__":
    sys.exit(main())
