"""Train an Equinox MLP through a Tesseract: gradient descent on VJP requests.

An `eqx.nn.MLP` maps grid coordinates to a source field `f(x, y)`, which goes into
the `bratu` Tesseract with a fixed state `u*`. Training asks that `u*` solve the
Bratu problem for the learnt source, i.e. that the residual

    r = -Laplacian(u*) - k exp(u*) - f_MLP

vanish: the loss is `mean(r^2)` (scaled), and every step's gradient comes from one
`/apply` (the residual) and one VJP request (its cotangent with respect to `f`,
pulled back through the MLP in JAX). The same training runs in pure JAX beside it:
the losses must agree. Prints the loss and the requests as it goes, and saves the
loss curve.

    python examples/train_mlp.py [--n 16] [--steps 200] [--png train_mlp.png]
"""

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)

BRATU = Path(__file__).parent / "tesseracts" / "bratu" / "tesseract_api.py"


def neg_laplacian(v):
    n = v.shape[0]
    p = jnp.pad(v, 1)
    return (4 * v - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) * (
        n + 1
    ) ** 2


def bratu_ref(inputs: dict) -> dict:
    """The Tesseract's maths in pure JAX."""
    u, k, f = inputs["u"], inputs["k"], inputs["f"]
    return {"residual": neg_laplacian(u) - k * jnp.exp(u) - f}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="grid side N")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--png", type=Path, default=Path("train_mlp.png"))
    opts = parser.parse_args()
    n = opts.n
    grid = (jnp.arange(n) + 1.0) / (n + 1)
    coords = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    u_star = jnp.sin(jnp.pi * grid)[:, None] * jnp.sin(jnp.pi * grid)[None, :]
    k = jnp.asarray(1.0)
    scale = float(jnp.mean(neg_laplacian(u_star) ** 2))  # the loss starts near 1

    def loss(mlp, apply):
        f = jax.vmap(mlp)(coords).reshape(n, n)
        r = apply({"u": u_star, "k": k, "f": f})["residual"]
        return jnp.mean(r**2) / scale

    @eqx.filter_jit
    def step(mlp, apply):
        value, grads = eqx.filter_value_and_grad(loss)(mlp, apply)
        updates = jax.tree.map(lambda g: -opts.lr * g, grads)
        return eqx.apply_updates(mlp, updates), value

    mlp0 = eqx.nn.MLP(2, "scalar", 32, 2, activation=jnp.tanh, key=jax.random.key(0))
    print(f"N={n}: training an MLP source field through the bratu Tesseract")
    with tlx.serve(BRATU) as client:
        tesseract = tlx.TesseractModule(client)
        tesseract({"u": u_star, "k": k, "f": jnp.zeros((n, n))})  # learns shapes
        client.stats.clear()
        ours, ref, history = mlp0, mlp0, []
        start = time.perf_counter()
        with tlx.progress(client):
            for i in range(opts.steps):
                ours, value = step(ours, tesseract)
                ref, ref_value = step(ref, bratu_ref)
                history.append((float(value), float(ref_value)))
                if i % max(opts.steps // 10, 1) == 0 or i == opts.steps - 1:
                    print(
                        f"step {i:4d}: loss {history[-1][0]:.6e} (pure JAX "
                        f"{history[-1][1]:.6e}), requests {dict(client.stats)}"
                    )
        seconds = time.perf_counter() - start
        worst = max(abs(a - b) / max(abs(b), 1e-300) for a, b in history)
        print(f"loss {history[0][0]:.3e} -> {history[-1][0]:.3e} in {seconds:.1f} s")
        print(f"largest relative difference from pure JAX: {worst:.2e}")
        print(f"requests per step: {sum(client.stats.values()) / opts.steps:g}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy([a for a, _ in history], label="through the Tesseract")
    ax.semilogy([b for _, b in history], "--", label="pure JAX")
    ax.set(xlabel="gradient step", ylabel="loss", title="MLP source field for Bratu")
    ax.legend()
    fig.tight_layout()
    fig.savefig(opts.png, dpi=120)
    print(f"saved {opts.png}")


if __name__ == "__main__":
    main()
