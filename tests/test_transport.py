"""How requests travel: in process from inside a running event loop, and over HTTP
on keep-alive connections that every thread shares.

The in-process transport runs the app on an event loop of its own, so it works where
the caller's thread already runs one (`asyncio.run`, anyio; a Jupyter kernel is
`test_notebook.py`). Over HTTP, connections are counted for real: a small TCP proxy of
our own between a client and a real `tesseract-lx serve` counts the connections it
accepts.
"""

import asyncio
import concurrent.futures
import contextlib
import gc
import socket
import threading
import urllib.parse
import warnings
from collections.abc import Iterator

import anyio
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx
from tesseract_lx._serve import in_process_app
from tesseract_lx._transport import ASGITransport

from conftest import fresh
from helpers import CASES, JVP, tree_allclose
from references import bratu_inputs, bratu_ref


BRATU = CASES["bratu"].path


def _jvp_case(n: int = 4):
    inputs = bratu_inputs(n)
    u = inputs["u"]
    t = jnp.asarray(np.random.default_rng(0).standard_normal(u.shape))
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    return inputs, u, t, g


#
# In process, from inside a running event loop
#


@pytest.fixture(scope="module")
def inprocess():
    client = tlx.Client.from_api(BRATU)
    try:
        yield client
    finally:
        client.close()


def _calls(f, inputs, u, t, g) -> dict:
    """An eager call, a jitted one and a JVP; what each gave."""
    return {
        "eager": f(inputs)["residual"],
        "jit": jax.jit(g(f))(u),
        "jvp": jax.jvp(g(f), (u,), (t,))[1],
    }


def _expected(inputs, u, t, g) -> dict:
    return {
        "eager": bratu_ref(inputs)["residual"],
        "jit": g(bratu_ref)(u),
        "jvp": jax.jvp(g(bratu_ref), (u,), (t,))[1],
    }


def test_in_process_inside_asyncio_run(inprocess):
    """Calls from a coroutine run by `asyncio.run`, eager and under `jax.jit`: the
    caller's loop keeps running, untouched, and so does its policy."""
    client = fresh(inprocess)
    f = tlx.TesseractModule(client, batching="sequential")
    inputs, u, t, g = _jvp_case()
    policy = asyncio.get_event_loop_policy()

    async def main() -> tuple[dict, bool]:
        loop = asyncio.get_running_loop()
        out = _calls(f, inputs, u, t, g)
        await asyncio.sleep(0)  # the caller's loop still runs its own tasks
        return out, asyncio.get_running_loop() is loop

    out, same_loop = asyncio.run(main())
    assert same_loop
    assert asyncio.get_event_loop_policy() is policy
    assert tree_allclose(out, _expected(inputs, u, t, g))
    assert client.stats == {"apply": 3, JVP: 1}


def test_in_process_inside_anyio_run(inprocess):
    client = fresh(inprocess)
    f = tlx.TesseractModule(client, batching="sequential")
    inputs, u, t, g = _jvp_case()

    async def main() -> dict:
        await anyio.sleep(0)
        return _calls(f, inputs, u, t, g)

    out = anyio.run(main)
    assert tree_allclose(out, _expected(inputs, u, t, g))
    assert client.stats == {"apply": 3, JVP: 1}


def test_in_process_from_many_threads_at_once(inprocess):
    """8 threads through one in-process client, half of them inside event loops of
    their own: every answer right, every request counted."""
    client = fresh(inprocess)
    f = tlx.TesseractModule(client, batching="sequential")
    inputs, u, t, g = _jvp_case()
    points = [u + 0.1 * j for j in range(8)]

    def work(j: int):
        call = lambda: jax.jvp(g(f), (points[j],), (t,))  # noqa: E731
        if j % 2:
            return call()

        async def main():
            return call()

        return asyncio.run(main())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, range(8)))
    for point, out in zip(points, got, strict=True):
        assert tree_allclose(out, jax.jvp(g(bratu_ref), (point,), (t,)))
    assert client.stats == {"apply": 8, JVP: 8}


def _gathering_app(n: int):
    """An ASGI app that answers no request before `n` are in it at once."""
    arrived = []
    everyone = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        arrived.append(1)
        if len(arrived) == n:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), 60)
            status, body = 200, b'{"together": %d}' % len(arrived)
        except TimeoutError:
            status, body = 504, b'{"detail": "alone"}'
        headers = [(b"content-type", b"application/json")]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_in_process_requests_of_several_threads_are_in_flight_at_once():
    """8 threads, each one request, into an app that answers none before all 8 are
    in: they all come back, so they were all in flight together."""
    transport = ASGITransport(_gathering_app(8), "in-process:gathering", {})
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: transport.send("POST", "x"), range(8)))
    finally:
        transport.close()
    assert [(a.status, a.content) for a in answers] == [(200, b'{"together": 8}')] * 8


def test_in_process_transport_closes_and_reopens(inprocess):
    """`close` stops the transport's loop and its thread; a later request starts
    them again; a transport dropped without `close` stops them too."""
    transport = ASGITransport(in_process_app(BRATU), "in-process:bratu", {})
    try:
        assert transport.send("GET", "health").status == 200
        runner = transport._runner
        assert runner is not None and runner.thread.is_alive()
        transport.close()
        assert not runner.thread.is_alive() and runner.loop.is_closed()
        assert transport.send("GET", "health").status == 200
        again = transport._runner
        assert again is not None and again is not runner
    finally:
        transport.close()
    dropped = ASGITransport(in_process_app(BRATU), "in-process:bratu", {})
    assert dropped.send("GET", "health").status == 200
    assert dropped._runner is not None
    thread = dropped._runner.thread
    del dropped
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()


#
# Over HTTP: connections counted by a proxy
#


class CountingProxy:
    """A TCP proxy on 127.0.0.1 to `target`, counting the connections it accepts.

    One thread accepts; two threads per connection copy bytes each way. `stop`
    closes everything it opened and joins every thread.
    """

    def __init__(self, target: str):
        parts = urllib.parse.urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.accepted = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            if self._stopping:
                conn.close()
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.accepted += 1
                self._sockets += [conn, upstream]
                for a, b in ((conn, upstream), (upstream, conn)):
                    thread = threading.Thread(
                        target=self._copy, args=(a, b), daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    @staticmethod
    def _copy(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopping = True
        # Wake the acceptor with a connection of our own.
        socket.create_connection(self._listener.getsockname()).close()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join()
        for s in sockets:
            s.close()


@contextlib.contextmanager
def counted(served) -> Iterator[tuple[tlx.Client, CountingProxy]]:
    """A new client of the session's tesseract-lx bratu server, through a counting
    proxy; both closed on the way out, even on failure."""
    server = served.get(BRATU, "tlx")
    proxy = CountingProxy(server.urls[0])
    client = None
    try:
        client = tlx.Client(proxy.url)
        yield client, proxy
    finally:
        if client is not None:
            client.close()
        proxy.stop()


@contextlib.contextmanager
def no_unclosed_sockets() -> Iterator[None]:
    """Fail if a socket is left for the garbage collector (a `ResourceWarning`,
    emitted by `socket.__del__`, recorded whichever thread collects it)."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    unclosed = [
        str(w.message) for w in caught if issubclass(w.category, ResourceWarning)
    ]
    assert unclosed == []


def _solve_case(n: int = 8):
    inputs = bratu_inputs(n)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)))
    g = lambda u: bratu_ref({**inputs, "u": u})["residual"]  # noqa: E731
    matrix = jax.jacfwd(g)(inputs["u"]).reshape(n * n, n * n)
    expected = jnp.linalg.solve(matrix, b.reshape(-1)).reshape(n, n)
    return inputs, b, expected


SOLVER = lx.GMRES(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_krylov_solve_uses_one_connection(served, jit):
    """A lineax GMRES solve over a Tesseract's Jacobian, eager or jitted: dozens of
    JVP requests, one connection, no socket left to the garbage collector. (Eager,
    JAX runs the host callbacks on threads that come and go: with a connection per
    thread, every request opened one.)"""
    inputs, b, expected = _solve_case()
    with no_unclosed_sockets(), counted(served) as (client, proxy):
        f = tlx.TesseractModule(client, batching="sequential")
        J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
        solve = lambda b: lx.linear_solve(J, b, SOLVER).value  # noqa: E731
        x = (jax.jit(solve) if jit else solve)(b)
        assert tree_allclose(x, expected, rtol=1e-7, atol=1e-9)
        assert set(client.stats) <= {"abstract_eval", JVP}
        assert client.stats[JVP] > 10
        assert proxy.accepted == 1


def test_threads_that_come_and_go_share_one_connection(served):
    """Requests one at a time from the main thread, then from 5 thread pools in
    turn (each ended before the next starts): one connection for all of them."""
    inputs, u, t, g = _jvp_case()
    with no_unclosed_sockets(), counted(served) as (client, proxy):
        f = tlx.TesseractModule(client, batching="sequential")
        expected = jax.jvp(g(bratu_ref), (u,), (t,))
        assert tree_allclose(jax.jvp(g(f), (u,), (t,)), expected)
        for _ in range(5):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for _ in range(2):
                    out = pool.submit(jax.jvp, g(f), (u,), (t,)).result()
                    assert tree_allclose(out, expected)
        assert client.stats == {"apply": 11, JVP: 11}
        assert proxy.accepted == 1


def test_concurrent_requests_open_at_most_as_many_connections_as_in_flight(served):
    """`Concurrent(max_in_flight=4)` over 8 tangents, twice: at most 4 connections
    (the requests in flight at once), reused the second time; then a sequential
    call reuses one of them."""
    inputs, u, t, g = _jvp_case()
    tangents = jnp.asarray(np.random.default_rng(2).standard_normal((8, *u.shape)))
    with no_unclosed_sockets(), counted(served) as (client, proxy):
        f = tlx.TesseractModule(client, batching=tlx.Concurrent(max_in_flight=4))
        jvps = lambda fn: jax.vmap(lambda t: jax.jvp(g(fn), (u,), (t,))[1])  # noqa: E731
        expected = jvps(bratu_ref)(tangents)
        assert tree_allclose(jvps(f)(tangents), expected)
        first = proxy.accepted
        assert 1 <= first <= 4
        assert tree_allclose(jax.jit(jvps(f))(tangents), expected)
        assert tree_allclose(f(inputs), bratu_ref(inputs))
        # Under jit the unused primal output is not asked for.
        assert client.stats == {"apply": 2, JVP: 16}
        assert proxy.accepted == first


def test_a_connection_the_server_closed_is_replaced(served):
    """A kept-alive connection that the other end closed while idle is not used
    again: the next request opens one new connection and is answered."""
    inputs = bratu_inputs(4)
    with no_unclosed_sockets(), counted(served) as (client, proxy):
        f = tlx.TesseractModule(client, batching="sequential")
        assert tree_allclose(f(inputs), bratu_ref(inputs))
        # Close the proxy's ends of the connection, as a server's keep-alive
        # timeout does.
        with proxy._lock:
            live = list(proxy._sockets)
        for s in live:
            with contextlib.suppress(OSError):  # the other end may be gone already
                s.shutdown(socket.SHUT_RDWR)
        assert tree_allclose(f(inputs), bratu_ref(inputs))
        assert client.stats == {"apply": 2}
        assert proxy.accepted == 2
