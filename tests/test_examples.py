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
    k_true = float(re.search(r"k_true = (\S+)", out).group(1))
    k_fit = float(re.search(r"k_fit  = (\S+)", out).group(1))
    assert abs(k_fit - k_true) < 0.05, out
    assert re.search(r"requests: \d+ \{", out), out
    rel = float(re.search(r"relative difference: (\S+)", out).group(1))
    assert rel < 1e-6, out
