"""The tesseract-lx server: batched endpoints, their modes, validation, the cache.

Real servers (`python -m tesseract_lx._server.cli serve ...`) on free 127.0.0.1 ports, started
once per session and all at once; requests with plain `requests`.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from tesseract_core.runtime.core import load_module_from_path
from tesseract_lx._wire.encoding import ACCEPT, decode_tree, encode_tree
from tesseract_lx._server.endpoints import batched_modes, create_endpoints, lx_info


ROOT = Path(__file__).resolve().parents[1]
APIS = {
    "pytree": ROOT / "examples/tesseracts/pytree/tesseract_api.py",
    "own": ROOT / "tests/tesseracts/batched_own/tesseract_api.py",
    "loop": ROOT / "tests/tesseracts/numpy_loop/tesseract_api.py",
}
EXPECTED_MODE = {"pytree": "vmap", "own": "own", "loop": "loop"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    procs, urls = [], {}
    try:
        for name, api in APIS.items():
            port = _free_port()
            env = {
                **os.environ,
                "TESSERACT_OUTPUT_PATH": str(tmp_path_factory.mktemp(f"out_{name}")),
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT), os.environ.get("PYTHONPATH", "")]
                ),
            }
            cmd = [sys.executable, "-m", "tesseract_lx._server.cli", "serve", str(api)]
            cmd += ["--port", str(port)]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )
            urls[name] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        for (name, url), proc in zip(urls.items(), procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} server died: {proc.stderr.read().decode()}"
                    )
                try:
                    if requests.get(f"{url}/health", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} server did not start")
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


# Each case: inputs, differentiable input shapes, differentiable output shapes.
def _case(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if name == "pytree":
        inputs = {
            "params": {"a": rng.normal(size=3), "b": np.float64(rng.normal())},
            "x": rng.normal(size=5),
            "offset": rng.normal(size=5),
            "power": 2,
        }
        return (
            inputs,
            {"params.a": (3,), "params.b": (), "x": (5,)},
            {
                "y": (5,),
                "stats.norm": (),
                "stats.mean": (),
            },
        )
    inputs = {"x": rng.normal(size=4), "a": np.float64(rng.normal())}
    return inputs, {"x": (4,), "a": ()}, {"y": (4,), "s": ()}


def _post(url: str, endpoint: str, payload: dict) -> requests.Response:
    return requests.post(
        f"{url}/{endpoint}",
        json=encode_tree(payload),
        headers={"Accept": ACCEPT},
        timeout=30,
    )


def _ok(url: str, endpoint: str, payload: dict) -> dict:
    r = _post(url, endpoint, payload)
    assert r.status_code == 200, r.text
    return decode_tree(r.json())


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


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(APIS))
def test_batched_equals_unbatched(servers, name, k):
    url = servers[name]
    inputs, in_shapes, out_shapes = _case(name)
    rng = np.random.default_rng(1)
    ins, outs = sorted(in_shapes), sorted(out_shapes)

    tangents = {p: rng.normal(size=(k, *s)) for p, s in in_shapes.items()}
    batched = _ok(
        url,
        "batched_jacobian_vector_product",
        _jvp_payload(inputs, ins, outs, tangents),
    )
    assert set(batched) == set(outs)
    for i in range(k):
        one = {p: v[i] for p, v in tangents.items()}
        ref = _ok(url, "jacobian_vector_product", _jvp_payload(inputs, ins, outs, one))
        for o in outs:
            assert batched[o].shape == (k, *out_shapes[o])
            assert batched[o].dtype == np.float64
            np.testing.assert_allclose(batched[o][i], ref[o], rtol=1e-10, atol=1e-10)

    cotangents = {o: rng.normal(size=(k, *s)) for o, s in out_shapes.items()}
    batched = _ok(
        url,
        "batched_vector_jacobian_product",
        _vjp_payload(inputs, ins, outs, cotangents),
    )
    assert set(batched) == set(ins)
    for i in range(k):
        one = {o: v[i] for o, v in cotangents.items()}
        ref = _ok(url, "vector_jacobian_product", _vjp_payload(inputs, ins, outs, one))
        for p in ins:
            assert batched[p].shape == (k, *in_shapes[p])
            np.testing.assert_allclose(batched[p][i], ref[p], rtol=1e-10, atol=1e-10)


def test_openapi_lists_endpoints_and_modes(servers):
    for name, url in servers.items():
        schema = requests.get(f"{url}/openapi.json", timeout=10).json()
        assert "/batched_jacobian_vector_product" in schema["paths"]
        assert "/batched_vector_jacobian_product" in schema["paths"]
        assert "/jacobian_vector_product" in schema["paths"]
        lx = schema["x-tesseract-lx"]
        assert lx["batched"] == {
            "batched_jacobian_vector_product": EXPECTED_MODE[name],
            "batched_vector_jacobian_product": EXPECTED_MODE[name],
        }
        assert {"enabled", "max_entries", "max_bytes"} <= set(lx["linearisation_cache"])
        assert lx["version"]
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok"
        assert health["tesseract_lx"]["batched"] == lx["batched"]


@pytest.mark.parametrize(
    "name, field, vec, message",
    [
        (
            "pytree",
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "params.b": np.ones(3), "x": np.ones((2, 5))},
            "`tangent_vector.params.b` has batch size 3",
        ),
        (
            "pytree",
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "params.b": np.ones(2), "x": np.ones((2, 6))},
            "`tangent_vector.x` has shape (2, 6); expected (2, 5)",
        ),
        (
            "pytree",
            "tangent_vector",
            {"params.a": np.ones((2, 3)), "x": np.ones((2, 5))},
            "`tangent_vector` must have exactly the keys of `jvp_inputs`",
        ),
        (
            "pytree",
            "cotangent_vector",
            {"y": np.ones((2, 4)), "stats.norm": np.ones(2), "stats.mean": np.ones(2)},
            "`cotangent_vector.y` has shape (2, 4); expected (2, 5)",
        ),
        (
            "pytree",
            "cotangent_vector",
            {"y": np.ones((2, 5)), "stats.norm": np.ones(1), "stats.mean": np.ones(2)},
            "has batch size",
        ),
        (
            "loop",
            "tangent_vector",
            {"x": np.ones((2, 4)), "a": np.ones(())},
            "`tangent_vector.a` needs a leading batch axis",
        ),
    ],
)
def test_bad_batched_payload_is_422(servers, name, field, vec, message):
    inputs, in_shapes, out_shapes = _case(name)
    ins, outs = sorted(in_shapes), sorted(out_shapes)
    if field == "tangent_vector":
        r = _post(
            servers[name],
            "batched_jacobian_vector_product",
            _jvp_payload(inputs, ins, outs, vec),
        )
    else:
        r = _post(
            servers[name],
            "batched_vector_jacobian_product",
            _vjp_payload(inputs, ins, outs, vec),
        )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][-1] == field
    assert message in error["msg"]


def _cache(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json()["tesseract_lx"][
        "linearisation_cache"
    ]


def test_linearisation_cache_hits_and_misses(servers):
    url = servers["pytree"]
    inputs, in_shapes, out_shapes = _case("pytree", seed=123)
    ins, outs = ["x"], ["y"]
    payload = _jvp_payload(inputs, ins, outs, {"x": np.ones(5)})

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
    assert after_second["misses"] == after_first["misses"]
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


def test_in_process_endpoints():
    api = load_module_from_path(APIS["own"])
    endpoints = create_endpoints(api)
    by_name = {fn.__name__: fn for fn in endpoints}
    assert {"apply", "jacobian_vector_product", "health", "abstract_eval"} <= set(
        by_name
    )
    assert batched_modes(endpoints) == {
        "batched_jacobian_vector_product": "own",
        "batched_vector_jacobian_product": "own",
    }
    assert lx_info(endpoints)["linearisation_cache"]["active"]

    def call(name, payload):
        fn = by_name[name]
        return fn(fn.__annotations__["payload"].model_validate(payload)).model_dump()

    inputs, in_shapes, out_shapes = _case("own")
    ins, outs = sorted(in_shapes), sorted(out_shapes)
    tangents = {
        p: np.random.default_rng(2).normal(size=(3, *s)) for p, s in in_shapes.items()
    }
    calls = api.CALLS["batched_jacobian_vector_product"]
    batched = call(
        "batched_jacobian_vector_product", _jvp_payload(inputs, ins, outs, tangents)
    )
    assert api.CALLS["batched_jacobian_vector_product"] == calls + 1
    for i in range(3):
        ref = call(
            "jacobian_vector_product",
            _jvp_payload(inputs, ins, outs, {p: v[i] for p, v in tangents.items()}),
        )
        for o in outs:
            np.testing.assert_allclose(batched[o][i], ref[o], rtol=1e-10, atol=1e-10)
    assert by_name["health"]()["tesseract_lx"]["batched"] == batched_modes(endpoints)


def test_in_process_vmap_without_cache():
    api = load_module_from_path(APIS["pytree"])
    endpoints = create_endpoints(api, cache=False)
    by_name = {fn.__name__: fn for fn in endpoints}
    assert not lx_info(endpoints)["linearisation_cache"]["active"]
    fn = by_name["batched_vector_jacobian_product"]
    inputs, in_shapes, out_shapes = _case("pytree")
    cot = {o: np.ones((2, *s)) for o, s in out_shapes.items()}
    out = fn(
        fn.__annotations__["payload"].model_validate(
            _vjp_payload(inputs, sorted(in_shapes), sorted(out_shapes), cot)
        )
    ).model_dump()
    assert batched_modes(endpoints)["batched_vector_jacobian_product"] == "vmap"
    assert out["x"].shape == (2, 5)
    np.testing.assert_allclose(out["x"][0], out["x"][1])


def test_json_encoding_and_dtype_cast(servers):
    url = servers["loop"]
    inputs, in_shapes, out_shapes = _case("loop")
    payload = _jvp_payload(
        inputs,
        ["x"],
        ["y"],
        {"x": np.ones((2, 4), np.float32)},
    )
    r = requests.post(
        f"{url}/batched_jacobian_vector_product",
        json=encode_tree(payload),
        headers={"Accept": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["y"]["data"]["encoding"] == "json"
    y = decode_tree(r.json())["y"]
    assert y.shape == (2, 4) and y.dtype == np.float64


def test_untraceable_jvp_falls_back_to_loop():
    api = load_module_from_path(APIS["loop"])
    # Pretend it uses JAX: tracing is tried, fails (NumPy code), is remembered.
    api.jax = __import__("jax")
    endpoints = create_endpoints(api)
    assert batched_modes(endpoints)["batched_jacobian_vector_product"] == "vmap"
    fn = {f.__name__: f for f in endpoints}["batched_jacobian_vector_product"]
    inputs, in_shapes, out_shapes = _case("loop")
    payload = _jvp_payload(inputs, ["x"], ["y", "s"], {"x": np.ones((3, 4))})
    out = fn(fn.__annotations__["payload"].model_validate(payload)).model_dump()
    assert out["y"].shape == (3, 4)
    assert batched_modes(endpoints)["batched_jacobian_vector_product"] == "loop"
    assert lx_info(endpoints)["linearisation_cache"]["fallbacks"] == 1
