"""The layers stay apart (`DESIGN.md`, "Layers"), each checked in a fresh interpreter,
whose `sys.modules` says what was imported.

- The client side imports nothing of `_server/`: a process that imports
  `tesseract_lx`, starts a server with `tlx.serve` (a child process) and calls it (an
  `/apply`, a jitted JVP, a `tlx.OnServer` solve) never loads `tesseract_lx._server`;
  `tlx.Client.from_api`, which runs the server's app in process, does. (fastapi and
  uvicorn are not checked: tesseract-core's array encoding, which the client uses,
  imports them.)
- `_wire/` is pure data: its modules import no JAX, lineax or Equinox, and nothing of
  either side.
- The server side needs JAX for JAX code and for `/linear_solve` only: the app a
  `tesseract-lx serve` worker builds (`create_app_from_env`) for a NumPy Tesseract
  answers `/apply` and `/jacobian_vector_product` without importing JAX; its first
  `/linear_solve` does.

The last two load the modules without `tesseract_lx/__init__.py`, which imports the
whole client side (JAX included) in any process that imports a submodule, a server
process too: `tesseract_lx` is registered as a bare package of its folder first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from helpers import EXAMPLES, ROOT
from references import bratu_ref


N = 4

CLIENT_SIDE = r"""
import json, sys

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

# This fresh process's own setting: the test compares in float64.
jax.config.update("jax_enable_x64", True)

import tesseract_lx as tlx


def server_modules():
    return sorted(
        m for m in sys.modules
        if m == "tesseract_lx._server" or m.startswith("tesseract_lx._server.")
    )


api, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
point = {
    "u": jnp.asarray(0.1 * rng.normal(size=(n, n))),
    "k": jnp.asarray(1.0),
    "f": jnp.asarray(rng.normal(size=(n, n))),
}
b = jnp.asarray(rng.normal(size=(n, n)))
imported = server_modules()
with tlx.serve(api) as client:
    f = tlx.TesseractModule(client)
    applied = f(point)["residual"]
    g = lambda u: f({**point, "u": u})["residual"]
    tangent = jax.jit(lambda u, t: jax.jvp(g, (u,), (t,))[1])(point["u"], b)
    J = tlx.TesseractJacobianOperator(f, point, wrt="u", of="residual")
    solver = tlx.OnServer(lx.GMRES(rtol=1e-8, atol=1e-8))
    solution = lx.linear_solve(J, b, solver).value
    stats = dict(client.stats)
served = server_modules()
in_process = tlx.Client.from_api(api)
try:
    in_process.request("apply", {"inputs": point})
finally:
    in_process.close()

print(json.dumps({
    "after import": imported,
    "after serve": served,
    "after from_api": server_modules(),
    "stats": stats,
    "apply": np.asarray(applied).tolist(),
    "jvp": np.asarray(tangent).tolist(),
    "solution": np.asarray(solution).tolist(),
}))
"""

# `tesseract_lx` as a bare package of its folder: its `__init__.py` is not run.
BARE_PACKAGE = r"""
import json, pathlib, sys, types

package = types.ModuleType("tesseract_lx")
package.__path__ = [str(pathlib.Path(sys.argv[1]) / "tesseract_lx")]
sys.modules["tesseract_lx"] = package
HEAVY = ("jax", "lineax", "equinox", "optimistix")


def loaded():
    return {
        "heavy": [m for m in HEAVY if m in sys.modules],
        "tesseract_lx": sorted(
            m for m in sys.modules if m.startswith("tesseract_lx.")
        ),
    }
"""

WIRE = (
    BARE_PACKAGE
    + r"""
import importlib, pkgutil

import tesseract_lx._wire as wire

names = ["tesseract_lx._wire"] + [
    f"tesseract_lx._wire.{m.name}" for m in pkgutil.iter_modules(wire.__path__)
]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, **loaded()}))
"""
)

NUMPY_SERVER = (
    BARE_PACKAGE
    + r"""
import os

import numpy as np
import orjson

from tesseract_lx._server.asgi import create_app_from_env
from tesseract_lx._transport import ASGITransport
from tesseract_lx._wire.encoding import decode_tree, encode_tree

# As `tesseract-lx serve` hands its settings to each worker.
os.environ["TESSERACT_API_PATH"] = sys.argv[2]
n = int(sys.argv[3])
app = create_app_from_env()
built = loaded()["heavy"]
transport = ASGITransport(app, "in-process:bratu_numpy", {})
rng = np.random.default_rng(0)
point = {
    "u": 0.1 * rng.normal(size=(n, n)),
    "k": np.float64(1.0),
    "f": rng.normal(size=(n, n)),
}
b = rng.normal(size=(n, n))
jvp = {"inputs": point, "jvp_inputs": ["u"], "jvp_outputs": ["residual"]}


def post(endpoint, payload):
    body = orjson.dumps(encode_tree(payload), option=orjson.OPT_SERIALIZE_NUMPY)
    answer = transport.send(
        "POST", endpoint, body, {"Content-Type": "application/json"}
    )
    assert answer.status == 200, (endpoint, answer.status, answer.content[:2000])
    return decode_tree(orjson.loads(answer.content))


try:
    applied = post("apply", {"inputs": point})["residual"]
    tangent = post(
        "jacobian_vector_product", {**jvp, "tangent_vector": {"u": b}}
    )["residual"]
    served = loaded()["heavy"]
    solved = post(
        "linear_solve",
        {
            **jvp,
            "rhs": {"residual": b[None]},
            "solver": {"name": "GMRES", "rtol": 1e-12, "atol": 1e-12},
        },
    )
finally:
    transport.close()
print(json.dumps({
    "after build": built,
    "after apply and jvp": served,
    "after linear_solve": loaded()["heavy"],
    "apply": np.asarray(applied).tolist(),
    "jvp": np.asarray(tangent).tolist(),
    "solution": np.asarray(solved["solution"]["u"]).tolist(),
    "result": solved["result"],
}))
"""
)


def _run(tmp_path: Path, script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # This checkout's package, and nothing written outside the temporary folder.
    env["PYTHONPATH"] = str(ROOT)
    env["TESSERACT_OUTPUT_PATH"] = str(tmp_path / "outputs")
    path = tmp_path / "layers.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _point() -> tuple[dict, np.ndarray]:
    """The scripts' point and right-hand side."""
    rng = np.random.default_rng(0)
    point = {
        "u": 0.1 * rng.normal(size=(N, N)),
        "k": np.float64(1.0),
        "f": rng.normal(size=(N, N)),
    }
    return point, rng.normal(size=(N, N))


def _reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(residual, J b, J^-1 b)` at the scripts' point, in JAX."""
    point, b = _point()
    point = {k: jnp.asarray(v) for k, v in point.items()}
    g = lambda u: bratu_ref({**point, "u": u})["residual"]  # noqa: E731
    residual, tangent = jax.jvp(g, (point["u"],), (jnp.asarray(b),))
    matrix = jax.jacfwd(g)(point["u"]).reshape(N * N, N * N)
    solution = jnp.linalg.solve(matrix, jnp.asarray(b).ravel()).reshape(N, N)
    return np.asarray(residual), np.asarray(tangent), np.asarray(solution)


def test_the_client_side_never_imports_the_server(tmp_path):
    out = _run(
        tmp_path, CLIENT_SIDE, str(EXAMPLES / "bratu" / "tesseract_api.py"), str(N)
    )
    assert out["after import"] == []
    assert out["after serve"] == []
    # The sanity check: `from_api` runs the server's app here, so it loads it.
    assert "tesseract_lx._server" in out["after from_api"]
    # The eager call, the jitted JVP, the solve: one request each.
    assert out["stats"] == {
        "apply": 1,
        "jacobian_vector_product": 1,
        "linear_solve": 1,
    }
    residual, tangent, solution = _reference()
    np.testing.assert_allclose(out["apply"], residual, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["jvp"], tangent, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["solution"], solution, rtol=1e-7, atol=1e-9)


def test_the_wire_is_pure_data(tmp_path):
    out = _run(tmp_path, WIRE, str(ROOT))
    assert "tesseract_lx._wire.solvers" in out["modules"], out["modules"]
    assert out["heavy"] == []
    assert all(m.startswith("tesseract_lx._wire") for m in out["tesseract_lx"]), out[
        "tesseract_lx"
    ]


def test_a_numpy_tesseract_is_served_without_jax(tmp_path):
    api = EXAMPLES / "bratu_numpy" / "tesseract_api.py"
    out = _run(tmp_path, NUMPY_SERVER, str(ROOT), str(api), str(N))
    assert out["after build"] == []
    assert out["after apply and jvp"] == []
    # The check sees an import when there is one: a solve needs JAX and lineax.
    assert {"jax", "lineax"} <= set(out["after linear_solve"])
    residual, tangent, solution = _reference()
    np.testing.assert_allclose(out["apply"], residual, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["jvp"], tangent, rtol=1e-12, atol=1e-12)
    assert out["result"] == ["successful"]
    np.testing.assert_allclose(out["solution"], [solution], rtol=1e-10, atol=1e-12)


def test_every_public_name_is_declared_for_type_checkers():
    """`tesseract_lx/__init__.py` loads its names on first use; the block a type
    checker reads names the same ones, from the same modules."""
    import ast

    import tesseract_lx

    tree = ast.parse(open(tesseract_lx.__file__).read())
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    ]
    declared = {
        alias.asname or alias.name: node.module.lstrip(".")
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    assert declared == tesseract_lx._HOME
    assert sorted(tesseract_lx.__all__) == sorted(tesseract_lx._HOME)
    for name in tesseract_lx.__all__:
        assert getattr(tesseract_lx, name).__module__.startswith("tesseract_lx.")
