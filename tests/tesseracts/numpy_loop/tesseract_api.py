"""Plain NumPy, no JAX: a tesseract-lx server computes batches with a loop.

y = a sin(x),  s = sum(x**2)
"""

from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]
    a: Differentiable[Float64]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]
    s: Differentiable[Float64]


def apply(inputs: InputSchema) -> OutputSchema:
    x, a = np.asarray(inputs.x), float(inputs.a)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
    return OutputSchema(y=a * np.sin(x), s=np.sum(x**2))  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def _zero(v):
    return np.zeros_like(np.asarray(v, dtype=np.float64))


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    x, a = np.asarray(inputs.x), float(inputs.a)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
    dx = np.asarray(tangent_vector.get("x", _zero(x)))
    da = float(np.asarray(tangent_vector.get("a", 0.0)))
    out = {"y": a * np.cos(x) * dx + np.sin(x) * da, "s": np.float64(2 * x @ dx)}
    return {k: out[k] for k in jvp_outputs}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    x, a = np.asarray(inputs.x), float(inputs.a)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
    cy = np.asarray(cotangent_vector.get("y", _zero(x)))
    cs = float(np.asarray(cotangent_vector.get("s", 0.0)))
    out = {"x": a * np.cos(x) * cy + 2 * x * cs, "a": np.float64(np.sin(x) @ cy)}
    return {k: out[k] for k in vjp_inputs}
