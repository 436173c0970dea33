"""Shifted 2-D Poisson operator.

On an `N x N` grid of interior points with zero Dirichlet boundary and `h = 1/(N+1)`,

    y = (4x - x_N - x_S - x_E - x_W) / h^2 + c x,

where neighbours outside the grid are 0. This is the Bratu Laplacian plus `c I`:
linear in `x`, symmetric positive definite for `c >= 0`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jacobian,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class InputSchema(BaseModel):
    x: Differentiable[Array[(None, None), Float64]]
    c: Differentiable[Float64]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None, None), Float64]]


def _neg_laplacian(x):
    n = x.shape[0]
    p = jnp.pad(x, 1)
    neighbours = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4 * x - neighbours) * (n + 1) ** 2


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    x, c = inputs["x"], inputs["c"]
    return {"y": _neg_laplacian(x) + c * x}


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(**jax_apply(apply_jit, inputs))


def jacobian(inputs: InputSchema, jac_inputs: set[str], jac_outputs: set[str]):
    return jax_jacobian(apply_jit, inputs, jac_inputs, jac_outputs)


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
):
    return jax_jvp(apply_jit, inputs, jvp_inputs, jvp_outputs, tangent_vector)


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    return jax_vjp(apply_jit, inputs, vjp_inputs, vjp_outputs, cotangent_vector)


def abstract_eval(abstract_inputs):
    return jax_abstract_eval(apply_jit, abstract_inputs)
