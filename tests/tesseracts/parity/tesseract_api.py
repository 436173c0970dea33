"""A Tesseract failing the ways tesseract-jax's callers expect (tests/test_parity.py).

    y = sqrt(x) * (1 + v),     backend = "reference" (x <= 100), "fallback" (x > 100)

`x` must be positive: a bound checked while the payload is parsed (a 422 naming it),
which lets abstract values (`ShapeDType`) through. `v` has a fixed shape. `mode="raise"`
fails inside `apply`. `backend` is a string output that `/abstract_eval` always
reports as "reference": past x = 100, `/apply` answers otherwise.
"""

from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64, ShapeDType


def _positive(value: Any) -> Any:
    if not isinstance(value, ShapeDType) and value <= 0:
        raise ValueError(f"x must be strictly positive, got {value}")
    return value


class InputSchema(BaseModel):
    x: Annotated[Differentiable[Float64], AfterValidator(_positive)]
    v: Array[(3,), Float64]
    mode: str = "ok"


class OutputSchema(BaseModel):
    y: Differentiable[Array[(3,), Float64]]
    backend: str


def apply(inputs: InputSchema) -> OutputSchema:
    if inputs.mode == "raise":
        raise RuntimeError("a failure inside apply, on purpose")
    x = float(inputs.x)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
    y = np.sqrt(x) * (1.0 + np.asarray(inputs.v))
    return OutputSchema(y=y, backend="fallback" if x > 100 else "reference")


def _dy_dx(inputs: InputSchema) -> np.ndarray:
    return 0.5 / np.sqrt(float(inputs.x)) * (1.0 + np.asarray(inputs.v))  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def jacobian(inputs: InputSchema, jac_inputs: set[str], jac_outputs: set[str]):
    return {"y": {"x": _dy_dx(inputs)}}


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    return {"y": _dy_dx(inputs) * np.asarray(tangent_vector["x"])}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    return {"x": np.sum(_dy_dx(inputs) * np.asarray(cotangent_vector["y"]))}


def abstract_eval(abstract_inputs):
    return {"y": ShapeDType(shape=(3,), dtype="float64"), "backend": "reference"}
