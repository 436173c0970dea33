"""Paths into input and output trees, in tesseract-core's own syntax.

A path is a dot-separated string of segments: a model field (`mesh`), a list item
(`[1]`) or a dict key (`{a}`, with `{`, `}` and `\\` escaped): `mesh.points`,
`xs.[1]`, `fields.{a}`. The syntax and its escaping are tesseract-core's
(`tesseract_core.runtime.tree_transforms`); this module is the only place in
tesseract_lx that builds, splits or follows paths.

`get` and `replace` work on plain containers (dicts and lists), never copy arrays,
and never touch a value's contents: safe on JAX tracers.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from tesseract_core.runtime.tree_transforms import (
    escape_dict_key,
    path_to_index_op,
    split_path,
)


def field(name: str) -> str:
    return name


def item(index: int) -> str:
    return f"[{index}]"


def key(name: str) -> str:
    return "{" + escape_dict_key(name) + "}"


def join(prefix: str, segment: str) -> str:
    return f"{prefix}.{segment}" if prefix else segment


def segments(path: str) -> list[tuple[str, Any]]:
    """`"xs.[1]"` -> `[("getattr", "xs"), ("seq", 1)]`; a clear error if malformed."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"A path must be a non-empty string, got {path!r}.")
    try:
        return [path_to_index_op(part) for part in split_path(path)]
    except ValueError:
        raise ValueError(
            f"`{path}` is not a path: segments are field names (`mesh.points`), list "
            "items (`xs.[1]`) and dict keys (`fields.{a}`), joined by dots."
        ) from None


def get(tree: Any, path: str) -> Any:
    """The value at `path` in a tree of dicts and lists (a `KeyError` if absent)."""
    node = tree
    for op, index in segments(path):
        try:
            if op == "seq":
                if not isinstance(node, Sequence) or isinstance(node, str):
                    raise KeyError(path)
                node = node[index]
            else:
                if not isinstance(node, Mapping):
                    raise KeyError(path)
                node = node[index]
        except (IndexError, KeyError):
            raise KeyError(path) from None
    return node


def replace(tree: Any, path: str, value: Any) -> Any:
    """A copy of `tree` with the value at `path` replaced (containers on the way are
    copied, nothing else); missing model fields and dict keys are created."""
    ops = segments(path)

    def go(node: Any, depth: int) -> Any:
        op, index = ops[depth]
        last = depth == len(ops) - 1
        if op == "seq":
            if not isinstance(node, list | tuple):
                raise TypeError(
                    f"`{path}`: expected a list to index with `[{index}]`, got "
                    f"{type(node).__name__}."
                )
            if index >= len(node):
                raise KeyError(path)
            new = list(node)
            new[index] = value if last else go(node[index], depth + 1)
            return type(node)(new) if isinstance(node, tuple) else new
        if node is None:
            node = {}
        if not isinstance(node, Mapping):
            raise TypeError(
                f"`{path}`: expected a dict to hold `{index}`, got "
                f"{type(node).__name__}."
            )
        new = dict(node)
        new[index] = value if last else go(node.get(index), depth + 1)
        return new

    return go(tree, 0)


def describe(paths: Sequence[str]) -> str:
    return ", ".join(f"`{p}`" for p in paths) if paths else "none"
