"""Clear errors: bad input fails before any request; server failures carry details."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import requests
import tesseract_lx as tlx
from tesseract_lx._serve import free_port

from helpers import TRANSPORTS


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
            r"`params.a` must have shape \(3,\)",
        ),
        (
            "wrong rank",
            {**inputs, "x": jnp.zeros((2, 2))},
            ValueError,
            "`x` must have shape",
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
        assert err.message == "Internal Server Error"
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
    if server == "tesseract-lx":
        from conftest import HAVE_TLX_SERVER, NO_TLX_SERVER

        if not HAVE_TLX_SERVER:
            pytest.skip(NO_TLX_SERVER)
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


@pytest.fixture(scope="module")
def float32_server():
    with tlx.serve(FLOAT32, server="tesseract-runtime") as client:
        yield client


def test_float32_precision_from_a_float64_schema_raises(float32_server):
    f = tlx.TesseractModule(float32_server)
    x = jnp.linspace(0.1, 2.0, 8)
    with pytest.raises(tlx.TesseractDtypeError, match="float32 precision"):
        f({"x": x})
    loose = tlx.TesseractModule(float32_server, strict_dtype=False)
    with pytest.warns(UserWarning, match="jax_enable_x64"):
        y = loose({"x": x})["y"]
    assert y.dtype == jnp.float64
    assert jnp.allclose(y, jnp.sin(x), rtol=1e-6)
