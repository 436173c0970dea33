"""Pure-JAX references of the benchmarked Tesseracts (the floor), and their inputs.

`bratu_ref` and `springs_ref` are the tests' (`tests/references.py`). `heavy_ref` is written here again
from the maths in the docstring of `examples/tesseracts/heavy/tesseract_api.py`, not
imported from it, so that the two check each other. Neither module imports
tesseract_lx: this one also runs in the venv of tesseract-jax.
"""

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from references import (  # noqa: E402
    bratu_inputs,
    bratu_ref,
    springs_inputs,
    springs_ref,
)


TESSERACTS = ROOT / "examples" / "tesseracts"
# The heavy Tesseract's constants: relaxation steps of `kappa`, backward-Euler step.
HEAVY_ITERATIONS = 2500
HEAVY_DT = 2e-3


def _neg_laplacian(u: jax.Array) -> jax.Array:
    """5-point `-Laplacian` on interior points, zero Dirichlet boundary, h = 1/(N+1)."""
    n = u.shape[0]
    out = 4 * u
    out = out.at[1:, :].add(-u[:-1, :])
    out = out.at[:-1, :].add(-u[1:, :])
    out = out.at[:, 1:].add(-u[:, :-1])
    out = out.at[:, :-1].add(-u[:, 1:])
    return out * (n + 1) ** 2


def _kappa(k: jax.Array) -> jax.Array:
    """`HEAVY_ITERATIONS` steps of `z -> z/2 + tanh(W z W^T + k)/2 + sin(z)^2/100`
    from `tanh(k)`, `W_ij = cos(0.3 (i - j)) / N`; then `1 + exp(z/2)`."""
    n = k.shape[0]
    i = jnp.arange(n, dtype=k.dtype)
    w = jnp.cos(0.3 * (i[:, None] - i[None, :])) / n

    def step(_, z):
        return 0.5 * z + 0.5 * jnp.tanh(w @ z @ w.T + k) + 0.01 * jnp.sin(z) ** 2

    return 1.0 + jnp.exp(
        0.5 * jax.lax.fori_loop(0, HEAVY_ITERATIONS, step, jnp.tanh(k))
    )


def heavy_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    u, k, f = inputs["u"], inputs["k"], inputs["f"]
    return {"residual": u - f + HEAVY_DT * (_kappa(k) * _neg_laplacian(u) + u**3)}


def heavy_inputs(n: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "u": jnp.asarray(0.1 * rng.standard_normal((n, n))),
        "k": jnp.asarray(rng.standard_normal((n, n))),
        "f": jnp.asarray(5.0 * np.ones((n, n))),
    }


def chain_inputs(n_side: int) -> dict[str, Any]:
    """`springs`'s inputs for a chain of `n_side`^2 springs (n unknowns, as the grids
    of the others have)."""
    return springs_inputs(n_side**2)


# `bratu_numpy`: the same maths as `bratu`, served by NumPy code (no JAX). `springs`
# (a test Tesseract): two outputs, `residual` and `energy`; its unknown is `x`.
REFERENCES = {
    "bratu": bratu_ref,
    "heavy": heavy_ref,
    "bratu_numpy": bratu_ref,
    "springs": springs_ref,
}
INPUTS = {
    "bratu": bratu_inputs,
    "heavy": heavy_inputs,
    "bratu_numpy": bratu_inputs,
    "springs": chain_inputs,
}
# The input every scenario differentiates, solves for or perturbs (of `residual`).
UNKNOWN = {"bratu": "u", "heavy": "u", "bratu_numpy": "u", "springs": "x"}
# Where Newton starts (else 0): at x = 0 the springs' Jacobian is the chain's
# Laplacian, on which a restarted GMRES takes hundreds of iterations; at x = 1 its
# cubic term keeps it well conditioned.
START = {"springs": 1.0}
APIS = {name: TESSERACTS / name / "tesseract_api.py" for name in REFERENCES}
APIS["springs"] = ROOT / "tests" / "tesseracts" / "springs" / "tesseract_api.py"
