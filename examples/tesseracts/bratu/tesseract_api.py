"""Residual of the 2-D Bratu problem.

On an `N x N` grid of interior points with zero Dirichlet boundary and `h = 1/(N+1)`,

    residual = (4u - u_N - u_S - u_E - u_W) / h^2 - k exp(u) - f,

where neighbours outside the grid are 0 and `k` is the Bratu parameter lambda.
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
    u: Differentiable[Array[(None, None), Float64]]
    k: Differentiable[Float64]
    f: Differentiable[Array[(None, None), Float64]]


class OutputSchema(BaseModel):
    residual: Differentiable[Array[(None, None), Float64]]


def _neg_laplacian(u):
    n = u.shape[0]
    p = jnp.pad(u, 1)
    neighbours = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4 * u - neighbours) * (n + 1) ** 2


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    u, k, f = inputs["u"], inputs["k"], inputs["f"]
    return {"residual": _neg_laplacian(u) - k * jnp.exp(u) - f}


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
