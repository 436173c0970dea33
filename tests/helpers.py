"""Test helpers: `tree_allclose`, the example Tesseracts, transports, strategies."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from references import (
    bratu_inputs,
    bratu_ref,
    poisson_inputs,
    poisson_ref,
    pytree_inputs,
    pytree_ref,
)


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "tesseracts"
PARTIAL = ROOT / "tests" / "tesseracts"

# How a test reaches a Tesseract.
TRANSPORTS = ("stock", "tlx", "inprocess")
# `tlx.serve(..., server=...)` for the transports that are real servers.
SERVERS = {"stock": "tesseract-runtime", "tlx": "tesseract-lx"}
STRATEGIES = ("sequential", "concurrent", "jacobian", "batched", "auto")

JVP, VJP = "jacobian_vector_product", "vector_jacobian_product"
BATCHED = {JVP: f"batched_{JVP}", VJP: f"batched_{VJP}"}


class Tol(TypedDict):
    """Tolerances for `**tol`: a lineax solver's or `np.testing.assert_allclose`'s."""

    rtol: float
    atol: float


def tree_allclose(a: Any, b: Any, rtol: float = 1e-8, atol: float = 1e-10) -> bool:
    """Same tree structure, and every leaf close (shapes equal, dtypes not checked)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or not np.allclose(x, y, rtol=rtol, atol=atol):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Case:
    """One example Tesseract, its pure-JAX reference and how to differentiate it.

    `diff_keys` are the top-level inputs that are differentiable all the way down;
    `diff_out` keeps the differentiable outputs of an output dict.
    """

    name: str
    path: Path
    ref: Callable[[dict], dict]
    make_inputs: Callable[[], dict]
    diff_keys: tuple[str, ...]
    diff_out: Callable[[dict], dict]

    def inputs(self) -> dict:
        return self.make_inputs()

    def split(self, inputs: dict) -> tuple[dict, dict]:
        """(differentiable inputs, the rest)."""
        diff = {k: v for k, v in inputs.items() if k in self.diff_keys}
        rest = {k: v for k, v in inputs.items() if k not in self.diff_keys}
        return diff, rest

    def fn(self, f: Callable[[dict], dict], inputs: dict) -> Callable[[dict], dict]:
        """Differentiable inputs -> differentiable outputs, the rest held fixed."""
        _, rest = self.split(inputs)
        return lambda diff: self.diff_out(f({**rest, **diff}))

    def loss(self, f: Callable[[dict], dict], inputs: dict) -> Callable[[dict], Any]:
        g = self.fn(f, inputs)
        return lambda diff: sum(jnp.sum(x**2) for x in jax.tree.leaves(g(diff)))


def _pytree_out(out: dict) -> dict:
    return {"y": out["y"], "stats": out["stats"]}


CASES = {
    "bratu": Case(
        "bratu",
        EXAMPLES / "bratu" / "tesseract_api.py",
        bratu_ref,
        lambda: bratu_inputs(4),
        ("u", "k", "f"),
        lambda out: out,
    ),
    "poisson": Case(
        "poisson",
        EXAMPLES / "poisson" / "tesseract_api.py",
        poisson_ref,
        lambda: poisson_inputs(4),
        ("x", "c"),
        lambda out: out,
    ),
    "pytree": Case(
        "pytree",
        EXAMPLES / "pytree" / "tesseract_api.py",
        pytree_ref,
        lambda: pytree_inputs(5),
        ("params", "x"),
        _pytree_out,
    ),
}
# The bratu example serving only some of its gradient endpoints.
PARTIAL_CASES = {
    name: dataclasses.replace(
        CASES["bratu"], name=name, path=PARTIAL / name / "tesseract_api.py"
    )
    for name in ("bratu_vjp_only", "bratu_jacobian_only")
}
ALL_CASES = {**CASES, **PARTIAL_CASES}


def schema_fixes_outputs(client) -> bool:
    """Whether the schema alone fixes the output shapes (no `/abstract_eval` needed)."""
    from tesseract_lx._tree import fixed_outputs

    return fixed_outputs(client.schema.outputs) is not None


def size(tree: Any) -> int:
    return sum(np.size(x) for x in jax.tree.leaves(tree))


def has_batched(transport: str) -> bool:
    """Whether the transport serves the batched endpoints (stock servers do not)."""
    return transport != "stock"


def linear_counts(rule: str, kind: str, k: int) -> dict[str, int]:
    """The requests a rule sends for K (co)tangents of `kind` at one point."""
    return {
        "sequential": {kind: k},
        "concurrent": {kind: k},
        "jacobian": {"jacobian": 1},
        "batched": {BATCHED[kind]: 1},
    }[rule]


def gradient_stats(stats) -> dict[str, int]:
    """`client.stats` without `apply` and `abstract_eval`."""
    return {k: v for k, v in stats.items() if k not in ("apply", "abstract_eval") and v}
