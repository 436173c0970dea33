"""Smoke test of the benchmark suite: `benchmarks/suite.py --smallest` (every scenario
at its smallest size, tesseract_lx and pure JAX, no tesseract-jax) runs end to end
into a temporary folder, writes its tables and plots, and every scenario works."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_suite_smallest(tmp_path):
    rows_file = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--smallest"]
    cmd += ["--out", str(tmp_path), "--json", str(rows_file)]
    done = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    meta, rows = json.loads(rows_file.read_text()).values()
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ["Targets", "Per-request time profile", *meta["families"]]:
        assert f"\n## {heading}\n" in text
    assert "\n<!-- profile -->\n" in text
    for plot in ("results_time.png", "results_requests.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")

    assert {r["contender"] for r in rows} == {"tesseract_lx", "pure JAX"}
    for who, extra in (("tesseract_lx", {"health"}), ("pure JAX", set())):
        ran = {r["scenario"] for r in rows if r["contender"] == who}
        missing = {*meta["scenarios"], *extra} - ran
        assert not missing, f"{who} did not run {missing}"
    failed = [(r["key"], r["contender"], r["error"]) for r in rows if r["error"]]
    assert not failed
    assert all(r["ok"] is not False for r in rows), "a solve did not converge"
    ours = {r["scenario"]: r for r in rows if r["contender"] == "tesseract_lx"}
    assert ours["jvp"]["sent"] == {"jacobian_vector_product": 1}
    assert ours["health"]["sent"] == {"health": 1}
    newton = ours["newton_lu"]
    assert sum(newton["sent"].values()) == 2 * newton["steps"]
    errors = [r["err"] for r in rows if r["contender"] == "tesseract_lx"]
    assert max(e for e in errors if e is not None) < 1e-8
