"""An elementwise Tesseract whose arrays take any rank: y = a * sin(x) + x**2.

Its schema admits a leading batch axis, so a vmap over primal points is one request.
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
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class InputSchema(BaseModel):
    x: Differentiable[Array[..., Float64]]
    a: Differentiable[Array[..., Float64]]


class OutputSchema(BaseModel):
    y: Differentiable[Array[..., Float64]]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    return {"y": inputs["a"] * jnp.sin(inputs["x"]) + inputs["x"] ** 2}


def apply(inputs: InputSchema) -> OutputSchema:
    return jax_apply(apply_jit, inputs)


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
