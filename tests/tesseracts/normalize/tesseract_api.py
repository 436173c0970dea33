"""Arrays of any rank, and maths that is NOT elementwise:

    y = x / sum(x)
    z = x - mean(x)

The sum and mean run over every element of `x`. The schema says `Array[..., Float64]`,
"any rank", which does not mean "maps over a leading axis": K points stacked into one
request come back normalised by the sum of all K points, silently wrong.
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
    x: Differentiable[Array[..., Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[..., Float64]]
    z: Differentiable[Array[..., Float64]]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    x = inputs["x"]
    return {"y": x / jnp.sum(x), "z": x - jnp.mean(x)}


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
