"""`tesseract-lx serve PATH/tesseract_api.py`: a tesseract-lx server under uvicorn.

tesseract-runtime's own CLI (`tesseract-runtime serve`) always serves
`tesseract_core.runtime.app_http:app`, so it cannot serve our app; this is its
counterpart, with the same defaults (127.0.0.1:8000, 1 worker, 60 s keep-alive).
Configuration reaches the worker processes through environment variables (see
`asgi.py`).
"""

import argparse
import os
import socket
import sys
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tesseract-lx",
        description="Serve a Tesseract with batched JVP/VJP endpoints and a "
        "linearisation cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a tesseract_api.py over HTTP.")
    serve.add_argument("api_path", type=Path, help="Path of the tesseract_api.py.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--no-cache",
        action="store_true",
        help="Switch off the linearisation cache (TESSERACT_LX_CACHE=0).",
    )
    serve.add_argument(
        "--output-path",
        default=None,
        help="Folder for the run_<id>/ folders (TESSERACT_OUTPUT_PATH); "
        "default: the environment's, else the working directory.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tesseract-lx` script."""
    args = _parser().parse_args(argv)
    api_path = args.api_path.resolve()
    if not api_path.is_file():
        sys.exit(f"tesseract-lx: `{args.api_path}` is not a file.")
    os.environ["TESSERACT_API_PATH"] = str(api_path)
    if args.no_cache:
        os.environ["TESSERACT_LX_CACHE"] = "0"
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
        "tesseract_lx._server.asgi:app",
        host=host,
        port=port,
        workers=workers,
        # As tesseract-runtime: requests are long, reconnecting is not free.
        timeout_keep_alive=60,
    )
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
