"""What every benchmark script shares: progress lines and the versions it ran on."""

import platform
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def log(*args) -> None:
    print(*args, flush=True)


def versions() -> str:
    """The versions of everything measured, and the commit of this checkout."""
    import equinox
    import jax
    import lineax
    import optimistix
    import requests
    import tesseract_core

    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "?"
    return (
        f"Python {platform.python_version()}, jax {jax.__version__}, "
        f"tesseract-core {tesseract_core.__version__}, equinox {equinox.__version__}, "
        f"lineax {lineax.__version__}, optimistix {optimistix.__version__}, "
        f"requests {requests.__version__}, tesseract_lx @ {rev}"
    )
