"""Nested inputs and outputs, a non-differentiable input and a static int.

    y     = a[0] sin(x) + a[1] b x**power + a[2] + offset
    norm  = sum(y**2)
    mean  = mean(y) b
    count = x.size

`offset` is not differentiable, `power` is a static Python int and `count` is a
non-differentiable integer output.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64, Int64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jacobian,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class Params(BaseModel):
    a: Differentiable[Array[(3,), Float64]]
    b: Differentiable[Float64]


class InputSchema(BaseModel):
    params: Params
    x: Differentiable[Array[(None,), Float64]]
    offset: Array[(None,), Float64]
    # A Python int: eqx.filter_jit treats it as static.
    power: int = 2


class Stats(BaseModel):
    norm: Differentiable[Float64]
    mean: Differentiable[Float64]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]
    stats: Stats
    count: Int64


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    a, b = inputs["params"]["a"], inputs["params"]["b"]
    x, offset, power = inputs["x"], inputs["offset"], inputs["power"]
    y = a[0] * jnp.sin(x) + a[1] * b * x**power + a[2] + offset
    stats = {"norm": jnp.sum(y**2), "mean": jnp.mean(y) * b}
    return {"y": y, "stats": stats, "count": x.size}


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
