"""Two Tesseracts chained inside one Equinox module, differentiated end to end.

`poisson` maps a field `x` to `y = (-Laplacian + c) x`; `bratu` takes `y` as its
source term `f` and returns the Bratu residual of a state `u`. The `Chain` module
holds both as `tlx.TesseractModule`s, each on its own server:

    residual = bratu(u, k, f = poisson(x, c))

`jax.grad` of `mean(residual^2)` with respect to `x`, `u`, `c` and `k` runs the VJPs
of both Tesseracts (bratu's first, its cotangent of `f` then poisson's), and
`jax.jvp` their JVPs; both are checked against the same chain in pure JAX, and the
requests each Tesseract received are printed.

    python examples/two_tesseracts.py [--n 16]
"""

import argparse
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)

HERE = Path(__file__).parent / "tesseracts"


class Chain(eqx.Module):
    """`bratu(u, k, f=poisson(x, c))["residual"]`, two Tesseracts in one module."""

    poisson: tlx.TesseractModule
    bratu: tlx.TesseractModule

    def __call__(self, x, u, c, k):
        y = self.poisson({"x": x, "c": c})["y"]
        return self.bratu({"u": u, "k": k, "f": y})["residual"]


def neg_laplacian(v):
    n = v.shape[0]
    p = jnp.pad(v, 1)
    return (4 * v - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) * (
        n + 1
    ) ** 2


def chain_ref(x, u, c, k):
    """The same chain in pure JAX."""
    y = neg_laplacian(x) + c * x
    return neg_laplacian(u) - k * jnp.exp(u) - y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="grid side N")
    opts = parser.parse_args()
    n = opts.n
    rng = np.random.default_rng(0)
    x, u = (jnp.asarray(0.1 * rng.standard_normal((n, n))) for _ in range(2))
    c, k = jnp.asarray(1.0), jnp.asarray(0.5)
    args = (x, u, c, k)

    def loss(fn, *args):
        return jnp.mean(fn(*args) ** 2)

    with (
        tlx.serve(HERE / "poisson" / "tesseract_api.py") as poisson,
        tlx.serve(HERE / "bratu" / "tesseract_api.py") as bratu,
    ):
        model = Chain(tlx.TesseractModule(poisson), tlx.TesseractModule(bratu))
        model(*args)  # eager: both learn their output shapes
        for client in (poisson, bratu):
            client.stats.clear()

        value, grads = eqx.filter_jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)))(
            model, *args
        )
        ref_value, ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(
            chain_ref, *args
        )
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads))
        print(f"N={n}: loss {float(value):.6e} (pure JAX {float(ref_value):.6e})")
        print(f"grad w.r.t. (x, u, c, k): max abs difference from pure JAX {err:.2e}")
        print(f"  requests: poisson {dict(poisson.stats)}, bratu {dict(bratu.stats)}")

        for client in (poisson, bratu):
            client.stats.clear()
        tangents = tuple(jnp.ones_like(a) for a in args)
        _, tangent = eqx.filter_jit(lambda *a: jax.jvp(model, a, tangents))(*args)
        _, ref_tangent = jax.jvp(chain_ref, args, tangents)
        err = float(jnp.max(jnp.abs(tangent - ref_tangent)))
        print(f"jvp along ones: max abs difference from pure JAX {err:.2e}")
        print(f"  requests: poisson {dict(poisson.stats)}, bratu {dict(bratu.stats)}")


if __name__ == "__main__":
    main()
