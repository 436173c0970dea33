"""Benchmark: per-call latency of apply / JVP / VJP through `tlx.TesseractModule`,
against a raw `requests` post of the same payload.

A benchmark, not a test: it serves the `bratu` example Tesseract over loopback (stock
`tesseract-runtime` server and the tesseract-lx server, 1 worker each) at N = 8 and
N = 32, and writes `benchmarks/latency.md` (next to this file).

Module calls, each followed by `jax.block_until_ready`:

- apply: `f(inputs)["residual"]`, eager and `jax.jit`-ed;
- jvp: `jax.jvp(g, (u,), (t,))[1]` with `g = u -> f({..., "u": u})["residual"]`,
  eager and jitted;
- vjp: `jax.vjp(g, u)[1](ct)[0]`, eager and jitted (the jitted one is
  `jax.jit(lambda u, ct: jax.vjp(g, u)[1](ct)[0])`).

Raw: one `requests.Session` (keep-alive, `Accept: application/json+base64`) posts the
same payload, encoded with `tesseract_lx._wire.encoding.encode_tree` and `orjson` (as the
client does), and decodes the answer with `decode_tree`: the time of one bare request
of that endpoint including encoding and decoding. Overhead = module - raw (medians).
If the module sends more than one request for a call (e.g. a primal `/apply` next to
the JVP), the table says so in its `requests` column.

    cd /work/main && PYTHONPATH=. python benchmarks/latency.py [--calls 50]
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orjson
import requests
import tesseract_lx as tlx
from _report import log, versions
from tesseract_lx._wire.encoding import ACCEPT, decode_tree, encode_tree


jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BRATU = ROOT / "examples" / "tesseracts" / "bratu" / "tesseract_api.py"
SERVERS = ("tesseract-runtime", "tesseract-lx")
# `tlx.serve` starts the server with its cwd in the Tesseract's folder: a relative
# `PYTHONPATH=.` would not find `tesseract_lx` there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
SIDES = (8, 32)
ENDPOINT_KIND = {
    "apply": "apply",
    "jacobian_vector_product": "jvp",
    "vector_jacobian_product": "vjp",
}
WARMUP = 5


def interleaved_ms(fns: dict, calls: int) -> dict:
    """Median ms of each callable, called in turn (one round = each once), so that
    a drift in machine load hits all of them alike."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def problem(n_side: int):
    rng = np.random.default_rng(0)
    u = jnp.asarray(0.1 * rng.standard_normal((n_side, n_side)))
    k = jnp.asarray(1.0)
    f0 = jnp.ones((n_side, n_side))
    t = jnp.asarray(rng.standard_normal((n_side, n_side)))
    ct = jnp.asarray(rng.standard_normal((n_side, n_side)))
    return u, k, f0, t, ct


def module_calls(client: tlx.Client, n_side: int) -> dict:
    """name -> zero-argument callable that makes one call through the module."""
    f = tlx.TesseractModule(client)
    u, k, f0, t, ct = problem(n_side)

    def g(u):
        return f({"u": u, "k": k, "f": f0})["residual"]

    apply_jit = jax.jit(g)
    jvp = lambda u, t: jax.jvp(g, (u,), (t,))[1]  # noqa: E731
    jvp_jit = jax.jit(jvp)
    vjp = lambda u, ct: jax.vjp(g, u)[1](ct)[0]  # noqa: E731
    vjp_jit = jax.jit(vjp)
    return {
        ("apply", "eager"): lambda: jax.block_until_ready(g(u)),
        ("apply", "jit"): lambda: jax.block_until_ready(apply_jit(u)),
        ("jvp", "eager"): lambda: jax.block_until_ready(jvp(u, t)),
        ("jvp", "jit"): lambda: jax.block_until_ready(jvp_jit(u, t)),
        ("vjp", "eager"): lambda: jax.block_until_ready(vjp(u, ct)),
        ("vjp", "jit"): lambda: jax.block_until_ready(vjp_jit(u, ct)),
    }, (g, jvp, vjp, u, t, ct)


def raw_calls(url: str, n_side: int) -> dict:
    """endpoint -> zero-argument callable: one bare `requests` post, encode+decode."""
    u, k, f0, t, ct = problem(n_side)
    inputs = {"u": u, "k": k, "f": f0}
    payloads = {
        "apply": {"inputs": inputs},
        "jvp": {
            "inputs": inputs,
            "jvp_inputs": ["u"],
            "jvp_outputs": ["residual"],
            "tangent_vector": {"u": t},
        },
        "vjp": {
            "inputs": inputs,
            "vjp_inputs": ["u"],
            "vjp_outputs": ["residual"],
            "cotangent_vector": {"residual": ct},
        },
    }
    endpoints = {
        "apply": "apply",
        "jvp": "jacobian_vector_product",
        "vjp": "vector_jacobian_product",
    }
    session = requests.Session()
    session.headers.update({"Content-Type": "application/json", "Accept": ACCEPT})

    def make(kind):
        def call():
            response = session.post(
                f"{url}/{endpoints[kind]}",
                data=orjson.dumps(encode_tree(payloads[kind])),
                timeout=60,
            )
            assert response.status_code == 200, response.text[:500]
            return decode_tree(orjson.loads(response.content))

        return call

    return {kind: make(kind) for kind in payloads}, session


def check(client, fns, raws, n_side: int) -> None:
    """Module and raw answers agree (same numbers over the same wire)."""
    g, jvp, vjp, u, t, ct = fns
    np.testing.assert_allclose(g(u), raws["apply"]()["residual"], rtol=1e-12)
    np.testing.assert_allclose(jvp(u, t), raws["jvp"]()["residual"], rtol=1e-12)
    np.testing.assert_allclose(vjp(u, ct), raws["vjp"]()["u"], rtol=1e-12)


def measure(calls: int):
    rows = []
    for server in SERVERS:
        with tlx.serve(BRATU, server=server) as client:
            for n_side in SIDES:
                mods, fns = module_calls(client, n_side)
                raws, session = raw_calls(client.urls[0], n_side)
                check(client, fns, raws, n_side)
                for (kind, mode), fn in mods.items():
                    fn()  # trace / compile, and the shapes' one /abstract_eval
                    client.stats.clear()
                    fn()
                    sent = dict(client.stats)
                    ms = interleaved_ms({"module": fn, **raws}, calls)
                    # The bare requests this call sent, one after the other.
                    same = sum(ms[ENDPOINT_KIND[e]] * v for e, v in sent.items())
                    row = {
                        "server": server,
                        "N": n_side,
                        "call": kind,
                        "mode": mode,
                        "module": ms["module"],
                        "raw": ms[kind],
                        "raw_same": same,
                        "sent": sent,
                    }
                    rows.append(row)
                    log(
                        f"[{server} N={n_side}] {kind} {mode}: module "
                        f"{ms['module']:.2f} ms, raw {ms[kind]:.2f} ms, overhead "
                        f"{ms['module'] - ms[kind]:+.2f} ms, requests {sent}"
                    )
                session.close()
    return rows


def table(rows) -> str:
    lines = [
        "| server | N (n) | call | mode | module [ms] | raw `requests` [ms] | "
        "overhead [ms] | requests per module call | overhead vs raw of the same "
        "requests [ms] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sent = ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items()))
        lines.append(
            f"| {r['server']} | {r['N']} ({r['N'] ** 2}) | {r['call']} | {r['mode']} | "
            f"{r['module']:.2f} | {r['raw']:.2f} | {r['module'] - r['raw']:+.2f} | "
            f"{sent} | {r['module'] - r['raw_same']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "latency.md")
    opts = parser.parse_args()
    start = time.perf_counter()
    header = (
        f"Machine: {os.cpu_count()} cores ({platform.machine()}, {platform.system()}), "
        f"loopback HTTP, 1 server worker, {datetime.date.today().isoformat()}. "
        f"{versions()}. Median of {opts.calls} calls after {WARMUP} warm-up calls "
        "(and one untimed call that traces/compiles). `raw` is one bare "
        "`requests.Session().post` of the same payload to the endpoint of that call "
        "(`/apply`, `/jacobian_vector_product`, `/vector_jacobian_product`), "
        "including `encode_tree` + `orjson` encoding and `decode_tree` of the answer. "
        "Overhead = module - raw; the last column subtracts the raw time of every "
        "request the module call sent (eager jvp/vjp also send the primal `/apply`)."
    )
    log(header)
    rows = measure(opts.calls)
    text = (
        "# Per-call latency: module vs raw request (bratu)\n\n"
        + header
        + "\n\n"
        + table(rows)
        + f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s.\n"
    )
    opts.out.write_text(text)
    log("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
