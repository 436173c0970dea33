"""Outputs that do not depend on every input, and only some derivative endpoints:

    fa    = sin(a)
    fb    = b**2
    const = ones(3)          (differentiable, depends on nothing)

Serves `apply`, `vector_jacobian_product` and `abstract_eval`: no
`jacobian_vector_product`, no `jacobian`.
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
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class InputSchema(BaseModel):
    a: Differentiable[Array[(None,), Float64]]
    b: Differentiable[Array[(None,), Float64]]


class OutputSchema(BaseModel):
    fa: Differentiable[Array[(None,), Float64]]
    fb: Differentiable[Array[(None,), Float64]]
    const: Differentiable[Array[(3,), Float64]]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    return {
        "fa": jnp.sin(inputs["a"]),
        "fb": inputs["b"] ** 2,
        "const": jnp.ones(3, dtype=jnp.float64),
    }


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(**jax_apply(apply_jit, inputs))


def vector_jacobian_product(
    inputs: InputSchema,
    vjp_inputs: set[str],
    vjp_outputs: set[str],
    cotangent_vector: dict[str, Any],
):
    return jax_vjp(apply_jit, inputs, vjp_inputs, vjp_outputs, cotangent_vector)


def abstract_eval(abstract_inputs):
    return jax_abstract_eval(apply_jit, abstract_inputs)
