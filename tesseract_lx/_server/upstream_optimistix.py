"""Every private name of optimistix the server side uses, and nothing else.

`/nonlinear_solve` answers the outcome of a solve by the name of its `optx.RESULTS`
item (`"successful"`, `"nonlinear_max_steps_reached"`, ...) and, when asked to throw,
with optimistix's own message for it. optimistix has no public hook for:

- **the items by name**: `optx.RESULTS._name_to_item`, `{name: item}`;
- **an item's integer code**: `item._value`, what a jitted solve can return;
- **an item's message**: `optx.RESULTS[item]` (equinox's enumeration).

`optx.RESULTS` is an `equinox.Enumeration` extending lineax's: `check_optimistix()`
says in words what moved, and `optimistix_solve.NonlinearSolver` runs it when it is
made (`tests/test_nonlinear_server.py` runs it against the installed releases).
"""

import importlib.metadata
import inspect
from typing import Any

import numpy as np
import optimistix as optx


def _items() -> Any:
    # Read statically, as `upstream_lineax._items` (a missing attribute recurses).
    return inspect.getattr_static(optx.RESULTS, "_name_to_item", None)


def _code(item: Any) -> int | None:
    try:
        code = np.asarray(getattr(item, "_value", None))
    except Exception:  # noqa: BLE001 - anything but an array is "none"
        return None
    if code.shape != () or code.dtype.kind not in "iu":
        return None
    return int(code)


def check_optimistix() -> None:
    """A `RuntimeError` naming what moved, if the installed optimistix no longer
    gives `optx.RESULTS` items by name, each with a distinct integer code and a
    message."""
    problems = []
    items = _items()
    if not isinstance(items, dict) or "successful" not in items:
        problems.append(
            "`optimistix.RESULTS._name_to_item` is gone or lacks `successful`"
        )
    else:
        codes = {name: _code(item) for name, item in items.items()}
        if None in codes.values() or len(set(codes.values())) != len(codes):
            problems.append("`optimistix.RESULTS` items have no distinct integer codes")
        else:
            try:
                [str(optx.RESULTS[item]) for item in items.values()]
            except Exception as e:  # noqa: BLE001 - whatever moved
                problems.append(f"`optimistix.RESULTS[item]` fails ({e!r})")
    if problems:
        versions = ", ".join(
            f"{name} {importlib.metadata.version(name)}"
            for name in ("optimistix", "equinox")
        )
        raise RuntimeError(
            "tesseract_lx's server cannot name the outcome of an optimistix solve "
            f"with this optimistix ({versions}): "
            + "; ".join(problems)
            + ". Update `tesseract_lx/_server/upstream_optimistix.py` for this release."
        )


def result_names() -> dict[int, str]:
    """`{code: name}` of every `optx.RESULTS` item (`check_optimistix()` first)."""
    return {_code(item): name for name, item in _items().items()}  # type: ignore[misc]


def result_code(result: Any) -> Any:
    """The integer code of an `optx.RESULTS` item (a JAX array when traced)."""
    return result._value


def message(name: str) -> str:
    """optimistix's own message for the item `name` (what `throw=True` raises)."""
    return str(optx.RESULTS[_items()[name]])
