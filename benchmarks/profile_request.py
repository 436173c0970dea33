"""Benchmark: where the time of ONE JVP request goes, on the client and on the server.

A benchmark, not a test. It writes `benchmarks/PROFILE.md` (next to this file):

    .venv/bin/python benchmarks/profile_request.py [--calls 300] [--sides 16 32 100]

**What is measured.** `jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])` with
`g = u -> tlx.TesseractModule(client)({"u": u, "k": k, "f": f})["residual"]`, on the
`bratu` example Tesseract (N x N grid, n = N^2 unknowns), `jax_enable_x64` on, each call
followed by `block_until_ready`: exactly one `/jacobian_vector_product` request per call
(checked). Three servers, 1 worker each, uvicorn (httptools, uvloop) on 127.0.0.1:

- `lx`: `tesseract-lx serve` (`tlx.serve(path)`), linearisation cache on: every timed
  request is a cache hit (same primal point, as in a Krylov solve). The client sends
  it binary bodies (`_wire/binary.py`), answered by `BinaryRoutes` (`_server/lean.py`),
  an ASGI middleware in front of FastAPI;
- `lx-nocache`: the same with `cache=False` (the Tesseract's own JVP every time);
- `stock`: `tesseract-runtime serve` (`tlx.serve(path, server="tesseract-runtime")`),
  tesseract-core's own app and run folders; the client sends it tesseract-core's JSON.

**Method.**

1. *Clean end to end.* Against the real servers, no instrumentation anywhere: the JVP
   call, an empty `GET /health` through the client's own transport
   (`HTTPTransport.send`), and the JVP request's own bytes and headers (captured from
   the client) posted through a bare `http.client.HTTPConnection` (the server alone: no
   JAX, no client); called in turn (one round = each once), medians. The floor of the
   stack: a bare ASGI app (no FastAPI, no starlette: answers a fixed body) under the
   same uvicorn, asked by `GET` and by a `POST` of the bytes of `lx`'s JVP request,
   answered with as many bytes as `lx`'s answer.
2. *Phases.* The same call against an instrumented replica of each server (a child
   process of this script: the same app factory, `create_app` resp. tesseract-core's
   `create_rest_api`, under `uvicorn.Server` with the same settings), with
   `time.perf_counter_ns` wrappers monkeypatched around the functions of each phase on
   both ends. Client side, in this process: `_primitive._HOST`, `Call.payload`,
   `_dispatch.plan`/`conform`, `Client.request`/`_decode`, `binary.encode`/`decode`
   (lx) resp. `encode_tree`, `orjson.dumps`/`loads`, `decode_tree` (stock),
   `HTTPTransport.send`, `http.client`'s `HTTPConnection.request`/`getresponse`,
   `HTTPResponse._read_status` (the blocking wait for the status line) and `read`.
   Server side, in the child: uvicorn's `data_received` and its connections' transport
   `write`, the ASGI app and its `send`; on `lx` `BinaryRoutes._answer`, its
   `run_in_threadpool`, `binary.decode`/`encode` and `Runner.call`; on `stock`
   starlette's `Request.body`/`json`, FastAPI's `solve_dependencies`, `start_run` and
   `create_response`; on both tesseract-core's endpoint function and the Tesseract's
   JVP, or `LinearisationCache.call` around it with its key `_digest` and the jitted
   linear map `_Linear`. Derived phases are differences of nested timings or of the
   start and end of calls (`lx`'s "request in" runs from the start of `_answer` to
   the start of `Runner.call`: `binary.decode`, `find_escape`, the payload's
   `model_validate`). Requests are paired client/server by order (one client, one
   request at a time), so "loopback + wake-ups" = the client's send + wait for the
   status line - the server's time from `data_received` of the first bytes to the
   write of the status line, per request: syscalls, scheduling, the other process's
   wake-up. The server's wall time runs to the write of the last bytes. A phase not
   on a server's path shows `–`; a function not found is listed below the tables.
   Each wrapper costs ~1 us; the table shows the instrumented total next to the
   clean one.
3. *cProfile.* 200 calls at n = 1024: this process's main thread (the host callback runs
   there, synchronously) without instrumentation; on the server, the event-loop
   thread and the worker threads of the child (merged). Listed: the top 15 by
   cumulative time per request, leaving out frames that only wait (locks, the
   worker threads' loop, uvicorn's main loop) and this script's own frames. A callee whose
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
import inspect
import json
import os
import platform
import pstats
import re
import shutil
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

from _report import stop_group  # noqa: E402


# --- timing records, shared by both ends ---------------------------------------------

# The record of the request in progress (one client, one request at a time), or None.
CURRENT: dict[str, Any] | None = None
MISSING: list[str] = []


def _add(phase: str, t0: int) -> None:
    """Time since `t0` added to `phase`; `phase@` = start and end of its last call."""
    t1 = ns()
    rec = CURRENT
    if rec is not None:
        rec[phase] = rec.get(phase, 0) + t1 - t0
        rec[phase + "@"] = (t0, t1)


def _timed(fn, phase: str):
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args, **kwargs):
            t0 = ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                _add(phase, t0)

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(phase, t0)

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
            _add(self.phase, t0)

    def __exit__(self, *exc):
        t0 = ns()
        try:
            return self.inner.__exit__(*exc)
        finally:
            _add(self.phase, t0)


class Patches:
    """Monkeypatches, undone in reverse order; a missing target is noted, not fatal."""

    def __init__(self):
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def set(self, owner: Any, name: str, make) -> None:
        if owner is None or name not in vars(owner):
            MISSING.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        old = vars(owner)[name]
        self._undo.append((owner, name, old, False))
        setattr(owner, name, make(old))

    def timed(self, owner: Any, name: str, phase: str) -> None:
        self.set(owner, name, lambda old: _timed(old, phase))

    def set_item(self, mapping: Any, key: Any, make, label: str) -> None:
        if mapping is None or key not in mapping:
            MISSING.append(label)
            return
        self._undo.append((mapping, key, mapping[key], True))
        mapping[key] = make(mapping[key])

    def undo(self) -> None:
        while self._undo:
            owner, name, old, item = self._undo.pop()
            if item:
                owner[name] = old
            else:
                setattr(owner, name, old)


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
# (uvloop's own loop is C: none of its frames show.)
_WAITING = {
    ("threading.py", "wait"),
    ("queue.py", "get"),
    ("server.py", "main_loop"),
    ("server.py", "serve"),
    ("server.py", "_serve"),
    ("server.py", "run"),
    ("_asyncio.py", "run"),  # anyio's worker thread loop
}
_WAITING_BUILTINS = ("_thread.lock", "_lsprof.Profiler", "Context")
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


class _TimedTransport:
    """A connection's transport (uvloop's: not patchable) whose writes are stamped:
    the first write of an answer carries its status line, the last its last bytes
    (what the syscall and the wake-ups cost after that is the network's)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, data) -> None:
        rec = CURRENT
        t0 = ns()
        try:
            return self._inner.write(data)
        finally:
            if rec is not None:
                rec.setdefault("t_write_first", t0)
                rec["t_write"], rec["write_last"] = t0, ns() - t0


def _instrument_server(patches: Patches) -> None:
    """Every server-side phase wrapper (the app is built after this)."""
    probe = _ServerProbe

    # uvicorn's protocol with httptools installed (else h11: nothing timed here).
    protocol = _attr(
        _module("uvicorn.protocols.http.httptools_impl"), "HttpToolsProtocol"
    )

    def make_received(old):
        def data_received(self, data):
            global CURRENT
            t0 = ns()
            if probe.open is None:
                loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
                probe.open = {"t_in": t0, "loop": loop}
            CURRENT = probe.open
            try:
                return old(self, data)
            finally:
                _add("data_in", t0)

        return data_received

    patches.set(protocol, "data_received", make_received)
    patches.set(
        protocol,
        "connection_made",
        lambda old: lambda self, transport: old(self, _TimedTransport(transport)),
    )

    # tesseract-core's app (stock): JSON in, pydantic, run folder, JSON out.
    requests_mod = _module("starlette.requests")
    patches.timed(_attr(requests_mod, "Request"), "body", "body")
    patches.timed(_attr(requests_mod, "Request"), "json", "json")
    patches.timed(_module("fastapi.routing"), "solve_dependencies", "validate")
    serve = _module("tesseract_core.runtime.serve")
    patches.set(
        serve,
        "start_run",
        lambda old: lambda *a, **k: _TimedCM(old(*a, **k), "runfolder"),
    )
    patches.timed(serve, "create_response", "create_response")
    # tesseract-lx's lean path: binary in, the payload model, `Runner`, binary out.
    lean = _module("tesseract_lx._server.lean")
    patches.timed(_attr(lean, "BinaryRoutes"), "_answer", "answer")
    binary = _module("tesseract_lx._wire.binary")
    patches.timed(binary, "decode", "bdecode")
    patches.timed(binary, "encode", "bencode")
    patches.timed(
        _attr(_module("tesseract_lx._server.routes"), "Runner"), "call", "run"
    )
    cache = _module("tesseract_lx._server.cache")
    patches.timed(_attr(cache, "LinearisationCache"), "call", "compute_cached")
    patches.timed(cache, "_digest", "digest")
    patches.timed(_attr(cache, "_Linear"), "__call__", "linear")

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
                if "end" in box and CURRENT is not None:
                    hop = box["start"] - t0 + ns() - box["end"]
                    CURRENT["pool_hop"] = CURRENT.get("pool_hop", 0) + hop

        return run_in_threadpool

    patches.set(lean, "run_in_threadpool", wrap_pool)


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
        CURRENT = rec
        keep = scope["method"] == "POST" and scope["path"].endswith(
            "jacobian_vector_product"
        )

        async def timed_send(message) -> None:
            global CURRENT
            t0 = ns()
            await send(message)
            _add("send", t0)
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
    body = b'{"status":"ok"}' if not size else b"A" * size
    headers = [(b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def child_main(kind: str, port_file: str) -> None:
    """Serve `kind` (`lx`, `lx-nocache`, `stock`, `raw`) instrumented on a free port,
    as `tesseract-lx serve` resp. `tesseract-runtime serve` would, 1 worker."""
    import uvicorn

    config_cls: Any = uvicorn.Config
    settings: dict[str, Any] = {"timeout_keep_alive": 60}
    if kind == "raw":
        app: Any = _raw_app
        settings["lifespan"] = "off"
    else:
        _instrument_server(Patches())
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
    server = uvicorn.Server(config_cls(app, host="127.0.0.1", port=0, **settings))
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
                    ask, conn = _connection(url)
                    try:
                        ask("GET", "/health")
                        break
                    except (OSError, AssertionError):
                        pass
                    finally:
                        conn.close()
                time.sleep(0.1)
            yield url, json.loads(missing)
        finally:
            stop_group(proc)
            shutil.rmtree(tmp, ignore_errors=True)


# --- the client side -----------------------------------------------------------------


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def _connection(url: str):
    """`(ask, conn)`: `ask(method, path, body, headers) -> answer body` on one
    persistent bare `http.client` connection to `url`; a status but 200 fails."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)

    def ask(method: str, path: str, body=None, headers=None) -> bytes:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        content = r.read()
        assert r.status == 200, (r.status, content)
        return content

    return ask, conn


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


def _captured(client, call) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the request that `call()` sends through `client`."""
    transport = client._transports[0]
    seen: dict[str, Any] = {}

    def send(method, endpoint, body=None, headers=None):
        seen.update(body=body, headers={**transport.headers, **(headers or {})})
        return type(transport).send(transport, method, endpoint, body, headers)

    transport.send = send
    try:
        call()
    finally:
        del transport.send
    return seen["body"], seen["headers"]


def interleaved(fns: dict, calls: int) -> dict[Any, list[float]]:
    """ms of each callable, called in turn, so a drift in load hits all alike."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = ns()
            fn()
            times[name].append((ns() - t0) / 1e6)
    return times


def _median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _client_patches() -> Patches:
    """Every client-side phase wrapper."""
    patches = Patches()
    primitive = _module("tesseract_lx._primitive")
    patches.set_item(
        _attr(primitive, "_HOST"),
        _attr(primitive, "jvp_p"),
        lambda old: _timed(old, "host"),
        "tesseract_lx._primitive._HOST",
    )
    patches.timed(_attr(_module("tesseract_lx._call"), "Call"), "payload", "payload")
    dispatch = _module("tesseract_lx._dispatch")
    patches.timed(dispatch, "plan", "plan")
    patches.timed(dispatch, "conform", "conform")
    client_mod = _module("tesseract_lx._client")
    patches.timed(_attr(client_mod, "Client"), "request", "request")
    patches.timed(_attr(client_mod, "Client"), "_decode", "decode")
    # lx: binary bodies; stock: tesseract-core's JSON. Each is one server's path.
    binary = _module("tesseract_lx._wire.binary")
    patches.timed(binary, "encode", "encode")
    patches.timed(binary, "decode", "decode_inner")
    patches.timed(client_mod, "encode_tree", "encode")
    patches.timed(client_mod, "decode_tree", "decode_inner")

    def proxy_orjson(old):
        names = {k: getattr(old, k) for k in dir(old) if not k.startswith("__")}
        names["dumps"] = _timed(old.dumps, "encode")
        names["loads"] = _timed(old.loads, "decode_inner")
        return types.SimpleNamespace(**names)

    patches.set(client_mod, "orjson", proxy_orjson)
    transport = _module("tesseract_lx._transport")
    patches.timed(_attr(transport, "HTTPTransport"), "send", "transport")
    patches.timed(http.client.HTTPConnection, "request", "sock_send")
    patches.timed(http.client.HTTPConnection, "getresponse", "getresponse")
    patches.timed(http.client.HTTPResponse, "_read_status", "wait")
    patches.timed(http.client.HTTPResponse, "read", "read_body")
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


def _span(rec: dict, start: str, end: str) -> float | None:
    """ms from the stamp `start` (`phase@0` / `phase@1`: its start / end) to `end`."""
    (a, i), (b, j) = start.split("@"), end.split("@")
    if a + "@" not in rec or b + "@" not in rec:
        return None
    return (rec[b + "@"][int(j)] - rec[a + "@"][int(i)]) / 1e6


CLIENT_ROWS = (
    ("callback entry: jit dispatch, XLA, `pure_callback` -> host", "entry"),
    ("dispatch: payload building (`Call.payload`)", "payload"),
    ("dispatch: batching plan (`_batching.plan`)", "plan"),
    ("dispatch: other (`run_jvp`/`linear`: arrays, dicts, checks)", "dispatch"),
    (
        "encode: `binary.encode` (lx) / `encode_tree` + `orjson.dumps` (stock)",
        "encode",
    ),
    ("client: `Client.request` bookkeeping (stats, lock, latency)", "request_other"),
    ("transport: `HTTPTransport.send` around `http.client`", "transport_other"),
    ("HTTP: `http.client` send + wait for the status line", "send_wait"),
    ("  of which in `HTTPConnection.request` (sending)", "sock_send"),
    ("  of which server: first byte in -> status line written", "server_wall"),
    ("  of which loopback + wake-ups (send + wait - server part)", "network"),
    ("HTTP: parse status line + headers (`getresponse` - wait)", "headers"),
    ("HTTP: read body (`HTTPResponse.read`)", "read_body"),
    (
        "decode: `binary.decode` (lx) / `orjson.loads` + `decode_tree` (stock)",
        "decode_inner",
    ),
    ("decode: other (`Client._decode`)", "decode_other"),
    ("conform: dtype/shape back (`_dtypes.conform`)", "conform"),
    ("back to JAX: callback return, `block_until_ready`", "back"),
    ("**total (instrumented)**", "total"),
)

SERVER_ROWS = (
    ("uvicorn: httptools `data_received` (parse request)", "data_in"),
    (
        "request in: `BinaryRoutes` `binary.decode` + `find_escape` + payload "
        "`model_validate` (lx) / `Request.body` + `.json` + FastAPI "
        "`solve_dependencies` (stock)",
        "request_in",
    ),
    ("  of which `binary.decode` (lx) / `Request.json` (stock)", "parse"),
    ("thread-pool hop (`run_in_threadpool`, there and back)", "pool_hop"),
    ("`Runner.call`: lock, null run (lx) / `start_run` run folder (stock)", "runner"),
    ("Tesseract JVP (through the cache when on)", "compute"),
    ("  of which cache key (`_digest`)", "digest"),
    ("  of which the jitted linear map (`_Linear`)", "linear"),
    ("output model validation (endpoint - JVP)", "out_validate"),
    (
        "response: `model_dump` + `binary.encode` (lx) / `create_response` (stock)",
        "encode",
    ),
    ("  of which `binary.encode`", "bencode"),
    ("ASGI `send` -> uvicorn (up to the last write)", "send"),
    ("framework: middleware, routing, loop (wall - rows)", "framework"),
    ("**server wall: first byte in -> last write to the socket**", "wall"),
)
# The server rows that add up to the wall (with `framework`).
_SERVER_PARTS = (
    "data_in request_in pool_hop runner compute out_validate encode send".split()
)


def client_phases(rec: dict, server: dict) -> dict[str, float | None]:
    """Derived client phases of one request, ms."""
    g = functools.partial(_get, rec)
    out: dict[str, float | None] = {"total": g("total")}
    out["entry"] = (rec["host@"][0] - rec["t0"]) / 1e6
    out["back"] = (rec["t0"] + rec["total"] - rec["host@"][1]) / 1e6
    for (
        name
    ) in "payload plan encode sock_send wait read_body decode_inner conform".split():
        out[name] = g(name)
    request, transport, decode = g("request"), g("transport"), g("decode")
    out["dispatch"] = _minus(
        g("host"), out["payload"], out["plan"], request, out["conform"]
    )
    out["request_other"] = _minus(request, out["encode"], transport, decode)
    out["transport_other"] = _minus(
        transport, out["sock_send"], g("getresponse"), out["read_body"]
    )
    out["headers"] = _minus(g("getresponse"), out["wait"])
    out["send_wait"] = g("sock_send", "wait")
    out["decode_other"] = _minus(decode, out["decode_inner"])
    # The status line goes out in the first write: what the client waited for.
    out["server_wall"] = (server["t_write_first"] - server["t_in"]) / 1e6
    out["network"] = _minus(out["send_wait"], out["server_wall"])
    return out


def server_phases(rec: dict) -> dict[str, float | None]:
    """Derived server phases of one request, ms."""
    g = functools.partial(_get, rec)
    out: dict[str, float | None] = {
        name: g(name) for name in "data_in pool_hop digest linear bencode".split()
    }
    out["compute"] = g("compute_cached") if "compute_cached" in rec else g("compute")
    endpoint = g("endpoint")
    out["out_validate"] = _minus(endpoint, out["compute"])
    if "answer" in rec:  # lx: the lean path
        out["request_in"] = _span(rec, "answer@0", "run@0")
        out["parse"] = g("bdecode")
        out["runner"] = _minus(g("run"), endpoint)
        out["encode"] = _span(rec, "run@1", "answer@1")
    else:  # stock: tesseract-core's JSON route
        out["request_in"] = g("body", "json", "validate")
        out["parse"] = g("json")
        out["runner"] = g("runfolder")
        out["encode"] = g("create_response")
    out["send"] = _minus(g("send"), g("write_last"))
    out["wall"] = (rec["t_write"] - rec["t_in"]) / 1e6
    out["framework"] = _minus(out["wall"], *(out[n] for n in _SERVER_PARTS))
    return out


def _post(url: str, path: str) -> Any:
    ask, conn = _connection(url)
    data = json.loads(ask("POST", f"/__profile/{path}", b""))
    conn.close()
    return data


def _medians(rows: list[dict]) -> dict[str, float | None]:
    """Per phase, the median over requests; None if a request lacks it."""
    out = {}
    for k in {k for r in rows for k in r}:
        values = [r[k] for r in rows if r.get(k) is not None]
        out[k] = _median(values) if len(values) == len(rows) else None
    return out


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
            patches = _client_patches()
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
            cl = _medians([client_phases(r, s) for r, s in zip(records, server)])
            sv = _medians([server_phases(s) for s in server])
            result["loop"] = server[0].get("loop", "?")
            result["sides"][side] = {"client": cl, "server": sv}
            print(
                f"[{kind} n={side * side}] phases: total {cl['total']:.2f} ms, "
                f"server wall {sv['wall']:.2f} ms",
                flush=True,
            )
            if side == PROFILE_SIDE:
                _post(url, "start")
                for _ in range(PROFILE_CALLS):
                    call()
                result["server_profile"] = _post(url, "stop")
        client.close()
    return result


def measure_clean(sides, calls: int) -> tuple[dict, dict]:
    """End to end against the real servers and the bare app, no instrumentation: all
    up at once and called in turn, so that a change in the machine's load hits all
    alike. Then the client's cProfile. Returns `(per server, floor)`."""
    import tesseract_lx as tlx

    clean: dict[str, Any] = {kind: {"sides": {}, "bytes": {}} for kind in SERVERS}
    floor: dict[int, dict] = {}
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
        raw, raw_conn = _connection(raw_url)
        stack.callback(raw_conn.close)
        for side in sides:
            fns: dict[tuple[str, str], Any] = {}
            for kind, client in clients.items():
                fns[kind, "jvp"] = jvp_call(client, side)
                transport = client._transports[0]
                assert transport.send("GET", "health").status == 200
                fns[kind, "health"] = functools.partial(transport.send, "GET", "health")
                body, headers = _captured(client, fns[kind, "jvp"])
                ask, conn = _connection(client.urls[0])
                stack.callback(conn.close)
                post = functools.partial(
                    ask, "POST", "/jacobian_vector_product", body, headers
                )
                fns[kind, "jvp_http_client"] = post
                clean[kind]["bytes"][side] = (len(body), len(post()))
                if kind == "lx":
                    path = f"/jvp?size={clean[kind]['bytes'][side][1]}"
                    fns["raw", "post"] = functools.partial(
                        raw, "POST", path, body, headers
                    )
            fns["raw", "get"] = functools.partial(raw, "GET", "/health")
            times = {k: _median(v) for k, v in interleaved(fns, calls).items()}
            for kind in SERVERS:
                clean[kind]["sides"][side] = {
                    name: t for (k, name), t in times.items() if k == kind
                }
            floor[side] = {name: t for (k, name), t in times.items() if k == "raw"}
            print(f"[n={side * side}] clean: {times}", flush=True)
            if side == PROFILE_SIDE:
                for kind in ("lx", "stock"):
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(PROFILE_CALLS):
                        fns[kind, "jvp"]()
                    prof.disable()
                    clean[kind]["client_profile"] = top_rows([prof], PROFILE_CALLS)
    return clean, floor


# --- the report ----------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def _columns(sides) -> list[tuple[str, int]]:
    return [(kind, side) for kind in SERVERS for side in sides]


def _head(sides, first: str) -> list[str]:
    cols = _columns(sides)
    return [
        "| " + " | ".join([first] + [f"{k} n={s * s}" for k, s in cols]) + " |",
        "|---" + "|---:" * len(cols) + "|",
    ]


def _table(rows, cell, sides, first: str = "phase [median ms]") -> str:
    """One line per `(label, key)` of `rows`, a cell `cell(kind, side, key)` per
    column."""
    lines = _head(sides, first)
    for label, key in rows:
        cells = [cell(k, s, key) for k, s in _columns(sides)]
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
    from importlib.metadata import version

    names = "jax tesseract-core equinox fastapi starlette uvicorn httptools uvloop "
    names += "pydantic orjson"
    return ", ".join(f"{n} {version(n)}" for n in names.split())


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
    missing = sorted(
        set(MISSING + [m for k in SERVERS for m in phases[k]["server_missing"]])
    )

    def wire(kind: str) -> str:
        return ", ".join(
            f"n={s * s}: {clean[kind]['bytes'][s][0]} / {clean[kind]['bytes'][s][1]}"
            for s in sides
        )

    def e2e(kind: str, side: int, key: str) -> str:
        t = clean[kind]["sides"][side]
        return f"{t['jvp'] / t['health']:.1f}x" if key == "ratio" else _fmt(t[key])

    lines = [
        "# Where the time of one JVP request goes (bratu)",
        "",
        f"Written by `benchmarks/profile_request.py` on "
        f"{datetime.date.today().isoformat()}, "
        f"in {time.perf_counter() - started:.0f} s. Machine: {_machine()}; loopback "
        "HTTP, 1 server worker, client and server on the same cores. Load average "
        f"(1 min) {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"Code measured: `{_commit()}`. Python {platform.python_version()}, "
        f"{_versions()}; uvicorn ran httptools on {phases['lx']['loop']}.",
        "",
        "Call: `jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])(u, t)"
        ".block_until_ready()`, `g = u -> tlx.TesseractModule(client)({'u': u, "
        "'k': k, 'f': f})['residual']`: one `/jacobian_vector_product` per call. "
        f"Medians of {calls} calls after {WARMUP} warm-up calls. Servers: `lx` = "
        "`tesseract-lx serve` (linearisation cache on, every timed request a hit; "
        "binary bodies, the lean path), `lx-nocache` = the same with `cache=False`, "
        "`stock` = `tesseract-runtime serve` (JSON with base64 arrays). Method: see "
        "the script's docstring.",
        "",
        f"Bytes on the wire per JVP (request body / response body): lx (binary) "
        f"{wire('lx')}; stock (JSON) {wire('stock')}.",
        "",
        "## End to end, no instrumentation",
        "",
        _table(
            (
                ("**one JVP call** (module, jit)", "jvp"),
                ("`GET /health` through the client's `HTTPTransport`", "health"),
                (
                    "the JVP's bytes posted by bare `http.client` (no JAX, no client)",
                    "jvp_http_client",
                ),
                ("JVP / `GET /health`", "ratio"),
            ),
            e2e,
            sides,
            "median ms",
        ),
        "",
        "The floor: a bare ASGI app (no FastAPI/starlette) under the same uvicorn, "
        "through bare `http.client`, median ms:",
        "",
        "| request | " + " | ".join(f"n={s * s}" for s in sides) + " |",
        "|---" + "|---:" * len(sides) + "|",
        "| `GET` (15-byte answer) | "
        + " | ".join(_fmt(floor[s]["get"]) for s in sides)
        + " |",
        "| `POST` of lx's JVP bytes, as many bytes back | "
        + " | ".join(_fmt(floor[s]["post"]) for s in sides)
        + " |",
        "",
        "## Client side, per phase (instrumented)",
        "",
        "Rows are medians of per-request values, so they need not add up to the "
        "total exactly. `–`: not on this server's path. A second pass, against one "
        "instrumented server at a time: its total is not the clean run's (another "
        "moment, one server up instead of four).",
        "",
        _table(
            CLIENT_ROWS,
            lambda k, s, key: _fmt(phases[k]["sides"][s]["client"][key]),
            sides,
        ),
        "",
        "## Server side, per phase (instrumented replica)",
        "",
        _table(
            SERVER_ROWS,
            lambda k, s, key: _fmt(phases[k]["sides"][s]["server"][key]),
            sides,
        ),
        "",
        f"## cProfile, {PROFILE_CALLS} requests at n={PROFILE_SIDE**2}, top 15 by "
        "cumulative time",
        "",
        "Per request, under cProfile (which roughly doubles Python-heavy times). "
        "Frames that only wait (locks, the worker threads' loop) are left out; a callee "
        "within 3% of its caller's cumulative time is folded into its row.",
    ]
    for kind in ("lx", "stock"):
        lines += [
            "",
            f"### Client, against `{kind}` (main thread; the callback runs in it)",
            "",
            _profile_table(clean[kind]["client_profile"]),
        ]
    for kind in SERVERS:
        lines += [
            "",
            f"### Server `{kind}` (event loop + worker threads)",
            "",
            _profile_table(phases[kind].get("server_profile", [])),
        ]
    lines += ["", "## Conclusions", "", _kept_conclusions(out), ""]
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


if __name__ == "__main__":
    sys.exit(main())
