"""Declares float64 but computes in float32: it never enables `jax_enable_x64`.

tesseract-core casts the float32 results to the declared float64, so only their
precision gives the loss away.
"""

import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(y=jnp.sin(jnp.asarray(inputs.x, jnp.float32)))  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
