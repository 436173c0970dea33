"""Request latencies measured by a client: what the `Auto` rule's cost model reads."""

import collections
import threading

import numpy as np


class Latencies:
    """Seconds per request, by endpoint and input size; safe to share between threads.

    A request of K items ((co)tangents or points) is modelled as `a + b K`: from
    samples at one K the median stands; from several K, a least-squares line. The
    first sample of each (endpoint, size, K) carries the server's compilation: it
    counts for nothing, and is dropped when a second arrives. At most `max_keys`
    (endpoint, size) pairs are kept, the least recently measured dropped first.
    """

    def __init__(self, max_keys: int = 256):
        self._samples: collections.OrderedDict[tuple[str, int], collections.deque] = (
            collections.OrderedDict()
        )
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()

    def __bool__(self) -> bool:
        return bool(self._samples)

    def record(self, endpoint: str, size: int, k: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, size)
            samples = self._samples.pop(key, None)
            if samples is None:
                samples = collections.deque(maxlen=12)
            self._samples[key] = samples
            while len(self._samples) > self._max_keys:
                self._samples.popitem(last=False)
            same = [s for s in samples if s[0] == k]
            if len(same) == 1 and same[0][2]:
                samples.remove(same[0])
            samples.append((k, seconds, not same))

    def get(self, endpoint: str, size: int, k: int = 1) -> float | None:
        """Expected seconds for one request of `k` items, or `None` if unmeasured."""
        with self._lock:
            samples = [
                (kk, t)
                for kk, t, cold in self._samples.get((endpoint, size), ())
                if not cold
            ]
        if not samples:
            return None
        same = sorted(t for kk, t in samples if kk == k)
        if same:
            return same[len(same) // 2]
        ks = np.array([kk for kk, _ in samples], float)
        ts = np.array([t for _, t in samples], float)
        if len(set(ks)) < 2:
            # One batch size seen: scale its per-item part, keep its fixed part.
            t0, k0 = float(np.median(ts)), ks[0]
            fixed = min(t0, 3e-3)
            return fixed + (t0 - fixed) * k / k0
        b, a = np.polyfit(ks, ts, 1)
        return max(a, 0.0) + max(b, 0.0) * k
