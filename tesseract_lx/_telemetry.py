"""`Telemetry`: what a client's requests cost, and what was learnt and decided.

A `Client` keeps one, and shows its parts as its own attributes (`client.stats`,
`client.latency`, `client.decisions`, `client.activity`, `client.last_error`,
`client.structures`). Other modules change it through its methods only, never by
reaching into the client: each method takes the lock its change needs, so one
client stays safe to share between threads.
"""

import collections
import threading
import time
from collections.abc import Hashable
from typing import Any

from ._errors import TesseractError
from ._latency import Latencies
from ._progress import Activity


class LRU(collections.OrderedDict):
    """A small bounded mapping for per-signature memos."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def get_fresh(self, key: Any) -> Any:
        value = self.pop(key, None)
        if value is not None:
            self[key] = value
        return value

    def put(self, key: Any, value: Any) -> None:
        self.pop(key, None)
        self[key] = value
        while len(self) > self.maxsize:
            self.popitem(last=False)


class Telemetry:
    """The counters, measurements and memos of one client; safe to share between
    threads.

    **Attributes:**

    - `stats`: a `collections.Counter` of the requests sent, keyed by endpoint name,
        counted as each request leaves (a failed one counts too).
    - `latency`: measured seconds per request, by endpoint, size and batch
        (`_latency.Latencies`): what `tlx.Auto` estimates from.
    - `decisions`: the last 100 `tlx.Decision`s.
    - `activity`: requests in flight and done, by endpoint, with times and bytes
        (`tlx.progress` draws it).
    - `last_error`: the last `tlx.TesseractError`, typed: under `jax.jit` only its
        text reaches the caller.
    - `structures`: the output structure learnt per call signature (`_shapes.py`),
        the 512 most recently used.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()
        self.latency = Latencies()
        self.decisions: collections.deque = collections.deque(maxlen=100)
        self.activity = Activity()
        self.last_error: TesseractError | None = None
        self.structures = LRU(512)
        # What has been warned about once already (`warn_once`).
        self._warned: set[Hashable] = set()

    def sent(self, endpoint: str, nbytes: int) -> float:
        """Count a request to `endpoint` of `nbytes` leaving now; its start time
        (`time.perf_counter()`), for `answered`."""
        with self._lock:
            self.stats[endpoint] += 1
        return self.activity.started(endpoint, nbytes)

    def answered(
        self,
        endpoint: str,
        start: float,
        nbytes: int,
        *,
        size: int | None = None,
        k: int = 1,
    ) -> None:
        """The request to `endpoint` sent at `start` is over, `nbytes` received.
        `size` (elements of the point) and `k` (items in the request) key its
        latency sample; `None` for a request that failed, which is no sample."""
        self.activity.finished(endpoint, start, nbytes)
        if size is not None:
            self.latency.record(endpoint, size, k, time.perf_counter() - start)

    def record_error(self, error: TesseractError) -> None:
        """Keep `error` as `last_error`."""
        self.last_error = error

    def record_decision(self, decision: Any) -> None:
        """Add a `tlx.Decision` to `decisions` (the oldest of 100 goes)."""
        # `deque.append` is atomic: no lock.
        self.decisions.append(decision)

    def structure(self, key: Hashable) -> Any:
        """The output structure learnt for the call signature `key`, or `None`."""
        with self._lock:
            return self.structures.get_fresh(key)

    def learn_structure(self, key: Hashable, value: Any) -> None:
        """Remember `value` as the output structure of the call signature `key`."""
        with self._lock:
            self.structures.put(key, value)

    def warn_once(self, key: Hashable) -> bool:
        """Whether a warning about `key` is due: `True` the first time only."""
        with self._lock:
            if key in self._warned:
                return False
            self._warned.add(key)
            return True
