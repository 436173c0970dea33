"""The jobs of the benchmark suite, run where every contender has the same JAX.

`benchmarks/suite.py` runs this file as a script in the venv of the run (made by
`benchmarks/_peer.py`: tesseract-jax and this checkout of tesseract_lx, editable, so
both under one JAX), one process per Tesseract, or calls `run_jobs` in its own process
when tesseract-jax is not run. A job is one contender, one setting, on one case:

- `floor`: pure JAX (`benchmarks/_references.py`); its outputs are saved (`refs/`)
  for the others to be compared with;
- `ours`: `tlx.TesseractModule(client, batching=rule)` with `tlx.residual_fn`,
  `tlx.TesseractJacobianOperator` and `tlx.OnServer`, on `tesseract-lx serve` or on a
  stock `tesseract-runtime serve`;
- `peer`: `tesseract_jax.apply_tesseract` on `tesseract_core.Tesseract.from_url` to
  the stock server, with one of its settings.

Servers are started here (`tlx.serve`, so they run this venv's JAX too), once each, on
free 127.0.0.1 ports; a case with a round trip (`rtt_ms`) reaches its server through
the delaying proxy (`benchmarks/_proxy.py`), one per server and round trip. As a
script it prints one JSON line for its versions, then one as each job starts and
ends: the suite enforces time limits by killing this process (servers die with it).

    PYTHON benchmarks/_worker.py --jobs JOBS.json --refs DIR
"""

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import tesseract_lx as tlx
from _proxy import delayed
from _references import APIS, REFERENCES, UNKNOWN
from _scenarios import blank, Case, failure, Functional, run_case, Variant


RULES = {
    "auto": tlx.Auto,
    "sequential": tlx.Sequential,
    "concurrent": tlx.Concurrent,
    "jacobian": tlx.Jacobian,
    "batched": tlx.Batched,
}
SERVERS = ("tesseract-lx", "tesseract-runtime")
VERSIONS = (
    "tesseract-jax",
    "jax",
    "jaxlib",
    "lineax",
    "optimistix",
    "equinox",
    "tesseract-core",
)


class Ours(Functional):
    """tesseract_lx: the module with one batching rule, and its own operator and
    optimistix function."""

    def __init__(self, client: tlx.Client, rule: str, unknown: str):
        self.module = tlx.TesseractModule(client, batching=RULES[rule]())
        super().__init__(self.module, unknown=unknown)

    def residual_fn(self):
        return tlx.residual_fn(self.module, wrt=self.unknown, of="residual")

    def jacobian_operator(self, inputs):
        return tlx.TesseractJacobianOperator(
            self.module, inputs, wrt=self.unknown, of="residual"
        )

    def on_server(self, solver):
        return tlx.OnServer(solver)


class Servers:
    """The servers (and proxies) of one process, each started on first use and
    stopped by `close`; `prestart` starts several at once in the background."""

    def __init__(self):
        self.stack = contextlib.ExitStack()
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.started: dict[tuple[str, str], concurrent.futures.Future] = {}
        self.clients: dict[tuple[str, str, float], tlx.Client] = {}
        self.proxies: dict[tuple[str, str, float], str] = {}
        self.trips: dict[tuple[str, str, float], float] = {}
        self.tesseracts: dict[str, tuple] = {}

    def prestart(self, pairs) -> None:
        for name, server in pairs:
            key = (name, server)
            if key not in self.started:
                cm = tlx.serve(APIS[name], server=server)
                future = self.pool.submit(cm.__enter__)
                self.started[key] = future
                # Stopped on close, once started (in the order they were asked for).
                future.add_done_callback(
                    lambda f, cm=cm: (
                        f.exception() is None and self.stack.push(cm.__exit__)
                    )
                )

    def wait(self) -> None:
        """Until every server started is up (or failed: its jobs will say why)."""
        concurrent.futures.wait(self.started.values())

    def url(self, name: str, server: str, rtt_ms: float) -> str:
        self.prestart([(name, server)])
        url = self.started[(name, server)].result().urls[0]
        if not rtt_ms:
            return url
        # One proxy per server and round trip, which every contender goes through.
        key = (name, server, rtt_ms)
        if key not in self.proxies:
            self.proxies[key] = self.stack.enter_context(delayed(url, rtt_ms))
            self.trips[key] = _trip(self.proxies[key])
        return self.proxies[key]

    def trip(self, name: str, server: str, rtt_ms: float) -> float | None:
        """The median time of a bare keep-alive `GET /health` through the proxy."""
        return self.trips.get((name, server, rtt_ms))

    def client(self, name: str, server: str, rtt_ms: float) -> tlx.Client:
        key = (name, server, rtt_ms)
        if key not in self.clients:
            if rtt_ms:
                self.clients[key] = tlx.Client(self.url(name, server, rtt_ms))
            else:
                self.prestart([(name, server)])
                self.clients[key] = self.started[(name, server)].result()
        return self.clients[key]

    def tesseract(self, name: str, server: str, rtt_ms: float):
        """tesseract-core's `Tesseract.from_url`, and the endpoints it sends to."""
        from _peer import counted
        from tesseract_core import Tesseract

        key = f"{name} {server} {rtt_ms}"
        if key not in self.tesseracts:
            tesseract = Tesseract.from_url(self.url(name, server, rtt_ms))
            self.tesseracts[key] = (tesseract, counted(tesseract))
        return self.tesseracts[key]

    def close(self) -> None:
        for future in self.started.values():
            with contextlib.suppress(Exception):
                future.result()
        self.pool.shutdown()
        self.stack.close()


def _trip(url: str, calls: int = 20) -> float:
    """The median seconds of a keep-alive `GET /health` to `url` by bare
    `http.client`: the round trip a request pays, measured."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    times = []
    try:
        for _ in range(calls + 2):
            start = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    return statistics.median(times[2:])


def versions() -> dict[str, str]:
    found = {"Python": platform.python_version()}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _load(path: Path) -> list[np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        return [data[f"arr_{j}"] for j in range(len(data.files))]


def run_job(job: dict, servers: Servers, refs: Path, repeats: int, budget: float):
    """One job's row (see `_scenarios.run_case`), with `fallback`: what tesseract_lx
    did instead of what was asked, if anything (its `client.decisions`)."""
    try:
        return _run_job(job, servers, refs, repeats, budget)
    except Exception as e:  # a server that did not start, a proxy: a result too
        return {**blank(failure(e)), "fallback": None, "trip": None}


def _run_job(job: dict, servers: Servers, refs: Path, repeats: int, budget: float):
    case = Case(**job["case"])
    name, server, rtt = case.tesseract, job.get("server"), case.rtt_ms
    unknown = UNKNOWN[name]
    ref = refs / f"{job['ref']}.npz"
    companion: Callable | None = None
    client = None
    if job["who"] == "floor":
        contender = Functional(REFERENCES[name], unknown=unknown)
        sent, clear = dict, lambda: None
    elif job["who"] == "ours":
        client = servers.client(name, server, rtt)
        contender = Ours(client, job["rule"], unknown)
        sent, clear = (lambda: client.stats), client.stats.clear
        companion = client.health
    else:
        from tesseract_jax import apply_tesseract

        tesseract, endpoints = servers.tesseract(name, server, rtt)
        variant = Variant(**job["variant"])
        contender = Functional(
            lambda x, kw=variant.apply: apply_tesseract(tesseract, x, **kw),
            jac=variant.jac,
            unknown=unknown,
        )
        sent, clear = (lambda: _counter(endpoints)), endpoints.clear
        companion = tesseract.health
    if client is not None:
        client.decisions.clear()  # this job's decisions only, below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tlx.FallbackWarning)  # in `fallback` below
        row = run_case(
            case,
            contender,
            sent=sent,
            clear=clear,
            reference=None if job["who"] == "floor" else _load(ref),
            repeats=repeats * (6 if case.scenario == "jvp" else 1),
            budget=budget,
            companion=companion if case.scenario == "jvp" else None,
        )
    row["fallback"] = None
    row["trip"] = servers.trip(name, server, rtt) if server and rtt else None
    if client is not None:
        fell = [d for d in client.decisions if d.fallback]
        if fell:
            row["fallback"] = fell[-1].reason
    value = row.pop("value", None)
    if job["who"] == "floor" and value is not None:
        np.savez(ref, *value)
    return row


def _counter(endpoints: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in endpoints:
        out[e] = out.get(e, 0) + 1
    return out


def run_jobs(
    jobs: list[dict],
    refs: Path,
    *,
    repeats: int,
    budget: float,
    emit: Callable[[dict], None],
    wait: bool = True,
) -> None:
    """Run `jobs` in order, emitting `{"start": i}` and `{"row": ..., "job": i}`;
    with `wait`, once every server is up (none starting while a job is timed),
    else at once (pure JAX's jobs, first, while the servers start)."""
    servers = Servers()
    try:
        servers.prestart(
            dict.fromkeys(
                (j["case"]["tesseract"], j["server"]) for j in jobs if j.get("server")
            )
        )
        if wait:
            servers.wait()
        for i, job in enumerate(jobs):
            emit({"start": i})
            row = run_job(job, servers, refs, repeats, budget)
            emit({"row": row, "job": i})
    finally:
        servers.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--refs", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0)
    opts = parser.parse_args()

    def emit(doc: dict) -> None:
        print(json.dumps(doc), flush=True)

    emit({"versions": versions()})
    jobs = json.loads(opts.jobs.read_text())
    run_jobs(jobs, opts.refs, repeats=opts.repeats, budget=opts.budget, emit=emit)


if __name__ == "__main__":
    sys.exit(main())
