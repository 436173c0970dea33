"""A JAX Tesseract that is NOT a pure function of its inputs, and says so.

    y = scale x,   `scale` a module-level number that grows by one on every `/apply`

Its JVP and VJP read the current `scale`. A linearisation cached at a point would
keep the `scale` of the moment it was made: `TESSERACT_LX = {"pure": False}` tells a
tesseract-lx server to cache nothing (and to loop over `/batched_apply` points, one
call each).
"""

from typing import Any

import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


TESSERACT_LX = {"pure": False}

scale = 1.0


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]


def apply(inputs: InputSchema) -> OutputSchema:
    global scale
    y = scale * jnp.asarray(inputs.x)
    scale += 1.0
    return OutputSchema(y=y)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    return {"y": scale * jnp.asarray(tangent_vector["x"])}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    return {"x": scale * jnp.asarray(cotangent_vector["y"])}
