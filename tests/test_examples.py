"""The example scripts run, at a small size, against real local servers."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


def run(script: str, *args: str, cwd) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def found(pattern: str, out: str) -> re.Match[str]:
    """`re.search(pattern, out)`, which must match (else the output is shown)."""
    match = re.search(pattern, out)
    assert match is not None, out
    return match


@pytest.mark.parametrize("server", ["tesseract-lx", "tesseract-runtime"])
def test_bratu_newton(tmp_path, server):
    png = tmp_path / "bratu.png"
    args = ("--n", "6", "--png", str(png), "--server", server)
    out = run("bratu_newton.py", *args, cwd=tmp_path)
    steps = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\d+)\s+(\{.*\})", out, re.MULTILINE)
    assert len(steps) >= 3, out
    # Step 0 is the initial residual: one `/apply`, which also tells the shapes.
    assert steps[0][0] == "0" and steps[0][3] == "{'apply': 1}", out
    # Every Newton step: one `/apply` and one materialising request, no more.
    assert all(int(sent) == 2 for _, _, sent, _ in steps[1:]), out
    final = re.search(r"converged: \|r\(u\)\| = (\S+) after (\d+) steps", out)
    assert final is not None and float(final.group(1)) < 1e-8, out
    assert png.stat().st_size > 0


def test_calibrate(tmp_path):
    out = run("calibrate.py", "--n", "6", cwd=tmp_path)
    k_true = float(found(r"k_true = (\S+)", out).group(1))
    k_fit = float(found(r"k_fit  = (\S+)", out).group(1))
    assert abs(k_fit - k_true) < 0.05, out
    assert re.search(r"requests: \d+ \{", out), out
    rel = float(found(r"relative difference: (\S+)", out).group(1))
    assert rel < 1e-6, out
    # optimistix's `verbose=` (on by default): one line per step of the fit.
    steps = int(found(r"LevenbergMarquardt: (\d+) steps", out).group(1))
    lines = re.findall(r"^  step +(\d+): loss \S+, accepted +\d+, step size", out, re.M)
    assert [int(i) for i in lines] == list(range(steps)), out
    quiet = run("calibrate.py", "--n", "6", "--no-verbose", cwd=tmp_path)
    assert "  step " not in quiet, quiet
    # Printing each step sends no request of its own.
    assert re.findall(r"requests: .*", quiet) == re.findall(r"requests: .*", out)


def _rows(out: str) -> dict[str, tuple[float, str]]:
    """`poisson_solve.py`'s table: solve -> (max abs err, requests)."""
    found = re.findall(r"^(\S.*?)\s+(\S+e[-+]\d+)\s+\S+ ms\s+(\{.*\})$", out, re.M)
    return {name: (float(err), sent) for name, err, sent in found}


def test_poisson_solve(tmp_path):
    out = run("poisson_solve.py", "--n", "6", "--k", "3", cwd=tmp_path)
    rows = _rows(out)
    assert len(rows) == 4, out
    assert all(err < 1e-8 for err, _ in rows.values()), out
    assert rows["LU, one right-hand side"][1] == "{'jacobian': 1}", out
    assert rows["OnServer(CG), vmap over 3"][1] == "{'linear_solve': 1}", out
    # CG: one `/apply` per iteration; under vmap the 3 mat-vecs of an iteration go
    # in one `/batched_apply` (a mat-vec all 3 share, of the start, in one `/apply`).
    single, batch = rows["CG, one right-hand side"][1], rows["CG, vmap over 3"][1]
    assert re.fullmatch(r"\{'apply': \d+\}", single), out
    assert re.fullmatch(r"\{('apply': 1, )?'batched_apply': \d+\}", batch), out


def test_two_tesseracts(tmp_path):
    out = run("two_tesseracts.py", "--n", "6", cwd=tmp_path)
    diffs = [float(d) for d in re.findall(r"from pure JAX (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-9, out
    requests = re.findall(r"requests: poisson (\{.*\}), bratu (\{.*\})", out)
    # The gradient: each Tesseract's `/apply` (the forward pass) and one VJP.
    assert requests[0] == (
        "{'apply': 1, 'vector_jacobian_product': 1}",
        "{'apply': 1, 'vector_jacobian_product': 1}",
    ), out


def test_train_mlp(tmp_path):
    png = tmp_path / "loss.png"
    out = run(
        "train_mlp.py", "--n", "6", "--steps", "20", "--png", str(png), cwd=tmp_path
    )
    first, last = map(float, found(r"loss (\S+) -> (\S+) in", out).groups())
    assert last < first, out
    assert float(found(r"from pure JAX: (\S+)", out).group(1)) < 1e-8, out
    # Every step: the residual (`/apply`) and its VJP w.r.t. the source field.
    assert "requests per step: 2\n" in out, out
    assert png.stat().st_size > 0
