"""Benchmark: how many HTTP requests, per endpoint, `apply_tesseract` sends for the
usual JAX / lineax / optimistix workloads on a served Tesseract.

A benchmark, not a test. It serves the `bratu` example Tesseract with tesseract-core's
stock server (`tesseract-runtime serve`, 1 worker, a free 127.0.0.1 port, outputs in
a temporary directory), connects with `tesseract_core.Tesseract.from_url` and counts
every call of that object's `_client.run_tesseract` by endpoint (the OpenAPI schema
is fetched once before counting starts). Grid N = 4 (n = 16 unknowns), derivatives of
output `residual` w.r.t. input `u`, `jax_enable_x64` on, all calls eager except what
optimistix / lineax jit themselves:

1. `jacfwd`: `jax.jacfwd(g)(u)`, `g = u -> residual`;
2. `jacrev`: `jax.jacrev(g)(u)`;
3. `vmap_jvp`: `jax.vmap(lambda t: jax.jvp(g, (u,), (t,))[1])(T)`, K = 4 tangents;
4. `newton`: `optx.root_find(fn, optx.Newton(rtol=1e-8, atol=1e-8), u0, args)`
   (LU), `fn(u, args) = residual`, from u0 = 0; the number of steps is in `note`;
5. `gmres`: `lx.linear_solve(lx.JacobianLinearOperator(fn, u, args, jac="bwd"), b,
   lx.GMRES(rtol=1e-8, atol=1e-8))`.

Each runs with `apply_tesseract`'s defaults (`vmap_method=None`,
`materialize_jacobian=None`); `vmap_jvp` also with the other settings that change
how a batch of tangents is sent. `err` is the max abs difference from the same
scenario run on the pure-JAX reference `bratu_ref` (`tests/references.py`). A scenario
that raises gets its error text in `note`.

    --peer: tesseract-jax's `tesseract_jax.apply_tesseract`, run from a venv that
        has tesseract-jax (it needs its own: it pins other versions; `bash dev.sh
        bench` makes one at out/bench-venv, see `benchmarks/_peer.py`)
        out/bench-venv/bin/python benchmarks/versus_tesseract_jax.py --peer
    --ours: `tesseract_lx.apply_tesseract` (same signature)
        .venv/bin/python benchmarks/versus_tesseract_jax.py --ours
"""

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import requests
import tesseract_core
from _peer import counted
from _report import stop_group
from _scenarios import failure
from tesseract_core import Tesseract


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
BRATU = ROOT / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
sys.path.insert(0, str(ROOT / "tests"))
from references import bratu_inputs, bratu_ref  # noqa: E402


N, K, TOL = 4, 4, 1e-8
ENDPOINTS = {
    "abstract_eval": "abstract_eval",
    "apply": "apply",
    "jacobian": "jacobian",
    "jacobian_vector_product": "jvp",
    "vector_jacobian_product": "vjp",
}
VMAP_VARIANTS = (
    {"materialize_jacobian": False},
    {"vmap_method": "sequential"},
    {"vmap_method": "sequential", "materialize_jacobian": False},
)


# --- the scenarios: `f` maps the Tesseract's inputs to its outputs -------------------


def problem():
    inputs = bratu_inputs(N)
    rng = np.random.default_rng(1)
    tangents = jnp.asarray(rng.standard_normal((K, N, N)))
    b = jnp.asarray(rng.standard_normal((N, N)))
    return inputs, tangents, b


def residual_of_u(f, inputs):
    return lambda u: f({**inputs, "u": u})["residual"]


def residual_fn(f):
    return lambda u, args: f({**args, "u": u})["residual"]


def jacfwd(f):
    inputs, _, _ = problem()
    return jax.jacfwd(residual_of_u(f, inputs))(inputs["u"]), ""


def jacrev(f):
    inputs, _, _ = problem()
    return jax.jacrev(residual_of_u(f, inputs))(inputs["u"]), ""


def vmap_jvp(f):
    inputs, tangents, _ = problem()
    g, u = residual_of_u(f, inputs), inputs["u"]
    return jax.vmap(lambda t: jax.jvp(g, (u,), (t,))[1])(tangents), ""


def newton(f):
    inputs, _, _ = problem()
    args = {"k": inputs["k"], "f": inputs["f"]}
    solver = optx.Newton(rtol=TOL, atol=TOL)
    sol = optx.root_find(residual_fn(f), solver, jnp.zeros((N, N)), args)
    return sol.value, f"{int(sol.stats['num_steps'])} steps"


def gmres(f):
    inputs, _, b = problem()
    args = {"k": inputs["k"], "f": inputs["f"]}
    op = lx.JacobianLinearOperator(residual_fn(f), inputs["u"], args, jac="bwd")
    return lx.linear_solve(op, b, lx.GMRES(rtol=TOL, atol=TOL)).value, ""


SCENARIOS = {f.__name__: f for f in (jacfwd, jacrev, vmap_jvp, newton, gmres)}


# --- server and counting -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stock_server(api: Path):
    """`tesseract-runtime serve` on a free loopback port; yields its URL."""
    runtime = Path(sys.executable).with_name("tesseract-runtime")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="versus_tjx_") as tmp:
        env = {**os.environ, "TESSERACT_API_PATH": str(api)}
        env["TESSERACT_OUTPUT_PATH"] = tmp
        with open(Path(tmp) / "server.log", "w+b") as log:
            proc = subprocess.Popen(
                [str(runtime), "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=api.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 120
                while True:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"server not ready:\n{log.read().decode()}")
                    with contextlib.suppress(requests.RequestException):
                        if requests.get(f"{url}/health", timeout=2).ok:
                            break
                    time.sleep(0.2)
                yield url
            finally:
                stop_group(proc)


def run(scenario, f):
    try:
        out, note = scenario(f)
        return jax.block_until_ready(out), note
    except Exception as e:  # a failing scenario is a result
        return None, failure(e)


def order(sent: list[str]) -> str:
    """`sent` in short: the requests sent while tracing (`abstract_eval`), then the
    shortest block of requests that repeats to make up the rest, times its count."""
    k = next((i for i, e in enumerate(sent) if e != "abstract_eval"), len(sent))
    head, rest = sent[:k], [ENDPOINTS.get(e, e) for e in sent[k:]]
    parts = [f"abstract_eval x {len(head)}"] if head else []
    if rest:
        n = len(rest)
        p = next(p for p in range(1, n + 1) if rest == rest[:p] * (n // p))
        parts.append(f"({', '.join(rest[:p])}) x {n // p}")
    return ", then ".join(parts)


def measure(apply_tesseract, tesseract: Tesseract, sent: list[str]) -> list[dict]:
    jobs = [(name, {}) for name in SCENARIOS]
    jobs[3:3] = [("vmap_jvp", kw) for kw in VMAP_VARIANTS]
    rows = []
    for name, kwargs in jobs:
        ref, _ = run(SCENARIOS[name], bratu_ref)
        sent.clear()
        out, note = run(
            SCENARIOS[name], lambda x: apply_tesseract(tesseract, x, **kwargs)
        )
        row = {"scenario": name, "kwargs": kwargs, "sent": Counter(sent)}
        row["order"] = order(sent)
        row["err"] = None if out is None else float(jnp.max(jnp.abs(out - ref)))
        row["note"] = note
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = [
        "scenario",
        "options",
        *ENDPOINTS.values(),
        "total",
        "order",
        "max abs err",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        options = ", ".join(f"{k}={v!r}" for k, v in r["kwargs"].items()) or "defaults"
        counts = [str(r["sent"].get(e, 0)) for e in ENDPOINTS]
        others = sum(v for e, v in r["sent"].items() if e not in ENDPOINTS)
        total = str(sum(r["sent"].values())) + (f" ({others} other)" if others else "")
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        cells = [r["scenario"], options, *counts, total, r["order"], err, r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument(
        "--peer", action="store_true", help="tesseract_jax.apply_tesseract"
    )
    side.add_argument(
        "--ours", action="store_true", help="tesseract_lx.apply_tesseract"
    )
    opts = parser.parse_args()
    if opts.peer:
        import tesseract_jax
        from tesseract_jax import apply_tesseract

        who = f"tesseract-jax {tesseract_jax.__version__}"
    else:
        from tesseract_lx import apply_tesseract

        who = "tesseract_lx"

    with stock_server(BRATU) as url:
        tesseract = Tesseract.from_url(url)
        rows = measure(apply_tesseract, tesseract, counted(tesseract))
    print(
        f"Requests per endpoint, {who}, tesseract-core {tesseract_core.__version__}, "
        f"jax {jax.__version__}, lineax {lx.__version__}, optimistix {optx.__version__}; "
        f"bratu N={N} (n={N * N}), K={K}.\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
