"""Smoke test of the benchmark suite: `benchmarks/suite.py --quick --no-peer` (every
scenario at its smallest size, the far ones that move a solve to the server through
the delaying proxy at a 1 ms round trip; tesseract_lx on `tesseract-lx serve` and on a
stock server, and pure JAX; no tesseract-jax) runs end to end into a temporary folder,
writes its tables, plots and the generated parts of the docs pages, and every scenario
works."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_suite_smallest(tmp_path):
    rows_file = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick"]
    cmd += ["--no-peer"]
    cmd += ["--out", str(tmp_path), "--json", str(rows_file)]
    # ~90 s on 2 quiet cores; the timeout only stops a hang, also on a busy machine.
    done = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    meta, rows = json.loads(rows_file.read_text()).values()
    text = (tmp_path / "RESULTS.md").read_text()
    headings = ["Side by side", "Targets", "Per-request time profile"]
    for heading in [*headings, *meta["families"]]:
        assert f"\n## {heading}\n" in text
    assert "\n<!-- profile -->\n" in text
    for plot in ("results_time.png", "results_requests.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")

    ours, stock = "tesseract_lx", "tesseract_lx, stock server"
    assert {r["contender"] for r in rows} == {ours, stock, "pure JAX"}
    for who, extra in ((ours, {"health"}), ("pure JAX", set())):
        ran = {r["scenario"] for r in rows if r["contender"] == who}
        missing = {*meta["scenarios"], *extra} - ran
        assert not missing, f"{who} did not run {missing}"
    ran = {r["scenario"] for r in rows if r["contender"] == stock}
    moved = ("newton_onserver", "newton_whole")  # a solve moved to the server
    assert ran == {"jvp", "health", *moved}
    far = {(r["scenario"], r["contender"]) for r in rows if r["rtt_ms"] == 1.0}
    assert far == {(s, c) for s in moved for c in (ours, stock, "pure JAX")}
    failed = [(r["key"], r["contender"], r["error"]) for r in rows if r["error"]]
    assert not failed
    assert all(r["ok"] is not False for r in rows), "a solve did not converge"
    mine = {
        (r["scenario"], r["contender"], r["tesseract"], r["rtt_ms"]): r for r in rows
    }
    assert mine["jvp", ours, "bratu", 0.0]["sent"] == {"jacobian_vector_product": 1}
    assert mine["health", ours, "bratu", 0.0]["sent"] == {"health": 1}
    newton = mine["newton_lu", ours, "bratu", 0.0]
    assert sum(newton["sent"].values()) == 2 * newton["steps"]
    for rtt in (0.0, 1.0):  # near, and through the delaying proxy
        newton = mine["newton_onserver", ours, "bratu", rtt]
        assert newton["sent"] == {
            "apply": newton["steps"],
            "linear_solve": newton["steps"],
        }
        assert mine["newton_onserver", stock, "bratu", rtt]["fallback"]
    # `OnServer` on a stock server solves here, and the row says so.
    onserver = mine["newton_onserver", ours, "springs", 0.0]
    assert onserver["sent"]["linear_solve"] == onserver["steps"]
    assert onserver["fallback"] is None
    assert mine["newton_onserver", stock, "springs", 0.0]["fallback"]
    # The whole Newton solve on the server: one request, whatever the steps.
    for tesseract in ("bratu", "bratu_numpy", "springs"):
        whole = mine["newton_whole", ours, tesseract, 0.0]
        assert whole["sent"] == {"nonlinear_solve": 1} and whole["steps"] > 1
        assert whole["fallback"] is None
        assert mine["newton_whole", stock, tesseract, 0.0]["fallback"]
    assert mine["newton_whole", ours, "bratu", 1.0]["sent"] == {"nonlinear_solve": 1}
    errors = [r["err"] for r in rows if r["contender"] != "pure JAX"]
    assert max(e for e in errors if e is not None) < 1e-8

    # The docs' generated parts, written into copies of the pages under --out.
    for page, name in (
        ("benchmarks/index.md", "headline"),
        ("migration.md", "requests"),
    ):
        text = (tmp_path / "docs" / page).read_text()
        part = text.split(f"<!-- bench:{name} -->\n")[1].split(f"<!-- /bench:{name}")[0]
        assert f"commit `{meta['commit']}`" in part
        assert "| " in part
