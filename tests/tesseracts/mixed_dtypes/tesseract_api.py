"""float32, float64 and int64 arrays in one schema:

    y32 = sin(a) * float32(mean(b)) + float32(i)         (computed in float32)
    y64 = b * float64(sum(a)) + b**2 + sum(i)            (computed in float64)
    idx = cumsum(i) + argmax(b)                          (int64, not differentiable)

`a` (float32) and `i` (int64) have one length, `b` (float64) another. Gradients flow
across the dtypes: `y32` depends on `b`, `y64` on `a`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float32, Float64, Int64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jacobian,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class InputSchema(BaseModel):
    a: Differentiable[Array[(None,), Float32]]
    b: Differentiable[Array[(None,), Float64]]
    i: Array[(None,), Int64]


class OutputSchema(BaseModel):
    y32: Differentiable[Array[(None,), Float32]]
    y64: Differentiable[Array[(None,), Float64]]
    idx: Array[(None,), Int64]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    a, b, i = inputs["a"], inputs["b"], inputs["i"]
    y32 = jnp.sin(a) * jnp.mean(b).astype(jnp.float32) + i.astype(jnp.float32)
    y64 = b * jnp.sum(a).astype(jnp.float64) + b**2 + jnp.sum(i)
    return {"y32": y32, "y64": y64, "idx": jnp.cumsum(i) + jnp.argmax(b)}


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
