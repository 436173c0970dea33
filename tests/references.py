"""Pure-JAX references for the example Tesseracts, and deterministic example inputs.

Each `*_ref` takes the same input dict as the Tesseract (of `jnp` arrays) and returns
the same output dict. The maths is written again here, independently of
`examples/tesseracts/*/tesseract_api.py`, so the two can be checked against each other.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


jax.config.update("jax_enable_x64", True)


def _neg_laplacian(u: jax.Array) -> jax.Array:
    """5-point `-Laplacian` on interior points, zero Dirichlet boundary, h = 1/(N+1)."""
    n = u.shape[0]
    h = 1.0 / (n + 1)
    out = 4 * u
    out = out.at[1:, :].add(-u[:-1, :])
    out = out.at[:-1, :].add(-u[1:, :])
    out = out.at[:, 1:].add(-u[:, :-1])
    out = out.at[:, :-1].add(-u[:, 1:])
    return out / h**2


def bratu_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    u, k, f = inputs["u"], inputs["k"], inputs["f"]
    return {"residual": _neg_laplacian(u) - k * jnp.exp(u) - f}


def poisson_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    x, c = inputs["x"], inputs["c"]
    return {"y": _neg_laplacian(x) + c * x}


def pytree_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    a, b = inputs["params"]["a"], inputs["params"]["b"]
    x, offset = inputs["x"], inputs["offset"]
    power = inputs.get("power", 2)
    y = a[0] * jnp.sin(x) + a[1] * b * x**power + a[2] + offset
    return {
        "y": y,
        "stats": {"norm": jnp.sum(y**2), "mean": jnp.mean(y) * b},
        "count": x.size,
    }


def bratu_inputs(n: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = np.random.RandomState(seed)
    return {
        "u": jnp.asarray(0.1 * rng.standard_normal((n, n)), dtype=jnp.float64),
        "k": jnp.asarray(1.0, dtype=jnp.float64),
        "f": jnp.ones((n, n), dtype=jnp.float64),
    }


def poisson_inputs(n: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = np.random.RandomState(seed)
    return {
        "x": jnp.asarray(rng.standard_normal((n, n)), dtype=jnp.float64),
        "c": jnp.asarray(0.5, dtype=jnp.float64),
    }


def pytree_inputs(m: int = 5, seed: int = 0) -> dict[str, Any]:
    rng = np.random.RandomState(seed)
    return {
        "params": {
            "a": jnp.asarray(rng.standard_normal(3), dtype=jnp.float64),
            "b": jnp.asarray(0.5 + rng.uniform(), dtype=jnp.float64),
        },
        "x": jnp.asarray(rng.standard_normal(m), dtype=jnp.float64),
        "offset": jnp.asarray(0.1 * rng.standard_normal(m), dtype=jnp.float64),
        "power": 2,
    }


def _chain_laplacian(x: jax.Array) -> jax.Array:
    """`tridiag(-1, 2, -1) @ x`, both ends fixed."""
    out = 2 * x
    out = out.at[1:].add(-x[:-1])
    return out.at[:-1].add(-x[1:])


def springs_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    x, k, c, f = inputs["x"], inputs["k"], inputs["c"], inputs["f"]
    return {
        "residual": k * _chain_laplacian(x) + c * x**3 - f,
        "energy": 0.5 * k * x @ _chain_laplacian(x) + 0.25 * c * jnp.sum(x**4) - f @ x,
    }


def springs_inputs(n: int = 16) -> dict[str, Any]:
    return {
        "x": jnp.zeros(n, dtype=jnp.float64),
        "k": jnp.asarray(1.0, dtype=jnp.float64),
        "c": jnp.asarray(0.5, dtype=jnp.float64),
        "f": jnp.linspace(0.1, 1.0, n, dtype=jnp.float64),
    }
