"""A real Jupyter kernel: `tlx.Client.from_api` and `tlx.serve` in a notebook.

A kernel runs its cells inside a running event loop, where the in-process transport
once failed (`Cannot run the event loop while another loop is running`). The notebook
is built here with `nbformat` and run by `nbclient` on an IPython kernel of this
interpreter (a kernel spec installed into a temporary folder); every file Jupyter and
IPython write goes to temporary folders too.
"""

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec

from helpers import CASES, ROOT


KERNEL = "tesseract-lx-tests"

SETUP = f"""
import asyncio, json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import tesseract_lx as tlx
sys.path.insert(0, {str(ROOT / "tests")!r})
from references import bratu_inputs, bratu_ref

API = {str(CASES["bratu"].path)!r}
inputs = bratu_inputs(4)
u = inputs["u"]
t = jnp.asarray(np.random.default_rng(0).standard_normal(u.shape))
g = lambda fn: lambda u: fn({{**inputs, "u": u}})["residual"]
ref = jax.jvp(g(bratu_ref), (u,), (t,))

def report(name, client, out):
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out, ref))
    print(json.dumps({{"check": name, "error": error, "stats": dict(client.stats)}}))
"""

# The kernel runs cells inside its own running loop: what used to break.
LOOP = """
print(json.dumps({"running_loop": asyncio.get_running_loop().is_running()}))
"""

IN_PROCESS = """
client = tlx.Client.from_api(API)
f = tlx.TesseractModule(client, batching="sequential")
report("in-process eager", client, jax.jvp(g(f), (u,), (t,)))
client.stats.clear()
report("in-process jit", client, jax.jit(lambda u, t: jax.jvp(g(f), (u,), (t,)))(u, t))
"""

# A top-level `await`: the cell is a coroutine on the kernel's loop.
AWAITED = """
await asyncio.sleep(0)
client.stats.clear()
report("in-process after await", client, jax.jvp(g(f), (u,), (t,)))
client.close()
"""

SERVED = """
with tlx.serve(API) as served:
    f = tlx.TesseractModule(served, batching="sequential")
    report("served eager", served, jax.jvp(g(f), (u,), (t,)))
    served.stats.clear()
    report("served jit", served, jax.jit(lambda u, t: jax.jvp(g(f), (u,), (t,)))(u, t))
"""


@pytest.fixture
def jupyter_home(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, and every Jupyter/IPython folder, under
    `tmp_path`."""
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    for name, folder in [
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "matplotlib"),
    ]:
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    spec = prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    assert json.loads(spec.read_text())["argv"][0] == sys.executable
    work = tmp_path / "work"
    work.mkdir()
    return work


def _records(cell) -> list[dict]:
    lines = "".join(
        o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream"
    )
    return [json.loads(line) for line in lines.splitlines() if line.startswith("{")]


def test_a_notebook_uses_the_in_process_and_the_served_client(jupyter_home: Path):
    cells = [SETUP, LOOP, IN_PROCESS, AWAITED, SERVED]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source.strip()) for source in cells]
    nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(jupyter_home)}},
    ).execute()
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert _records(nb.cells[1]) == [{"running_loop": True}]
    checks = [r for c in nb.cells[2:] for r in _records(c)]
    assert [r["check"] for r in checks] == [
        "in-process eager",
        "in-process jit",
        "in-process after await",
        "served eager",
        "served jit",
    ]
    for record in checks:
        assert record["error"] < 1e-8, record
        stats = dict(record["stats"])
        # A client's first call may ask for the output shapes; no other may.
        learned = stats.pop("abstract_eval", 0)
        assert learned <= record["check"].endswith("eager"), record
        assert stats == {"apply": 1, "jacobian_vector_product": 1}, record
    # Nothing was written next to the notebook's working folder but by it.
    assert sorted(os.listdir(jupyter_home)) == []
