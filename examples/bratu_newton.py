"""Newton's method on the Bratu problem, served by a real local Tesseract.

Solves  -Δu - λ exp(u) = f  on the unit square (zero boundary) on an N x N grid, with
`optx.Newton` and lineax's LU, the residual and its Jacobian coming from the `bratu`
example Tesseract over HTTP. Prints per step the residual norm and the requests sent
(with `tlx.progress`'s live line of requests below, on a terminal), then saves a PNG
of the solution and of the convergence.

    python examples/bratu_newton.py [--n 32] [--lam 1.0] [--server tesseract-lx]
"""

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)
HERE = Path(__file__).resolve().parent
BRATU = HERE / "tesseracts" / "bratu" / "tesseract_api.py"


def newton(client: tlx.Client, n: int, lam: float, rtol: float, max_steps: int):
    """Newton's iterations, one `solver.step` at a time, so each step is reported."""
    f = tlx.TesseractModule(client)
    fn = tlx.residual_fn(f, wrt="u", of="residual")
    args = {"k": jnp.asarray(lam), "f": jnp.zeros((n, n))}
    y = jnp.zeros((n, n))
    solver = optx.Newton(rtol=rtol, atol=rtol)
    fn_aux = lambda y, args: (fn(y, args), None)  # optimistix's internal convention
    struct = jax.ShapeDtypeStruct((n, n), jnp.float64)
    tags = frozenset()
    state = solver.init(fn_aux, y, args, {}, struct, None, tags)
    step = eqx.filter_jit(
        lambda y, state: solver.step(fn_aux, y, args, {}, state, tags)[:2]
    )
    terminate = eqx.filter_jit(
        lambda y, state: solver.terminate(fn_aux, y, args, {}, state, tags)
    )
    head = f"{'step':>4} {'|r(u)|':>12} {'requests':>9}"
    print(head + "  by endpoint (|r| as the step starts)")
    # The initial residual, eagerly: its `/apply` also tells the output shapes, so
    # tracing the Newton step below needs no `/abstract_eval`.
    r0 = float(jnp.linalg.norm(fn(y, args)))
    print(f"{0:>4} {r0:12.3e} {sum(client.stats.values()):>9}  {dict(client.stats)}")
    history = []
    for i in range(max_steps):
        before = client.stats.copy()
        start = time.perf_counter()
        y, state = step(y, state)
        jax.block_until_ready(y)
        elapsed = time.perf_counter() - start
        sent = client.stats - before
        norm = float(jnp.linalg.norm(state.f))  # the residual at the step's start
        history.append(norm)
        print(
            f"{i + 1:>4} {norm:12.3e} {sum(sent.values()):>9}  {dict(sent)}"
            f"  ({elapsed * 1e3:.0f} ms)"
        )
        done, _ = terminate(y, state)
        if bool(done):
            break
    final = float(jnp.linalg.norm(fn(y, args)))
    print(f"converged: |r(u)| = {final:.3e} after {len(history)} steps")
    return y, history + [final]


def plot(u, history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    im = a.imshow(u, origin="lower", extent=(0, 1, 0, 1))
    fig.colorbar(im, ax=a)
    a.set_title("Bratu solution u")
    b.semilogy(range(len(history)), history, "o-")
    b.set_xlabel("Newton step")
    b.set_ylabel("residual norm")
    b.set_title("Convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="grid size N (n = N^2)")
    parser.add_argument("--lam", type=float, default=1.0, help="Bratu parameter")
    parser.add_argument("--rtol", type=float, default=1e-10)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument(
        "--server",
        default="tesseract-lx",
        choices=["tesseract-lx", "tesseract-runtime"],
    )
    parser.add_argument("--png", type=Path, default=Path("bratu_newton.png"))
    opts = parser.parse_args()
    print(f"Bratu, N={opts.n} ({opts.n**2} unknowns), lambda={opts.lam}, {opts.server}")
    with tlx.serve(BRATU, server=opts.server) as client:
        # optimistix's Newton has no `verbose=`: `newton` prints each step itself.
        with tlx.progress(client):
            u, history = newton(client, opts.n, opts.lam, opts.rtol, opts.max_steps)
        print(f"requests in all: {dict(client.stats)}")
    plot(u, history, opts.png)


if __name__ == "__main__":
    main()
