"""No global state of the caller's process changes, whatever runs server code there.

`tlx.Client.from_api` runs the server's app in the caller's process, and the example
Tesseracts switch JAX's float64 on when imported (`jax.config.update`), as a served
Tesseract may; `tlx.serve` starts a server process. Each entry point runs here in a
fresh interpreter with float64 off (not this test session's, which switches it on),
on a NumPy Tesseract and a JAX one: `/apply`, `/jacobian_vector_product`, a
`/linear_solve` request, and `lx.linear_solve` with `tlx.OnServer(lx.GMRES(...))` on
a `tlx.TesseractJacobianOperator`. Before and after: `jax.config.values`,
`jnp.ones(2).dtype`, `os.environ`, every signal handler, the event loop policy, the
root logger, `logging.disable`, NumPy's error handling, the recursion limit and
`sys.excepthook` are the same. (`sys.path` keeps the Tesseract's folder, which its
own imports need; `warnings` filters are left out: third-party imports add theirs.)

The server still computes as the Tesseract asks: the `/linear_solve` answer is
float64 and agrees with `np.linalg.solve` of the Jacobian to 1e-10, the other
answers with a NumPy reference to 1e-12.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import EXAMPLES, ROOT


N = 4
TESSERACTS = {
    "numpy": EXAMPLES / "bratu_numpy" / "tesseract_api.py",
    "jax": EXAMPLES / "bratu" / "tesseract_api.py",
}

SCRIPT = r"""
import asyncio, json, logging, os, signal, sys

import numpy as np


def snapshot():
    import jax
    import jax.numpy as jnp

    handlers = {}
    for s in signal.valid_signals():
        try:
            handlers[int(s)] = repr(signal.getsignal(s))
        except (OSError, ValueError):
            pass
    root = logging.getLogger()
    return {
        "jax.config.values": {k: repr(v) for k, v in jax.config.values.items()},
        "jnp.ones(2).dtype": str(jnp.ones(2).dtype),
        "os.environ": dict(os.environ),
        "signal handlers": handlers,
        "event loop policy": type(asyncio.get_event_loop_policy()).__qualname__,
        "root logger": [root.level, [repr(h) for h in root.handlers]],
        "logging.disable": logging.root.manager.disable,
        "numpy errors": np.geterr(),
        "recursion limit": sys.getrecursionlimit(),
        "sys.excepthook": repr(sys.excepthook),
    }


before = snapshot()

import jax.numpy as jnp
import lineax as lx
import tesseract_lx as tlx

api, entry, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
point = {
    "u": 0.1 * rng.normal(size=(n, n)),
    "k": np.float64(1.0),
    "f": rng.normal(size=(n, n)),
}
b = rng.normal(size=(n, n))
jvp = {"inputs": point, "jvp_inputs": ["u"], "jvp_outputs": ["residual"]}
serving = tlx.serve(api) if entry == "serve" else None
client = serving.__enter__() if serving else tlx.Client.from_api(api)
try:
    applied = client.request("apply", {"inputs": point})
    tangent = client.request(
        "jacobian_vector_product", {**jvp, "tangent_vector": {"u": b}}
    )
    solved = client.request(
        "linear_solve",
        {
            **jvp,
            "rhs": {"residual": b[None]},
            "solver": {"name": "GMRES", "rtol": 1e-12, "atol": 1e-12},
        },
    )
    f = tlx.TesseractModule(client)
    J = tlx.TesseractJacobianOperator(f, point, wrt="u", of="residual")
    sent = client.stats["linear_solve"]
    x = lx.linear_solve(J, jnp.asarray(b), tlx.OnServer(lx.GMRES(rtol=1e-6, atol=1e-6)))
    on_server = client.stats["linear_solve"] - sent
finally:
    if serving:
        serving.__exit__(None, None, None)

print(json.dumps({
    "before": before,
    "after": snapshot(),
    "apply": np.asarray(applied["residual"]).tolist(),
    "apply dtype": str(np.asarray(applied["residual"]).dtype),
    "jvp": np.asarray(tangent["residual"]).tolist(),
    "solution": np.asarray(solved["solution"]["u"]).tolist(),
    "solution dtype": str(np.asarray(solved["solution"]["u"]).dtype),
    "result": solved["result"],
    "on server": on_server,
    "OnServer": np.asarray(x.value).tolist(),
    "decisions": [repr(d) for d in client.decisions],
}))
"""


def _neg_laplacian(u: np.ndarray) -> np.ndarray:
    p = np.pad(u, 1)
    return (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) * (
        N + 1
    ) ** 2


def _reference() -> tuple[dict, np.ndarray, np.ndarray]:
    """The script's point and right-hand side, and the Jacobian in NumPy."""
    rng = np.random.default_rng(0)
    point = {
        "u": 0.1 * rng.normal(size=(N, N)),
        "k": 1.0,
        "f": rng.normal(size=(N, N)),
    }
    b = rng.normal(size=(N, N))
    columns = [
        (_neg_laplacian(e) - point["k"] * np.exp(point["u"]) * e).ravel()
        for e in np.eye(N * N).reshape(-1, N, N)
    ]
    return point, b, np.stack(columns, axis=1)


def _run(tmp_path: Path, api: Path, entry: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # This checkout's package, and nothing written outside the temporary folder.
    env["PYTHONPATH"] = str(ROOT)
    env["TESSERACT_OUTPUT_PATH"] = str(tmp_path / "outputs")
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(api), entry, str(N)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ["from_api", "serve"])
@pytest.mark.parametrize("tesseract", list(TESSERACTS))
def test_no_global_state_changes(tmp_path, tesseract, entry):
    out = _run(tmp_path, TESSERACTS[tesseract], entry)
    before, after = out["before"], out["after"]
    assert before["jnp.ones(2).dtype"] == "float32"
    assert before["jax.config.values"]["jax_enable_x64"] == "False"
    for key in before:
        assert after[key] == before[key], key

    point, b, jacobian = _reference()
    residual = _neg_laplacian(point["u"]) - point["k"] * np.exp(point["u"]) - point["f"]
    assert out["apply dtype"] == "float64"
    np.testing.assert_allclose(out["apply"], residual, rtol=1e-12, atol=1e-12)
    tangent = (jacobian @ b.ravel()).reshape(N, N)
    np.testing.assert_allclose(out["jvp"], tangent, rtol=1e-12, atol=1e-12)
    # The solve happened on the server, in float64.
    exact = np.linalg.solve(jacobian, b.ravel()).reshape(1, N, N)
    assert out["solution dtype"] == "float64" and out["result"] == ["successful"]
    np.testing.assert_allclose(out["solution"], exact, rtol=1e-10, atol=1e-12)
    # `OnServer` sent its one request, and its answer reached this float32 process.
    assert out["on server"] == 1 and out["decisions"] == []
    np.testing.assert_allclose(out["OnServer"], exact[0], rtol=1e-4, atol=1e-5)
