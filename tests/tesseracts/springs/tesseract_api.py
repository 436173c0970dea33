"""A chain of nonlinear springs with two outputs: the force residual and the energy.

    energy   = k/2 x^T L x + c/4 sum(x^4) - f . x
    residual = k L x + c x^3 - f          (the gradient of the energy)

with `L = tridiag(-1, 2, -1)` (both ends fixed). Two outputs, so a solve of one of
them (`residual`) must not ask for the other: the case where a Newton step's
linearised map once carried every output of the JVP.
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
    x: Differentiable[Array[(None,), Float64]]
    k: Differentiable[Float64]
    c: Differentiable[Float64]
    f: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    residual: Differentiable[Array[(None,), Float64]]
    energy: Differentiable[Float64]


def _lap(x):
    p = jnp.pad(x, 1)
    return 2 * x - p[:-2] - p[2:]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    x, k, c, f = inputs["x"], inputs["k"], inputs["c"], inputs["f"]
    return {
        "residual": k * _lap(x) + c * x**3 - f,
        "energy": 0.5 * k * x @ _lap(x) + 0.25 * c * jnp.sum(x**4) - f @ x,
    }


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
