"""The binary body of tesseract-lx's lean path: arrays as raw bytes, the rest as JSON.

tesseract-core's wire format puts every array into JSON as base64 text: 4/3 of its
bytes, encoded and decoded on both ends, and parsed as JSON strings. A server that
states `"binary": MEDIA_TYPE` under `x-tesseract-lx` also takes and answers this
format on its computational endpoints, when the request says
`Content-Type: application/x-tesseract-lx` (and `Accept` the same for the answer).
Stock clients never send it, so they keep getting tesseract-core's JSON.

Layout, all integers little-endian:

    b"TLX1" | uint32 header size | header (UTF-8 JSON) | zero padding to 8 bytes
           | array 0 bytes | padding to 8 | array 1 bytes | padding to 8 | ...

The header is `{"tree": tree, "arrays": [entry, ...]}`: `tree` is the payload with
`null` where an array sits, and each entry `{"path": [key or index, ...], "shape":
[...], "dtype": "<f8"}` says where it goes; the arrays follow in the entries' order,
C-ordered, in a little-endian numeric dtype (`b`, `i`, `u`, `f`, `c` kinds). Decoding
refuses anything else, and any entry that does not fit the body, with a `ValueError`
that says what.
"""

import struct
from typing import Any

import numpy as np
import orjson


MEDIA_TYPE = "application/x-tesseract-lx"
_MAGIC = b"TLX1"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 8
_KINDS = "biufc"


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic) or (
        hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def _pad(n: int) -> int:
    return -n % _ALIGN


def encode(tree: Any) -> bytes:
    """`tree` (dicts with string keys, lists, tuples, JSON values, arrays) as a body."""
    arrays: list[np.ndarray] = []
    entries: list[dict] = []

    def walk(x: Any, path: list) -> Any:
        if _is_array(x):
            arr = np.asarray(x)
            if arr.dtype.kind not in _KINDS:
                raise TypeError(
                    f"Cannot send the array at {path} of dtype {arr.dtype}: only "
                    "numeric arrays travel as binary."
                )
            arr = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).reshape(
                arr.shape
            )
            entries.append(
                {"path": path, "shape": list(arr.shape), "dtype": arr.dtype.str}
            )
            arrays.append(arr)
            return None
        if isinstance(x, dict):
            return {k: walk(v, [*path, k]) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, [*path, i]) for i, v in enumerate(x)]
        return x

    skeleton = walk(tree, [])
    header = orjson.dumps({"tree": skeleton, "arrays": entries})
    parts = [_PREFIX.pack(_MAGIC, len(header)), header]
    parts.append(b"\0" * _pad(_PREFIX.size + len(header)))
    for arr in arrays:
        parts.append(arr.tobytes())
        parts.append(b"\0" * _pad(arr.nbytes))
    return b"".join(parts)


def decode(body: bytes) -> Any:
    """The tree of a body made by `encode`; arrays are read-only views of `body`."""
    if len(body) < _PREFIX.size:
        raise ValueError("binary body too short for its prefix")
    magic, size = _PREFIX.unpack_from(body)
    if magic != _MAGIC:
        raise ValueError(f"binary body starts with {magic!r}, not {_MAGIC!r}")
    start = _PREFIX.size
    if start + size > len(body):
        raise ValueError(f"binary header of {size} bytes runs past the body's end")
    try:
        header = orjson.loads(body[start : start + size])
        tree, entries = header["tree"], header["arrays"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"binary header is not a {{tree, arrays}} object: {e}")
    if not isinstance(entries, list):
        raise ValueError("binary header's `arrays` must be a list")
    offset = start + size + _pad(start + size)
    for i, entry in enumerate(entries):
        arr = _array(body, entry, offset, i)
        offset += arr.nbytes + _pad(arr.nbytes)
        tree = _put(
            tree, entry.get("path") if isinstance(entry, dict) else None, arr, i
        )
    if offset < len(body) - _ALIGN:
        raise ValueError(f"binary body has {len(body) - offset} bytes past its arrays")
    return tree


def _array(body: bytes, entry: Any, offset: int, i: int) -> np.ndarray:
    try:
        shape = tuple(entry["shape"])
        dtype = np.dtype(entry["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"binary array {i}: malformed entry ({e})") from None
    if dtype.kind not in _KINDS or dtype.byteorder == ">":
        raise ValueError(f"binary array {i}: dtype {dtype.str} is not numeric, LE")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"binary array {i}: shape {list(shape)} is not sizes >= 0")
    count = int(np.prod(shape, dtype=object))
    if offset + count * dtype.itemsize > len(body):
        raise ValueError(
            f"binary array {i}: shape {list(shape)} of {dtype.str} runs past the end "
            f"of a body of {len(body)} bytes"
        )
    return np.frombuffer(body, dtype, count, offset).reshape(shape)


def _put(tree: Any, path: Any, value: np.ndarray, i: int) -> Any:
    """`tree` with the `null` at `path` replaced by `value`."""
    if not isinstance(path, list):
        raise ValueError(f"binary array {i}: `path` must be a list")
    if not path:
        if tree is not None:
            raise ValueError(f"binary array {i}: its path does not hold `null`")
        return value
    node = tree
    for step in path[:-1]:
        node = _child(node, step, i)
    last = path[-1]
    if _child(node, last, i) is not None:
        raise ValueError(f"binary array {i}: its path does not hold `null`")
    node[last] = value
    return tree


def _child(node: Any, step: Any, i: int) -> Any:
    if isinstance(node, dict) and isinstance(step, str) and step in node:
        return node[step]
    if isinstance(node, list) and type(step) is int and 0 <= step < len(node):
        return node[step]
    raise ValueError(f"binary array {i}: its path leaves the tree at {step!r}")
