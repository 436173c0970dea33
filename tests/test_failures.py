"""A Tesseract that raises: its own words reach the user, eagerly, under `jit`, in
a batch of points and inside a GMRES solve, on every transport.

`tests/tesseracts/raising` computes `y = 2 x` and raises `ValueError("x[0] must be
>= 0")` otherwise, in `apply`, its JVP and its VJP. It has no `/abstract_eval`: one
eager call at a good point teaches the client its output shapes, as a user would.
"""

import logging

import jax
import jax.numpy as jnp
import lineax as lx
import pytest
import tesseract_lx as tlx

from conftest import fresh
from helpers import has_batched, PARTIAL, TRANSPORTS


RAISING = PARTIAL / "raising" / "tesseract_api.py"
GOOD = jnp.array([1.0, 2.0, 3.0])
BAD = jnp.array([-1.0, 2.0, 3.0])


@pytest.fixture(params=TRANSPORTS)
def raising(served, request):
    """`(transport, client)` of the raising Tesseract."""
    client = fresh(served.get(RAISING, request.param))
    # The server logs the Tesseract's traceback; in process, that is this process.
    logging.getLogger("tesseract_lx.server").disabled = True
    yield request.param, client
    logging.getLogger("tesseract_lx.server").disabled = False


def _says(text: str, client: tlx.Client, transport: str, endpoint: str) -> None:
    """`text` names the endpoint, URL and status, and what the server said."""
    assert f"`/{endpoint}` at {client.urls[0]} failed (500): " in text
    if transport == "stock":
        # tesseract-runtime answers a bare "Internal Server Error": say how to see more.
        assert "Internal Server Error" in text and "TESSERACT_DEBUG=1" in text
    else:
        assert "ValueError: x[0] must be >= 0" in text


def _learnt(client: tlx.Client) -> tlx.TesseractModule:
    f = tlx.TesseractModule(client)
    assert jnp.array_equal(f({"x": GOOD})["y"], 2 * GOOD)
    client.stats.clear()
    return f


def test_eager_error_is_typed(raising):
    transport, client = raising
    f = tlx.TesseractModule(client)
    with pytest.raises(tlx.TesseractServerError) as info:
        f({"x": BAD})
    err = info.value
    assert (err.endpoint, err.status, err.url) == ("apply", 500, client.urls[0])
    if transport != "stock":
        assert err.error_type == "ValueError"
        assert err.message == "ValueError: x[0] must be >= 0"
    _says(str(err), client, transport, "apply")
    assert client.last_error is err
    assert client.stats == {"apply": 1}


def test_error_under_jit_keeps_its_text(raising):
    transport, client = raising
    f = _learnt(client)
    # JAX re-raises a failed host callback as its own runtime error, with the text.
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(jax.jit(f)({"x": BAD}))
    _says(str(info.value), client, transport, "apply")
    assert isinstance(client.last_error, tlx.TesseractServerError)
    assert client.last_error.endpoint == "apply"
    assert client.stats == {"apply": 1}


def test_error_inside_a_gmres_solve(raising):
    transport, client = raising
    f = _learnt(client)
    J = tlx.TesseractJacobianOperator(f, {"x": BAD}, wrt="x", of="y")
    solver = lx.GMRES(rtol=1e-8, atol=1e-8)
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(lx.linear_solve(J, jnp.ones(3), solver).value)
    _says(str(info.value), client, transport, "jacobian_vector_product")
    assert client.last_error.endpoint == "jacobian_vector_product"
    # The first mat-vec fails, and the solve stops there.
    assert client.stats == {"jacobian_vector_product": 1}


def test_error_in_a_batch_of_points(raising):
    transport, client = raising
    f = _learnt(client)
    points = jnp.stack([GOOD, BAD, GOOD + 1])
    with pytest.raises(tlx.TesseractServerError) as info:
        jax.vmap(lambda x: f({"x": x}))(points)
    endpoint = "batched_apply" if has_batched(transport) else "apply"
    _says(str(info.value), client, transport, endpoint)
    # Our server loops over the points of this NumPy Tesseract, in one request; a
    # stock server gets them one by one, and the second fails.
    assert client.stats == {endpoint: 1 if has_batched(transport) else 2}


def test_error_in_a_transposed_mat_vec(raising):
    transport, client = raising
    f = _learnt(client)
    J = tlx.TesseractJacobianOperator(f, {"x": BAD}, wrt="x", of="y")
    with pytest.raises(tlx.TesseractServerError) as info:
        J.T.mv(jnp.ones(3))
    _says(str(info.value), client, transport, "vector_jacobian_product")
    assert client.stats == {"vector_jacobian_product": 1}
