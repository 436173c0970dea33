"""Load: one client shared by 4 threads against a 2-worker `tesseract-lx serve`.

Mixed requests (apply eagerly and under jit, JVP, VJP, batched JVP and VJP, Jacobians
by `jax.jacfwd` and `as_matrix`), each at its own point with its own vectors, so that
an answer lost or handed to the wrong caller shows against its pure-JAX reference.
Then a soak: the client's memory (RSS) and open file descriptors stay flat, and the
server writes no run folders.

The sizes fit the test budget; `TESSERACT_LX_FULL_LOAD=1` runs the full ones (4 x 500
mixed requests, then 5,000 for the soak), with `pytest -s` to see the figures.
"""

import collections
import concurrent.futures
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tesseract_lx as tlx

from helpers import BATCHED, EXAMPLES, JVP, tree_allclose, VJP
from references import bratu_inputs, bratu_ref


FULL = os.environ.get("TESSERACT_LX_FULL_LOAD") == "1"
THREADS = 4
PER_THREAD = 500 if FULL else 50
SOAK = 5000 if FULL else 600
# Grid side: n = 9 unknowns, so a Jacobian is 9 tangents in one batched request.
N = 3
K = 3  # vectors per batched JVP or VJP
# Measured: +0.2 MB over 1,000 requests, +1.9 MB over 5,000, none of it in Python
# objects (tracemalloc). The slack catches a leak of 10 kB per request (2 kB at the
# full size); a request's payload and answer are ~2 kB here.
RSS_SLACK_MB = 10
FD_SLACK = 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _files(root: Path) -> list[str]:
    """Everything under `root`, but the server's own log."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name != "server.log"
    )


@pytest.fixture(scope="module")
def bratu2(tmp_path_factory):
    """The bratu example on `tesseract-lx serve --workers 2`, and the folder `serve`
    keeps its run outputs in."""
    root = tmp_path_factory.mktemp("serve")
    # `serve` makes its temporary folder (outputs, log) with `tempfile`: here.
    saved, tempfile.tempdir = tempfile.tempdir, str(root)
    try:
        cm = tlx.serve(EXAMPLES / "bratu" / "tesseract_api.py", workers=2)
        client = cm.__enter__()
    finally:
        tempfile.tempdir = saved
    try:
        yield client, root
    finally:
        cm.__exit__(None, None, None)


def _table(client: tlx.Client, base: dict) -> dict:
    """`kind -> (fn(u, v), its pure-JAX reference, the requests one call sends)`."""
    batched = tlx.TesseractModule(client, tlx.Batched())
    single = tlx.TesseractModule(client, tlx.Sequential())

    def residual(f):
        return lambda u: f({**base, "u": u})["residual"]

    def maths(res, single_res, as_matrix) -> dict:
        jvp = lambda f, u, t: jax.jvp(f, (u,), (t,))[1]
        vjp = lambda f, u, c: jax.vjp(f, u)[1](c)[0]
        return {
            "apply": lambda u, v: res(u),
            "jvp": lambda u, v: jvp(single_res, u, v[0]),
            "vjp": lambda u, v: vjp(single_res, u, v[1]),
            "batched_jvp": lambda u, v: jax.vmap(lambda t: jvp(res, u, t))(v),
            "batched_vjp": lambda u, v: jax.vmap(lambda c: vjp(res, u, c))(v),
            "jacfwd": lambda u, v: jax.jacfwd(res)(u),
            "as_matrix": as_matrix,
        }

    ref = residual(bratu_ref)
    ours = maths(
        residual(batched),
        residual(single),
        lambda u, v: tlx.TesseractJacobianOperator(
            batched, {**base, "u": u}, wrt="u", of="residual"
        ).as_matrix(),
    )
    refs = maths(ref, ref, lambda u, v: jax.jacfwd(ref)(u).reshape(N * N, N * N))
    # Under jit a derivative's own `/apply` is never sent: nobody uses its output.
    sends = {
        "apply": {"apply": 1},
        "apply_jit": {"apply": 1},
        "jvp": {JVP: 1},
        "vjp": {VJP: 1},
        "batched_jvp": {BATCHED[JVP]: 1},
        "batched_vjp": {BATCHED[VJP]: 1},
        "jacfwd": {BATCHED[JVP]: 1},
        "as_matrix": {"jacobian": 1},
    }
    table = {}
    for kind, send in sends.items():
        name = "apply" if kind == "apply_jit" else kind
        # "apply" eagerly (no tracing: one `/apply`), everything else under jit.
        fn = ours[name] if kind == "apply" else jax.jit(ours[name])
        table[kind] = (fn, jax.jit(refs[name]), send)
    return table


def _point(base: dict, i: int) -> tuple[jax.Array, jax.Array]:
    """Request `i`'s own point and vectors."""
    rng = np.random.default_rng(i)
    u = base["u"] + 1e-3 * i
    return u, jnp.asarray(rng.standard_normal((K, N, N)))


def test_threads_share_one_client_under_load(bratu2):
    client, root = bratu2
    base = bratu_inputs(N)
    table = _table(client, base)
    kinds = list(table)
    # Warm-up: compile every function and reference once.
    for fn, ref, _ in table.values():
        u, v = _point(base, 0)
        assert tree_allclose(fn(u, v), ref(u, v))
    client.stats.clear()
    files = _files(root)
    assert any(f.endswith("outputs") for f in files), files

    def run(start: int, count: int) -> tuple[collections.Counter, list[str]]:
        """Requests `start .. start + count - 1`, checked as they come."""
        done: collections.Counter = collections.Counter()
        wrong = []
        for i in range(start, start + count):
            kind = kinds[i % len(kinds)]
            fn, ref, _ = table[kind]
            u, v = _point(base, i)
            try:
                ok = tree_allclose(fn(u, v), ref(u, v))
            except Exception as e:  # noqa: BLE001 - counted and reported below
                ok, kind = False, f"{kind} raised {type(e).__name__}: {e}"
            done[kind] += 1
            if not ok:
                wrong.append(f"#{i} {kind}")
        return done, wrong

    def phase(pool, total: int, offset: int) -> tuple[collections.Counter, float]:
        per = total // THREADS
        start = time.perf_counter()
        futures = [pool.submit(run, offset + t * per, per) for t in range(THREADS)]
        done: collections.Counter = collections.Counter()
        wrong = []
        for future in futures:
            d, w = future.result()
            done.update(d)
            wrong += w
        assert not wrong, f"{len(wrong)} wrong or failed answers: {wrong[:10]}"
        assert sum(done.values()) == per * THREADS
        return done, time.perf_counter() - start

    # One pool for both phases: its threads (and their connections) are warm.
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        done, seconds = phase(pool, THREADS * PER_THREAD, 1)
        expected: collections.Counter = collections.Counter()
        for kind, n in done.items():
            for endpoint, m in table[kind][2].items():
                expected[endpoint] += n * m
        assert client.stats == expected
        print(
            f"\n{THREADS} threads x {PER_THREAD} mixed requests in {seconds:.1f} s, "
            f"0 errors: {dict(done)}; sent {dict(client.stats)}"
        )

        rss, fds = _rss_mb(), _fds()
        soaked, soak_seconds = phase(pool, SOAK, 1 + THREADS * PER_THREAD)
        rss_after, fds_after = _rss_mb(), _fds()
    print(
        f"soak: {SOAK} requests in {soak_seconds:.1f} s, 0 errors; RSS "
        f"{rss:.1f} -> {rss_after:.1f} MB, open fds {fds} -> {fds_after}"
    )
    assert sum(soaked.values()) == SOAK
    assert rss_after - rss < RSS_SLACK_MB
    assert fds_after <= fds + FD_SLACK
    # `tesseract-lx serve` writes no run folders unless asked (`--run-folders`).
    assert _files(root) == files
    assert not [f for f in files if "run_" in f]


def test_short_lived_threads_leave_no_connections_open(bratu2):
    """A fresh pool of threads per batch of work, as `with ThreadPoolExecutor()`
    in a loop does: the connections of finished threads are closed."""
    client, _ = bratu2
    f = tlx.TesseractModule(client)
    inputs = bratu_inputs(N)
    expected = bratu_ref(inputs)

    def batch() -> None:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            outs = list(pool.map(lambda _: f(inputs), range(2 * THREADS)))
        assert all(tree_allclose(out, expected) for out in outs)

    batch()
    fds = _fds()
    for _ in range(5):
        batch()
    assert _fds() <= fds + FD_SLACK
