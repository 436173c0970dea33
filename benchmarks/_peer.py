"""The tesseract-jax contender: its own venv, and the runner that works in it.

tesseract-jax pins other versions than this project, so it gets a venv of its own,
made from the package index by `peer_python` (cached under `out/`, remade when the
pins change) with the same jax, jaxlib, lineax, optimistix, equinox and
tesseract-core as this project's venv, plus `tesseract-jax==0.4.0`.

Run as a script in that venv, this file connects `tesseract_core.Tesseract.from_url`
to a stock `tesseract-runtime serve` (started by `benchmarks/suite.py`), runs the jobs
it is given through `tesseract_jax.apply_tesseract` with `_scenarios.run_case`, and
prints one JSON line as each starts and ends: the suite enforces time limits by
killing this process. Requests are counted by wrapping the Tesseract object's
`_client.run_tesseract` (`counted`, also used by `versus_tesseract_jax.py`).

    PEER/bin/python benchmarks/_peer.py --url URL --jobs JOBS.json --refs DIR
"""

import argparse
import json
import subprocess
import sys
from collections import Counter
from functools import wraps
from importlib import metadata
from pathlib import Path


PEER = "tesseract-jax==0.4.0"
SAME = ("jax", "jaxlib", "lineax", "optimistix", "equinox", "tesseract-core")


def pins() -> list[str]:
    """The peer venv's requirements: ours for everything both use."""
    extras = {"tesseract-core": "[runtime]"}
    same = [f"{n}{extras.get(n, '')}=={metadata.version(n)}" for n in SAME]
    return [PEER, *same]


def peer_python(venv: Path, log) -> Path:
    """The Python of a venv with tesseract-jax and our pins, made if needed.
    Raises `RuntimeError` with pip's words if it cannot be made."""
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    want = "\n".join(pins())
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    log(f"making the tesseract-jax venv at {venv}: {', '.join(pins())}")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *pins()],
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
    return python


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--refs", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0)
    opts = parser.parse_args()

    import numpy as np
    from _scenarios import Case, Functional, run_case, Variant
    from tesseract_core import Tesseract
    from tesseract_jax import apply_tesseract

    def emit(doc: dict) -> None:
        print(json.dumps(doc), flush=True)

    emit(
        {
            "versions": {
                name: metadata.version(name) for name in ("tesseract-jax", *SAME)
            }
        }
    )
    tesseract = Tesseract.from_url(opts.url)
    sent = counted(tesseract)
    for i, job in enumerate(json.loads(opts.jobs.read_text())):
        emit({"start": i})
        case, variant = Case(**job["case"]), Variant(**job["variant"])
        contender = Functional(
            lambda x, kw=variant.apply: apply_tesseract(tesseract, x, **kw),
            jac=variant.jac,
        )
        ref = opts.refs / f"{job['ref']}.npz"
        reference = None
        if ref.exists():
            with np.load(ref) as data:
                reference = [data[f"arr_{j}"] for j in range(len(data.files))]
        row = run_case(
            case,
            contender,
            sent=lambda: Counter(sent),
            clear=sent.clear,
            reference=reference,
            repeats=opts.repeats,
            budget=opts.budget,
            companion=tesseract.health if case.scenario == "jvp" else None,
        )
        row.pop("value", None)
        emit({"row": row, "job": i})


if __name__ == "__main__":
    sys.exit(main())
