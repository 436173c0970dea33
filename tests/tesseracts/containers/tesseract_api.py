"""Every container tesseract-core's schemas allow, in one Tesseract.

Inputs: a list of arrays of different lengths, a dict of arrays, an optional array, a
differentiable scalar, a `Literal`, a `str`, an `int` and a nested model. With
`agg = sum` if `mode == "sum"` else `max`:

    ys[i]     = s * xs[i] ** n + agg(xs[i])
    totals[k] = agg(fields[k] * w[0]) + w[1] * s
    maybe     = opt * s + agg(opt)          (None when `opt` is None)
    message   = f"{label}:{mode}"
    count     = len(xs)

Derivative paths look like `xs.[1]`, `fields.{a}`, `sub.w`, `ys.[0]`, `totals.{b}`.
"""

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from pydantic import BaseModel
from tesseract_core.runtime import Array, Differentiable, Float64
from tesseract_core.runtime.jax_recipes import (
    jax_apply,
    jax_jacobian,
    jax_jvp,
    jax_vjp,
)


jax.config.update("jax_enable_x64", True)


class Sub(BaseModel):
    w: Differentiable[Array[(2,), Float64]]


class InputSchema(BaseModel):
    xs: list[Differentiable[Array[(None,), Float64]]]
    fields: dict[str, Differentiable[Array[(3,), Float64]]]
    s: Differentiable[Float64]
    sub: Sub
    opt: Differentiable[Array[(3,), Float64]] | None = None
    mode: Literal["sum", "max"] = "sum"
    label: str = "run"
    n: int = 2


class OutputSchema(BaseModel):
    ys: list[Differentiable[Array[(None,), Float64]]]
    totals: dict[str, Differentiable[Float64]]
    maybe: Differentiable[Array[(3,), Float64]] | None = None
    message: str
    count: int


# `mode`, `label` and `n` are Python values: static to `eqx.filter_jit`.
@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    agg = jnp.sum if inputs["mode"] == "sum" else jnp.max
    s, w, n, opt = inputs["s"], inputs["sub"]["w"], inputs["n"], inputs["opt"]
    return {
        "ys": [s * x**n + agg(x) for x in inputs["xs"]],
        "totals": {k: agg(v * w[0]) + w[1] * s for k, v in inputs["fields"].items()},
        "maybe": None if opt is None else opt * s + agg(opt),
        "message": f"{inputs['label']}:{inputs['mode']}",
        "count": len(inputs["xs"]),
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
    """`jax_abstract_eval` cannot return the `str` output: evaluate shapes with
    `eqx.filter_eval_shape`, which passes Python values through."""
    to_struct = lambda x: jax.ShapeDtypeStruct(x["shape"], x["dtype"])
    is_struct_dict = lambda x: type(x) is dict and x.keys() == {"shape", "dtype"}
    inputs = jax.tree.map(
        lambda x: to_struct(x) if is_struct_dict(x) else x,
        abstract_inputs.model_dump(),
        is_leaf=is_struct_dict,
    )
    out = eqx.filter_eval_shape(apply_jit, inputs)
    is_struct = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    return jax.tree.map(
        lambda x: {"shape": x.shape, "dtype": str(x.dtype)} if is_struct(x) else x,
        out,
        is_leaf=is_struct,
    )
