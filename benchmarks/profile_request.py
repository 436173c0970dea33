"""Benchmark: where the time of ONE JVP request goes, on the client and on the server.

A benchmark, not a test. It writes `benchmarks/PROFILE.md` (next to this file):

    .venv/bin/python benchmarks/profile_request.py [--calls 300] [--sides 16 32 100]

**What is measured.** `jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])` with
`g = u -> tlx.TesseractModule(client)({"u": u, "k": k, "f": f})["residual"]`, on the
`bratu` example Tesseract (N x N grid, n = N^2 unknowns), `jax_enable_x64` on, each call
followed by `block_until_ready`: exactly one `/jacobian_vector_product` request per call
(checked). Three servers, 1 worker each, on 127.0.0.1:

- `lx`: `tesseract-lx serve` (`tlx.serve(path)`), linearisation cache on: every timed
  request is a cache hit (same primal point, as in a Krylov solve);
- `lx-nocache`: the same with `cache=False` (the Tesseract's own JVP every time);
- `stock`: `tesseract-runtime serve` (`tlx.serve(path, server="tesseract-runtime")`:
  port 0, outputs in a temporary folder), tesseract-core's own app and run folders.

**Method.**

1. *Clean end to end.* Against the real servers, no instrumentation anywhere: the JVP
   call, an empty `GET /health` through the client's own `requests` session, and the
   same through a persistent `http.client.HTTPConnection`, and the JVP request's own
   bytes posted through `http.client` (the server alone, no JAX, no client); called
   in turn (one round = each once), medians. The floor of the stack: a bare ASGI app (no FastAPI, no
   starlette: answers a fixed body) under uvicorn with the same settings, asked by
   `GET` and by a `POST` of the very bytes of a JVP request answered with as many bytes
   as a JVP answer, through `requests` and through `http.client`.
2. *Phases.* The same call against an instrumented replica of each server (a child
   process of this script: the same app factory, `create_app` resp. tesseract-core's
   `create_rest_api`, under `uvicorn.Server` with the same settings, 1 worker), with
   `time.perf_counter_ns` wrappers monkeypatched around the functions of each phase on
   both ends: client side in this process (`_primitive._HOST`, `Call.payload`,
   `_dispatch.plan`/`conform`, `Client.request`/`_decode`, `encode_tree`/`decode_tree`,
   the base64 codec, `orjson.dumps`/`loads`, `HTTPTransport.send`,
   `requests.Session.request`, urllib3's `HTTPConnection.request`/`getresponse`,
   `http.client.HTTPResponse._read_status` (the blocking wait for the status line),
   `Response.content`); server side in the child (uvicorn's `data_received`, the ASGI
   app and its `send`, starlette's `Request.body`/`json`, FastAPI's
   `solve_dependencies` (pydantic validation), tesseract-core's endpoint function and
   the Tesseract's JVP (or the `LinearisationCache.call` around it), `start_run`,
   `create_response`, the base64 codec, the thread-pool hop). Per request, derived
   phases are differences of nested timings (e.g. "requests overhead" = time in
   `Session.request` minus send, wait, header parse and body read); requests are
   paired client/server by order (one client, one request at a time), so "loopback +
   wake-ups" = the client's send + wait for the status line - the server's time from
   `data_received` of the first bytes to the socket write of the status line, per
   request: syscalls, scheduling, the other process's wake-up. The server's wall time
   runs to the write of the last bytes. A phase whose function no longer exists (the code
   moves on) shows `n/a`. Each wrapper costs ~1 us; the table shows the instrumented
   total next to the clean one.
3. *cProfile.* 200 calls at n = 1024: this process's main thread (the host callback runs
   there, synchronously) without instrumentation; on the server, the event-loop
   thread and the worker threads of the child (merged). Listed: the top 15 by
   cumulative time per request, leaving out frames that only wait (epoll, locks,
   the event loop's `run_forever`) and this script's own frames. A callee whose
   cumulative time is within 3% of its caller's row is folded into it (a chain of
   wrappers: ASGI middleware, JAX's callback layers), its own time added. cProfile
   counts each resumption of a coroutine as a call, and roughly doubles the time of
   Python-heavy code: read the rows for their order, the phase tables for times.

The machine's load average is written next to the numbers: other work on the same
cores moves every number.

A re-run rewrites everything in `PROFILE.md` but the hand-written text between the
`<!-- conclusions -->` markers, which it keeps.
"""

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import functools
import http.client
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.parse
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BRATU = ROOT / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
OUT = HERE / "PROFILE.md"
SERVERS = ("lx", "lx-nocache", "stock")
SIDES = (16, 32, 100)
PROFILE_SIDE = 32
PROFILE_CALLS = 200
WARMUP = 20
ns = time.perf_counter_ns
# The checkout this script sits in is the one measured (ahead of an editable install
# of another one), here and in the servers' child processes.
sys.path.insert(0, str(ROOT))

# `tlx.serve` starts its child in the Tesseract's folder: this package must be
# importable there whatever the caller's PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


# --- timing records, shared by both ends ---------------------------------------------

# The record of the request in progress (one client, one request at a time), or None.
CURRENT: dict[str, int] | None = None
MISSING: list[str] = []


def _add(phase: str, dt: int) -> None:
    rec = CURRENT
    if rec is not None:
        rec[phase] = rec.get(phase, 0) + dt


def _timed(fn, phase: str):
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args, **kwargs):
            t0 = ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                _add(phase, ns() - t0)

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(phase, ns() - t0)

    return wrapper


class _TimedCM:
    """A context manager's enter and exit, timed (a run folder: made, then closed)."""

    def __init__(self, inner, phase: str):
        self.inner, self.phase = inner, phase

    def __enter__(self):
        t0 = ns()
        try:
            return self.inner.__enter__()
        finally:
            _add(self.phase, ns() - t0)

    def __exit__(self, *exc):
        t0 = ns()
        try:
            return self.inner.__exit__(*exc)
        finally:
            _add(self.phase, ns() - t0)


class Patches:
    """Monkeypatches, undone in reverse order; a missing target is noted, not fatal."""

    def __init__(self):
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, make, label: str | None = None) -> bool:
        label = label or f"{getattr(owner, '__name__', owner)}.{name}"
        if owner is None or name not in vars(owner):
            MISSING.append(label)
            return False
        old = vars(owner)[name]
        self._undo.append((owner, name, old))
        setattr(owner, name, make(old))
        return True

    def timed(self, owner: Any, name: str, phase: str) -> bool:
        def make(old):
            if isinstance(old, property):
                return property(_timed(old.fget, phase), old.fset, old.fdel)
            return _timed(old, phase)

        return self.set(owner, name, make)

    def set_item(self, mapping: Any, key: Any, make, label: str) -> bool:
        if mapping is None or key not in mapping:
            MISSING.append(label)
            return False
        old = mapping[key]
        self._undo.append((mapping, key, _ITEM(old)))
        mapping[key] = make(old)
        return True

    def undo(self) -> None:
        while self._undo:
            owner, name, old = self._undo.pop()
            if isinstance(old, _ITEM):
                owner[name] = old.value
            else:
                setattr(owner, name, old)


class _ITEM:
    """An old value that was a mapping's item, not an attribute."""

    def __init__(self, value: Any):
        self.value = value


def _module(name: str) -> types.ModuleType | None:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        MISSING.append(name)
        return None


def _attr(owner: Any, name: str) -> Any:
    return None if owner is None else getattr(owner, name, None)


# --- cProfile, trimmed ---------------------------------------------------------------

# Frames that only wait or schedule: (file name, function), or a builtin's name part.
_WAITING = {
    ("selectors.py", "select"),
    ("base_events.py", "run_forever"),
    ("base_events.py", "_run_once"),
    ("base_events.py", "run_until_complete"),
    ("events.py", "_run"),
    ("runners.py", "run"),
    ("threading.py", "wait"),
    ("queue.py", "get"),
    ("server.py", "main_loop"),
    ("server.py", "serve"),
    ("server.py", "_serve"),
    ("server.py", "run"),
    ("_asyncio.py", "run"),  # anyio's worker thread loop
}
_WAITING_BUILTINS = ("select.epoll", "_thread.lock", "_lsprof.Profiler", "Context")
# Rows whose cumulative time is within this fraction of the row above are one chain
# of wrappers (ASGI middleware, JAX's callback layers): folded into one row.
_FOLD = 0.97


def _short(func: tuple) -> str:
    file, line, name = func
    if file == "~":
        return name
    file = re.sub(r"^.*/(site-packages|python3\.\d+)/", "", file)
    file = file.replace(str(ROOT) + "/", "")
    return f"{file}:{line}({name})"


def _waiting(func: tuple) -> bool:
    file, _, name = func
    if file == "~":
        return any(w in name for w in _WAITING_BUILTINS)
    return file == __file__ or (Path(file).name, name) in _WAITING


def top_rows(profiles: list[cProfile.Profile], requests: int, k: int = 15) -> list:
    """`[(cum ms, own ms, calls, function, folded)]` per request: the top `k` by
    cumulative time, merged over `profiles`, without frames that only wait or belong
    to this script; a chain of wrappers is one row (`folded`: its innermost frame and
    how many frames it holds)."""
    stats = None
    for p in profiles:
        try:
            s = pstats.Stats(p)
        except TypeError:  # a profile that saw nothing
            continue
        if stats is None:
            stats = s
        else:
            stats.add(s)
    if stats is None:
        return []
    table = stats.stats  # type: ignore[attr-defined]
    rows = [
        (ct * 1e3 / requests, tt * 1e3 / requests, nc / requests, func)
        for func, (_, nc, tt, ct, _) in table.items()
        if not _waiting(func)
    ]
    rows.sort(key=lambda r: r[0], reverse=True)
    out: list[list] = []
    inner = None  # the innermost frame of the last row's chain
    for cum, own, calls, func in rows:
        if out and cum >= _FOLD * out[-1][0] and inner in table[func][4]:
            out[-1][4] = [_short(func), out[-1][4][1] + 1]
            out[-1][1] += own
            inner = func
            continue
        if len(out) == k:
            break
        out.append([cum, own, calls, _short(func), [None, 0]])
        inner = func
    return out


# --- the server side: an instrumented replica in a child process ---------------------


class _ServerProbe:
    """State of the child: finished records, the profilers."""

    records: list[dict] = []
    open: dict | None = None
    loop_profile: cProfile.Profile | None = None
    worker_profile: cProfile.Profile | None = None
    profiled: int = 0


def _instrument_server(patches: Patches) -> None:
    """Every server-side phase wrapper (the app is built after this)."""
    probe = _ServerProbe

    for mod_name, cls_name in (
        ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
        ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
        ("uvicorn.protocols.http.zttp_impl", "ZttpProtocol"),
    ):
        try:
            cls = getattr(__import__(mod_name, fromlist=["_"]), cls_name)
        except ImportError:
            continue

        def make(old, cls_name=cls_name):
            def data_received(self, data):
                global CURRENT
                t0 = ns()
                if probe.open is None:
                    probe.open = {"t_in": t0, "protocol": cls_name}
                CURRENT = probe.open
                try:
                    return old(self, data)
                finally:
                    _add("h11_in", ns() - t0)

            return data_received

        patches.set(cls, "data_received", make)

    def make_write(old):
        # The last write of a response hands its last bytes to the kernel: the end of
        # the server's part (what the syscall and the wake-ups cost is the network's).
        def write(self, data):
            rec = CURRENT
            t0 = ns()
            try:
                return old(self, data)
            finally:
                if rec is not None:
                    rec.setdefault("t_write_first", t0)
                    rec["t_write"], rec["write_last"] = t0, ns() - t0

        return write

    selector_events = _module("asyncio.selector_events")
    patches.set(_attr(selector_events, "_SelectorSocketTransport"), "write", make_write)
    requests_mod = _module("starlette.requests")
    patches.timed(_attr(requests_mod, "Request"), "body", "body")
    patches.timed(_attr(requests_mod, "Request"), "json", "json")
    patches.timed(_module("fastapi.routing"), "solve_dependencies", "validate")
    encoding = _module("tesseract_core.runtime.array_encoding")
    patches.timed(encoding, "_load_base64_arraydict", "b64dec")
    patches.timed(encoding, "_dump_base64_arraydict", "b64enc")
    serve = _module("tesseract_core.runtime.serve")
    patches.set(
        serve,
        "start_run",
        lambda old: lambda *a, **k: _TimedCM(old(*a, **k), "runfolder"),
    )
    patches.timed(serve, "create_response", "encode")
    routes = _module("tesseract_lx._server.routes")
    patches.timed(routes, "create_response", "encode")
    patches.set(routes, "_null_run", lambda old: lambda: _TimedCM(old(), "runfolder"))
    cache = _module("tesseract_lx._server.cache")
    patches.timed(_attr(cache, "LinearisationCache"), "call", "compute_cached")
    patches.timed(cache, "primal_digest", "digest")

    def wrap_endpoints(old):
        def create_endpoints(api_module):
            return [
                _timed(fn, "endpoint")
                if fn.__name__ == "jacobian_vector_product"
                else fn
                for fn in old(api_module)
            ]

        return create_endpoints

    patches.set(serve, "create_endpoints", wrap_endpoints)
    patches.set(
        _module("tesseract_lx._server.endpoints"), "create_endpoints", wrap_endpoints
    )

    def wrap_pool(old):
        async def run_in_threadpool(func, *args, **kwargs):
            box: dict[str, int] = {}

            def inner():
                box["start"] = ns()
                prof = probe.worker_profile
                try:
                    if prof is None:
                        return func(*args, **kwargs)
                    prof.enable()
                    try:
                        return func(*args, **kwargs)
                    finally:
                        prof.disable()
                finally:
                    box["end"] = ns()

            t0 = ns()
            try:
                return await old(inner)
            finally:
                if "end" in box:
                    _add("pool_hop", box["start"] - t0 + ns() - box["end"])

        return run_in_threadpool

    patches.set(routes, "run_in_threadpool", wrap_pool)


def _probe_app(app):
    """The ASGI app uvicorn serves: the real one, timed, plus `/__profile/*`."""
    probe = _ServerProbe

    async def respond(send, payload: Any) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def control(scope, receive, send) -> None:
        global CURRENT
        probe.open = CURRENT = None
        what = scope["path"].removeprefix("/__profile/")
        if what == "reset":
            probe.records = []
            await respond(send, {})
        elif what == "records":
            records, probe.records = probe.records, []
            await respond(send, records)
        elif what == "start":
            probe.profiled = 0
            probe.worker_profile = cProfile.Profile()
            probe.loop_profile = cProfile.Profile()
            probe.loop_profile.enable()
            await respond(send, {})
        elif what == "stop":
            assert probe.loop_profile is not None
            probe.loop_profile.disable()
            profiles = [probe.loop_profile, probe.worker_profile]
            probe.loop_profile = probe.worker_profile = None
            await respond(send, top_rows(profiles, max(probe.profiled, 1)))

    async def probed(scope, receive, send) -> None:
        global CURRENT
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"].startswith("/__profile/"):
            await control(scope, receive, send)
            return
        rec = probe.open or {"t_in": ns()}
        rec["t_app"] = ns()
        CURRENT = rec
        keep = scope["method"] == "POST" and scope["path"].endswith(
            "jacobian_vector_product"
        )

        async def timed_send(message) -> None:
            global CURRENT
            t0 = ns()
            await send(message)
            _add("send", ns() - t0)
            if message["type"] == "http.response.body" and not message.get(
                "more_body", False
            ):
                probe.open = CURRENT = None
                if keep:
                    probe.records.append(rec)
                    probe.profiled += 1

        await app(scope, receive, timed_send)

    return probed


async def _raw_app(scope, receive, send) -> None:
    """The floor: no framework. Answers `?size=` bytes (default a small JSON)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
    size = int(query.get("size", ["0"])[0])
    body = b'{"status":"ok"}' if not size else b'"' + b"A" * (size - 2) + b'"'
    headers = [(b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def child_main(kind: str, port_file: str) -> None:
    """Serve `kind` (`lx`, `lx-nocache`, `stock`, `raw`) instrumented on a free port,
    as `tesseract-lx serve` resp. `tesseract-runtime serve` would, 1 worker."""
    import uvicorn

    patches = Patches()
    config_cls: Any = uvicorn.Config
    settings: dict[str, Any] = {"timeout_keep_alive": 60}
    if kind == "raw":
        app: Any = _raw_app
        settings["lifespan"] = "off"
    else:
        _instrument_server(patches)
        from tesseract_core.runtime.core import load_module_from_path

        api = load_module_from_path(os.environ["TESSERACT_API_PATH"])
        api.jacobian_vector_product = _timed(api.jacobian_vector_product, "compute")
        if kind == "stock":
            from tesseract_core.runtime.serve import create_rest_api

            app = create_rest_api(api)
        else:
            from tesseract_lx._server.app import create_app
            from tesseract_lx._server.cache import CacheSettings
            from tesseract_lx._server.cli import _NoDelayConfig

            config_cls = _NoDelayConfig
            app = create_app(api, cache=CacheSettings.from_env(enabled=kind == "lx"))
        app = _probe_app(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    config = config_cls(app, host="127.0.0.1", port=0, **settings)
    server = uvicorn.Server(config)
    Path(port_file).write_text(f"{sock.getsockname()[1]}\n{json.dumps(MISSING)}")
    server.run(sockets=[sock])


@contextlib.contextmanager
def child_server(kind: str):
    """An instrumented replica of `kind`, as a child process; yields `(url, missing)`."""
    tmp = Path(tempfile.mkdtemp(prefix="profile_request_"))
    (tmp / "outputs").mkdir()
    (tmp / "inputs").mkdir()
    env = {
        **os.environ,
        "TESSERACT_API_PATH": str(BRATU),
        "TESSERACT_OUTPUT_PATH": str(tmp / "outputs"),
        "TESSERACT_INPUT_PATH": str(tmp / "inputs"),
        "PYTHONUNBUFFERED": "1",
    }
    port_file = tmp / "port"
    cmd = [sys.executable, __file__, "--child", kind, str(port_file)]
    with open(tmp / "server.log", "a+b") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=BRATU.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{kind} child failed:\n{log.read().decode()}")
                if port_file.exists() and port_file.read_text().count("\n"):
                    port_text, missing = port_file.read_text().split("\n", 1)
                    url = f"http://127.0.0.1:{port_text}"
                    try:
                        conn = http.client.HTTPConnection("127.0.0.1", int(port_text))
                        conn.request("GET", "/health")
                        if conn.getresponse().status == 200:
                            conn.close()
                            break
                    except OSError:
                        pass
                time.sleep(0.1)
            yield url, json.loads(missing)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)


# --- the client side -----------------------------------------------------------------


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def jvp_call(client, side: int):
    """A zero-argument callable: one jitted JVP through the module, blocked on."""
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np
    import tesseract_lx as tlx

    rng = np.random.default_rng(0)
    u = jnp.asarray(0.1 * rng.standard_normal((side, side)))
    t = jnp.asarray(rng.standard_normal((side, side)))
    k, f0 = jnp.asarray(1.0), jnp.ones((side, side))
    module = tlx.TesseractModule(client)

    def g(u):
        return module({"u": u, "k": k, "f": f0})["residual"]

    jvp = jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])

    def call():
        return jvp(u, t).block_until_ready()

    call()  # trace, compile, the one /abstract_eval
    client.stats.clear()
    call()
    assert dict(client.stats) == {"jacobian_vector_product": 1}, client.stats
    return call


def bare_calls(client, url: str, side: int) -> dict:
    """`GET /health` through the client's own session and through `http.client`; the
    JVP request's own bytes posted through `http.client` (no JAX, no client)."""
    from tesseract_lx._wire.encoding import ACCEPT

    session = client._transports[0]._session()
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    body = _jvp_body(side)
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}

    def via_requests():
        r = session.get(f"{url}/health", timeout=10)
        assert r.status_code == 200
        return r.content

    def via_http_client():
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200
        return r.read()

    def jvp_http_client():
        conn.request("POST", "/jacobian_vector_product", body, headers)
        r = conn.getresponse()
        assert r.status == 200
        return r.read()

    return {
        "health_requests": via_requests,
        "health_http_client": via_http_client,
        "jvp_http_client": jvp_http_client,
    }


def interleaved(fns: dict, calls: int) -> dict[str, list[float]]:
    """ms of each callable, called in turn, so a drift in load hits all alike."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = ns()
            fn()
            times[name].append((ns() - t0) / 1e6)
    return times


def _median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _client_patches(sizes: dict) -> Patches:
    """Every client-side phase wrapper."""
    patches = Patches()
    primitive = _module("tesseract_lx._primitive")
    host_table = _attr(primitive, "_HOST")
    jvp_p = _attr(primitive, "jvp_p")

    def make_host(old):
        def host(*args, **kwargs):
            _add("t_host_in", ns())
            try:
                return old(*args, **kwargs)
            finally:
                _add("t_host_out", ns())

        return host

    patches.set_item(host_table, jvp_p, make_host, "tesseract_lx._primitive._HOST")
    patches.timed(_attr(_module("tesseract_lx._call"), "Call"), "payload", "payload")
    dispatch = _module("tesseract_lx._dispatch")
    patches.timed(dispatch, "plan", "plan")
    patches.timed(dispatch, "conform", "conform")
    client_mod = _module("tesseract_lx._client")
    client_cls = _attr(client_mod, "Client")
    patches.timed(client_cls, "request", "request")
    patches.timed(client_cls, "_decode", "decode")
    patches.timed(client_mod, "encode_tree", "encode_tree")
    patches.timed(client_mod, "decode_tree", "decode_tree")
    encoding = _module("tesseract_lx._wire.encoding")
    patches.timed(encoding, "_dump_base64_arraydict", "b64enc")
    patches.timed(encoding, "_load_base64_arraydict", "b64dec")

    def proxy_orjson(old):
        def dumps(*args, **kwargs):
            t0 = ns()
            out = old.dumps(*args, **kwargs)
            _add("dumps", ns() - t0)
            sizes["request_bytes"] = len(out)
            return out

        def loads(data, *args, **kwargs):
            t0 = ns()
            out = old.loads(data, *args, **kwargs)
            _add("loads", ns() - t0)
            sizes["response_bytes"] = len(data)
            return out

        names = {k: getattr(old, k) for k in dir(old) if not k.startswith("__")}
        return types.SimpleNamespace(**{**names, "dumps": dumps, "loads": loads})

    patches.set(client_mod, "orjson", proxy_orjson)
    patches.timed(
        _attr(_module("tesseract_lx._transport"), "HTTPTransport"), "send", "transport"
    )
    import requests
    import urllib3.connection

    patches.timed(requests.Session, "request", "requests")
    patches.timed(requests.models.Response, "content", "read_body")
    patches.timed(urllib3.connection.HTTPConnection, "request", "sock_send")
    patches.timed(urllib3.connection.HTTPConnection, "getresponse", "getresponse")
    patches.timed(http.client.HTTPResponse, "_read_status", "wait")
    return patches


def _get(rec: dict, *names: str) -> float | None:
    """The sum of recorded phases in ms; None if one was never recorded."""
    if any(n not in rec for n in names):
        return None
    return sum(rec[n] for n in names) / 1e6


def _minus(a: float | None, *bs: float | None) -> float | None:
    if a is None:
        return None
    return a - sum(b for b in bs if b is not None)


CLIENT_ROWS = (
    ("callback entry: jit dispatch, XLA, `pure_callback` -> host", "entry"),
    ("dispatch: payload building (`Call.payload`)", "payload"),
    ("dispatch: batching plan (`_batching.plan`)", "plan"),
    ("dispatch: other (`_run_linear`/`linear`: arrays, dicts, checks)", "dispatch"),
    ("encode: `encode_tree` (arrays -> base64 dicts)", "encode_tree"),
    ("  of which base64 (`pybase64`, tesseract-core's codec)", "b64enc"),
    ("encode: `orjson.dumps`", "dumps"),
    ("client: `Client.request` bookkeeping (stats, lock, latency)", "request_other"),
    ("transport: `HTTPTransport.send` around `requests`", "transport_other"),
    ("requests: prepare, settings, adapter, urllib3 pool", "requests_other"),
    ("HTTP: send request + wait for the status line", "send_wait"),
    ("  of which in `HTTPConnection.request` (sending)", "sock_send"),
    ("  of which server: first byte in -> status line written", "server_wall"),
    ("  of which loopback + wake-ups (send + wait - server part)", "network"),
    ("HTTP: parse status/headers, urllib3 response", "headers"),
    ("HTTP: read body (`Response.content`)", "read_body"),
    ("decode: `orjson.loads`", "loads"),
    ("decode: `decode_tree` (base64 -> arrays)", "decode_tree"),
    ("decode: other (`Client._decode`)", "decode_other"),
    ("conform: dtype/shape back (`_dtypes.conform`)", "conform"),
    ("back to JAX: callback return, `block_until_ready`", "back"),
    ("**total (instrumented)**", "total"),
)

SERVER_ROWS = (
    ("uvicorn: h11 `data_received` (parse request)", "h11_in"),
    ("starlette: `Request.body`", "body"),
    ("starlette: `Request.json` (stdlib `json.loads`)", "json"),
    ("FastAPI `solve_dependencies`: pydantic validation", "validate"),
    ("  of which base64 decode (`_load_base64_arraydict`)", "b64dec"),
    ("thread-pool hop (`run_in_threadpool`, there and back)", "pool_hop"),
    ("run folder + stdio redirect (`start_run`) / null run", "runfolder"),
    ("Tesseract JVP (through the cache when on)", "compute"),
    ("  of which cache key (`primal_digest`)", "digest"),
    ("output model validation (endpoint - JVP)", "out_validate"),
    ("response encoding (`create_response`)", "encode"),
    ("  of which base64 encode (`_dump_base64_arraydict`)", "b64enc"),
    ("ASGI `send` -> uvicorn h11 (up to the last write)", "send"),
    ("framework: routing, middleware, deps, loop (wall - rows)", "framework"),
    ("**server wall: first byte in -> last write to the socket**", "wall"),
)


def client_phases(rec: dict, server: dict | None) -> dict[str, float | None]:
    """Derived client phases of one request, ms."""
    g = functools.partial(_get, rec)
    out: dict[str, float | None] = {"total": g("total")}
    if "t_host_in" in rec:
        out["entry"] = (rec["t_host_in"] - rec["t0"]) / 1e6
        out["back"] = (rec["t0"] + rec["total"] - rec["t_host_out"]) / 1e6
        host = (rec["t_host_out"] - rec["t_host_in"]) / 1e6
    else:
        out["entry"] = out["back"] = host = None
    for name in (
        "payload plan encode_tree b64enc dumps sock_send wait read_body loads "
        "decode_tree conform"
    ).split():
        out[name] = g(name)
    request, transport, requests_ = g("request"), g("transport"), g("requests")
    decode, getresponse = g("decode"), g("getresponse")
    out["dispatch"] = _minus(host, out["payload"], out["plan"], request, out["conform"])
    out["request_other"] = _minus(
        request, out["encode_tree"], out["dumps"], transport, decode
    )
    out["transport_other"] = _minus(transport, requests_)
    out["requests_other"] = _minus(
        requests_, out["sock_send"], getresponse, out["read_body"]
    )
    out["headers"] = _minus(getresponse, out["wait"])
    out["send_wait"] = g("sock_send", "wait")
    out["decode_other"] = _minus(decode, out["loads"], out["decode_tree"])
    if server is not None and "t_write_first" in server:
        # The status line goes out in the first write: what the client waited for.
        out["server_wall"] = (server["t_write_first"] - server["t_in"]) / 1e6
        out["network"] = _minus(out["send_wait"], out["server_wall"])
    return out


def server_phases(rec: dict) -> dict[str, float | None]:
    """Derived server phases of one request, ms."""
    g = functools.partial(_get, rec)
    out: dict[str, float | None] = {}
    for name in (
        "h11_in body json validate b64dec pool_hop runfolder digest encode b64enc send"
    ).split():
        out[name] = g(name)
    out["compute"] = g("compute_cached") if "compute_cached" in rec else g("compute")
    endpoint = g("endpoint")
    out["out_validate"] = _minus(endpoint, out["compute"])
    out["wall"] = (rec["t_write"] - rec["t_in"]) / 1e6 if "t_write" in rec else None
    out["send"] = _minus(out["send"], g("write_last"))
    parts = ("h11_in", "body", "json", "validate", "pool_hop", "runfolder", "encode")
    out["framework"] = _minus(out["wall"], *(out[n] for n in parts), endpoint)
    out["framework"] = _minus(out["framework"], out["send"])
    return out


def _post(url: str, path: str) -> Any:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    conn.request("POST", f"/__profile/{path}", b"")
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return data


def measure_phases(kind: str, sides, calls: int) -> dict:
    """Phases per side against the instrumented replica of `kind`; and the server's
    cProfile at `PROFILE_SIDE`."""
    import tesseract_lx as tlx

    global CURRENT
    result: dict[str, Any] = {"sides": {}}
    with child_server(kind) as (url, server_missing):
        result["server_missing"] = server_missing
        client = tlx.Client(url)
        for side in sides:
            call = jvp_call(client, side)
            sizes: dict[str, int] = {}
            patches = _client_patches(sizes)
            try:
                for _ in range(WARMUP):
                    call()
                _post(url, "reset")
                records = []
                for _ in range(calls):
                    rec = CURRENT = {"t0": ns()}
                    call()
                    rec["total"] = ns() - rec["t0"]
                    CURRENT = None
                    records.append(rec)
            finally:
                CURRENT = None
                patches.undo()
            server = _post(url, "records")
            if len(server) != len(records):
                raise RuntimeError(
                    f"{kind}: {len(records)} client requests, {len(server)} server "
                    "records: cannot pair them"
                )
            cl = [client_phases(r, s) for r, s in zip(records, server)]
            sv = [server_phases(s) for s in server]
            result["sides"][side] = {
                "client": _medians(cl),
                "server": _medians(sv),
                "sizes": sizes,
                "protocol": server[0].get("protocol", "?") if server else "?",
            }
            print(
                f"[{kind} n={side * side}] phases: total "
                f"{result['sides'][side]['client'].get('total'):.2f} ms, server wall "
                f"{result['sides'][side]['server'].get('wall'):.2f} ms",
                flush=True,
            )
            if side == PROFILE_SIDE:
                _post(url, "start")
                for _ in range(PROFILE_CALLS):
                    call()
                result["server_profile"] = _post(url, "stop")
        client.close()
    return result


def _medians(rows: list[dict]) -> dict[str, float | None]:
    keys = {k for r in rows for k in r}
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        out[k] = _median(values) if len(values) == len(rows) else None
    return out


def measure_clean(sides, calls: int) -> tuple[dict, dict]:
    """End to end against the real servers and the bare app, no instrumentation: all
    up at once and called in turn, so that a change in the machine's load hits all
    alike. Then the client's cProfile. Returns `(per server, floor)`."""
    import requests
    import tesseract_lx as tlx

    clean: dict[str, Any] = {kind: {"sides": {}} for kind in SERVERS}
    floor: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        clients = {
            kind: stack.enter_context(
                tlx.serve(
                    BRATU,
                    server="tesseract-runtime" if kind == "stock" else "tesseract-lx",
                    cache=kind != "lx-nocache",
                )
            )
            for kind in SERVERS
        }
        raw_url, _ = stack.enter_context(child_server("raw"))
        parts = urllib.parse.urlsplit(raw_url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port)
        session = requests.Session()
        session.headers.update({"Content-Type": "application/json"})
        no_env = requests.Session()
        no_env.trust_env = False  # no proxy/netrc/CA lookups in the environment

        def get_requests():
            return session.get(f"{raw_url}/health", timeout=10).content

        def get_no_env():
            return no_env.get(f"{raw_url}/health", timeout=10).content

        def get_http_client():
            conn.request("GET", "/health")
            return conn.getresponse().read()

        for side in sides:
            fns: dict[tuple[str, str], Any] = {}
            for kind, client in clients.items():
                url = client.urls[0]
                fns[kind, "jvp"] = jvp_call(client, side)
                for name, fn in bare_calls(client, url, side).items():
                    fns[kind, name] = fn
            body = _jvp_body(side)
            answer = len(fns["lx", "jvp_http_client"]())

            def post_requests(body=body, answer=answer):
                r = session.post(f"{raw_url}/jvp?size={answer}", data=body, timeout=10)
                return r.content

            def post_http_client(body=body, answer=answer):
                headers = {"Content-Type": "application/json"}
                conn.request("POST", f"/jvp?size={answer}", body, headers)
                return conn.getresponse().read()

            fns["raw", "post_requests"] = post_requests
            fns["raw", "post_http_client"] = post_http_client
            fns["raw", "get_requests"] = get_requests
            fns["raw", "get_no_env"] = get_no_env
            fns["raw", "get_http_client"] = get_http_client
            times = {k: _median(v) for k, v in interleaved(fns, calls).items()}
            for kind in SERVERS:
                clean[kind]["sides"][side] = {
                    name: t for (k, name), t in times.items() if k == kind
                }
            floor[side] = {name: t for (k, name), t in times.items() if k == "raw"}
            print(f"[n={side * side}] clean: {times}", flush=True)
            if side == PROFILE_SIDE:
                for kind in SERVERS:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(PROFILE_CALLS):
                        fns[kind, "jvp"]()
                    prof.disable()
                    clean[kind]["client_profile"] = top_rows([prof], PROFILE_CALLS)
        conn.close()
    return clean, floor


# --- the report ----------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _columns(sides) -> list[tuple[str, int]]:
    return [(kind, side) for kind in SERVERS for side in sides]


def _head(sides, first: str) -> list[str]:
    cols = _columns(sides)
    return [
        "| " + " | ".join([first] + [f"{k} n={s * s}" for k, s in cols]) + " |",
        "|---" + "|---:" * len(cols) + "|",
    ]


def _table(rows, data, part: str, sides) -> str:
    lines = _head(sides, "phase [median ms]")
    for label, key in rows:
        cells = [_fmt(data[k]["sides"][s][part].get(key)) for k, s in _columns(sides)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _profile_table(rows: list) -> str:
    lines = [
        "| cum ms/req | own ms/req | calls/req | function (-> innermost of a folded chain) |",
        "|---:|---:|---:|---|",
    ]
    for cum, own, calls, name, (inner, folded) in rows:
        if folded:
            name = f"`{name}` -> ({folded} frames) -> `{inner}`"
        else:
            name = f"`{name}`"
        lines.append(f"| {cum:.3f} | {own:.3f} | {calls:.1f} | {name} |")
    return "\n".join(lines)


def _machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}, {platform.machine()}), "
        f"{platform.system()} {platform.release()}"
    )


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True
        ).stdout.strip()

    rev = git("log", "-1", "--format=%h %s")
    dirty = git("status", "--porcelain", "--", "tesseract_lx")
    return rev + (" (+ uncommitted changes in tesseract_lx/)" if dirty else "")


def _versions() -> str:
    import equinox
    import jax
    import requests
    import tesseract_core

    return (
        f"Python {platform.python_version()}, jax {jax.__version__}, "
        f"tesseract-core {tesseract_core.__version__}, equinox {equinox.__version__}, "
        f"requests {requests.__version__}"
    )


def _kept_conclusions(out: Path) -> str:
    default = (
        "<!-- conclusions -->\n(none written yet: read the tables above)\n"
        "<!-- /conclusions -->"
    )
    if not out.exists():
        return default
    found = re.search(
        r"<!-- conclusions -->.*?<!-- /conclusions -->", out.read_text(), re.DOTALL
    )
    return found.group(0) if found else default


def report(clean, phases, floor, sides, calls, started, out: Path, load) -> str:
    import fastapi
    import orjson
    import pybase64
    import pydantic
    import starlette
    import urllib3
    import uvicorn

    protocol = phases["lx"]["sides"][sides[0]].get("protocol", "?")
    sizes = {s: phases["lx"]["sides"][s]["sizes"] for s in sides}
    missing = sorted(
        set(MISSING + [m for k in SERVERS for m in phases[k]["server_missing"]])
    )
    lines = [
        "# Where the time of one JVP request goes (bratu)",
        "",
        f"Written by `benchmarks/profile_request.py` on "
        f"{datetime.date.today().isoformat()}, "
        f"in {time.perf_counter() - started:.0f} s. Machine: {_machine()}; loopback "
        "HTTP, 1 server worker, client and server on the same cores. Load average "
        f"(1 min) {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"Code: `{_commit()}`. {_versions()}, fastapi {fastapi.__version__}, "
        f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__} "
        f"({protocol}), pydantic {pydantic.__version__}, urllib3 {urllib3.__version__}, "
        f"orjson {orjson.__version__}, pybase64 {pybase64.__version__}.",
        "",
        "Call: `jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])(u, t)"
        ".block_until_ready()`, `g = u -> tlx.TesseractModule(client)({'u': u, "
        "'k': k, 'f': f})['residual']`: one `/jacobian_vector_product` per call. "
        f"Medians of {calls} calls after {WARMUP} warm-up calls. Servers: `lx` = "
        "`tesseract-lx serve` (linearisation cache on, every timed request a hit), "
        "`lx-nocache` = the same with `cache=False`, `stock` = `tesseract-runtime "
        "serve`. Method: see the script's docstring.",
        "",
        "Bytes on the wire per JVP (request body / response body): "
        + ", ".join(
            f"n={s * s}: {sizes[s].get('request_bytes', '?')} / "
            f"{sizes[s].get('response_bytes', '?')}"
            for s in sides
        )
        + ".",
        "",
        "## End to end, no instrumentation",
        "",
        *_head(sides, "median ms"),
    ]
    for label, key in (
        ("**one JVP call** (module, jit)", "jvp"),
        ("`GET /health`, client's `requests` session", "health_requests"),
        ("`GET /health`, `http.client`", "health_http_client"),
        (
            "the JVP's bytes posted by `http.client` (no JAX, no client)",
            "jvp_http_client",
        ),
    ):
        cells = [_fmt(clean[k]["sides"][s][key]) for k, s in _columns(sides)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for how in ("requests", "http_client"):
        ratio = [
            f"{clean[k]['sides'][s]['jvp'] / clean[k]['sides'][s]['health_' + how]:.1f}x"
            for k, s in _columns(sides)
        ]
        label = how.replace("_", ".")
        lines.append(f"| JVP / `GET /health` ({label}) | " + " | ".join(ratio) + " |")
    lines += [
        "",
        "The floor: a bare ASGI app (no FastAPI/starlette) under the same uvicorn, "
        "median ms:",
        "",
        "| request | `requests` session | `http.client` |",
        "|---|---:|---:|",
    ]
    for s in sides:
        f = floor[s]
        lines += [
            f"| `GET` (15-byte answer), during n={s * s} | {_fmt(f['get_requests'])} "
            f"| {_fmt(f['get_http_client'])} |",
            f"| `GET`, session with `trust_env = False`, during n={s * s} | "
            f"{_fmt(f['get_no_env'])} | |",
            f"| `POST` of a JVP's bytes each way, n={s * s} | "
            f"{_fmt(f['post_requests'])} | {_fmt(f['post_http_client'])} |",
        ]
    lines += [
        "",
        "## Client side, per phase (instrumented)",
        "",
        "Rows are medians of per-request values, so they need not add up to the "
        "total exactly. `n/a`: the function timed is not there (any more). A second "
        "pass, against one instrumented server at a time: its total is not the clean "
        "run's (another moment, one server up instead of four).",
        "",
        _table(CLIENT_ROWS, phases, "client", sides),
        "",
        "## Server side, per phase (instrumented replica)",
        "",
        _table(SERVER_ROWS, phases, "server", sides),
        "",
        f"## cProfile, {PROFILE_CALLS} requests at n={PROFILE_SIDE**2}, top 15 by "
        "cumulative time",
        "",
        "Per request, under cProfile (which roughly doubles Python-heavy times). "
        "Frames that only wait (epoll, locks, `run_forever`) are left out; a callee "
        "within 3% of its caller's cumulative time is folded into its row.",
    ]
    for kind in ("lx", "stock"):
        lines += [
            "",
            f"### Client, against `{kind}` (main thread; the callback runs in it)",
            "",
            _profile_table(clean[kind].get("client_profile", [])),
        ]
    for kind in SERVERS:
        lines += [
            "",
            f"### Server `{kind}` (event loop + worker threads)",
            "",
            _profile_table(phases[kind].get("server_profile", [])),
        ]
    lines += [
        "",
        "## Conclusions",
        "",
        _kept_conclusions(out),
        "",
    ]
    if missing:
        lines += [f"Not timed (not found): {', '.join(f'`{m}`' for m in missing)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PORT_FILE"))
    opts = parser.parse_args()
    if opts.child:
        child_main(*opts.child)
        return
    started, load = time.perf_counter(), os.getloadavg()
    sides = tuple(opts.sides)
    if PROFILE_SIDE not in sides:
        raise SystemExit(f"--sides must include {PROFILE_SIDE} (the cProfile size)")
    _jax()
    import tesseract_lx

    if not Path(tesseract_lx.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"tesseract_lx comes from {tesseract_lx.__file__}, not {ROOT}")
    clean, floor = measure_clean(sides, opts.calls)
    phases = {kind: measure_phases(kind, sides, opts.calls) for kind in SERVERS}
    text = report(clean, phases, floor, sides, opts.calls, started, opts.out, load)
    opts.out.write_text(text)
    print("\n" + text, flush=True)


def _jvp_body(side: int) -> bytes:
    """The bytes of a JVP request as the client encodes them (for the floor)."""
    import numpy as np
    import orjson
    from tesseract_lx._wire.encoding import encode_tree

    rng = np.random.default_rng(0)
    payload = {
        "inputs": {
            "u": 0.1 * rng.standard_normal((side, side)),
            "k": np.asarray(1.0),
            "f": np.ones((side, side)),
        },
        "jvp_inputs": ["u"],
        "jvp_outputs": ["residual"],
        "tangent_vector": {"u": rng.standard_normal((side, side))},
    }
    return orjson.dumps(encode_tree(payload), option=orjson.OPT_SERIALIZE_NUMPY)


if __name__ == "__main__":
    sys.exit(main())
