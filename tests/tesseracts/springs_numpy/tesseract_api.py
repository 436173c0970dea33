"""The chain of springs of `tests/tesseracts/springs`, in plain NumPy, with its JVP
and VJP written by hand (no JAX, no `/jacobian`):

    energy   = k/2 x^T L x + c/4 sum(x^4) - f . x
    residual = k L x + c x^3 - f
"""

from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]
    k: Differentiable[Float64]
    c: Differentiable[Float64]
    f: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    residual: Differentiable[Array[(None,), Float64]]
    energy: Differentiable[Float64]


def _lap(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1)
    return 2 * x - p[:-2] - p[2:]


def _point(inputs: InputSchema):
    x, f = np.asarray(inputs.x, np.float64), np.asarray(inputs.f, np.float64)
    return x, float(inputs.k), float(inputs.c), f  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only


def apply(inputs: InputSchema) -> OutputSchema:
    x, k, c, f = _point(inputs)
    return OutputSchema(
        residual=k * _lap(x) + c * x**3 - f,  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
        energy=0.5 * k * x @ _lap(x) + 0.25 * c * np.sum(x**4) - f @ x,  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
    )


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    x, k, c, f = _point(inputs)
    zero = np.zeros_like(x)
    dx = np.asarray(tangent_vector.get("x", zero), np.float64)
    dk = float(np.asarray(tangent_vector.get("k", 0.0)))
    dc = float(np.asarray(tangent_vector.get("c", 0.0)))
    df = np.asarray(tangent_vector.get("f", zero), np.float64)
    residual = k * _lap(x) + c * x**3 - f
    out = {
        "residual": k * _lap(dx) + 3 * c * x**2 * dx + dk * _lap(x) + dc * x**3 - df,
        "energy": np.float64(
            residual @ dx + 0.5 * dk * x @ _lap(x) + 0.25 * dc * np.sum(x**4) - df @ x
        ),
    }
    return {p: out[p] for p in jvp_outputs}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    x, k, c, f = _point(inputs)
    zero = np.zeros_like(x)
    r = np.asarray(cotangent_vector.get("residual", zero), np.float64)
    e = float(np.asarray(cotangent_vector.get("energy", 0.0)))
    residual = k * _lap(x) + c * x**3 - f
    # L is symmetric, so the residual's Jacobian in x is too.
    out = {
        "x": k * _lap(r) + 3 * c * x**2 * r + e * residual,
        "k": np.float64(_lap(x) @ r + e * 0.5 * x @ _lap(x)),
        "c": np.float64(x**3 @ r + e * 0.25 * np.sum(x**4)),
        "f": -r - e * x,
    }
    return {p: out[p] for p in vjp_inputs}


def abstract_eval(abstract_inputs):
    """The residual has the shape of `x`; the energy is a scalar."""
    n = tuple(abstract_inputs.x.shape)
    return {
        "residual": {"shape": n, "dtype": "float64"},
        "energy": {"shape": (), "dtype": "float64"},
    }
