"""What every benchmark script shares: progress lines, the machine and versions."""

import contextlib
import os
import platform
import signal
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in a session of its own, its whole process group with
    it: asked first, killed if it has not gone within 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log(*args) -> None:
    print(*args, flush=True)


def commit() -> str:
    """The commit of this checkout, `+changes` if the work tree differs from it."""
    try:
        rev, changes = (
            subprocess.run(
                ["git", "-C", str(ROOT), *cmd],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for cmd in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain"])
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + ("+changes" if changes else "")


def machine() -> str:
    """Cores, CPU, architecture and OS of this machine."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.machine()}, "
        f"{platform.system()} {platform.release()}"
    )


def versions() -> str:
    """The versions of everything measured, and the commit of this checkout."""
    import equinox
    import jax
    import lineax
    import optimistix
    import requests
    import tesseract_core

    return (
        f"Python {platform.python_version()}, jax {jax.__version__}, "
        f"tesseract-core {tesseract_core.__version__}, equinox {equinox.__version__}, "
        f"lineax {lineax.__version__}, optimistix {optimistix.__version__}, "
        f"requests {requests.__version__}, tesseract_lx @ {commit()}"
    )
