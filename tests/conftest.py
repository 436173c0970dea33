"""Real servers for the example Tesseracts, started once per session, and clients.

Every test asserts exact request counts, so the `client` fixture hands out a client
whose `stats` (and the caches that decide whether a request is sent: learned output
shapes, measured latencies, `auto`'s decisions) start empty. Servers are never
restarted: startup costs seconds.
"""

import atexit
import concurrent.futures
import os
import shutil
import tempfile
import threading
from pathlib import Path

import jax


# Before anything builds an array: the tests compare against float64 references.
jax.config.update("jax_enable_x64", True)

# tesseract-core writes `run_<id>/` folders under `TESSERACT_OUTPUT_PATH` (default: the
# working directory); keep anything the in-process runtime might write out of the repo.
_OUTPUTS = tempfile.mkdtemp(prefix="tesseract_lx_tests_")
os.environ.setdefault("TESSERACT_OUTPUT_PATH", _OUTPUTS)
atexit.register(shutil.rmtree, _OUTPUTS, True)

# hypothesis (and schemathesis on it) would keep examples and caches in
# `./.hypothesis`: no example database, and its caches in the temporary directory.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_OUTPUTS, "hyp"))
from hypothesis import settings as _hypothesis_settings  # noqa: E402


_hypothesis_settings.register_profile("tesseract_lx", database=None)
_hypothesis_settings.load_profile("tesseract_lx")

import pytest  # noqa: E402
import tesseract_lx as tlx  # noqa: E402

from helpers import ALL_CASES, SERVERS  # noqa: E402


def fresh(client: tlx.Client) -> tlx.Client:
    """Forget everything a previous test taught `client` (not its schema)."""
    client.stats.clear()
    client.structures.clear()
    client.last_error = None
    client.latency.clear()
    client.decisions.clear()
    return client


class Servers:
    """Clients of served (or in-process) Tesseracts, each started once.

    `start` launches several servers at once (startup is mostly importing JAX, so
    they overlap well); `get` starts any other on first use.
    """

    def __init__(self):
        self._clients: dict[tuple[str, str, int], tlx.Client] = {}
        self._failed: dict[tuple[str, str, int], BaseException] = {}
        self._exits: list = []
        self._lock = threading.RLock()

    def start(self, keys) -> None:
        keys = [k for k in keys if k not in self._clients and k[1] in SERVERS]
        with concurrent.futures.ThreadPoolExecutor(max(len(keys), 1)) as pool:
            futures = {k: pool.submit(self._serve, *k) for k in keys}
        for key, future in futures.items():
            try:
                self._clients[key] = future.result()
            except Exception as e:  # noqa: BLE001 - re-raised by the tests needing it
                self._failed[key] = e

    def get(self, path: str | Path, transport: str, workers: int = 1) -> tlx.Client:
        key = (str(path), transport, workers)
        with self._lock:
            if key in self._failed:
                raise self._failed[key]
            if key not in self._clients:
                if transport == "inprocess":
                    self._clients[key] = tlx.Client.from_api(path)
                else:
                    self._clients[key] = self._serve(*key)
            return self._clients[key]

    def _serve(self, path: str, transport: str, workers: int) -> tlx.Client:
        cm = tlx.serve(path, server=SERVERS[transport], workers=workers)
        client = cm.__enter__()
        with self._lock:
            self._exits.append(cm)
        return client

    def close(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(max(len(self._exits), 1)) as pool:
            list(pool.map(lambda cm: cm.__exit__(None, None, None), self._exits))
        self._exits.clear()
        for (_, transport, _), client in self._clients.items():
            if transport == "inprocess":
                client.close()
        self._clients.clear()


# The servers the collected tests will ask for: started together, in parallel.
_NEEDED: set[tuple[str, str, int]] = set()


# Files with a few long tests: run first, so that under pytest-xdist (files in
# collection order, `--no-loadscope-reorder`) none of them is left running alone at
# the end. The other files follow, the largest first.
_LONG_FILES = ("test_bench.py", "test_examples.py")


def _file_order(items) -> None:
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.path.name] = sizes.get(item.path.name, 0) + 1

    def key(item):
        name = item.path.name
        first = _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)
        return (first, -sizes[name], name)

    items.sort(key=key)  # stable: a file's tests keep their order


def pytest_collection_modifyitems(config, items):
    _file_order(items)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        transport, tesseract = params.get("transport"), params.get("tesseract")
        if transport in SERVERS and tesseract in ALL_CASES:
            _NEEDED.add((str(ALL_CASES[tesseract].path), transport, 1))
        if "stock2" in getattr(item, "fixturenames", ()):
            _NEEDED.add((str(ALL_CASES["bratu"].path), "stock", 2))


@pytest.fixture(scope="session")
def served():
    servers = Servers()
    try:
        # Under pytest-xdist each process runs some of the files: it starts the
        # servers its tests ask for, when they ask (all of them in each process
        # would hold twice the memory).
        if "PYTEST_XDIST_WORKER" not in os.environ:
            servers.start(sorted(_NEEDED))
        yield servers
    finally:
        servers.close()


@pytest.fixture
def client(served, tesseract, transport):
    """A client of `tesseract` (a key of `helpers.ALL_CASES`) over `transport`.

    Tests parametrise `tesseract` and `transport`; the client's `stats` start at zero.
    """
    return fresh(served.get(ALL_CASES[tesseract].path, transport))


@pytest.fixture
def case(tesseract):
    return ALL_CASES[tesseract]


@pytest.fixture
def stock2(served):
    """The bratu example on a stock server with 2 workers."""
    return fresh(served.get(ALL_CASES["bratu"].path, "stock", workers=2))
