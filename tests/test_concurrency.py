"""One client shared by threads, and `concurrent` requests that really overlap."""

import collections
import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx

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
    return sorted(tuple(map(float, line.split())) for line in lines if line)


@pytest.mark.parametrize("rule", ["concurrent", "sequential"])
def test_concurrent_requests_overlap_on_the_server(sleepy, rule):
    """Concurrent JVPs run at once on two workers; sequential ones never do."""
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
    overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    if rule == "concurrent":
        # 4 JVPs, 2 in flight: which of them the server runs side by side depends
        # on its scheduling and the machine's load, but some do.
        assert overlaps >= 1
    else:
        assert overlaps == 0
