"""Progress of a long solve: what a client has sent, what is in flight, how fast.

`Activity` is kept by every `Client` (`client.activity`), updated around each
request; `progress(client)` draws it as one live line with `rich` while the block
runs:

    requests 412 (in flight 1) | jacobian_vector_product 405 2.7 ms | apply 7 3.1 ms
    | 1.2 MB out, 0.4 MB in | 00:01.3

It draws nothing when the output is not a terminal (a log file, a test, CI), so
examples can always use it.
"""

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass
class _Endpoint:
    done: int = 0
    in_flight: int = 0
    seconds: float = 0.0


class Activity:
    """Requests by endpoint (done, in flight, total seconds) and bytes each way;
    safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = collections.defaultdict(_Endpoint)
        self.bytes_out = 0
        self.bytes_in = 0

    def started(self, endpoint: str, nbytes: int) -> float:
        with self._lock:
            self._endpoints[endpoint].in_flight += 1
            self.bytes_out += nbytes
        return time.perf_counter()

    def finished(self, endpoint: str, start: float, nbytes: int) -> None:
        with self._lock:
            e = self._endpoints[endpoint]
            e.in_flight -= 1
            e.done += 1
            e.seconds += time.perf_counter() - start
            self.bytes_in += nbytes

    def snapshot(self) -> dict[str, Any]:
        """`{"endpoints": {name: (done, in flight, total seconds)}, "bytes_out",
        "bytes_in"}`, since the client was made."""
        with self._lock:
            return {
                "endpoints": {
                    name: (e.done, e.in_flight, e.seconds)
                    for name, e in self._endpoints.items()
                },
                "bytes_out": self.bytes_out,
                "bytes_in": self.bytes_in,
            }


def describe(now: dict[str, Any], start: dict[str, Any], elapsed: float) -> str:
    """One line of text for what happened between the snapshots `start` and `now`,
    `elapsed` seconds apart."""
    endpoints = {}
    for name, (done, flying, seconds) in now["endpoints"].items():
        done0, _, seconds0 = start["endpoints"].get(name, (0, 0, 0.0))
        if done > done0 or flying:
            endpoints[name] = (done - done0, flying, seconds - seconds0)
    sent = sum(d for d, _, _ in endpoints.values())
    flying = sum(f for _, f, _ in endpoints.values())
    parts = [f"requests {sent} (in flight {flying})"]
    for name, (d, _, seconds) in sorted(endpoints.items(), key=lambda kv: -kv[1][0]):
        mean = seconds / d if d else 0.0
        parts.append(f"{name} {d} {mean * 1e3:.1f} ms")
    out, back = ((now[k] - start[k]) / 1024**2 for k in ("bytes_out", "bytes_in"))
    parts.append(f"{out:.1f} MB out, {back:.1f} MB in")
    minutes, seconds = divmod(elapsed, 60)
    parts.append(f"{int(minutes):02d}:{seconds:04.1f}")
    return " | ".join(parts)


@contextlib.contextmanager
def progress(client: Any, *, refresh: float = 0.25, console: Any = None) -> Iterator:
    """Show `client`'s requests as one live line while the block runs.

    **Arguments:**

    - `client`: a `tesseract_lx.Client`.
    - `refresh`: seconds between redraws.
    - `console`: a `rich.console.Console` (default: standard error's).

    **Returns:**

    A context manager; the line shows the requests sent since the block began and
    those in flight, by endpoint, their mean latency, bytes each way and the time
    elapsed, and stays as a summary when the block ends.

    Draws nothing when the console is not a terminal. Use it together with
    optimistix's `verbose=` to see steps and residuals as they come.

    !!! Example

        ```python
        with tlx.progress(client):
            sol = optx.root_find(fn, solver, u0, args)
        ```
    """
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    start, before = time.perf_counter(), client.activity.snapshot()

    def line() -> Any:
        now = client.activity.snapshot()
        return Text(describe(now, before, time.perf_counter() - start))

    with Live(line(), console=console, refresh_per_second=1 / refresh) as live:
        done = threading.Event()

        def redraw() -> None:
            while not done.wait(refresh):
                live.update(line())

        thread = threading.Thread(target=redraw, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            live.update(line())
