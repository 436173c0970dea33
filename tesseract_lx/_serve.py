"""Where servers are started: `tlx.serve`, a real local server for a
`tesseract_api.py` as a child process; and `in_process_app`, the same server's app in
this process, for `tlx.Client.from_api`. The only module of the client side that knows
the server side, and it imports it only to build that app.

**The port.** Picking a free port and handing it to the child races: another process
may bind it in between (the child then dies, or worse, `/health` answers from someone
else's server). The child binds port 0 instead, the kernel gives it a free port
atomically, and uvicorn (under both `tesseract-lx serve` and `tesseract-runtime
serve`) prints it: `Uvicorn running on http://127.0.0.1:PORT`. We read it there.

**What the child may read.** tesseract-core reads `binref` arrays of a request from
`TESSERACT_INPUT_PATH` (default: the working directory, here the Tesseract's source
folder): a client could read the source, or anything next to it. The input path is a
private empty folder unless the user names one.

**Cleanup.** The temporary folder, the log file and the child (its whole process
group) go on every way out: startup failure, timeout, an exception in the `with`
block, Ctrl-C. On Linux the child also goes when this process dies without running
any of that (SIGKILL, a crash): a launcher asks the kernel for a SIGTERM on the
parent's death (`PR_SET_PDEATHSIG`) and then execs the server, whichever it is. The
kernel ties that to the thread that forked, so every server is forked from one
thread that lives as long as the process.
"""

import concurrent.futures
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, IO

import requests

from ._client import Client


def in_process_app(api: str | os.PathLike | ModuleType, *, cache: bool = True) -> Any:
    """The ASGI app `tesseract-lx serve` runs, built in this process for `api` (the
    path of a `tesseract_api.py`, or the loaded module), with its linearisation
    `cache` or without: what `tlx.Client.from_api` drives.

    The server side is imported here, on first use: a process that only talks to
    servers elsewhere (`tlx.Client(url)`, `tlx.serve`, whose server is a child
    process) never loads it.
    """
    from ._server import create_app

    return create_app(
        api if isinstance(api, ModuleType) else os.fspath(api), cache=cache
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, but not reserved: someone may take it before it is used (fine
    for an address nothing listens on; `serve` does not rely on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# uvicorn's startup line, with the port it bound (the real one, for port 0).
_RUNNING = re.compile(rb"Uvicorn running on https?://\S+:(\d+) ")
# What each of uvicorn's worker processes says once it has loaded the app, and once
# it serves.
_LOADED = b"Started server process ["
_SERVING = b"Application startup complete."
_NO_LIFESPAN = b"'lifespan' protocol appears unsupported"


# Run in the child before the server: SIGTERM when the parent dies (the setting
# survives `exec`); if the parent is already gone, stop at once.
_LAUNCH = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("tesseract_lx: the process that started this server is gone")
os.execvp(sys.argv[2], sys.argv[2:])
"""


# The kernel sends the parent-death signal when the *thread* that forked the child
# ends, not the process: every server is forked from this one thread, which lives
# as long as the process (a server started from a short-lived thread, as a pool of
# them, must not stop with it).
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tlx-spawn")


def _die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, launched so that it gets SIGTERM when this process dies (Linux). A
    program that is not there is a `FileNotFoundError` here, as `Popen`'s own."""
    if not sys.platform.startswith("linux"):
        return cmd
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd[0])
    return [sys.executable, "-c", _LAUNCH, str(os.getpid()), *cmd]


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
    """Stop the server and its process group (its own session): uvicorn's workers go
    with it. Asked first, then killed; the group is swept even when the server
    itself is already gone (killed, its workers orphaned but still serving)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _output(log: IO[bytes]) -> str:
    # The child appends (`O_APPEND`): moving our offset never moves its writes.
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def _ready(
    proc: subprocess.Popen,
    log: IO[bytes],
    path: Path,
    host: str,
    port: int | None,
    startup_timeout: float,
    workers: int = 1,
) -> int:
    """The child's port, once `/health` answers on it and each of its `workers`
    said it serves. (One worker answers `/health` while the others may still be
    importing the Tesseract: connections opened then all go to the first, and
    kept alive, they stay there, one request at a time.)"""
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            text = _output(log)
            hint = ""
            if "address already in use" in text.lower():
                hint = f" Port {port} is in use: choose another `port`, or none."
            raise RuntimeError(
                f"The Tesseract server for {path} exited with code {proc.returncode} "
                f"before it was ready.{hint} Its output:\n{text}"
            )
        if port is None:
            log.seek(0)
            found = _RUNNING.search(log.read())
            port = int(found.group(1)) if found else None
        if port is not None:
            try:
                url = f"http://{host}:{port}/health"
                if requests.get(url, timeout=2).status_code == 200 and _all_up(
                    log, workers
                ):
                    return port
            except requests.RequestException:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"The Tesseract server for {path} did not answer `/health` within "
                f"{startup_timeout} s. Its output:\n{_output(log)}"
            )
        time.sleep(0.1)


def _all_up(log: IO[bytes], workers: int) -> bool:
    """Whether each of `workers` worker processes said it serves; true for a server
    that says nothing of the kind (no worker said it loaded the app)."""
    if workers <= 1:
        return True
    log.seek(0)
    text = log.read()
    loaded = text.count(_LOADED)
    if loaded == 0:
        return True
    if loaded < workers:
        return False
    return _NO_LIFESPAN in text or text.count(_SERVING) >= workers


@contextlib.contextmanager
def serve(
    path: str | os.PathLike,
    *,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int | None = None,
    server: str = "tesseract-lx",
    cache: bool = True,
    input_path: str | os.PathLike | None = None,
    startup_timeout: float = 120.0,
    timeout: float = 120.0,
) -> Iterator[Client]:
    """Serve a `tesseract_api.py` on this machine and yield a connected `Client`.

    **Arguments:**

    - `path`: the `tesseract_api.py` file.
    - `workers`: server processes answering requests at once; the client is handed
        out once every one of them serves.
    - `host`: the address to listen on: this machine only (`127.0.0.1`) unless told
        otherwise.
    - `port`: the port; by default the server binds a free one itself (no race with
        other processes) and says which.
    - `server`: `"tesseract-lx"` (tesseract-core's app plus the batched endpoints and
        the linearisation cache) or `"tesseract-runtime"` (tesseract-core's own
        `tesseract-runtime serve`, unchanged).
    - `cache`: the linearisation cache of the tesseract-lx server.
    - `input_path`: the folder `binref` arrays of requests are read from
        (`TESSERACT_INPUT_PATH`); by default a private empty temporary one, so that
        no request can read the Tesseract's own files.
    - `startup_timeout`: seconds to wait for `/health` before giving up.
    - `timeout`: the client's per-request timeout.

    **Returns:**

    A context manager that yields a [`tlx.Client`][tesseract_lx.Client] of the
    running server.

    !!! Example

        ```python
        with tlx.serve("examples/tesseracts/bratu/tesseract_api.py") as client:
            f = tlx.TesseractModule(client)
        ```

    Run outputs go to a temporary directory removed on exit. The server is stopped
    on exit, on exceptions and on Ctrl-C; if it fails to start, the error carries
    its own output, and nothing is left behind.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no `tesseract_api.py` at {path}.")
    if workers < 1:
        raise ValueError(f"`workers` must be at least 1, got {workers}.")
    if input_path is not None:
        input_path = Path(input_path).resolve()
        if not input_path.is_dir():
            raise NotADirectoryError(f"`input_path`: no folder at {input_path}.")
    cmd = _command(server, path, host, 0 if port is None else port, workers, cache)
    env = dict(os.environ)
    # The child starts in the Tesseract's folder: relative entries of PYTHONPATH
    # would point elsewhere, and this package must be importable there.
    package_root = str(Path(__file__).resolve().parents[1])
    paths = [
        str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *paths]))
    tmp = Path(tempfile.mkdtemp(prefix="tesseract_lx_"))  # private: mode 0o700
    log = proc = client = None
    try:
        (tmp / "outputs").mkdir()
        (tmp / "inputs").mkdir()
        env.update(
            TESSERACT_API_PATH=str(path),
            TESSERACT_OUTPUT_PATH=str(tmp / "outputs"),
            TESSERACT_INPUT_PATH=str(input_path or tmp / "inputs"),
            TESSERACT_LX_CACHE="1" if cache else "0",
            PYTHONUNBUFFERED="1",
        )
        log = open(tmp / "server.log", "a+b")  # noqa: SIM115 - closed in finally
        proc = _SPAWNER.submit(
            subprocess.Popen,
            _die_with_parent(cmd),
            cwd=path.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        ).result()
        port = _ready(proc, log, path, host, port, startup_timeout, workers)
        client = Client(f"http://{host}:{port}", timeout=timeout, workers=workers)
        yield client
    finally:
        if client is not None:
            client.close()
        if proc is not None:
            _stop(proc)
        if log is not None:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
