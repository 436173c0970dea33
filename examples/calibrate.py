"""Calibrate the Bratu parameter from noisy observations, served by a real Tesseract.

The `bratu` example Tesseract gives the residual r(u, k) = -Δu - k exp(u) - f on an
N x N grid. Synthetic observations are the solution at `k_true` plus noise; the fit
recovers k (and u) with `optx.least_squares` on the residuals

    (h^2 r(u, k),  u - u_obs)        2 N^2 residuals, N^2 + 1 unknowns,

then the sensitivity d mean(u)/dk of the model at the fitted k, by implicit
differentiation through `optx.root_find` (`jax.grad`, optimistix's ImplicitAdjoint),
checked against a central finite difference. (The sensitivity of `k_fit` to the data
would go through optimistix's implicit rule for least squares, which differentiates
the gradient J^T r = 0 again: second derivatives, which a Tesseract does not serve.)

The fit prints one line per step through optimistix's `verbose=` (`--no-verbose` to
silence it), and on a terminal `tlx.progress` shows the requests as they go.

    python examples/calibrate.py [--n 16] [--k-true 2.0] [--noise 1e-3] [--no-verbose]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optimistix as optx
import tesseract_lx as tlx


jax.config.update("jax_enable_x64", True)
HERE = Path(__file__).resolve().parent
BRATU = HERE / "tesseracts" / "bratu" / "tesseract_api.py"
SOLVERS = {"lm": optx.LevenbergMarquardt, "gn": optx.GaussNewton}


def solve(residual, k, n: int, rtol: float) -> jax.Array:
    """u with r(u, k) = 0, by Newton from zero: differentiable in `k` (implicitly)."""
    args = {"k": k, "f": jnp.ones((n, n))}
    solver = optx.Newton(rtol=rtol, atol=rtol)
    return optx.root_find(residual, solver, jnp.zeros((n, n)), args).value


def misfit(y, args):
    """Least-squares residuals: the equation (scaled by h^2) and the data misfit."""
    h2 = 1.0 / (args["f"].shape[0] + 1) ** 2
    r = args["residual"](y, {"f": args["f"]})
    return h2 * r, y["u"] - args["u_obs"]


def show_step(**fields) -> None:
    """`verbose=` for the least-squares solvers: one line per step.

    optimistix calls it inside each step with `name=(label, value)`; `verbose=True`
    would print every field, `y` among them (N^2 + 1 numbers, twice), so this prints
    the rest only. A rejected step leaves `accepted` as it was.
    """
    shown = ("num_steps", "loss_this_step", "accepted_steps", "step_size")
    jax.debug.print(
        "  step {num_steps:>3}: loss {loss_this_step:.6e}, accepted {accepted_steps:>3}"
        ", step size {step_size:.3g}",
        **{name: fields[name][1] for name in shown},
    )


def sent(client: tlx.Client, before) -> str:
    diff = client.stats - before
    return f"{sum(diff.values())} {dict(diff)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="grid size N (n = N^2)")
    parser.add_argument("--k-true", type=float, default=2.0, help="true parameter")
    parser.add_argument("--k0", type=float, default=1.0, help="initial guess for k")
    parser.add_argument("--noise", type=float, default=1e-3, help="noise std on u")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-10)
    parser.add_argument("--solver", choices=sorted(SOLVERS), default="lm")
    parser.add_argument(
        "--verbose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print each step of the fit (optimistix's `verbose=`)",
    )
    parser.add_argument(
        "--server",
        default="tesseract-lx",
        choices=["tesseract-lx", "tesseract-runtime"],
    )
    parser.add_argument(
        "--batching", default="auto", help="the TesseractModule's batching rule"
    )
    opts = parser.parse_args()
    n = opts.n
    print(f"Bratu calibration, N={n} ({n**2} unknowns + k), {opts.server}")

    with tlx.serve(BRATU, server=opts.server) as client, tlx.progress(client):
        f = tlx.TesseractModule(client, batching=opts.batching)
        residual_u = tlx.residual_fn(f, wrt="u", of="residual")
        residual_uk = tlx.residual_fn(f, wrt=("u", "k"), of="residual")

        # Synthetic data: the model at k_true, plus noise.
        before = client.stats.copy()
        u_true = solve(residual_u, jnp.asarray(opts.k_true), n, opts.rtol)
        key = jax.random.key(opts.seed)
        u_obs = u_true + opts.noise * jax.random.normal(key, u_true.shape)
        print(f"observations: Newton at k_true, requests {sent(client, before)}")

        # The fit: k and u from the data.
        verbose = show_step if opts.verbose else False
        solver = SOLVERS[opts.solver](rtol=opts.rtol, atol=opts.rtol, verbose=verbose)
        args = {"f": jnp.ones((n, n)), "u_obs": u_obs, "residual": residual_uk}
        y0 = {"u": u_obs, "k": jnp.asarray(opts.k0)}
        before = client.stats.copy()
        start = time.perf_counter()
        sol = optx.least_squares(misfit, solver, y0, args)
        k_fit = float(sol.value["k"])
        elapsed = time.perf_counter() - start
        steps = int(sol.stats["num_steps"])
        print(f"{type(solver).__name__}: {steps} steps, {elapsed:.2f} s")
        print(f"requests: {sent(client, before)}")
        print(f"k_true = {opts.k_true:.6f}")
        print(f"k_fit  = {k_fit:.6f}  (error {abs(k_fit - opts.k_true):.2e})")
        u_err = float(jnp.max(jnp.abs(sol.value["u"] - u_true)))
        print(f"max |u_fit - u_true| = {u_err:.2e} (noise {opts.noise:.1e})")

        # Sensitivity of the model at the fit: d mean(u)/dk, implicitly.
        def mean_u(k):
            return jnp.mean(solve(residual_u, k, n, opts.rtol))

        before = client.stats.copy()
        grad = float(jax.grad(mean_u)(jnp.asarray(k_fit)))
        print(f"d mean(u)/dk by implicit differentiation = {grad:.10f}")
        print(f"  requests: {sent(client, before)}")
        eps = 1e-5
        fd = float(mean_u(k_fit + eps) - mean_u(k_fit - eps)) / (2 * eps)
        rel = abs(grad - fd) / abs(fd)
        print(f"d mean(u)/dk by central difference      = {fd:.10f}")
        print(f"relative difference: {rel:.1e}")
        print(f"requests in all: {dict(client.stats)}")
        if rel > 1e-5:
            raise SystemExit("gradient check failed")


if __name__ == "__main__":
    main()
