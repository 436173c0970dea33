"""A JAX Tesseract that also defines its own batched apply, JVP and VJP.

    y = a sin(x),  s = sum(x**2)

The `batched_*` functions are written out by hand in NumPy (not `jax.vmap`), and
count their calls in `CALLS`, so tests can tell that the server used them.
"""

from collections import Counter
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.jax_recipes import (
    jax_abstract_eval,
    jax_apply,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)

CALLS: Counter = Counter()


class InputSchema(BaseModel):
    x: Differentiable[Array[(None,), Float64]]
    a: Differentiable[Float64]


class OutputSchema(BaseModel):
    y: Differentiable[Array[(None,), Float64]]
    s: Differentiable[Float64]


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    x, a = inputs["x"], inputs["a"]
    return {"y": a * jnp.sin(x), "s": jnp.sum(x**2)}


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


def batched_jacobian_vector_product(inputs, jvp_inputs, jvp_outputs, tangent_vector):
    CALLS["batched_jacobian_vector_product"] += 1
    x, a = np.asarray(inputs.x), float(inputs.a)
    k = next(iter(tangent_vector.values())).shape[0]
    dx = np.asarray(tangent_vector.get("x", np.zeros((k, *x.shape))))
    da = np.asarray(tangent_vector.get("a", np.zeros(k)))
    out = {"y": a * np.cos(x) * dx + np.sin(x) * da[:, None], "s": 2 * dx @ x}
    return {key: out[key] for key in jvp_outputs}


def batched_vector_jacobian_product(inputs, vjp_inputs, vjp_outputs, cotangent_vector):
    CALLS["batched_vector_jacobian_product"] += 1
    x, a = np.asarray(inputs.x), float(inputs.a)
    k = next(iter(cotangent_vector.values())).shape[0]
    cy = np.asarray(cotangent_vector.get("y", np.zeros((k, *x.shape))))
    cs = np.asarray(cotangent_vector.get("s", np.zeros(k)))
    out = {"x": a * np.cos(x) * cy + 2 * cs[:, None] * x, "a": cy @ np.sin(x)}
    return {key: out[key] for key in vjp_inputs}


def batched_apply(inputs: list[InputSchema]) -> list[dict]:
    """K points at once, by hand in NumPy (points may differ in length)."""
    CALLS["batched_apply"] += 1
    outs = []
    for point in inputs:
        x, a = np.asarray(point.x), float(point.a)  # pyright: ignore[reportArgumentType]  # Differentiable[...] is runtime-only
        outs.append({"y": a * np.sin(x), "s": np.sum(x**2)})
    return outs
