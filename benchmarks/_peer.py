"""The venv of a benchmark run: tesseract-jax's, with this checkout of tesseract_lx.

tesseract-jax pins its own versions, so the run gets a venv of its own, made from the
package index by `bench_python` (cached under `out/`, remade when what it should hold
changes) and holding this checkout of tesseract_lx too (editable), so that every
contender runs under one JAX:

- where the machine has Python 3.12 (`PYENV_VERSION=3.12.1 pyenv which python3.12`,
  else `python3.12` on `PATH`, or `$PYTHON312`): `tesseract-jax==0.5.1` on it, with
  this project's lineax, optimistix, equinox and tesseract-core, and whatever JAX pip
  resolves for them (jax 0.12.x);
- otherwise `tesseract-jax==0.4.0` on this venv's Python, with this venv's versions of
  everything both use, JAX included (the report says so).

`counted` counts the requests of a `tesseract_core.Tesseract` (also used by
`versus_tesseract_jax.py`).
"""

import hashlib
import os
import shutil
import subprocess
import sys
from functools import wraps
from importlib import metadata
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
NEWEST, OLDER = "tesseract-jax==0.5.1", "tesseract-jax==0.4.0"
SAME = ("lineax", "optimistix", "equinox", "tesseract-core")
EXTRAS = {"tesseract-core": "[runtime]"}


def python312() -> str | None:
    """A Python 3.12 on this machine, or None."""
    found = os.environ.get("PYTHON312")
    if not found:
        try:
            done = subprocess.run(
                ["pyenv", "which", "python3.12"],
                capture_output=True,
                text=True,
                env={**os.environ, "PYENV_VERSION": "3.12.1"},
                timeout=30,
            )
            found = done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            found = None
    found = found or shutil.which("python3.12")
    return found if found and os.access(found, os.X_OK) else None


def plan() -> tuple[str, list[str], str]:
    """(the Python the venv is made with, its requirements, a note for the report)."""
    same = [f"{n}{EXTRAS.get(n, '')}=={metadata.version(n)}" for n in SAME]
    py312 = python312()
    if py312 is not None:
        return py312, [NEWEST, *same], f"{NEWEST} on Python 3.12 ({py312})"
    pinned = [f"{n}=={metadata.version(n)}" for n in ("jax", "jaxlib")]
    return (
        sys.executable,
        [OLDER, *pinned, *same],
        f"{OLDER} on this venv's Python: no Python 3.12 on this machine "
        "(tesseract-jax 0.5 needs it; set `PYTHON312=/path/to/python3.12`)",
    )


def bench_python(venv: Path, log) -> tuple[Path, str]:
    """The Python of the run's venv, made if needed, and what it holds in words.
    Raises `RuntimeError` with pip's words if it cannot be made."""
    base, requirements, note = plan()
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    project = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    want = "\n".join([base, *requirements, f"-e {ROOT} {project}"])
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python, note
    log(f"making the venv of the run at {venv}: {', '.join(requirements)}, -e {ROOT}")
    steps = [
        [base, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            *requirements,
            "-e",
            str(ROOT),
        ],
    ]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"`{' '.join(cmd[:4])} ...` took over 20 min") from e
        if done.returncode != 0:
            lines = [x for x in done.stderr.splitlines() if "is ignored" not in x]
            raise RuntimeError(
                f"`{' '.join(cmd[:4])} ...` failed ({done.returncode}): "
                + " ".join(lines[-6:])
            )
    stamp.write_text(want)
    return python, note


def counted(tesseract) -> list[str]:
    """The endpoints `tesseract` sends requests to from now on, in order."""
    sent = []
    run = tesseract._client.run_tesseract

    @wraps(run)
    def run_counted(endpoint, *args, **kwargs):
        sent.append(endpoint)
        return run(endpoint, *args, **kwargs)

    tesseract._client.run_tesseract = run_counted
    tesseract.openapi_schema  # fetched (once) before counting
    return sent
