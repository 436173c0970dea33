"""Plain Python `float`s in and out (JSON numbers, not arrays), in NumPy only.

    y    = scale * x
    peak = max(y)          (`scale` when `x` is empty)

JSON has no NaN or Infinity, so these fields test how non-finite numbers travel.
"""

from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]
    scale: float = 1.0


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]
    peak: float


def apply(inputs: InputSchema) -> OutputSchema:
    y = inputs.scale * np.asarray(inputs.x)
    return OutputSchema(y=y, peak=float(np.max(y)) if y.size else inputs.scale)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    return {"y": inputs.scale * np.asarray(tangent_vector["x"])}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    return {"x": inputs.scale * np.asarray(cotangent_vector["y"])}
