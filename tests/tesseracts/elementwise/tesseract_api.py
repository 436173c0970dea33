"""A Tesseract that maps over leading axes, and declares it: `apply_batch_axis: 0`.

    y = a sin(x) + x**2        (elementwise; `a` broadcast from the left)
    r = x / sum(x, axis=-1)    (each row of `x` normalised: NOT elementwise)

`x` has at least one axis; `a` has a leading part of its shape (a scalar, or `x`'s).
Stacking K points along a new axis 0 stacks the K answers along axis 0: `r`'s sum runs
over the last axis, never over the points. So `/batched_apply` sends K points through
`apply` once (`CALLS` counts the calls).
"""

from collections import Counter
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import BaseModel, model_validator
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)

TESSERACT_LX = {"apply_batch_axis": 0}

CALLS: Counter = Counter()


class InputSchema(BaseModel):
    x: Differentiable[Array[..., Float64]]
    a: Differentiable[Array[..., Float64]]

    @model_validator(mode="after")
    def _shapes(self):
        # Shapes only: abstract inputs (`/abstract_eval`) have no values.
        xs, as_ = tuple(self.x.shape), tuple(self.a.shape)  # pyright: ignore[reportAttributeAccessIssue]  # Differentiable[...] is runtime-only
        if len(xs) < 1:
            raise ValueError("`x` needs at least one axis (its rows are normalised).")
        if as_ != xs[: len(as_)]:
            raise ValueError(
                f"`a` of shape {as_} must have a leading part of the shape of `x` {xs}."
            )
        return self


class OutputSchema(BaseModel):
    y: Differentiable[Array[..., Float64]]
    r: Differentiable[Array[..., Float64]]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    x, a = inputs["x"], inputs["a"]
    a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
    return {
        "y": a * jnp.sin(x) + x**2,
        "r": x / jnp.sum(x, axis=-1, keepdims=True),
    }


def apply(inputs: InputSchema) -> dict[str, Any]:
    CALLS["apply"] += 1
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
