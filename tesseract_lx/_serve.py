"""`tlx.serve`: a real local server for a `tesseract_api.py`, as a child process."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from ._client import Client


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _command(server: str, path: Path, host: str, port: int, workers: int, cache: bool):
    if server == "tesseract-lx":
        cmd = [sys.executable, "-m", "tesseract_lx._server.cli", "serve", str(path)]
        cmd += ["--host", host, "--port", str(port), "--workers", str(workers)]
        return cmd + ([] if cache else ["--no-cache"])
    if server == "tesseract-runtime":
        runtime = Path(sys.executable).with_name("tesseract-runtime")
        exe = str(runtime) if runtime.exists() else "tesseract-runtime"
        return [exe, "serve", "--host", host, "--port", str(port)] + (
            ["--num-workers", str(workers)] if workers > 1 else []
        )
    raise ValueError(
        f"`server={server!r}` is not a server; choose 'tesseract-lx' (with the "
        "batched endpoints) or 'tesseract-runtime' (tesseract-core's own)."
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    # The server runs in its own process group: uvicorn's workers go with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve(
    path: str | os.PathLike,
    *,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int | None = None,
    server: str = "tesseract-lx",
    cache: bool = True,
    startup_timeout: float = 120.0,
    timeout: float = 120.0,
) -> Iterator[Client]:
    """Serve a `tesseract_api.py` on this machine and yield a connected `Client`.

    **Arguments:**

    - `path`: the `tesseract_api.py` file.
    - `workers`: server processes answering requests at once.
    - `host`, `port`: where to listen; a free loopback port by default.
    - `server`: `"tesseract-lx"` (tesseract-core's app plus the batched endpoints and
        the linearisation cache) or `"tesseract-runtime"` (tesseract-core's own
        `tesseract-runtime serve`, unchanged).
    - `cache`: the linearisation cache of the tesseract-lx server.
    - `startup_timeout`: seconds to wait for `/health` before giving up.
    - `timeout`: the client's per-request timeout.

    Run outputs go to a temporary directory removed on exit. The server is stopped
    on exit, on exceptions and on Ctrl-C; if it fails to start, the error carries
    its own stderr.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no `tesseract_api.py` at {path}.")
    if workers < 1:
        raise ValueError(f"`workers` must be at least 1, got {workers}.")
    port = free_port(host) if port is None else port
    cmd = _command(server, path, host, port, workers, cache)
    tmp = Path(tempfile.mkdtemp(prefix="tesseract_lx_"))
    env = dict(os.environ)
    # The child starts in the Tesseract's folder: relative entries of PYTHONPATH
    # would point elsewhere, and this package must be importable there.
    package_root = str(Path(__file__).resolve().parents[1])
    paths = [
        str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *paths]))
    env.update(
        TESSERACT_API_PATH=str(path),
        TESSERACT_OUTPUT_PATH=str(tmp / "outputs"),
        TESSERACT_INPUT_PATH=str(path.parent),
        TESSERACT_LX_CACHE="1" if cache else "0",
        PYTHONUNBUFFERED="1",
    )
    (tmp / "outputs").mkdir()
    log = open(tmp / "server.log", "w+b")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        cmd,
        cwd=path.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://{host}:{port}"
    client = None
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                text = log.read().decode(errors="replace")[-4000:]
                raise RuntimeError(
                    f"The Tesseract server for {path} exited with code "
                    f"{proc.returncode} before it was ready. Its output:\n{text}"
                )
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                text = log.read().decode(errors="replace")[-4000:]
                raise TimeoutError(
                    f"The Tesseract server for {path} did not answer `/health` at "
                    f"{url} within {startup_timeout} s. Its output:\n{text}"
                )
            time.sleep(0.1)
        client = Client(url, timeout=timeout, workers=workers)
        yield client
    finally:
        if client is not None:
            client.close()
        _stop(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
