"""Plain NumPy, raising on part of its domain, and logging through tesseract-core's MPA.

    y = 2 x        (x[0] >= 0);   ValueError("x[0] must be >= 0") otherwise

in `apply`, `jacobian_vector_product` and `vector_jacobian_product`. `apply` logs a
metric and a parameter (`tesseract_core.runtime.experimental.log_metric`, ...)
and prints a line: with run folders they land in `run_<id>/`, without them
nowhere, and neither may fail.
"""

from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.experimental import log_metric, log_parameter


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]


def _check(inputs: InputSchema) -> np.ndarray:
    x = np.asarray(inputs.x)
    if x[0] < 0:
        raise ValueError("x[0] must be >= 0")
    return x


def apply(inputs: InputSchema) -> OutputSchema:
    x = _check(inputs)
    log_parameter("n", int(x.size))
    log_metric("x0", float(x[0]))
    print("raising: apply at x[0] =", float(x[0]))
    return OutputSchema(y=2 * x)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    _check(inputs)
    return {"y": 2 * np.asarray(tangent_vector["x"])}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    _check(inputs)
    return {"x": 2 * np.asarray(cotangent_vector["y"])}
