"""Solve a linear SPD Tesseract with lineax, and count what each way costs in requests.

The `poisson` example Tesseract is `y = (-Laplacian + c) x` on an N x N grid: linear
in `x`, symmetric positive definite. As a `tlx.TesseractLinearOperator` it is a lineax
operator whose `mv` is one `/apply`. This script solves `A x = b`:

1. with `lx.CG` (one `/apply` per iteration),
2. with `lx.LU` (the matrix in one request, then solved here),
3. for many right-hand sides at once under `jax.vmap`: with CG each iteration's K
   mat-vecs go as one batched request; with `tlx.OnServer(lx.CG(...))` the whole
   solve runs on the server, one request in all,

checks every answer against the same solve in pure JAX, and prints the requests each
sent, side by side.

    python examples/poisson_solve.py [--n 32] [--k 16] [--server tesseract-lx]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)

POISSON = Path(__file__).parent / "tesseracts" / "poisson" / "tesseract_api.py"


def poisson_matrix(n: int, c: float) -> jax.Array:
    """The same operator in pure JAX, as a dense matrix (the reference)."""
    eye = jnp.eye(n)
    t = 2 * eye - jnp.eye(n, k=1) - jnp.eye(n, k=-1)
    return (jnp.kron(t, eye) + jnp.kron(eye, t)) * (n + 1) ** 2 + c * jnp.eye(n * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="grid side N (n = N^2)")
    parser.add_argument("--k", type=int, default=16, help="right-hand sides at once")
    parser.add_argument("--c", type=float, default=1.0)
    parser.add_argument(
        "--server",
        default="tesseract-lx",
        choices=["tesseract-lx", "tesseract-runtime"],
    )
    opts = parser.parse_args()
    n, k = opts.n, opts.k
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal((n, n)))
    B = jnp.asarray(rng.standard_normal((k, n, n)))
    M = poisson_matrix(n, opts.c)
    x_ref = jnp.linalg.solve(M, b.reshape(-1)).reshape(n, n)
    X_ref = jnp.linalg.solve(M, B.reshape(k, -1).T).T.reshape(k, n, n)
    print(f"Poisson, N={n} ({n * n} unknowns), c={opts.c}, K={k}, {opts.server}")

    with tlx.serve(POISSON, server=opts.server) as client:
        f = tlx.TesseractModule(client)
        point = {"x": jnp.zeros((n, n)), "c": opts.c}
        f(point)  # one eager call: the output shapes, and the server warmed up
        spd = lx.positive_semidefinite_tag
        A = tlx.TesseractLinearOperator(f, point, wrt="x", of="y", tags=spd)
        cg = lx.CG(rtol=1e-10, atol=1e-10, max_steps=10 * n * n)
        ways = {
            "CG, one right-hand side": (A, cg, b, x_ref),
            "LU, one right-hand side": (A, lx.LU(), b, x_ref),
            f"CG, vmap over {k}": (A, cg, B, X_ref),
            f"OnServer(CG), vmap over {k}": (A, tlx.OnServer(cg), B, X_ref),
        }
        print(f"{'solve':<28} {'max abs err':>12} {'time':>9}  requests")
        for name, (op, solver, rhs, want) in ways.items():

            def solve(v, op=op, solver=solver):
                return lx.linear_solve(op, v, solver).value

            if rhs.ndim == 3:
                solve = jax.vmap(solve)
            solve = jax.jit(solve)
            jax.block_until_ready(solve(rhs))  # compiles
            client.stats.clear()
            start = time.perf_counter()
            with tlx.progress(client):
                got = jax.block_until_ready(solve(rhs))
            seconds = time.perf_counter() - start
            err = float(jnp.max(jnp.abs(got - want)))
            print(
                f"{name:<28} {err:12.2e} {seconds * 1e3:7.1f} ms  {dict(client.stats)}"
            )


if __name__ == "__main__":
    main()
