"""Benchmark suite: tesseract_lx against tesseract-jax 0.4.0 and pure JAX, one command.

    bash dev.sh bench [--smallest] [--no-peer] [--only SUBSTRING] [--out DIR]

Three contenders run the same scenarios (`benchmarks/_scenarios.py`) on the example
Tesseracts `bratu` (cheap) and `heavy` (a forward pass of tens of ms), float64:

- tesseract_lx: `tlx.TesseractModule(client, batching=tlx.Auto())` on a
  `tesseract-lx serve` server (`tlx.serve`, 1 worker, with its linearisation cache),
  and, for the vmapped scenarios, every batching rule; `tlx.residual_fn` for
  optimistix, `tlx.TesseractJacobianOperator` for lineax;
- tesseract-jax 0.4.0: `tesseract_jax.apply_tesseract` on a
  `tesseract_core.Tesseract.from_url` to a stock `tesseract-runtime serve` (1 worker),
  in a venv of its own with our versions of everything else (`benchmarks/_peer.py`),
  as a subprocess killed past a time limit per job; its own settings where they
  matter (`materialize_jacobian`, `vmap_method`, `jac` of `lx.JacobianLinearOperator`);
- pure JAX in this process (the floor): the same maths (`benchmarks/_references.py`),
  `lx.JacobianLinearOperator(..., jac="bwd")` for lineax.

Servers listen on free 127.0.0.1 ports, write to temporary folders and are stopped by
their handle on every way out. Each job is `jax.jit`-ed, called once to warm up
(compilation, the server's first call, tracing's `/abstract_eval`), then timed up to
5 times (30 for the one-JVP scenario, each followed by a timed `GET /health` on the
same client and server), fewer once 10 s went into timing: the table gives the
median, the requests of a timed call by endpoint (tesseract_lx: `client.stats`;
tesseract-jax: calls of `_client.run_tesseract`) and the max abs difference from pure
JAX. Writes `RESULTS.md` (targets, machine, versions, one table per scenario family)
and `results_time.png`, `results_requests.png` next to this file, or into `--out`.
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import tesseract_lx as tlx
from _peer import peer_python
from _references import APIS, REFERENCES
from _report import log, machine, versions
from _results import write_results
from _scenarios import (
    blank,
    Case,
    cases,
    FAMILIES,
    Functional,
    run_case,
    SCENARIOS,
    Variant,
)


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RULES = {
    "auto": tlx.Auto,
    "sequential": tlx.Sequential,
    "concurrent": tlx.Concurrent,
    "jacobian": tlx.Jacobian,
    "batched": tlx.Batched,
}
OURS, PEER, FLOOR = "tesseract_lx", "tesseract-jax", "pure JAX"


class Ours(Functional):
    """tesseract_lx: the module with one batching rule, and its own operator and
    optimistix function."""

    def __init__(self, client: tlx.Client, rule: str):
        self.module = tlx.TesseractModule(client, batching=RULES[rule]())
        super().__init__(self.module)

    def residual_fn(self):
        return tlx.residual_fn(self.module, wrt="u", of="residual")

    def jacobian_operator(self, inputs):
        return tlx.TesseractJacobianOperator(
            self.module, inputs, wrt="u", of="residual"
        )

    def on_server(self, solver):
        return tlx.OnServer(solver)


class Settings:
    """How much to measure: timed calls, seconds of timing per job, rules tried."""

    def __init__(self, opts):
        self.repeats = 3 if opts.smallest else 5
        self.budget = 0.5 if opts.smallest else 10.0
        # The batching rules of tesseract_lx tried per case (`Auto` alone at smallest).
        self.rules = 1 if opts.smallest else len(RULES)
        self.timeout = opts.peer_timeout

    def calls(self, case: Case) -> int:
        return self.repeats * (6 if case.scenario == "jvp" else 1)


def row(case: Case, contender: str, variant: Variant, measured: dict, main: bool):
    measured.pop("value", None)
    return {
        "key": case.key,
        "scenario": case.scenario,
        "family": SCENARIOS[case.scenario].family,
        "tesseract": case.tesseract,
        "n_side": case.n_side,
        "n": case.n,
        "k": case.k,
        "contender": contender,
        "variant": variant.label,
        "main": main,
        **measured,
    }


def health_row(jvp_row: dict) -> dict | None:
    """The `GET /health` calls timed between a JVP row's calls, as a row."""
    if not jvp_row["companion"]:
        return None
    times = jvp_row["companion"]
    return {
        **jvp_row,
        "key": jvp_row["key"].replace("jvp", "health", 1),
        "scenario": "health",
        "variant": "client.health()"
        if jvp_row["contender"] == OURS
        else "tesseract.health()",
        "times": times,
        "time": float(np.median(times)),
        "sent": {"health": 1},
        "requests": [1] * len(times),
        "err": None,
        "companion": [],
    }


def ordered(rows: list[dict], todo: list[Case]) -> list[dict]:
    """`rows` and the `GET /health` rows in the order of `todo` (each health case
    after its JVP), then tesseract_lx, tesseract-jax, pure JAX."""
    rows = rows + [h for r in rows if r["scenario"] == "jvp" if (h := health_row(r))]
    place = {c.key: i for i, c in enumerate(todo)}
    place.update({k.replace("jvp", "health", 1): i + 0.5 for k, i in place.items()})
    who = {OURS: 0, PEER: 1, FLOOR: 2}
    return sorted(rows, key=lambda r: (place[r["key"]], who[r["contender"]]))


#
# The floor and tesseract_lx, in this process
#


def floor(todo: list[Case], settings: Settings):
    """Pure JAX: rows, and the outputs the other contenders are compared with."""
    rows, refs = [], {}
    for case in todo:
        measured = run_case(
            case,
            Functional(REFERENCES[case.tesseract]),
            sent=dict,
            clear=lambda: None,
            reference=None,
            repeats=settings.calls(case),
            budget=settings.budget,
        )
        refs[case.key] = measured.get("value")
        rows.append(row(case, FLOOR, Variant(), measured, True))
        log_row(rows[-1])
    return rows, refs


@contextlib.contextmanager
def servers(names, server: str):
    """`tlx.serve` of each Tesseract in `names`, all starting at once in the
    background (each takes seconds); yields their clients as futures. Every server
    that started is stopped on the way out."""
    managers = {name: tlx.serve(APIS[name], server=server) for name in names}
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(len(managers) or 1) as pool:
            futures = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
            try:
                yield futures
            finally:
                for name, future in futures.items():
                    if future.exception() is None:
                        stack.push(managers[name].__exit__)


def ours(todo: list[Case], refs: dict, settings: Settings, clients: dict) -> list[dict]:
    rows = []
    for case in todo:
        client = clients[case.tesseract].result()
        rules = SCENARIOS[case.scenario].rules[: settings.rules]
        for i, rule in enumerate(rules):
            measured = run_case(
                case,
                Ours(client, rule),
                sent=lambda: client.stats,
                clear=client.stats.clear,
                reference=refs.get(case.key),
                repeats=settings.calls(case),
                budget=settings.budget,
                companion=client.health if case.scenario == "jvp" else None,
            )
            variant = Variant(f"tlx.{RULES[rule].__name__}()")
            rows.append(row(case, OURS, variant, measured, i == 0))
            log_row(rows[-1])
    return rows


#
# tesseract-jax, in its venv, on a stock server
#


def peer(todo: list[Case], refs: dict, settings: Settings, python: Path, tmp: Path):
    """Every peer variant of every case; returns (rows, the peer's versions)."""
    (tmp / "refs").mkdir()
    jobs = []
    for i, case in enumerate(todo):
        if refs.get(case.key) is not None:
            np.savez(tmp / "refs" / f"{i}.npz", *refs[case.key])
        for variant in SCENARIOS[case.scenario].peer:
            jobs.append({"case": vars(case), "variant": vars(variant), "ref": str(i)})
    rows, found = [], {}
    for name in sorted({c.tesseract for c in todo}):
        remaining = [j for j in jobs if j["case"]["tesseract"] == name]
        while remaining:
            # A fresh server after a timeout: the old one may still be computing.
            with servers([name], "tesseract-runtime") as clients:
                url = clients[name].result().urls[0]
                done, said = peer_process(python, url, remaining, tmp, settings)
            found.update(said)
            for job, measured in done:
                case, variant = Case(**job["case"]), Variant(**job["variant"])
                main = variant == SCENARIOS[case.scenario].peer[0]
                rows.append(row(case, PEER, variant, measured, main))
                log_row(rows[-1])
            remaining = remaining[len(done) :]
    return rows, found


def peer_process(python: Path, url: str, jobs: list, tmp: Path, settings: Settings):
    """Run `jobs` in one peer process until all are done, one overruns its time limit
    (killed) or the process dies: (finished jobs with their rows, peer versions)."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    cmd = [str(python), str(HERE / "_peer.py"), "--url", url]
    cmd += ["--jobs", str(tmp / "jobs.json"), "--refs", str(tmp / "refs")]
    cmd += ["--repeats", str(settings.repeats), "--budget", str(settings.budget)]
    done, versions, buffer = [], {}, b""
    with open(tmp / "peer.log", "a+b") as err:
        proc = subprocess.Popen(
            cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + 120 + settings.timeout
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
                    # Dead before it could run anything: so would be every restart.
                    for job in jobs[len(done) : None if versions else len(done) + 1]:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smallest",
        action="store_true",
        help="the smallest size of every scenario, no tesseract-jax, 3 repeats",
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
        "--peer-venv",
        type=Path,
        default=ROOT / "out" / "peer-venv",
        help="the venv of tesseract-jax, made if needed",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=90.0,
        help="seconds one tesseract-jax job may take, warm-up included",
    )
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    settings = Settings(opts)
    todo = cases(smallest=opts.smallest, only=opts.only)
    if not todo:
        parser.error(f"no scenario matches `--only {opts.only}`")
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "machine": machine(),
        "load": [os.getloadavg()[0]],
        "versions": versions(),
        "smallest": opts.smallest,
        "scenarios": list(SCENARIOS),
        "families": list(FAMILIES.values()),
        "peer": "not run (`--smallest`)" if opts.smallest else None,
    }
    log(f"{meta['machine']}; {meta['versions']}; {len(todo)} cases")
    with servers(sorted({c.tesseract for c in todo}), "tesseract-lx") as clients:
        rows, refs = floor(todo, settings)
        rows += ours(todo, refs, settings, clients)
    if opts.no_peer:
        meta["peer"] = "not run (`--no-peer`)"
    elif meta["peer"] is None:
        try:
            python = peer_python(opts.peer_venv, log)
        except RuntimeError as e:
            meta["peer"] = f"not run: its venv could not be made: {e}"
        else:
            with tempfile.TemporaryDirectory(prefix="tlx_bench_") as tmp:
                more, found = peer(todo, refs, settings, python, Path(tmp))
            rows += more
            meta["peer"] = ", ".join(f"{k} {v}" for k, v in found.items())
    rows = ordered(rows, todo)
    meta["seconds"] = time.perf_counter() - start
    meta["load"].append(os.getloadavg()[0])
    opts.out.mkdir(parents=True, exist_ok=True)
    write_results(rows, meta, opts.out, profile=HERE / "PROFILE.md")
    if opts.json is not None:
        opts.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(f"wrote {opts.out / 'RESULTS.md'} in {meta['seconds']:.0f} s")
    if not opts.smallest and opts.only is None:
        import linearisation  # the server's linearisation, compiled or not

        linearisation.main(["--out", str(opts.out)])


if __name__ == "__main__":
    sys.exit(main())
