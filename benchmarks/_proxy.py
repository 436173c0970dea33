"""A delaying TCP proxy: a server as far away as a network would put it.

Listens on 127.0.0.1 and forwards every connection to a target on 127.0.0.1; each
chunk read in either direction is written on `delay` seconds after it arrived, so
every request pays the round trip (2 x `delay`) plus its own time, and bytes keep
their order and their pace (a chunk that arrives while an earlier one waits is not
delayed twice). Both sides set `TCP_NODELAY`. Loopback only, by construction.

Run as its own process (`delayed`), so that it shares no interpreter lock with the
client it measures:

    python benchmarks/_proxy.py --target 127.0.0.1:8000 --delay-ms 5
    (prints the port it listens on, then serves until killed)
"""

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit


HOST = "127.0.0.1"
CHUNK = 1 << 16


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy `reader` to `writer`, each chunk `delay` s after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while chunk := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay, chunk))
        queue.put_nowait((time.monotonic() + delay, b""))

    task = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            # The event loop sleeps in whole milliseconds (epoll), rounded up: it
            # sleeps until a millisecond before, the rest precisely (blocking the
            # loop that long, which a request and its answer never need at once).
            if due - time.monotonic() > 2e-3:
                await asyncio.sleep(due - time.monotonic() - 1e-3)
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if not chunk:  # the other side is done sending: so is this one
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(chunk)
            await writer.drain()
    finally:
        task.cancel()


async def _serve(target: tuple[str, int], delay: float, ready) -> None:
    async def connection(
        client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        _nodelay(client_w)
        _nodelay(server_w)
        await asyncio.gather(
            _pipe(client_r, server_w, delay),
            _pipe(server_r, client_w, delay),
            return_exceptions=True,
        )
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.close()

    server = await asyncio.start_server(connection, HOST, 0)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def delayed(url: str, rtt_ms: float) -> Iterator[str]:
    """The URL of a proxy to `url` (on 127.0.0.1) that adds `rtt_ms` / 2 each way;
    the proxy is a child process, stopped on the way out (and, being in the
    caller's process group, with it)."""
    parts = urlsplit(url)
    if parts.hostname not in (HOST, "localhost"):
        raise ValueError(f"`url={url!r}`: the proxy forwards to {HOST} only.")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--target"]
    cmd += [f"{HOST}:{parts.port}", "--delay-ms", f"{rtt_ms / 2}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the delaying proxy did not start: {line!r}")
        yield f"http://{HOST}:{line}"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, required=True, help="one way")
    opts = parser.parse_args()
    host, port = opts.target.rsplit(":", 1)
    if host not in (HOST, "localhost"):
        parser.error(f"`--target {opts.target}`: the proxy forwards to {HOST} only")

    def ready(port: int) -> None:
        print(port, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((HOST, int(port)), opts.delay_ms / 1e3, ready))


if __name__ == "__main__":
    sys.exit(main())
