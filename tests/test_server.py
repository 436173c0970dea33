"""The tesseract-lx server: batched endpoints, their modes, errors, limits, the cache.

Real servers (`python -m tesseract_lx._server.cli serve ...`) on free 127.0.0.1 ports,
all started at once, once per session, each with its own temporary output folder, and
stopped in `finally`; requests with plain `requests` and with tesseract-core's own
client. Apps built in process (`tesseract_lx._server.create_app`) are driven by a raw
ASGI call (`_asgi`), as the client's in-process transport drives them. Results are
compared with pure NumPy/JAX references of the same maths.
"""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
import tesseract_lx as tlx
from tesseract_core import Tesseract
from tesseract_core.runtime.core import load_module_from_path
from tesseract_core.runtime.serve import create_rest_api
from tesseract_lx._server import create_app
from tesseract_lx._server.cache import CacheSettings
from tesseract_lx._transport import ASGITransport
from tesseract_lx._wire import binary
from tesseract_lx._wire.encoding import ACCEPT, decode_tree, encode_tree
from tesseract_lx._wire.spec import Capabilities, COMPUTATIONAL


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "tesseracts"
TESTS = ROOT / "tests" / "tesseracts"


def _api(name: str) -> Path:
    for base in (EXAMPLES, TESTS):
        if (base / name / "tesseract_api.py").is_file():
            return base / name / "tesseract_api.py"
    raise FileNotFoundError(name)


# -- references: the same maths, in JAX ------------------------------------------------


def pytree_ref(inp: dict) -> dict:
    a, b = inp["params"]["a"], inp["params"]["b"]
    x, offset = inp["x"], inp["offset"]
    y = a[0] * jnp.sin(x) + a[1] * b * x ** inp["power"] + a[2] + offset
    return {"y": y, "stats": {"norm": jnp.sum(y**2), "mean": jnp.mean(y) * b}}


def sin_ref(inp: dict) -> dict:  # batched_own, numpy_loop
    return {"y": inp["a"] * jnp.sin(inp["x"]), "s": jnp.sum(inp["x"] ** 2)}


def bratu_ref(inp: dict) -> dict:
    u, n = inp["u"], inp["u"].shape[0]
    p = jnp.pad(u, 1)
    lap = (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) * (
        n + 1
    ) ** 2
    return {"residual": lap - inp["k"] * jnp.exp(u) - inp["f"]}


def poisson_ref(inp: dict) -> dict:
    x = inp["x"]
    lap = bratu_ref({"u": x, "k": 0.0, "f": 0.0})["residual"]
    return {"y": lap + inp["c"] * x}


def normalize_ref(inp: dict) -> dict:
    x = inp["x"]
    return {"y": x / jnp.sum(x), "z": x - jnp.mean(x)}


def elementwise_ref(inp: dict) -> dict:
    x, a = inp["x"], inp["a"]
    a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
    return {"y": a * jnp.sin(x) + x**2, "r": x / jnp.sum(x, axis=-1, keepdims=True)}


def _point(name: str, rng: np.random.Generator, n: int = 5) -> dict:
    if name == "pytree":
        return {
            "params": {"a": rng.normal(size=3), "b": np.float64(rng.normal())},
            "x": rng.normal(size=n),
            "offset": rng.normal(size=n),
            "power": 2,
        }
    if name in ("batched_own", "numpy_loop"):
        return {"x": rng.normal(size=n), "a": np.float64(rng.normal())}
    if name in ("bratu", "heavy"):
        point = {"u": 0.1 * rng.normal(size=(n, n)), "f": rng.normal(size=(n, n))}
        k = np.float64(1.5) if name == "bratu" else 0.1 * rng.normal(size=(n, n))
        return {**point, "k": k}
    if name == "poisson":
        return {"x": rng.normal(size=(n, n)), "c": np.float64(rng.uniform(0, 2))}
    if name == "normalize":
        return {"x": rng.uniform(0.5, 2.0, size=n)}
    if name == "elementwise":
        return {"x": rng.uniform(0.5, 2.0, size=(2, n)), "a": rng.normal(size=2)}
    raise KeyError(name)


REFS = {
    "pytree": pytree_ref,
    "batched_own": sin_ref,
    "numpy_loop": sin_ref,
    "bratu": bratu_ref,
    "poisson": poisson_ref,
    "normalize": normalize_ref,
    "elementwise": elementwise_ref,
}


def assert_tree_close(got: Any, want: Any, tol: float = 1e-10) -> None:
    if isinstance(want, dict):
        assert set(got) >= set(want), (sorted(got), sorted(want))
        for k in want:
            assert_tree_close(got[k], want[k], tol)
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# -- servers ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(
        self, name: str, proc: subprocess.Popen, url: str, out: Path, log: Path
    ):
        self.name, self.proc, self.url, self.out, self.log = name, proc, url, out, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start(name: str, api: Path, tmp: Path, *flags: str) -> Served:
    port = _free_port()
    out, log = tmp / f"out_{name}", tmp / f"{name}.log"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TESSERACT_DEBUG", None)
    cmd = [sys.executable, "-m", "tesseract_lx._server.cli", "serve", str(api)]
    cmd += ["--port", str(port), "--output-path", str(out), *flags]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,
        )
    return Served(name, proc, f"http://127.0.0.1:{port}", out, log)


def _stop(served: Served) -> None:
    if served.proc.poll() is None:
        os.killpg(served.proc.pid, 15)
        try:
            served.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(served.proc.pid, 9)
            served.proc.wait(timeout=10)


def _strip_declaration(src: Path, dst: Path) -> Path:
    dst.mkdir()
    text = src.read_text()
    dst.joinpath("tesseract_api.py").write_text(
        re.sub(r"^TESSERACT_LX = .*$", "", text, flags=re.M)
    )
    return dst / "tesseract_api.py"


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="session")
def servers(tmp_session):
    tmp = tmp_session
    undeclared = _strip_declaration(_api("stateful"), tmp / "stateful_undeclared")
    malformed = tmp / "malformed"
    malformed.mkdir()
    malformed.joinpath("tesseract_api.py").write_text(
        _api("raising").read_text() + '\nTESSERACT_LX = {"precision": "float16"}\n'
    )
    specs = {
        "pytree": (_api("pytree"),),
        "batched_own": (_api("batched_own"),),
        "numpy_loop": (_api("numpy_loop"), "--workers", "2"),
        "float32": (_api("float32_compute"),),
        "raising": (_api("raising"), "--max-batch", "4", "--max-body-mb", "0.01"),
        "raising_debug": (_api("raising"), "--debug", "--run-folders"),
        "stateful_nocache": (undeclared, "--no-cache"),
        "malformed": (malformed / "tesseract_api.py",),
    }
    started: dict[str, Served] = {}
    try:
        for name, (api, *flags) in specs.items():
            started[name] = _start(name, api, tmp, *flags)
        deadline = time.monotonic() + 120
        for name, served in started.items():
            if name == "malformed":
                continue
            while True:
                if served.proc.poll() is not None:
                    raise RuntimeError(f"{name} server died:\n{served.log_text()}")
                try:
                    if requests.get(f"{served.url}/health", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name} server did not start:\n{served.log_text()}"
                    )
                time.sleep(0.1)
        yield started
    finally:
        for served in started.values():
            _stop(served)


def _post(url: str, endpoint: str, payload: Any, accept: str = ACCEPT, **kw):
    return requests.post(
        f"{url}/{endpoint}",
        json=encode_tree(payload),
        headers={"Accept": accept},
        timeout=60,
        **kw,
    )


def _ok(url: str, endpoint: str, payload: Any) -> Any:
    r = _post(url, endpoint, payload)
    assert r.status_code == 200, r.text
    return decode_tree(r.json())


# -- in process ------------------------------------------------------------------------


def _asgi(app, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    """One request to an ASGI app, in this thread, without a socket."""
    body = b"" if payload is None else json.dumps(encode_tree(payload)).encode()
    headers = {"Content-Type": "application/json", "Accept": ACCEPT}
    transport = ASGITransport(app, "in-process", headers)
    try:
        response = transport.send(method, path.lstrip("/"), body)
    finally:
        transport.close()
    return response.status, decode_tree(json.loads(response.content))


_APPS: dict[tuple, Any] = {}


def app_for(name: str, **settings: Any):
    """An in-process app (and its module), built once per settings."""
    key = (name, tuple(sorted(settings.items())))
    if key not in _APPS:
        module = load_module_from_path(_api(name))
        _APPS[key] = create_app(module, **settings), module
    return _APPS[key]


def _modes(app) -> dict:
    return app.state.tesseract_lx.info()["batched"]


# -- references for gradients ----------------------------------------------------------


def _get(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set(tree: Any, path: str, value: Any) -> Any:
    tree = dict(tree)
    head, _, rest = path.partition(".")
    tree[head] = _set(tree[head], rest, value) if rest else value
    return tree


def _flat_ref(name: str, inputs: dict, ins: list[str], outs: list[str]):
    """`{in path: array} -> {out path: array}` of the reference, at `inputs`."""
    base = jax.tree.map(jnp.asarray, inputs)

    def fn(values: dict) -> dict:
        tree = base
        for path, value in values.items():
            tree = _set(tree, path, value)
        out = REFS[name](tree)
        return {o: _get(out, o) for o in outs}

    primal = {p: jnp.asarray(_get(inputs, p)) for p in ins}
    return fn, primal


def ref_jvps(name: str, inputs: dict, ins, outs, tangents: dict) -> dict:
    fn, primal = _flat_ref(name, inputs, ins, outs)
    return jax.vmap(lambda t: jax.jvp(fn, (primal,), (t,))[1])(tangents)


def ref_vjps(name: str, inputs: dict, ins, outs, cotangents: dict) -> dict:
    fn, primal = _flat_ref(name, inputs, ins, outs)
    _, pullback = jax.vjp(fn, primal)
    return jax.vmap(lambda c: pullback(c)[0])(cotangents)


GRADIENT_CASES = {
    # name: differentiable inputs, differentiable outputs, expected batched mode
    "pytree": (
        ["params.a", "params.b", "x"],
        ["stats.mean", "stats.norm", "y"],
        "vmap",
    ),
    "batched_own": (["a", "x"], ["s", "y"], "own"),
    "numpy_loop": (["a", "x"], ["s", "y"], "loop"),
}


def _jvp_payload(inputs, ins, outs, vec):
    return {
        "inputs": inputs,
        "jvp_inputs": ins,
        "jvp_outputs": outs,
        "tangent_vector": vec,
    }


def _vjp_payload(inputs, ins, outs, vec):
    return {
        "inputs": inputs,
        "vjp_inputs": ins,
        "vjp_outputs": outs,
        "cotangent_vector": vec,
    }


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytree", "numpy_loop", "raising"])
def test_stock_openapi_is_tesseract_cores(name):
    module = load_module_from_path(_api(name))
    stock = create_rest_api(module).openapi()
    ours = create_app(module).openapi()
    for path, item in stock["paths"].items():
        assert ours["paths"][path] == item, path
    for component, schema in stock["components"]["schemas"].items():
        assert ours["components"]["schemas"][component] == schema, component
    for key in ("info", "x-supported-output-formats", "x-supported-compressions"):
        assert ours[key] == stock[key]
    assert {"/batched_apply", "/batched_jacobian_vector_product"} <= set(ours["paths"])
    caps = Capabilities.from_openapi(ours)
    assert not caps.is_stock and caps.max_batch == 65536
    assert Capabilities.from_openapi(stock).is_stock


def test_capabilities(servers):
    expected = {
        # name: modes, precision, workers, max_batch, max_body_bytes
        "pytree": (
            {
                "batched_apply": "vmap",
                "batched_jacobian_vector_product": "vmap",
                "batched_vector_jacobian_product": "vmap",
                "linear_solve": "linearise",
            },
            "float64",
            1,
            65536,
            1 << 30,
        ),
        "batched_own": (
            {
                "batched_apply": "own",
                "batched_jacobian_vector_product": "own",
                "batched_vector_jacobian_product": "own",
                "linear_solve": "linearise",
            },
            "float64",
            1,
            65536,
            1 << 30,
        ),
        "numpy_loop": (
            {
                "batched_apply": "loop",
                "batched_jacobian_vector_product": "loop",
                "batched_vector_jacobian_product": "loop",
                "linear_solve": "function",
            },
            None,
            2,
            65536,
            1 << 30,
        ),
        "float32": ({"batched_apply": "vmap"}, "float32", 1, 65536, 1 << 30),
        "raising": (
            {
                "batched_apply": "loop",
                "batched_jacobian_vector_product": "loop",
                "batched_vector_jacobian_product": "loop",
                "linear_solve": "function",
            },
            None,
            1,
            4,
            int(0.01 * (1 << 20)),
        ),
    }
    for name, (modes, precision, workers, max_batch, max_body) in expected.items():
        url = servers[name].url
        doc = requests.get(f"{url}/openapi.json", timeout=10).json()
        lx = doc["x-tesseract-lx"]
        assert lx["batched"] == modes, name
        assert lx["precision"] == precision, name
        assert (lx["workers"], lx["max_batch"], lx["max_body_bytes"]) == (
            workers,
            max_batch,
            max_body,
        ), name
        assert lx["pure"] is True and lx["version"]
        assert {"enabled", "active", "max_entries", "max_bytes"} <= set(
            lx["linearisation_cache"]
        )
        assert lx["linearisation_cache"]["active"] is (
            name in ("pytree", "batched_own", "float32")
        )
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok"
        assert health["tesseract_lx"]["batched"] == modes
        caps = Capabilities.from_openapi(doc)
        assert caps.mode("batched_apply") == modes["batched_apply"]
        assert caps.precision == precision


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_batched_jvp_vjp_against_reference(servers, name, k):
    url = servers[name].url
    ins, outs, _ = GRADIENT_CASES[name]
    rng = np.random.default_rng(k)
    inputs = _point(name, rng)
    in_shapes = {p: np.shape(_get(inputs, p)) for p in ins}
    ref = REFS[name](inputs)
    out_shapes = {o: np.shape(_get(ref, o)) for o in outs}

    tangents = {p: rng.normal(size=(k, *s)) for p, s in in_shapes.items()}
    got = _ok(
        url,
        "batched_jacobian_vector_product",
        _jvp_payload(inputs, ins, outs, tangents),
    )
    want = ref_jvps(name, inputs, ins, outs, tangents)
    assert set(got) == set(outs)
    for o in outs:
        assert got[o].shape == (k, *out_shapes[o]) and got[o].dtype == np.float64
        np.testing.assert_allclose(got[o], want[o], rtol=1e-10, atol=1e-10)

    cotangents = {o: rng.normal(size=(k, *s)) for o, s in out_shapes.items()}
    got = _ok(
        url,
        "batched_vector_jacobian_product",
        _vjp_payload(inputs, ins, outs, cotangents),
    )
    want = ref_vjps(name, inputs, ins, outs, cotangents)
    assert set(got) == set(ins)
    for p in ins:
        assert got[p].shape == (k, *in_shapes[p])
        np.testing.assert_allclose(got[p], want[p], rtol=1e-10, atol=1e-10)


BATCHED_APPLY_CASES = {
    # name: mode; every one but `elementwise` computes something not elementwise
    "pytree": "vmap",
    "bratu": "vmap",
    "poisson": "vmap",
    "heavy": "vmap",
    "normalize": "vmap",
    "batched_own": "own",
    "numpy_loop": "loop",
    "elementwise": "axis",
}


@pytest.mark.parametrize("name", list(BATCHED_APPLY_CASES))
def test_batched_apply_modes_in_process(name):
    app, module = app_for(name)
    mode = BATCHED_APPLY_CASES[name]
    assert _modes(app)["batched_apply"] == mode
    rng = np.random.default_rng(7)
    points = [_point(name, rng, n=3 if name == "heavy" else 4) for _ in range(3)]
    calls = dict(getattr(module, "CALLS", {}))
    status, outs = _asgi(app, "POST", "/batched_apply", {"inputs": points})
    assert status == 200, outs
    assert isinstance(outs, list) and len(outs) == len(points)
    ref = _heavy(module) if name == "heavy" else REFS[name]
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out, ref(point))
    # The mode did the work: no silent fallback to a loop.
    assert _modes(app)["batched_apply"] == mode
    if mode == "own":
        assert module.CALLS["batched_apply"] == calls.get("batched_apply", 0) + 1
    if mode == "axis":
        assert module.CALLS["apply"] == calls.get("apply", 0) + 1


def _heavy(module):
    return lambda point: module.apply_jit({k: jnp.asarray(v) for k, v in point.items()})


@pytest.mark.parametrize("name", ["pytree", "batched_own", "numpy_loop"])
def test_batched_apply_over_http(servers, name):
    url = servers[name].url
    rng = np.random.default_rng(3)
    # Points of different sizes: a vmap server loops over this request.
    points = [_point(name, rng, n=n) for n in (4, 4, 2)]
    outs = _ok(url, "batched_apply", {"inputs": points})
    assert len(outs) == 3
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out, REFS[name](point))
    r = _post(url, "batched_apply", {"inputs": points[:1]}, accept="application/json")
    assert r.status_code == 200
    (one,) = decode_tree(r.json())
    assert r.json()[0]["y"]["data"]["encoding"] == "json"
    assert_tree_close(one, REFS[name](points[0]))
    mode = GRADIENT_CASES[name][2]
    lx = requests.get(f"{url}/openapi.json", timeout=10).json()["x-tesseract-lx"]
    assert lx["batched"]["batched_apply"] == mode


def test_axis_loops_over_points_that_do_not_stack():
    app, module = app_for("elementwise")
    rng = np.random.default_rng(0)
    points = [_point("elementwise", rng, n=4), _point("elementwise", rng, n=3)]
    before = module.CALLS["apply"]
    status, outs = _asgi(app, "POST", "/batched_apply", {"inputs": points})
    assert status == 200
    assert module.CALLS["apply"] == before + 2
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out, elementwise_ref(point))
    assert _modes(app)["batched_apply"] == "axis"

    # Fixed shapes: a stack is not a valid input, so each point goes alone.
    loop = load_module_from_path(_api("numpy_loop"))
    setattr(loop, "TESSERACT_LX", {"apply_batch_axis": 0})
    app = create_app(loop)
    assert _modes(app)["batched_apply"] == "axis"
    points = [_point("numpy_loop", rng) for _ in range(3)]
    status, outs = _asgi(app, "POST", "/batched_apply", {"inputs": points})
    assert status == 200
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out, sin_ref(point))


def test_vmap_that_does_not_trace_falls_back_to_loop_for_good():
    module = load_module_from_path(_api("numpy_loop"))
    # Looks like JAX code: tracing is tried, and fails (NumPy).
    setattr(module, "jax", jax)
    app = create_app(module)
    modes = _modes(app)
    assert modes.pop("linear_solve") == "linearise"
    assert set(modes.values()) == {"vmap"}
    rng = np.random.default_rng(0)
    points = [_point("numpy_loop", rng) for _ in range(2)]
    status, outs = _asgi(app, "POST", "/batched_apply", {"inputs": points})
    assert status == 200
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out, sin_ref(point))
    inputs = points[0]
    tangents = {"x": rng.normal(size=(3, 5))}
    status, got = _asgi(
        app,
        "POST",
        "/batched_jacobian_vector_product",
        _jvp_payload(inputs, ["x"], ["y", "s"], tangents),
    )
    assert status == 200
    want = ref_jvps("numpy_loop", inputs, ["x"], ["y", "s"], tangents)
    assert_tree_close(got, want)
    # `/linear_solve` falls back to the JVP function in process, for good too.
    b = rng.normal(size=(2, 5))
    status, got = _asgi(
        app,
        "POST",
        "/linear_solve",
        {
            "inputs": inputs,
            "jvp_inputs": ["x"],
            "jvp_outputs": ["y"],
            "rhs": {"y": b},
            "solver": {"name": "GMRES", "rtol": 1e-12, "atol": 1e-12},
        },
    )
    assert status == 200
    diag = inputs["a"] * np.cos(inputs["x"])  # y = a sin(x)
    np.testing.assert_allclose(got["solution"]["x"], b / diag, rtol=1e-10)
    info = app.state.tesseract_lx.info()
    assert info["batched"]["batched_apply"] == "loop"
    assert info["batched"]["batched_jacobian_vector_product"] == "loop"
    assert info["batched"]["linear_solve"] == "function"
    assert info["linearisation_cache"]["fallbacks"] >= 1


def test_vmap_fallback_keeps_the_tesseracts_own_error():
    module = load_module_from_path(_api("raising"))
    setattr(module, "jax", jax)
    app = create_app(module)
    points = [{"x": np.array([1.0, 2.0])}, {"x": np.array([-1.0, 2.0])}]
    status, body = _asgi(app, "POST", "/batched_apply", {"inputs": points})
    assert status == 500
    assert body["detail"] == "ValueError: x[0] must be >= 0"
    assert body["error"]["endpoint"] == "batched_apply"
    # The loop failed too: nothing says vmap is at fault, so it is kept.
    assert _modes(app)["batched_apply"] == "vmap"


ENDPOINT_PAYLOADS = {
    "apply": lambda x: {"inputs": {"x": x}},
    "jacobian_vector_product": lambda x: _jvp_payload(
        {"x": x}, ["x"], ["y"], {"x": np.ones_like(x)}
    ),
    "vector_jacobian_product": lambda x: _vjp_payload(
        {"x": x}, ["x"], ["y"], {"y": np.ones_like(x)}
    ),
    "batched_apply": lambda x: {"inputs": [{"x": np.abs(x)}, {"x": x}]},
    "batched_jacobian_vector_product": lambda x: _jvp_payload(
        {"x": x}, ["x"], ["y"], {"x": np.ones((2, *x.shape))}
    ),
    "batched_vector_jacobian_product": lambda x: _vjp_payload(
        {"x": x}, ["x"], ["y"], {"y": np.ones((2, *x.shape))}
    ),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINT_PAYLOADS))
def test_tesseract_errors_are_500_with_its_words(servers, endpoint):
    bad, good = np.array([-1.0, 2.0]), np.array([1.0, 2.0])
    payload = ENDPOINT_PAYLOADS[endpoint]
    r = _post(servers["raising"].url, endpoint, payload(bad))
    assert r.status_code == 500, r.text
    assert r.json() == {
        "detail": "ValueError: x[0] must be >= 0",
        "error": {
            "type": "ValueError",
            "message": "x[0] must be >= 0",
            "endpoint": endpoint,
        },
    }
    r = _post(servers["raising_debug"].url, endpoint, payload(bad))
    assert r.status_code == 500
    error = r.json()["error"]
    assert r.json()["detail"] == "ValueError: x[0] must be >= 0"
    assert "Traceback" in error["traceback"]
    assert 'raise ValueError("x[0] must be >= 0")' in error["traceback"]
    # And the server keeps serving.
    assert _post(servers["raising"].url, endpoint, payload(good)).status_code == 200


def test_validation_errors_stay_422_naming_the_field(servers):
    r = _post(servers["raising"].url, "apply", {"inputs": {"x": "not an array"}})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"][:3] == ["body", "inputs", "x"]
    r = _post(servers["raising"].url, "batched_apply", {"inputs": [{"x": [1.0]}, {}]})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "inputs", 1, "x"]
    r = _post(servers["raising"].url, "batched_apply", {"inputs": []})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "inputs"]


@pytest.mark.parametrize(
    "field, vec, message",
    [
        (
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "params.b": np.ones(3), "x": np.ones((2, 5))},
            "`tangent_vector.params.b` has batch size 3",
        ),
        (
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "params.b": np.ones(2), "x": np.ones((2, 6))},
            "`tangent_vector.x` has shape (2, 6); expected (2, 5)",
        ),
        (
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "x": np.ones((2, 5))},
            "`tangent_vector` must have exactly the keys of `jvp_inputs`",
        ),
        (
            "tangent_vector",
            {"params.a": np.ones(3), "params.b": np.ones(()), "x": np.ones(5)},
            "`tangent_vector.params.b` needs a leading batch axis",
        ),
        (
            "cotangent_vector",
            {"y": np.ones((2, 4)), "stats.norm": np.ones(2), "stats.mean": np.ones(2)},
            "`cotangent_vector.y` has shape (2, 4); expected (2, 5)",
        ),
    ],
)
def test_bad_batched_gradient_payload_is_422(servers, field, vec, message):
    inputs = _point("pytree", np.random.default_rng(0))
    ins, outs = ["params.a", "params.b", "x"], ["stats.mean", "stats.norm", "y"]
    if field == "tangent_vector":
        endpoint, payload = "batched_jacobian_vector_product", _jvp_payload
    else:
        endpoint, payload = "batched_vector_jacobian_product", _vjp_payload
    r = _post(servers["pytree"].url, endpoint, payload(inputs, ins, outs, vec))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][-1] == field
    assert message in error["msg"]


def test_max_batch(servers):
    url, x = servers["raising"].url, np.ones(2)
    r = _post(url, "batched_apply", {"inputs": [{"x": x}] * 5})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "inputs"]
    assert "`max_batch` = 4" in error["msg"] and "5 items" in error["msg"]
    assert _post(url, "batched_apply", {"inputs": [{"x": x}] * 4}).status_code == 200
    for endpoint, payload, field in (
        ("batched_jacobian_vector_product", _jvp_payload, "tangent_vector"),
        ("batched_vector_jacobian_product", _vjp_payload, "cotangent_vector"),
    ):
        vec = {"x" if field == "tangent_vector" else "y": np.ones((5, 2))}
        r = _post(url, endpoint, payload({"x": x}, ["x"], ["y"], vec))
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"][-1] == field and "`max_batch` = 4" in error["msg"]


def test_body_limit(servers):
    url, limit = servers["raising"].url, int(0.01 * (1 << 20))
    big = {"inputs": {"x": np.ones(2000)}}
    r = _post(url, "apply", big)
    assert r.status_code == 413
    assert "`max_body_bytes` = 10485" in r.json()["detail"]
    # No Content-Length (chunked): the bytes are counted as they arrive.
    body = json.dumps(encode_tree(big)).encode()
    assert len(body) > limit
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    r = requests.post(
        f"{url}/apply",
        data=chunks,
        headers={"Content-Type": "application/json", "Accept": ACCEPT},
        timeout=30,
    )
    assert r.status_code == 413
    assert "`max_body_bytes` = 10485" in r.json()["detail"]
    assert _post(url, "apply", {"inputs": {"x": np.ones(3)}}).status_code == 200


def test_run_folders_only_when_asked(servers):
    x = np.array([1.0, 2.0])
    # Off (default): the Tesseract's MPA logging goes nowhere, and no folder appears.
    served = servers["raising"]
    assert _post(served.url, "apply", {"inputs": {"x": x}}).status_code == 200
    assert _post(served.url, "batched_apply", {"inputs": [{"x": x}]}).status_code == 200
    assert not list(served.out.iterdir())
    for name in ("pytree", "batched_own", "numpy_loop"):
        assert not list(servers[name].out.glob("run_*")), name
    # On: tesseract-runtime's folders, `run_id` included.
    served = servers["raising_debug"]
    r = _post(served.url, "apply?run_id=lx-test", {"inputs": {"x": x}})
    assert r.status_code == 200
    run = served.out / "run_lx-test"
    assert (run / "logs" / "metrics.csv").read_text().count("x0") == 1
    assert (
        "raising: apply at x[0] = 1.0" in (run / "logs" / "tesseract.log").read_text()
    )
    before = len(list(served.out.glob("run_*")))
    r = _post(served.url, "batched_apply", {"inputs": [{"x": x}, {"x": x}]})
    assert r.status_code == 200
    assert len(list(served.out.glob("run_*"))) == before + 1


def _jvp_y(app_or_url, x: np.ndarray) -> np.ndarray:
    payload = _jvp_payload({"x": x}, ["x"], ["y"], {"x": np.ones_like(x)})
    if isinstance(app_or_url, str):
        return _ok(app_or_url, "jacobian_vector_product", payload)["y"]
    status, out = _asgi(app_or_url, "POST", "/jacobian_vector_product", payload)
    assert status == 200, out
    return out["y"]


def _apply(app_or_url, x: np.ndarray) -> None:
    if isinstance(app_or_url, str):
        _ok(app_or_url, "apply", {"inputs": {"x": x}})
    else:
        assert _asgi(app_or_url, "POST", "/apply", {"inputs": {"x": x}})[0] == 200


def test_impure_tesseract_and_the_cache(servers, tmp_session):
    x = np.array([1.0, 2.0, 3.0])
    # Declared impure: no cache, so every JVP sees the current `scale`.
    module = load_module_from_path(_api("stateful"))
    app = create_app(module)
    info = app.state.tesseract_lx.info()
    assert info["pure"] is False
    assert info["linearisation_cache"]["active"] is False
    assert info["batched"]["batched_apply"] == "loop"
    first = _jvp_y(app, x)
    _apply(app, x)
    np.testing.assert_allclose(_jvp_y(app, x), first + 1.0)

    # Undeclared, served with --no-cache: fresh as well.
    url = servers["stateful_nocache"].url
    lx = requests.get(f"{url}/health", timeout=10).json()["tesseract_lx"]
    assert lx["pure"] is True and lx["linearisation_cache"]["active"] is False
    first = _jvp_y(url, x)
    _apply(url, x)
    np.testing.assert_allclose(_jvp_y(url, x), first + 1.0)

    # Undeclared with the cache on: the purity assumption is broken, and the cached
    # linearisation at `x` answers with the `scale` of its day: stale. So does a new
    # point of the same shapes: the linearisation is compiled once per signature,
    # with the `scale` of its first trace as a constant.
    undeclared = tmp_session / "stateful_undeclared" / "tesseract_api.py"
    app = create_app(load_module_from_path(undeclared))
    assert app.state.tesseract_lx.info()["linearisation_cache"]["active"] is True
    first = _jvp_y(app, x)
    _apply(app, x)
    np.testing.assert_allclose(_jvp_y(app, x), first)  # stale
    np.testing.assert_allclose(_jvp_y(app, x + 1.0), first)  # a new point: stale too
    assert app.state.tesseract_lx.info()["linearisation_cache"]["compiles"] == 1


def test_malformed_declaration_stops_the_server(servers):
    served = servers["malformed"]
    assert served.proc.wait(timeout=60) != 0
    log = served.log_text()
    assert "`TESSERACT_LX['precision']` must be one of ('float32', 'float64')" in log
    assert "float16" in log
    module = load_module_from_path(_api("raising"))
    setattr(module, "TESSERACT_LX", {"pure": "yes"})
    with pytest.raises(ValueError, match=re.escape("`TESSERACT_LX['pure']` must be")):
        create_app(module)


def test_tesseract_core_client_round_trip(servers):
    tess = Tesseract.from_url(servers["pytree"].url)
    rng = np.random.default_rng(11)
    inputs = _point("pytree", rng)
    ref = pytree_ref(inputs)
    out = tess.apply(inputs)
    assert_tree_close(out["y"], ref["y"])
    assert_tree_close(out["stats"], ref["stats"])
    assert int(out["count"]) == 5
    ins, outs = ["params.b", "x"], ["stats.norm", "y"]
    tangent = {"params.b": np.float64(0.3), "x": rng.normal(size=5)}
    got = tess.jacobian_vector_product(inputs, ins, outs, tangent)
    want = ref_jvps(
        "pytree", inputs, ins, outs, jax.tree.map(lambda v: v[None], tangent)
    )
    assert_tree_close(got, jax.tree.map(lambda v: v[0], want))
    cot = {"stats.norm": np.float64(0.7), "y": rng.normal(size=5)}
    got = tess.vector_jacobian_product(inputs, ins, outs, cot)
    want = ref_vjps("pytree", inputs, ins, outs, jax.tree.map(lambda v: v[None], cot))
    assert_tree_close(got, jax.tree.map(lambda v: v[0], want))
    jac = tess.jacobian(inputs, ["x"], ["y"])
    fn, primal = _flat_ref("pytree", inputs, ["x"], ["y"])
    assert_tree_close(jac["y"]["x"], jax.jacfwd(fn)(primal)["y"]["x"])


def test_in_process_app_from_threads():
    app, _ = app_for("pytree")
    rng = np.random.default_rng(5)
    points = [_point("pytree", rng) for _ in range(8)]

    def one(point):
        status, out = _asgi(app, "POST", "/apply", {"inputs": point})
        assert status == 200, out
        return out

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one, points))
    for point, out in zip(points, outs, strict=True):
        assert_tree_close(out["y"], pytree_ref(point)["y"])
    status, shapes = _asgi(
        app, "POST", "/abstract_eval", {"inputs": jax.tree.map(_abstract, points[0])}
    )
    assert status == 200, shapes
    assert shapes["y"] == {"shape": [5], "dtype": "float64"}
    status, health = _asgi(app, "GET", "/health")
    assert (
        status == 200 and health["tesseract_lx"]["batched"]["batched_apply"] == "vmap"
    )


def _abstract(x: Any) -> Any:
    if isinstance(x, np.ndarray | np.generic):
        return {"shape": list(np.shape(x)), "dtype": str(x.dtype)}
    return x


def _cache(url: str) -> dict:
    health = requests.get(f"{url}/health", timeout=10).json()
    return health["tesseract_lx"]["linearisation_cache"]


def test_linearisation_cache_hits_and_misses(servers):
    url = servers["pytree"].url
    inputs = _point("pytree", np.random.default_rng(123))
    payload = _jvp_payload(inputs, ["x"], ["y"], {"x": np.ones(5)})

    before = _cache(url)
    first = _ok(url, "jacobian_vector_product", payload)
    after_first = _cache(url)
    assert after_first["misses"] == before["misses"] + 1
    assert after_first["hits"] == before["hits"]

    second = _ok(
        url,
        "jacobian_vector_product",
        {**payload, "tangent_vector": {"x": 2 * np.ones(5)}},
    )
    after_second = _cache(url)
    assert after_second["hits"] == after_first["hits"] + 1
    np.testing.assert_allclose(second["y"], 2 * first["y"], rtol=1e-12)

    # The batched endpoint shares the linearisation of the same point.
    _ok(
        url,
        "batched_jacobian_vector_product",
        {**payload, "tangent_vector": {"x": np.ones((3, 5))}},
    )
    assert _cache(url)["hits"] == after_second["hits"] + 1

    # One bit of difference in the primal point is another point.
    moved = {**inputs, "x": np.nextafter(inputs["x"], np.inf)}
    _ok(url, "jacobian_vector_product", {**payload, "inputs": moved})
    after_moved = _cache(url)
    assert after_moved["misses"] == after_first["misses"] + 1
    assert after_moved["entries"] >= 2 and after_moved["bytes"] > 0
    # ... of the same signature: the compiled linearisation serves it.
    assert after_moved["compiles"] == after_first["compiles"] >= 1


def test_json_encoding_and_dtype_cast(servers):
    url = servers["numpy_loop"].url
    inputs = _point("numpy_loop", np.random.default_rng(0), n=4)
    payload = _jvp_payload(inputs, ["x"], ["y"], {"x": np.ones((2, 4), np.float32)})
    r = _post(
        url, "batched_jacobian_vector_product", payload, accept="application/json"
    )
    assert r.status_code == 200, r.text
    assert r.json()["y"]["data"]["encoding"] == "json"
    y = decode_tree(r.json())["y"]
    assert y.shape == (2, 4) and y.dtype == np.float64


# -- the lean path: binary bodies ------------------------------------------------------


def _binary(url: str, endpoint: str, payload: Any, accept: str = binary.MEDIA_TYPE):
    return requests.post(
        f"{url}/{endpoint}",
        data=binary.encode(payload),
        headers={"Content-Type": binary.MEDIA_TYPE, "Accept": accept},
        timeout=60,
    )


def test_binary_codec_round_trip_and_refusals():
    tree = {
        "a": np.arange(6.0).reshape(2, 3),
        "scalars": [np.float32(2.5), np.array(3, np.int64), np.array(True)],
        "empty": np.zeros((0, 4), np.int32),
        "c": np.array([1 + 2j], np.complex128),
        "meta": {"s": "text", "n": 3, "none": None, "f": 1.5},
    }
    back = binary.decode(binary.encode(tree))
    assert jax.tree.structure(back) == jax.tree.structure(
        jax.tree.map(np.asarray, tree)
    )
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)

    body = binary.encode({"x": np.ones(3)})
    header_size = int.from_bytes(body[4:8], "little")

    def with_header(header: dict) -> bytes:
        raw = json.dumps(header).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        return b"TLX1" + len(raw).to_bytes(4, "little") + raw + body[-24:]

    entry = {"path": ["x"], "shape": [3], "dtype": "<f8"}
    bad = {
        b"TLX": "too short",
        b"JSON" + body[4:]: "not b'TLX1'",
        body[:8] + body[8 : 8 + header_size - 1]: "runs past the body's end",
        with_header({"tree": {"x": None}, "arrays": [{**entry, "dtype": "|O"}]}): (
            "not numeric"
        ),
        with_header({"tree": {"x": None}, "arrays": [{**entry, "dtype": ">f8"}]}): (
            "not numeric, LE"
        ),
        with_header({"tree": {"x": None}, "arrays": [{**entry, "shape": [-3]}]}): (
            "sizes >= 0"
        ),
        with_header({"tree": {"x": None}, "arrays": [{**entry, "shape": [4]}]}): (
            "runs past the end"
        ),
        with_header({"tree": {"x": None}, "arrays": [{**entry, "path": ["y"]}]}): (
            "leaves the tree at 'y'"
        ),
        with_header({"tree": {"x": 1}, "arrays": [entry]}): "does not hold `null`",
    }
    for raw, words in bad.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            binary.decode(raw)


@pytest.mark.parametrize("accept", [binary.MEDIA_TYPE, ACCEPT])
def test_binary_route_answers_as_the_json_route(servers, accept):
    url = servers["pytree"].url
    info = requests.get(f"{url}/health", timeout=10).json()["tesseract_lx"]
    assert info["binary"] == binary.MEDIA_TYPE
    rng = np.random.default_rng(7)
    inputs = _point("pytree", rng)
    jvp = _jvp_payload(
        inputs,
        ["x", "params.a"],
        ["y"],
        {"x": rng.normal(size=5), "params.a": rng.normal(size=3)},
    )
    cases = {
        "apply": {"inputs": inputs},
        "jacobian_vector_product": jvp,
        "vector_jacobian_product": _vjp_payload(
            inputs,
            ["x"],
            ["y", "stats.norm"],
            {"y": rng.normal(size=5), "stats.norm": np.float64(0.5)},
        ),
        "jacobian": {"inputs": inputs, "jac_inputs": ["x"], "jac_outputs": ["y"]},
        "batched_jacobian_vector_product": {
            **jvp,
            "tangent_vector": {
                "x": rng.normal(size=(3, 5)),
                "params.a": rng.normal(size=(3, 3)),
            },
        },
        "batched_apply": {"inputs": [inputs, _point("pytree", rng)]},
    }
    for endpoint, payload in cases.items():
        r = _binary(url, endpoint, payload, accept)
        assert r.status_code == 200, (endpoint, r.text)
        want = _ok(url, endpoint, payload)
        if accept == binary.MEDIA_TYPE:
            assert r.headers["content-type"] == binary.MEDIA_TYPE
            got = binary.decode(r.content)
        else:
            got = decode_tree(r.json())
        got, want = jax.tree.map(np.asarray, (got, want))
        assert jax.tree.structure(got) == jax.tree.structure(want), endpoint
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w, err_msg=endpoint)


def test_binary_route_errors(servers):
    url = servers["raising"].url
    # The schema refuses it: a 422 naming the field, as FastAPI words it.
    r = _binary(url, "apply", {"inputs": {"x": np.ones((2, 2))}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:3] == ["body", "inputs", "x"]
    # The Tesseract raises: its own words.
    r = _binary(url, "apply", {"inputs": {"x": -np.ones(3)}})
    assert r.status_code == 500
    assert r.json()["detail"] == "ValueError: x[0] must be >= 0"
    # Limits hold: over `max_batch`, and over `max_body_bytes`.
    vec = {"x": np.ones((5, 3))}
    r = _binary(
        url,
        "batched_jacobian_vector_product",
        _jvp_payload({"x": np.ones(3)}, ["x"], ["y"], vec),
    )
    assert r.status_code == 422 and "max_batch" in r.text
    r = _binary(url, "apply", {"inputs": {"x": np.ones(4000)}})
    assert r.status_code == 413
    # Malformed, an endpoint without a binary route, a binref outside the inputs.
    r = requests.post(
        f"{url}/apply",
        data=b"TLX1garbage",
        headers={"Content-Type": binary.MEDIA_TYPE},
        timeout=10,
    )
    assert r.status_code == 400 and "malformed binary body" in r.json()["detail"]
    r = _binary(
        url, "abstract_eval", {"inputs": {"x": {"shape": [3], "dtype": "float64"}}}
    )
    assert r.status_code == 415 and "`/apply`" in r.json()["detail"]
    ref = {
        "object_type": "array",
        "shape": [3],
        "dtype": "float64",
        "data": {"buffer": "/etc/passwd", "encoding": "binref"},
    }
    r = _binary(url, "apply", {"inputs": {"x": ref}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
        "body",
        "inputs",
        "x",
    ]
    # A server that keeps run folders has no lean path, and says so.
    debug = servers["raising_debug"].url
    assert (
        requests.get(f"{debug}/health", timeout=10).json()["tesseract_lx"]["binary"]
        is None
    )


def test_client_sends_binary_where_offered(servers):
    url = servers["pytree"].url
    seen = []
    with tlx.Client(url) as client:
        transport = client._transports[0]
        send = transport.send

        def spy(method, endpoint, body=None, headers=None):
            seen.append((endpoint, (headers or {}).get("Content-Type")))
            return send(method, endpoint, body, headers)

        transport.send = spy
        f = tlx.TesseractModule(client)
        inputs = _point("pytree", np.random.default_rng(3))
        out = f(inputs)
        np.testing.assert_allclose(out["y"], pytree_ref(inputs)["y"], rtol=1e-12)
    assert ("apply", binary.MEDIA_TYPE) in seen
    assert all(t == binary.MEDIA_TYPE for e, t in seen if e in COMPUTATIONAL)


def test_linearisation_compiled_once_or_not_at_all():
    """The same JVPs with the compiled linearisation and with `jit=False` (traced
    anew at every point), against the pure-JAX reference."""
    module = load_module_from_path(_api("pytree"))
    rng = np.random.default_rng(11)
    points = [_point("pytree", rng) for _ in range(3)]
    t = rng.normal(size=5)
    for jit in (True, False):
        app = create_app(module, cache=CacheSettings(jit=jit))
        for p in points:
            status, out = _asgi(
                app,
                "POST",
                "/jacobian_vector_product",
                _jvp_payload(p, ["x"], ["y"], {"x": t}),
            )
            assert status == 200
            ref = jax.jvp(lambda x: pytree_ref({**p, "x": x})["y"], (p["x"],), (t,))[1]
            np.testing.assert_allclose(out["y"], ref, rtol=1e-12)
        stats = app.state.tesseract_lx.info()["linearisation_cache"]
        assert stats["jit"] is jit and stats["misses"] == 3
        assert stats["compiles"] == (1 if jit else 0)
