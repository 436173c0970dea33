"""Clear errors: bad input fails before any request; server failures carry details."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
import tesseract_lx as tlx
from tesseract_lx._serve import free_port

from conftest import fresh
from helpers import TRANSPORTS, tree_allclose


parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)


def _bad_inputs(inputs: dict) -> list[tuple[str, dict, type, str]]:
    """(what, inputs, error, message) for the pytree example."""
    params = inputs["params"]
    rest = {k: v for k, v in inputs.items() if k != "x"}
    return [
        (
            "wrong shape",
            {**inputs, "params": {**params, "a": jnp.zeros(4)}},
            ValueError,
            r"`params.a` must be an array of shape \(3,\).*got shape \(4,\)",
        ),
        (
            "wrong rank",
            {**inputs, "x": jnp.zeros((2, 2))},
            ValueError,
            r"`x` must be an array of shape \(\*,\).*got shape \(2, 2\)",
        ),
        (
            "float for an int",
            {**inputs, "power": 2.5},
            TypeError,
            "`power` must be an int",
        ),
        ("missing key", rest, ValueError, "Missing input `x`"),
        ("extra key", {**inputs, "z": 1.0}, ValueError, "Unknown input `z`"),
        (
            "extra nested key",
            {**inputs, "params": {**params, "c": 1.0}},
            ValueError,
            "Unknown input `params.c`",
        ),
        (
            "complex for a float",
            {**inputs, "x": inputs["x"] + 0j},
            TypeError,
            "`x` must have dtype",
        ),
    ]


_CASES = [c[0] for c in _bad_inputs(__import__("references").pytree_inputs())]


@pytest.mark.parametrize("what", _CASES)
@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_bad_input_sends_nothing(client, case, what):
    f = tlx.TesseractModule(client)
    ((_, inputs, error, message),) = [
        c for c in _bad_inputs(case.inputs()) if c[0] == what
    ]
    with pytest.raises(error, match=message):
        f(inputs)
    with pytest.raises(error, match=message):
        jax.jit(lambda: f(inputs))()
    assert not client.stats


@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_derivative_of_non_differentiable_input_sends_nothing(client, case):
    f = tlx.TesseractModule(client)
    inputs = case.inputs()

    def loss(offset):
        return f({**inputs, "offset": offset})["stats"]["norm"]

    msg = "`offset`.*not a differentiable input.*`params.a`, `params.b`, `x`"
    with pytest.raises(ValueError, match=msg):
        jax.grad(loss)(inputs["offset"])
    with pytest.raises(ValueError, match=msg):
        jax.jvp(loss, (inputs["offset"],), (jnp.ones(5),))
    assert not client.stats


@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_bad_batching_name(client):
    with pytest.raises(ValueError, match="`batching='fastest'` is not a batching"):
        tlx.TesseractModule(client, batching="fastest")
    assert not client.stats


#
# Errors from the server
#


@pytest.mark.parametrize("tesseract", ["pytree"])
@parametrize_transport
def test_422_names_the_field(client, case):
    inputs = case.inputs()
    payload = {"inputs": {**inputs, "params": {"a": inputs["params"]["a"]}}}
    with pytest.raises(tlx.TesseractValidationError) as info:
        client.request("apply", payload)
    err = info.value
    assert isinstance(err, tlx.TesseractError)
    assert err.endpoint == "apply"
    assert err.status == 422
    assert "params.b" in err.message
    assert "params.b" in str(err) and "/apply" in str(err)
    assert client.stats == {"apply": 1}


@pytest.mark.parametrize("tesseract", ["bratu"])
@parametrize_transport
def test_unknown_endpoint(client, case, transport):
    with pytest.raises(tlx.TesseractError) as info:
        client.request("no_such_endpoint", {"inputs": case.inputs()})
    assert info.value.endpoint == "no_such_endpoint"
    assert info.value.status in (404, 405)


_FAILING_API = """
from pydantic import BaseModel
from tesseract_core.runtime import Array, Float64


class InputSchema(BaseModel):
    x: Array[(None,), Float64]


class OutputSchema(BaseModel):
    y: Array[(None,), Float64]


def apply(inputs: InputSchema) -> OutputSchema:
    raise RuntimeError("the solver diverged (marker 7411)")
"""


@pytest.fixture(scope="module")
def failing_api(tmp_path_factory):
    path = tmp_path_factory.mktemp("failing") / "tesseract_api.py"
    path.write_text(_FAILING_API)
    return path


@pytest.mark.parametrize("transport", ["stock", "inprocess"])
def test_5xx_carries_the_server_message(failing_api, transport):
    if transport == "inprocess":
        client = tlx.Client.from_api(failing_api)
        _check_5xx(client)
    else:
        with tlx.serve(failing_api, server="tesseract-runtime") as client:
            _check_5xx(client)


def _check_5xx(client: tlx.Client) -> None:
    f = tlx.TesseractModule(client)
    with pytest.raises(tlx.TesseractServerError) as info:
        f({"x": jnp.ones(3)})
    err = info.value
    assert err.endpoint == "apply"
    assert err.status == 500
    if client.urls[0].startswith("http"):
        # tesseract-runtime logs the traceback and answers with a generic text.
        assert err.message.startswith("Internal Server Error (the server did not")
        assert "TESSERACT_DEBUG=1" in err.message
    else:
        assert "RuntimeError: the solver diverged (marker 7411)" in err.message
    assert client.stats == {"apply": 1}


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    client = tlx.Client(url, timeout=5.0)
    with pytest.raises(tlx.TesseractConnectionError, match=url) as info:
        client.request("apply", {"inputs": {}})
    assert info.value.status is None
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(tlx.TesseractConnectionError, match=url):
        tlx.TesseractModule(client)({"x": jnp.ones(3)})


def test_bad_url():
    with pytest.raises(ValueError, match="http"):
        tlx.Client("127.0.0.1:8000")


@pytest.mark.parametrize("server", ["tesseract-runtime", "tesseract-lx"])
def test_server_that_fails_to_start_shows_its_stderr(tmp_path, server):
    path = tmp_path / "tesseract_api.py"
    path.write_text("raise ImportError('cannot import the mesher (marker 5120)')\n")
    with pytest.raises(RuntimeError, match="marker 5120"):
        with tlx.serve(path, server=server, startup_timeout=60.0):
            pass


def test_serve_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        with tlx.serve(tmp_path / "nothing.py"):
            pass


def test_health_of_a_served_tesseract(served):
    from helpers import CASES

    client = served.get(CASES["bratu"].path, "stock")
    assert client.health()
    assert requests.get(f"{client.urls[0]}/health", timeout=5).status_code == 200


FLOAT32 = Path(__file__).parent / "tesseracts" / "float32_compute" / "tesseract_api.py"


@pytest.fixture(scope="module", params=["tesseract-lx", "tesseract-runtime"])
def float32_server(request):
    with tlx.serve(FLOAT32, server=request.param) as client:
        yield request.param, client


def test_float32_precision_from_a_float64_schema(float32_server):
    """Our server says it computes in float32: refused before any request. A stock
    server says nothing: its answers are taken as they come, never second-guessed."""
    server, client = float32_server[0], fresh(float32_server[1])
    f = tlx.TesseractModule(client, batching="sequential")
    x = jnp.linspace(0.1, 2.0, 8)
    if server == "tesseract-lx":
        with pytest.raises(tlx.TesseractDtypeError, match="computes in float32"):
            f({"x": x})
        assert client.stats == {}
        loose = tlx.TesseractModule(client, strict_dtype=False)
        with pytest.warns(UserWarning, match="jax_enable_x64"):
            y = loose({"x": x})["y"]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = f({"x": x})["y"]
    assert y.dtype == jnp.float64
    assert jnp.allclose(y, jnp.sin(x), rtol=1e-6)
    assert not jnp.allclose(y, jnp.sin(x), rtol=1e-12, atol=0)
    assert client.stats == {"apply": 1}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", ["stock", "tlx"])
def test_float32_origin_data_through_a_float64_tesseract(client, case, transport):
    """float64 data read from a float32 file is every bit float64 data: no alarm."""
    inputs = {
        k: jnp.asarray(np.asarray(v, np.float32).astype(np.float64))
        for k, v in case.inputs().items()
    }
    f = tlx.TesseractModule(client)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = f(inputs)
        grad = jax.grad(case.loss(f, inputs))(case.split(inputs)[0])
    ref = case.ref(inputs)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype, out, ref))
    assert tree_allclose(out, ref, rtol=1e-12)
    ref_grad = jax.grad(case.loss(case.ref, inputs))(case.split(inputs)[0])
    assert tree_allclose(grad, ref_grad, rtol=1e-10)
