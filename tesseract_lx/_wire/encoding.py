"""Arrays <-> the Tesseract wire format, shared by client and server.

The format is tesseract-core's own `json+base64` array dict; the codec is
tesseract-core's (`tesseract_core.runtime.array_encoding`), wrapped here so that client
and server agree on one place that walks payload trees.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from tesseract_core.runtime.array_encoding import (
    _dump_base64_arraydict,
    _load_base64_arraydict,
)


ACCEPT = "application/json+base64"


def encode_array(x: Any) -> dict:
    """One array (NumPy, JAX or a Python scalar) as a base64 array dict.

    0-d arrays stay 0-d: the server checks the rank against its schema.
    """
    arr = np.asarray(x)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return dict(_dump_base64_arraydict(arr))


def is_encoded_array(x: Any) -> bool:
    """An array dict: its keys alone do not tell (a tree may have fields named
    `data`, `shape` and `dtype`), their types do."""
    return (
        isinstance(x, dict)
        and isinstance(x.get("data"), dict)
        and isinstance(x["data"].get("encoding"), str)
        and isinstance(x.get("shape"), list)
        and all(type(n) is int for n in x["shape"])
        and isinstance(x.get("dtype"), str)
    )


def decode_array(d: dict) -> np.ndarray:
    """A base64 (or plain JSON) array dict as a NumPy array."""
    encoding = d["data"].get("encoding")
    if encoding == "base64":
        return _load_base64_arraydict(d)  # pyright: ignore[reportArgumentType]
    if encoding in ("json", "raw"):
        return np.asarray(d["data"]["buffer"], dtype=d["dtype"]).reshape(d["shape"])
    raise ValueError(f"Unsupported array encoding {encoding!r} in a response.")


def _map(fn: Callable[[Any], Any], tree: Any, is_leaf: Callable[[Any], bool]) -> Any:
    if is_leaf(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v, is_leaf) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_map(fn, v, is_leaf) for v in tree)
    return tree


def _is_array(x: Any) -> bool:
    return (
        isinstance(x, np.ndarray | np.generic)
        or hasattr(x, "__jax_array__")
        or (type(x).__module__.startswith("jax") and hasattr(x, "shape"))
    )


def encode_tree(tree: Any) -> Any:
    """Every array leaf of a nested dict/list encoded; other leaves kept (JSON)."""
    return _map(encode_array, tree, _is_array)


def decode_tree(tree: Any) -> Any:
    """Every encoded array dict of a decoded JSON tree as a NumPy array."""
    return _map(decode_array, tree, is_encoded_array)
