"""The schema test Tesseracts (`tests/tesseracts/<name>/`): example inputs and pure-JAX
references.

Each `*_ref` takes the inputs as a user gives them to `TesseractModule` (plain
containers) and returns the outputs in the shape the rewritten client returns them:
lists as lists, dicts as dicts, an absent optional as `None`, strings as `str`, numeric
non-array outputs as numbers. The maths is written again here, independently of the
`tesseract_api.py` files, so the two can be checked against each other.

Paths use tesseract-core's syntax (`xs.[1]`, `fields.{a}`, `sub.w`); `get_path` and
`set_path` read and replace one leaf of an input or output tree without mutating it
(the leaves may be JAX tracers).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tesseract_core.runtime.tree_transforms import path_to_index_op, split_path


jax.config.update("jax_enable_x64", True)

TESSERACTS = Path(__file__).resolve().parent / "tesseracts"


def _index(tree: Any, part: str) -> Any:
    return tree[path_to_index_op(part)[1]]


def get_path(tree: Any, path: str) -> Any:
    """The leaf of `tree` at `path` (`"xs.[1]"`, `"fields.{a}"`, `"sub.w"`)."""
    for part in split_path(path):
        tree = _index(tree, part)
    return tree


def set_path(tree: Any, path: str, value: Any) -> Any:
    """A copy of `tree` (nested dicts and lists) with the leaf at `path` replaced."""
    head, *rest = split_path(path)
    key = path_to_index_op(head)[1]
    leaf = set_path(tree[key], ".".join(rest), value) if rest else value
    new: Any = list(tree) if isinstance(tree, list) else dict(tree)
    new[key] = leaf
    return new


def _rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)


#
# normalize: any rank, not elementwise
#


def normalize_inputs(shape: tuple[int, ...] = (5,), seed: int = 0) -> dict[str, Any]:
    # Positive, so that `sum(x)` is far from zero.
    return {"x": jnp.asarray(_rng(seed).uniform(0.5, 1.5, shape), dtype=jnp.float64)}


def normalize_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    x = inputs["x"]
    return {"y": x / jnp.sum(x), "z": x - jnp.mean(x)}


#
# containers: list, dict, Optional, a scalar, Literal, str, int, a nested model
#

CONTAINER_DIFF_PATHS = ("xs.[0]", "xs.[1]", "fields.{a}", "fields.{b}", "s", "sub.w")


def containers_inputs(
    *,
    mode: str = "sum",
    opt: str = "value",
    n: int = 2,
    label: str = "run",
    seed: int = 0,
) -> dict[str, Any]:
    """`opt` is `"value"` (an array), `"none"` (given as `None`) or `"omitted"`."""
    rng = _rng(seed)
    vec = lambda m: jnp.asarray(rng.standard_normal(m), dtype=jnp.float64)
    inputs = {
        "xs": [vec(3), vec(4)],
        "fields": {"a": vec(3), "b": vec(3)},
        "s": jnp.asarray(0.7, dtype=jnp.float64),
        "sub": {"w": vec(2)},
        "mode": mode,
        "label": label,
        "n": n,
    }
    if opt == "value":
        inputs["opt"] = vec(3)
    elif opt == "none":
        inputs["opt"] = None
    elif opt != "omitted":
        raise ValueError(f"`opt` must be 'value', 'none' or 'omitted', got {opt!r}.")
    return inputs


def containers_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    mode, n = inputs.get("mode", "sum"), inputs.get("n", 2)
    label, opt = inputs.get("label", "run"), inputs.get("opt")
    agg = {"sum": jnp.sum, "max": jnp.max}[mode]
    s, w = jnp.asarray(inputs["s"]), inputs["sub"]["w"]
    xs = [jnp.asarray(x) for x in inputs["xs"]]
    return {
        "ys": [s * x**n + agg(x) for x in xs],
        "totals": {k: agg(v * w[0]) + w[1] * s for k, v in inputs["fields"].items()},
        "maybe": None if opt is None else opt * s + agg(opt),
        "message": f"{label}:{mode}",
        "count": len(xs),
    }


def containers_diff_out(out: dict[str, Any]) -> dict[str, Any]:
    """The differentiable outputs (no `message`, no `count`)."""
    return {"ys": out["ys"], "totals": out["totals"], "maybe": out["maybe"]}


#
# mixed_dtypes: float32, float64 and int64 in one schema
#


def mixed_dtypes_inputs(seed: int = 0) -> dict[str, Any]:
    rng = _rng(seed)
    return {
        "a": jnp.asarray(rng.standard_normal(4), dtype=jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), dtype=jnp.float64),
        "i": jnp.asarray([3, 1, 4, 1], dtype=jnp.int64),
    }


def mixed_dtypes_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    a = jnp.asarray(inputs["a"], jnp.float32)
    b = jnp.asarray(inputs["b"], jnp.float64)
    i = jnp.asarray(inputs["i"], jnp.int64)
    return {
        "y32": jnp.sin(a) * jnp.mean(b).astype(jnp.float32) + i.astype(jnp.float32),
        "y64": b * jnp.sum(a).astype(jnp.float64) + b**2 + jnp.sum(i),
        "idx": jnp.cumsum(i) + jnp.argmax(b),
    }


#
# partial_outputs: outputs independent of some (or all) inputs; no JVP endpoint
#


def partial_outputs_inputs(seed: int = 0) -> dict[str, Any]:
    rng = _rng(seed)
    return {
        "a": jnp.asarray(rng.standard_normal(4), dtype=jnp.float64),
        "b": jnp.asarray(rng.standard_normal(3), dtype=jnp.float64),
    }


def partial_outputs_ref(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "fa": jnp.sin(inputs["a"]),
        "fb": inputs["b"] ** 2,
        "const": jnp.ones(3, dtype=jnp.float64),
    }


@dataclasses.dataclass(frozen=True)
class SchemaCase:
    """One schema test Tesseract: where it is, example inputs and its reference."""

    name: str
    path: Path
    make_inputs: Callable[..., dict]
    ref: Callable[[dict], dict]


def _case(name: str, make_inputs: Callable[..., dict], ref: Callable) -> SchemaCase:
    return SchemaCase(name, TESSERACTS / name / "tesseract_api.py", make_inputs, ref)


SCHEMA_CASES = {
    case.name: case
    for case in (
        _case("normalize", normalize_inputs, normalize_ref),
        _case("containers", containers_inputs, containers_ref),
        _case("mixed_dtypes", mixed_dtypes_inputs, mixed_dtypes_ref),
        _case("partial_outputs", partial_outputs_inputs, partial_outputs_ref),
    )
}
