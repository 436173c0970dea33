"""The dtype policy: answers are taken in the dtypes the schema declares, and lost
precision is reported from what the server says, never guessed.

tesseract-core casts a Tesseract's float32 results up to a declared float64, so
float64 data cannot show whether it was computed in float32, and float64 data that
came from a float32 file looks just the same. So:

- a tesseract-lx server states the precision it computes in (`x-tesseract-lx`); when
  that is below a float64 the schema declares, the call is refused before any request
  (`strict_dtype=True`, the default) or warned about once;
- a stock server states nothing: its answers are not second-guessed, except that an
  array that arrives in a lower float dtype than declared is warned about.
"""

import warnings
from typing import Any

import numpy as np

from ._errors import TesseractDtypeError
from ._tree import canonical_dtype
from ._wire.schema import (
    ArrayNode,
    DictNode,
    ListNode,
    ModelNode,
    Node,
    OptionalNode,
    UnionNode,
)


def declared_floats(node: Node) -> set[str]:
    """The floating-point dtypes declared anywhere below `node`."""
    if isinstance(node, ArrayNode):
        return {node.dtype} if node.dtype and node.dtype.startswith("float") else set()
    if isinstance(node, ModelNode):
        return set().union(*(declared_floats(n) for _, n, _ in node.fields))
    if isinstance(node, ListNode):
        return declared_floats(node.item)
    if isinstance(node, DictNode):
        return declared_floats(node.value)
    if isinstance(node, OptionalNode):
        return declared_floats(node.inner)
    if isinstance(node, UnionNode):
        return set().union(*(declared_floats(n) for n in node.options))
    return set()


def check_precision(client: Any, strict: bool) -> None:
    """Refuse (or warn about) a server that computes below its declared precision.

    Sends nothing: reads the schema and `x-tesseract-lx` only.
    """
    schema = client.schema
    stated = schema.capabilities.precision
    if stated is None:
        return
    declared = declared_floats(schema.outputs) | declared_floats(schema.inputs)
    limit = np.dtype(stated).itemsize
    wider = sorted(d for d in declared if canonical_dtype(d).itemsize > limit)
    if not wider:
        return
    message = (
        f"The Tesseract at {client.urls[0]} computes in {stated} (its server says so), "
        f"but its schema declares {', '.join(wider)}: its answers would carry {stated} "
        "precision only. Enable `jax_enable_x64` in its `tesseract_api.py`, or declare "
        f"`TESSERACT_LX = {{'precision': ...}}` there if it is wrong."
    )
    if strict:
        raise TesseractDtypeError(
            message + " Pass `strict_dtype=False` to accept.", client.urls[0]
        )
    if client.telemetry.warn_once("precision"):
        warnings.warn(message, stacklevel=4)


def conform(x: Any, dtype: str, path: str, endpoint: str) -> np.ndarray:
    """An answer in the dtype its leaf expects; a lower float dtype is warned about."""
    x = np.asarray(x)
    want = np.dtype(dtype)
    if x.dtype == want:
        return x
    if x.dtype.kind == "f" and want.kind == "f" and x.dtype.itemsize < want.itemsize:
        warnings.warn(
            f"`/{endpoint}` answered `{path}` in {x.dtype}, but {want} was "
            "expected: it carries that precision only.",
            stacklevel=2,
        )
    return x.astype(want, copy=False)
