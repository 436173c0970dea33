"""Trees of the Tesseract's inputs and outputs on the server: skeleton and arrays.

A pydantic input model (or a dump of one) is split into a *skeleton* (structure,
model classes, non-array values, array shapes and dtypes) and its arrays by path.
Two trees with equal skeletons differ in array values only: `/batched_apply` stacks
such points, and the linearisation cache compiles one function per skeleton.
`rebuild` puts traced arrays back into a model without validating it (tesseract-core's
array validation would turn tracers into NumPy).
"""

import dataclasses
import functools
from typing import Any

import numpy as np
from pydantic import BaseModel, PrivateAttr
from tesseract_core.runtime.tree_transforms import is_arraylike


Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where an array leaf sits in a tree's skeleton, and its shape and dtype."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Static:
    """A leaf that is not an array: points must agree on it to be stacked."""

    type: type
    value: Any

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static) or self.type is not other.type:
            return False
        try:
            return bool(self.value == other.value)
        except Exception:
            return False

    def __hash__(self) -> int:
        return hash(self.type)


@dataclasses.dataclass(frozen=True)
class _Model:
    """A pydantic model in a skeleton: its class and its fields' skeletons."""

    cls: type
    fields: dict[str, Any]


def flatten(tree: Any, path: Path = ()) -> tuple[Any, dict[Path, Any]]:
    """`(skeleton, {path: array})` of a tree of dicts, lists, tuples and models.

    Two trees with equal skeletons have the same structure, the same non-array leaves
    and arrays of the same shapes and dtypes.
    """
    arrays: dict[Path, Any] = {}

    def walk(x: Any, p: Path) -> Any:
        if isinstance(x, BaseModel):
            return _Model(
                type(x), {k: walk(getattr(x, k), (*p, k)) for k in _fields(x)}
            )
        if isinstance(x, dict):
            return {k: walk(v, (*p, k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(walk(v, (*p, i)) for i, v in enumerate(x))
        if is_arraylike(x):
            arrays[p] = x
            return _Slot(p, tuple(np.shape(x)), str(x.dtype))
        return _Static(type(x), x)

    return walk(tree, path), arrays


def _fields(model: BaseModel) -> list[str]:
    return list(type(model).model_fields)


def unflatten(skeleton: Any, arrays: dict[Path, Any]) -> Any:
    """The tree of `skeleton`, its array leaves taken from `arrays`; models become
    dicts (a dump)."""
    if isinstance(skeleton, _Slot):
        return arrays[skeleton.path]
    if isinstance(skeleton, _Static):
        return skeleton.value
    if isinstance(skeleton, _Model):
        return {k: unflatten(v, arrays) for k, v in skeleton.fields.items()}
    if isinstance(skeleton, dict):
        return {k: unflatten(v, arrays) for k, v in skeleton.items()}
    return type(skeleton)(unflatten(v, arrays) for v in skeleton)


@functools.lru_cache(maxsize=64)
def _traced_class(cls: type[BaseModel]) -> type[BaseModel]:
    """A subclass of the input model whose `model_dump()` returns a given dump (with
    tracers in it): tesseract-core's array serialiser would turn them into NumPy."""

    class Traced(cls):  # type: ignore[valid-type, misc]
        _lx_dump: Any = PrivateAttr(default=None)

        def model_dump(self, *args: Any, **kwargs: Any) -> Any:
            if (
                args
                or set(kwargs) - {"mode"}
                or kwargs.get("mode") not in (None, "python")
            ):
                raise TypeError("only `model_dump()` is supported while tracing")
            return self._lx_dump

    Traced.__name__ = Traced.__qualname__ = cls.__name__
    return Traced


def rebuild(x: Any, p: Path, arrays: dict[Path, Any], top: bool = False) -> Any:
    """`x` with the array leaves at `arrays`' paths replaced; models unvalidated."""
    if isinstance(x, BaseModel):
        values = {k: rebuild(getattr(x, k), (*p, k), arrays) for k in _fields(x)}
        cls = _traced_class(type(x)) if top else type(x)
        return cls.model_construct(**values)
    if isinstance(x, dict):
        return {k: rebuild(v, (*p, k), arrays) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(rebuild(v, (*p, i), arrays) for i, v in enumerate(x))
    return arrays.get(p, x)


def key(skeleton: Any) -> tuple:
    """A hashable key equal for equal skeletons (non-array values by `repr`: `0.0`
    and `-0.0` differ, a NaN equals itself)."""
    if isinstance(skeleton, _Slot):
        return ("a", skeleton.path, skeleton.shape, skeleton.dtype)
    if isinstance(skeleton, _Static):
        return ("s", skeleton.type, repr(skeleton.value))
    if isinstance(skeleton, _Model):
        return (
            "m",
            skeleton.cls,
            tuple((k, key(v)) for k, v in skeleton.fields.items()),
        )
    if isinstance(skeleton, dict):
        return ("d", tuple((k, key(v)) for k, v in skeleton.items()))
    return (type(skeleton).__name__, tuple(key(v) for v in skeleton))


def traced(template: BaseModel, skeleton: Any, values: dict[Path, Any]) -> BaseModel:
    """`template` with its arrays replaced by `values` (tracers), unvalidated; its
    `model_dump()` gives the dump with the tracers in it."""
    inputs = rebuild(template, (), values, top=True)
    inputs._lx_dump = unflatten(skeleton, values)  # type: ignore[attr-defined]
    return inputs
