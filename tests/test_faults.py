"""Faults, each against a real server process: a server that is not there, dies in
the middle of a solve, comes back, stalls, or answers garbage.

Real Tesseract servers serve `tests/tesseracts/stalling` (it sleeps `delay` seconds
when asked, writes its pid and logs its calls); the rest is a tiny HTTP server of our
own (`raw_server`, the standard library's `http.server` in a thread, on 127.0.0.1),
which answers what a broken or hostile server would. A Tesseract's 500 carrying its
own message is `tests/test_failures.py`.
"""

import collections
import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import orjson
import pytest
import requests
import tesseract_lx as tlx
from tesseract_lx._errors import TesseractTimeoutError
from tesseract_lx._serve import free_port
from tesseract_lx._wire.encoding import encode_array

from helpers import PARTIAL


STALLING = PARTIAL / "stalling" / "tesseract_api.py"
N = 4
X = jnp.linspace(0.5, 2.0, N)
B = jnp.zeros(N)
INPUTS = {"inputs": {"x": np.ones(N), "b": np.zeros(N)}}
ANSWER = {"y": encode_array(np.arange(3.0))}


#
# Helpers, also used by `test_security.py`
#


@contextlib.contextmanager
def raw_server(answer, port: int = 0):
    """A tiny HTTP server on 127.0.0.1 that hands every request to
    `answer(handler)`; yields its URL and what it received (`seen[path]`: the
    headers of each request to `path`). Stopped on exit, even on failure."""
    seen = collections.defaultdict(list)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen[self.path].append(dict(self.headers))
            answer(self)

        do_GET = do_POST = _any

        def log_message(self, format, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def reply(handler, status: int, body: bytes, length: int | None = None) -> None:
    """Answer `body`, declaring `length` bytes (a lie, to cut an answer short)."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def children() -> dict[int, str]:
    """This process's child processes: pid -> state (`Z` for a zombie)."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found[int(d.name)] = fields[0]
    return found


def alive_in_group(pgid: int) -> set[int]:
    """The live processes of process group `pgid` (killed orphans stay zombies
    of init until it reaps them)."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (d / "stat").read_text().rpartition(")")[2].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.add(int(d.name))
    return found


def eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def server_pid(pidfile: Path) -> int:
    """The pid the stalling Tesseract wrote: a child of this process."""
    pid = int(pidfile.read_text())
    assert pid in children(), "the Tesseract does not run in our own child"
    return pid


@contextlib.contextmanager
def killing(pid: int, log: Path, calls: int):
    """SIGKILL `pid` once the stalling Tesseract has logged `calls` calls (it is
    then sleeping inside the last one); never after the block. Yields a dict whose
    `"at"` is the `time.monotonic()` of the kill."""
    done = threading.Event()
    killed = {}

    def run():
        while not done.wait(0.02):
            if log.exists() and len(log.read_text().splitlines()) >= calls:
                os.kill(pid, signal.SIGKILL)
                killed["at"] = time.monotonic()
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


@pytest.fixture
def stalling_env(tmp_path, monkeypatch):
    """(pid file, call log) of the stalling Tesseract, served after this."""
    pidfile, log = tmp_path / "pid", tmp_path / "calls"
    monkeypatch.setenv("STALLING_PID", str(pidfile))
    monkeypatch.setenv("STALLING_LOG", str(log))
    return pidfile, log


def _learnt(client: tlx.Client, delay: float) -> tlx.TesseractModule:
    """A module that knows its output shapes at this `delay` (a static input: the
    Tesseract has no abstract_eval, one eager call teaches them)."""
    f = tlx.TesseractModule(client)
    assert jnp.allclose(f({"x": X, "b": B, "delay": delay})["y"], X**3 + X)
    return f


#
# No server, a slow one, a late one
#


def test_server_not_running():
    url = f"http://127.0.0.1:{free_port()}"
    client = tlx.Client(url, connect_timeout=2.0)
    start = time.monotonic()
    with pytest.raises(tlx.TesseractConnectionError) as info:
        client.request("apply", INPUTS)
    # Refused at once: 4 tries and 0.35 s of backoff, not the connect timeout
    # (generous for a busy machine: the message says how many tries there were).
    assert time.monotonic() - start < 20.0
    assert str(info.value) == (
        f"`/apply` at {url} failed: cannot connect to {url} "
        "([Errno 111] Connection refused; tried 4 times)"
    )
    assert (info.value.status, info.value.url) == (None, url)
    assert client.stats == {"apply": 1}


def test_connect_timeout():
    """A listener whose accept queue is full drops new connections: the connect
    timeout fires, once (not retried), while the read timeout is long."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        queued = []
        try:
            for _ in range(8):
                s = socket.socket()
                queued.append(s)
                s.settimeout(0.2)
                try:
                    s.connect(listener.getsockname())
                except TimeoutError:
                    break  # the queue is full
            client = tlx.Client(url, timeout=60.0, connect_timeout=0.5)
            start = time.monotonic()
            with pytest.raises(TesseractTimeoutError) as info:
                client.request("apply", INPUTS)
            # Not retried: the message below is the timeout's, not the retries'.
            assert 0.5 <= time.monotonic() - start < 20.0
        finally:
            for s in queued:
                s.close()
    assert isinstance(info.value, tlx.TesseractConnectionError | TimeoutError)
    assert str(info.value) == (
        f"`/apply` at {url} failed: cannot connect to {url} within the connect "
        "timeout of 0.5 s"
    )


def test_stall_past_the_read_timeout(stalling_env):
    _, log = stalling_env
    with tlx.serve(STALLING, server="tesseract-runtime") as served:
        url = served.urls[0]
        with tlx.Client(url, timeout=1.0, connect_timeout=5.0) as client:
            start = time.monotonic()
            with pytest.raises(TesseractTimeoutError) as info:
                client.request("apply", {"inputs": {**INPUTS["inputs"], "delay": 3.0}})
            assert 1.0 <= time.monotonic() - start < 20.0
        assert str(info.value) == (
            f"`/apply` at {url} failed: no answer within the read timeout of 1.0 s"
        )
        time.sleep(0.3)  # a retry would have reached the server by now
        assert log.read_text().split() == ["apply"]
        assert client.stats == {"apply": 1}


def test_stall_in_the_middle_of_an_answer():
    """Headers sent, then nothing: requests calls that a connection error; it is
    the read timeout, and final."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b'{"y": ')
        handler.wfile.flush()
        time.sleep(1.5)

    with raw_server(answer) as (url, seen):
        client = tlx.Client(url, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(TesseractTimeoutError) as info:
            client.request("apply", INPUTS)
        # The timeout, not the server's end (1.5 s, then a broken answer): the
        # error's type and text say so whatever the machine's load.
        assert time.monotonic() - start < 20.0
    assert str(info.value) == (
        f"`/apply` at {url} failed: no answer within the read timeout of 0.5 s"
    )
    assert len(seen["/apply"]) == 1


def test_retried_until_the_port_listens():
    """Refused connections are retried with backoff (0.05 + 0.1 + 0.2 s): a server
    that starts listening 0.1 s late still gets the request, once."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        started = {}

        def late():
            time.sleep(0.1)
            started["seen"] = stack.enter_context(
                raw_server(lambda h: reply(h, 200, orjson.dumps(ANSWER)), port)
            )[1]

        thread = threading.Thread(target=late)
        thread.start()
        client = tlx.Client(f"http://127.0.0.1:{port}")
        out = client.request("apply", INPUTS)
        thread.join()
        assert np.array_equal(out["y"], np.arange(3.0))
        assert client.stats == {"apply": 1}
        assert len(started["seen"]["/apply"]) == 1


def test_retried_when_the_server_drops_the_connection():
    """A server that closes the connection without answering (as one killed while
    computing does): the request is sent again, and answered."""
    calls = []

    def answer(handler):
        calls.append(1)
        if len(calls) == 1:
            handler.close_connection = True  # no answer at all
            return
        reply(handler, 200, orjson.dumps(ANSWER))

    with raw_server(answer) as (url, seen):
        client = tlx.Client(url)
        assert np.array_equal(client.request("apply", INPUTS)["y"], np.arange(3.0))
    assert len(seen["/apply"]) == 2
    assert client.stats == {"apply": 1}


@pytest.mark.parametrize(
    "status, error",
    [
        (400, tlx.TesseractError),
        (401, tlx.TesseractError),
        (404, tlx.TesseractError),
        (422, tlx.TesseractValidationError),
        (500, tlx.TesseractServerError),
        (503, tlx.TesseractServerError),
    ],
)
def test_an_answer_is_never_retried(status, error):
    body = b'{"detail": "no (marker 3310)"}'
    with raw_server(lambda h: reply(h, status, body)) as (url, seen):
        client = tlx.Client(url)
        with pytest.raises(error) as info:
            client.request("apply", INPUTS)
    assert str(info.value) == f"`/apply` at {url} failed ({status}): no (marker 3310)"
    assert len(seen["/apply"]) == 1
    assert client.stats == {"apply": 1}


#
# Answers that are not Tesseract payloads
#


_MALFORMED = {
    "garbage": (
        lambda h: reply(h, 200, b"<html>Bad gateway</html>"),
        tlx.TesseractServerError,
        r"failed \(200\): the answer is not a Tesseract payload \(JSONDecodeError: "
        r".*; 24 bytes\)",
    ),
    "truncated JSON": (
        lambda h: reply(h, 200, orjson.dumps(ANSWER)[:40]),
        tlx.TesseractServerError,
        r"the answer is not a Tesseract payload \(JSONDecodeError: .*; 40 bytes\)",
    ),
    "cut off": (
        lambda h: reply(h, 200, orjson.dumps(ANSWER)[:40], length=1000),
        tlx.TesseractConnectionError,
        r"failed: the answer from http://127.0.0.1:\d+ broke off before its end "
        r"\(IncompleteRead\(40 bytes read, 960 more expected\)\)",
    ),
    "wrong shape": (
        lambda h: reply(
            h,
            200,
            orjson.dumps(
                {"y": {**ANSWER["y"], "data": {"buffer": [1, 2], "encoding": "json"}}}
            ),
        ),
        tlx.TesseractServerError,
        r"the answer is not a Tesseract payload \(ValueError: cannot reshape array "
        r"of size 2 into shape \(3,\); ",
    ),
    "bad base64": (
        lambda h: reply(
            h,
            200,
            orjson.dumps(
                {"y": {**ANSWER["y"], "data": {"buffer": "@@@", "encoding": "base64"}}}
            ),
        ),
        tlx.TesseractServerError,
        r"the answer is not a Tesseract payload \(Error: Non-base64 digit found; ",
    ),
}


@pytest.mark.parametrize("kind", list(_MALFORMED))
def test_malformed_answer(kind):
    answer, error, message = _MALFORMED[kind]
    with raw_server(answer) as (url, seen):
        client = tlx.Client(url)
        with pytest.raises(error, match=message) as info:
            client.request("apply", INPUTS)
    assert str(info.value).startswith(f"`/apply` at {url} failed")
    assert info.value.endpoint == "apply"
    assert client.last_error is info.value
    assert len(seen["/apply"]) == 1


def test_malformed_schema():
    """The first thing a module asks for, `/openapi.json`, answered with garbage."""
    with raw_server(lambda h: reply(h, 200, b'{"openapi": "3.1.0"')) as (url, _):
        client = tlx.Client(url)
        with pytest.raises(tlx.TesseractServerError, match="JSONDecodeError"):
            tlx.TesseractModule(client)({"x": X, "b": B})
    with raw_server(lambda h: reply(h, 200, b'{"openapi": "3.1.0"}')) as (url, _):
        with pytest.raises(tlx.TesseractServerError) as info:
            tlx.Client(url).schema
    assert str(info.value) == (
        f"`/openapi.json` at {url} failed (200): the answer is not a Tesseract "
        "payload (KeyError: 'components'; 20 bytes)"
    )


#
# A server killed in the middle of a solve, and one restarted
#


def test_killed_in_a_jitted_gmres_solve_then_restarted(stalling_env):
    """Killed while computing a JVP of a jitted GMRES solve: an error within
    seconds (not the read timeout), the process reaped; served again on the same
    port, the same client reconnects and its calls succeed."""
    pidfile, log = stalling_env
    before = children()
    solver = lx.GMRES(rtol=1e-10, atol=1e-10)

    def jacobian(f, delay):
        inputs = {"x": X, "b": B, "delay": delay}
        return tlx.TesseractJacobianOperator(f, inputs, wrt="x", of="y")

    with contextlib.ExitStack() as stack:
        with tlx.serve(STALLING, server="tesseract-runtime") as served:
            url = served.urls[0]
            pid = server_pid(pidfile)
            client = stack.enter_context(tlx.Client(url, timeout=30.0))
            f = _learnt(client, 0.5)
            J = jacobian(f, 0.5)
            solve = jax.jit(lambda v: lx.linear_solve(J, v, solver).value)
            with killing(pid, log, 3) as killed:  # `apply`, then two JVPs
                with pytest.raises(jax.errors.JaxRuntimeError) as info:
                    jax.block_until_ready(solve(jnp.ones(N)))
            # Not the 30 s read timeout: the connection broke, retries were refused.
            assert time.monotonic() - killed["at"] < 20.0
            assert eventually(lambda: children()[pid] == "Z")  # `serve` reaps it
            assert (
                f"TesseractConnectionError: `/jacobian_vector_product` at {url} "
                f"failed: cannot connect to {url} ([Errno 111] Connection refused; "
                "tried 4 times)"
            ) in str(info.value)
            assert isinstance(client.last_error, tlx.TesseractConnectionError)
            assert client.stats["jacobian_vector_product"] == 2
        assert set(children()) <= set(before)

        port = urllib.parse.urlsplit(url).port
        with tlx.serve(STALLING, server="tesseract-runtime", port=port) as again:
            assert again.urls == (url,)
            client.stats.clear()
            # The old connections died with the old server: the next call reconnects.
            assert jnp.allclose(f({"x": X, "b": B, "delay": 0.0})["y"], X**3 + X)
            v = jnp.ones(N)
            assert jnp.allclose(jacobian(f, 0.0).mv(v), (3 * X**2 + 1) * v)
            assert client.stats == {"apply": 1, "jacobian_vector_product": 1}
    assert set(children()) <= set(before)


def test_killed_in_a_newton_solve(stalling_env):
    pidfile, log = stalling_env
    before = children()
    with tlx.serve(STALLING, server="tesseract-lx", timeout=30.0) as client:
        pid = server_pid(pidfile)
        f = _learnt(client, 0.3)
        fn = tlx.residual_fn(f, wrt="x", of="y")
        newton = optx.Newton(rtol=1e-8, atol=1e-8)
        args = {"b": X**3 + X, "delay": 0.3}  # the root is X
        with killing(pid, log, 4) as killed:  # `apply`, then the first Newton step
            with pytest.raises(jax.errors.JaxRuntimeError) as info:
                jax.block_until_ready(optx.root_find(fn, newton, 0 * X, args).value)
        assert time.monotonic() - killed["at"] < 20.0
        assert eventually(lambda: children()[pid] == "Z")
        url = client.urls[0]
        assert (
            f"TesseractConnectionError: `/batched_jacobian_vector_product` at {url} "
            f"failed: cannot connect to {url} ([Errno 111] Connection refused; "
            "tried 4 times)"
        ) in str(info.value)
        assert isinstance(client.last_error, tlx.TesseractConnectionError)
    assert set(children()) <= set(before)


def test_killed_with_its_workers_orphaned():
    """A server of 2 workers killed: its workers live on (they even keep serving);
    leaving `serve` ends them too."""
    before = children()
    with tlx.serve(STALLING, server="tesseract-runtime", workers=2) as client:
        (leader,) = set(children()) - set(before)
        workers = alive_in_group(leader) - {leader}
        assert len(workers) >= 2
        os.kill(leader, signal.SIGKILL)
        assert eventually(lambda: children().get(leader) == "Z")
        assert workers <= alive_in_group(leader)
        assert client.request("apply", INPUTS)["y"].shape == (N,)
    # SIGKILLed: gone as soon as the kernel has finished them.
    assert eventually(lambda: not alive_in_group(leader))
    assert set(children()) <= set(before)


_PARENT = """
import sys, time
import tesseract_lx as tlx

with tlx.serve(sys.argv[1], server=sys.argv[2], workers=int(sys.argv[3])) as client:
    print(client.urls[0], flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize(
    "server,workers", [("tesseract-lx", 2), ("tesseract-runtime", 1)]
)
def test_a_killed_parent_takes_its_server_along(server, workers):
    """The process that started a server is SIGKILLed (no `finally`, no handler
    runs): the kernel's SIGTERM on its death stops the server and its workers."""
    env = {**os.environ, "PYTHONPATH": str(Path(tlx.__file__).parents[1])}
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(STALLING), server, str(workers)],
        stdout=subprocess.PIPE,
        env=env,
    )
    leader = None
    try:
        assert parent.stdout is not None
        url = parent.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:"), url
        (leader,) = [
            int(d.name)
            for d in Path("/proc").iterdir()
            if d.name.isdigit() and _ppid(d) == parent.pid
        ]
        assert len(alive_in_group(leader)) >= workers
        assert requests.get(f"{url}/health", timeout=10).ok
        parent.kill()
        parent.wait(timeout=10)
        assert eventually(lambda: not alive_in_group(leader), timeout=30)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if leader is not None:  # whatever the test found, nothing stays behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader, signal.SIGKILL)


def _ppid(d: Path) -> int | None:
    try:
        return int((d / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_a_server_started_in_a_thread_that_ends_keeps_serving():
    """The parent-death signal is the forking thread's: a server started from a
    thread that then ends (a pool starting several at once) must not go with it."""
    with contextlib.ExitStack() as stack:
        started = {}
        thread = threading.Thread(
            target=lambda: started.update(
                client=stack.enter_context(tlx.serve(STALLING))
            )
        )
        thread.start()
        thread.join()
        client = started["client"]
        time.sleep(1.0)  # a signal would have landed by now
        assert client.health()["status"] == "ok"
        assert client.request("apply", INPUTS)["y"].shape == (N,)
