"""A complex map, `w = z**2 + a z`: applied as any other, never differentiated
(a Tesseract does not say which convention its complex VJP follows)."""

from typing import Any

import equinox as eqx
import jax
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)

# tesseract-core has no name for it; its `Array` takes the dtype's name.
Complex128 = "complex128"


class InputSchema(BaseModel):
    z: Differentiable[Array[(None,), Complex128]]
    a: Differentiable[Float64]


class OutputSchema(BaseModel):
    w: Differentiable[Array[(None,), Complex128]]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    return {"w": inputs["z"] ** 2 + inputs["a"] * inputs["z"]}


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(**jax_apply(apply_jit, inputs))


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
