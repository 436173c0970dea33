"""The 2-D Bratu residual of `examples/tesseracts/bratu`, in plain NumPy.

    residual = (4u - u_N - u_S - u_E - u_W) / h^2 - k exp(u) - f

Its JVP and VJP are NumPy functions written by hand (no JAX, no `/jacobian`): a
Tesseract whose derivatives do not trace under JAX. A tesseract-lx server computes
its batches by looping in process, and runs `/linear_solve` by calling its JVP (VJP)
at every Krylov iteration, in process.
"""

from typing import Any

import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64


class InputSchema(BaseModel):
    u: Differentiable[Array[(None, None), Float64]]
    k: Differentiable[Float64]
    f: Differentiable[Array[(None, None), Float64]]


class OutputSchema(BaseModel):
    residual: Differentiable[Array[(None, None), Float64]]


def _neg_laplacian(u: np.ndarray) -> np.ndarray:
    n = u.shape[0]
    p = np.pad(u, 1)
    neighbours = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4 * u - neighbours) * (n + 1) ** 2


def apply(inputs: InputSchema) -> OutputSchema:
    u, k, f = np.asarray(inputs.u), float(inputs.k), np.asarray(inputs.f)
    return OutputSchema(residual=_neg_laplacian(u) - k * np.exp(u) - f)


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    u, k = np.asarray(inputs.u), float(inputs.k)
    zero = np.zeros_like(u)
    du = np.asarray(tangent_vector.get("u", zero))
    dk = float(np.asarray(tangent_vector.get("k", 0.0)))
    df = np.asarray(tangent_vector.get("f", zero))
    out = _neg_laplacian(du) - k * np.exp(u) * du - dk * np.exp(u) - df
    return {"residual": out}


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    u, k = np.asarray(inputs.u), float(inputs.k)
    ct = np.asarray(cotangent_vector["residual"])
    # The 5-point Laplacian with zero boundary is symmetric.
    out = {
        "u": _neg_laplacian(ct) - k * np.exp(u) * ct,
        "k": np.float64(-np.sum(np.exp(u) * ct)),
        "f": -ct,
    }
    return {p: out[p] for p in vjp_inputs}


def abstract_eval(abstract_inputs):
    """The residual has the shape of `u`."""
    return {"residual": {"shape": tuple(abstract_inputs.u.shape), "dtype": "float64"}}
