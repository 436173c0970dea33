"""A nonlinear heat residual whose conductivity is expensive to compute.

One backward-Euler step of `u_t = div(kappa grad u) - u^3` from `f`, on an `N x N`
grid of interior points with zero Dirichlet boundary and `h = 1/(N+1)`:

    residual = u - f + DT * (kappa(k) * (4u - u_N - u_S - u_E - u_W) / h^2 + u^3),

where `kappa(k)` is a positive field obtained from the field `k` by `ITERATIONS`
steps of a smooth relaxation map (a `jax.lax.fori_loop`). `kappa` costs tens of
milliseconds; it depends on `k` only, so a JVP or VJP with respect to `u` needs the
value of `kappa` but not its derivative. A stock server recomputes it for every
request; the tesseract-lx server's linearisation cache computes it once per point.
It stands for any Tesseract with an expensive forward pass (a material model, an
inner solve, a surrogate network) feeding a cheap residual.
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

# Tuned so that one `/apply` takes ~20-50 ms at N = 32 on one core.
ITERATIONS = 2500
# Time step: keeps the Jacobian well conditioned (GMRES converges in tens of steps).
DT = 2e-3


class InputSchema(BaseModel):
    u: Differentiable[Array[(None, None), Float64]]
    k: Differentiable[Array[(None, None), Float64]]
    f: Differentiable[Array[(None, None), Float64]]


class OutputSchema(BaseModel):
    residual: Differentiable[Array[(None, None), Float64]]


def _neg_laplacian(u):
    n = u.shape[0]
    p = jnp.pad(u, 1)
    neighbours = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (4 * u - neighbours) * (n + 1) ** 2


def _kappa(k):
    """A smooth, positive, deliberately expensive function of `k`."""
    n = k.shape[0]
    # A fixed dense mixing matrix: every step couples all rows of the field.
    i = jnp.arange(n, dtype=k.dtype)
    w = jnp.cos(0.3 * (i[:, None] - i[None, :])) / n

    def step(_, z):
        return 0.5 * z + 0.5 * jnp.tanh(w @ z @ w.T + k) + 0.01 * jnp.sin(z) ** 2

    z = jax.lax.fori_loop(0, ITERATIONS, step, jnp.tanh(k))
    return 1.0 + jnp.exp(0.5 * z)


@eqx.filter_jit
def apply_jit(inputs: dict) -> dict:
    u, k, f = inputs["u"], inputs["k"], inputs["f"]
    return {"residual": u - f + DT * (_kappa(k) * _neg_laplacian(u) + u**3)}


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
