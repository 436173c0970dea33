"""One client shared by threads, and `concurrent` requests that really overlap: as
many at once as `max_in_flight` says."""

import collections
import concurrent.futures
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx
from tesseract_lx._progress import Activity

from conftest import fresh
from helpers import BATCHED, CASES, gradient_stats, JVP, PARTIAL, tree_allclose


@pytest.mark.parametrize("transport", ["stock", "tlx", "inprocess"])
def test_four_threads_share_one_client_with_auto(served, transport):
    """4 threads, each a Jacobian at its own point through one client: right
    numbers, and every request accounted for in `stats` and `decisions`."""
    case = CASES["bratu"]
    client = fresh(served.get(case.path, transport))
    f = tlx.TesseractModule(client, batching=tlx.Auto())
    inputs = case.inputs()
    points = [inputs["u"] + 0.1 * j for j in range(4)]

    def jacobian(fn, u):
        return jax.jacfwd(lambda u: fn({**inputs, "u": u})["residual"])(u)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda u: jacobian(f, u), points))
    for u, jac in zip(points, got, strict=True):
        assert tree_allclose(jac, jacobian(case.ref, u))
    # One `/apply` and one batch of 4 tangents per thread, each batch sent the way
    # `auto` decided (and recorded) for it.
    assert len(client.decisions) == 4
    chosen = collections.Counter(d.chosen for d in client.decisions)
    sent = collections.Counter()
    for rule, n in chosen.items():
        sent.update(
            {
                "batched": {BATCHED[JVP]: n},
                "jacobian": {"jacobian": n},
                "concurrent": {JVP: 4 * n},
                "sequential": {JVP: 4 * n},
            }[rule]
        )
    assert gradient_stats(client.stats) == dict(sent)
    assert client.stats["apply"] == 4
    assert set(client.stats) <= {"apply", "abstract_eval", *sent}


@pytest.fixture
def sleepy(tmp_path, monkeypatch):
    """The sleepy Tesseract on a stock server with 2 workers, and its JVP log."""
    log = tmp_path / "jvps.log"
    monkeypatch.setenv("SLEEPY_LOG", str(log))
    path = PARTIAL / "sleepy" / "tesseract_api.py"
    with tlx.serve(path, server="tesseract-runtime", workers=2) as client:
        yield client, log


def _intervals(log) -> list[tuple[float, float]]:
    lines = log.read_text().split("\n") if os.path.exists(log) else []
    spans = [line.split() for line in lines if line]
    return sorted((float(start), float(end)) for start, end in spans)


@pytest.mark.parametrize("rule", ["concurrent", "sequential"])
def test_concurrent_requests_overlap_on_the_server(sleepy, rule):
    """Sequential JVPs never run at once on the server. Concurrent ones are sent two
    at a time (the client's side is asserted by the gate tests below); whether the
    server then runs them side by side depends on which of its worker processes
    the kernel gives each connection, which no test can count on."""
    client, log = sleepy
    f = tlx.TesseractModule(client, batching=rule)
    x = jnp.linspace(0.0, 1.0, 3)
    tangents = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    jvp = lambda t: jax.jvp(lambda x: f({"x": x})["y"], (x,), (t,))[1]
    out = jax.vmap(jvp)(tangents)
    assert tree_allclose(out, 3 * tangents)
    assert client.stats == {"apply": 1, JVP: 4}
    spans = _intervals(log)
    assert len(spans) == 4
    if rule == "sequential":
        assert not any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


class Gate(Activity):
    """A client's `activity` that holds every request for `endpoint` until `n` of
    them are in flight at once (or fails after a minute), and records the most in
    flight: a client that sends fewer at once never gets past it, however fast or
    loaded the machine."""

    def __init__(self, endpoint: str, n: int):
        super().__init__()
        self.endpoint = endpoint
        self.barrier = threading.Barrier(n, timeout=60)
        self.now = self.peak = 0
        self._count = threading.Lock()

    def started(self, endpoint: str, nbytes: int) -> float:
        start = super().started(endpoint, nbytes)
        if endpoint == self.endpoint:
            with self._count:
                self.now += 1
                self.peak = max(self.peak, self.now)
            self.barrier.wait()
        return start

    def finished(self, endpoint: str, start: float, nbytes: int) -> None:
        if endpoint == self.endpoint:
            with self._count:
                self.now -= 1
        super().finished(endpoint, start, nbytes)


@pytest.fixture
def gated(served):
    """A new client of the session's tesseract-lx bratu server, by URL (so it knows
    no workers: `parallelism` 1), its requests counted by a `Gate`."""
    client = tlx.Client(served.get(CASES["bratu"].path, "tlx").urls)
    try:
        yield client
    finally:
        client.close()


def _tangents(k: int, seed: int = 0):
    inputs = CASES["bratu"].inputs()
    u = inputs["u"]
    tangents = jnp.asarray(np.random.default_rng(seed).standard_normal((k, *u.shape)))
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    jvps = lambda fn: jax.vmap(lambda t: jax.jvp(g(fn), (u,), (t,))[1])  # noqa: E731
    return tangents, jvps


def test_max_in_flight_is_honoured_beyond_the_thread_pool(gated):
    """`Concurrent(max_in_flight=16)`: 16 requests in flight at once, on a client
    whose own estimate is 1 at a time (a pool sized by it once capped this at 8)."""
    gated.activity = gate = Gate(JVP, 16)
    f = tlx.TesseractModule(gated, batching=tlx.Concurrent(max_in_flight=16))
    tangents, jvps = _tangents(16)
    assert tree_allclose(jvps(f)(tangents), jvps(CASES["bratu"].ref)(tangents))
    assert gated.stats == {"apply": 1, JVP: 16}
    assert gate.peak == 16


def test_calls_at_once_each_get_their_max_in_flight(gated):
    """Two threads, each a batch of 8 tangents with `max_in_flight=8`, at once: all
    16 requests in flight together (the threads of one call never wait for those of
    another)."""
    gated.activity = gate = Gate(JVP, 16)
    f = tlx.TesseractModule(gated, batching=tlx.Concurrent(max_in_flight=8))
    batches = [_tangents(8, seed) for seed in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda b: b[1](f)(b[0]), batches))
    for (tangents, jvps), out in zip(batches, outs, strict=True):
        assert tree_allclose(out, jvps(CASES["bratu"].ref)(tangents))
    assert gated.stats == {"apply": 2, JVP: 16}
    assert gate.peak == 16
