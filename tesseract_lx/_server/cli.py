"""`tesseract-lx serve PATH/tesseract_api.py`: a tesseract-lx server under uvicorn.

tesseract-runtime's own CLI (`tesseract-runtime serve`) always serves
`tesseract_core.runtime.app_http:app`, so it cannot serve our app; this is its
counterpart, with the same defaults (127.0.0.1:8000, 1 worker, 60 s keep-alive).
Settings reach the worker processes through environment variables (see `asgi.py`).

```
tesseract-lx serve PATH [--host 127.0.0.1] [--port 8000] [--workers N] [--no-cache]
                        [--run-folders] [--debug] [--max-batch N] [--max-body-mb M]
                        [--output-path P]
```
"""

import argparse
import os
import socket
import sys
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES


_MiB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tesseract-lx",
        description="Serve a Tesseract with batched endpoints, a linearisation cache "
        "and error bodies that say what went wrong.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a tesseract_api.py over HTTP.")
    serve.add_argument("api_path", type=Path, help="Path of the tesseract_api.py.")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
        "exposes the Tesseract, unauthenticated, to every network it is on).",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=8000,
        help="Port (default 8000; 0: a free one, chosen by the kernel and printed as "
        "`Uvicorn running on http://HOST:PORT`).",
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="Server processes (default 1)."
    )
    serve.add_argument(
        "--no-cache",
        action="store_true",
        help="Switch off the linearisation cache (needed for a Tesseract that is not "
        "a pure function of its inputs and does not declare it).",
    )
    serve.add_argument(
        "--run-folders",
        action="store_true",
        help="A run_<id>/ folder per request under the output path, with its "
        "stdout/stderr and logs, as tesseract-runtime does (default: none).",
    )
    serve.add_argument(
        "--debug",
        action="store_true",
        help="Tracebacks in error bodies, and the /test endpoint (TESSERACT_DEBUG=1).",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"Most items per batched request (default {DEFAULT_MAX_BATCH}).",
    )
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_BYTES / _MiB,
        help="Largest request body, in MiB "
        f"(default {DEFAULT_MAX_BODY_BYTES // _MiB}).",
    )
    serve.add_argument(
        "--output-path",
        default=None,
        help="Folder for run folders and binref outputs (TESSERACT_OUTPUT_PATH); "
        "default: the environment's, else the working directory.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tesseract-lx` script."""
    parser = _parser()
    args = parser.parse_args(argv)
    api_path = args.api_path.resolve()
    if not api_path.is_file():
        sys.exit(f"tesseract-lx: `{args.api_path}` is not a file.")
    for name, value in (("--workers", args.workers), ("--max-batch", args.max_batch)):
        if value < 1:
            parser.error(f"`{name}` must be at least 1, got {value}.")
    max_body_bytes = int(args.max_body_mb * _MiB)
    if max_body_bytes < 1:
        parser.error(f"`--max-body-mb` must be positive, got {args.max_body_mb}.")

    os.environ["TESSERACT_API_PATH"] = str(api_path)
    if args.no_cache:
        os.environ["TESSERACT_LX_CACHE"] = "0"
    if args.run_folders:
        os.environ["TESSERACT_LX_RUN_FOLDERS"] = "1"
    if args.debug:
        os.environ["TESSERACT_DEBUG"] = "1"
    os.environ["TESSERACT_LX_MAX_BATCH"] = str(args.max_batch)
    os.environ["TESSERACT_LX_MAX_BODY_BYTES"] = str(max_body_bytes)
    os.environ["TESSERACT_LX_WORKERS"] = str(args.workers)
    if args.output_path is not None:
        os.environ["TESSERACT_OUTPUT_PATH"] = str(Path(args.output_path).resolve())
    output_path = os.environ.get("TESSERACT_OUTPUT_PATH")
    if output_path:
        Path(output_path).mkdir(parents=True, exist_ok=True)

    _run(args.host, args.port, args.workers)


class _NoDelayConfig(uvicorn.Config):
    """uvicorn's configuration, with Nagle's algorithm off on the shared socket.

    With `workers > 1` uvicorn binds one socket for all workers, created without
    `IPPROTO_TCP`, so asyncio does not set `TCP_NODELAY` on the connections it
    accepts: every response then waits ~40 ms for the client's delayed ACK (measured:
    48 ms per request against 4 ms with one worker, on tesseract-runtime too). Set
    on the listening socket, Linux hands the option down to accepted connections.
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _run(host: str, port: int, workers: int) -> None:
    """`uvicorn.run`, on `_NoDelayConfig`."""
    config = _NoDelayConfig(
        "tesseract_lx._server.asgi:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # As tesseract-runtime: requests are long, reconnecting is not free.
        timeout_keep_alive=60,
        # uvicorn kills a worker that does not answer its supervisor's ping within
        # this many seconds, and a worker cannot answer while it imports JAX and
        # the Tesseract: 5 s (the default) is not enough on a loaded machine.
        timeout_worker_healthcheck=120,
    )
    try:
        if config.workers > 1:
            supervisor = Multiprocess(config, sockets=[config.bind_socket()])
            supervisor.run()
            # A worker that could not build the app (it said why) stops them all;
            # exit as a single worker does, not with 0.
            if any(p.process.exitcode == STARTUP_FAILURE for p in supervisor.processes):
                sys.exit(STARTUP_FAILURE)
        else:
            uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
