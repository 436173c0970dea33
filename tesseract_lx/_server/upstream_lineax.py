"""Every private name of lineax the server side uses, and nothing else.

`/linear_solve` answers the outcome of each solve by the name of its `lx.RESULTS` item
(`"successful"`, `"max_steps_reached"`, ...), and lineax has no public hook for two
things that takes:

- **the items by name**: `lx.RESULTS._name_to_item`, `{name: item}`;
- **an item's integer code**: `item._value`, what a jitted, vmapped solve can return
    (one code per right-hand side) and NumPy can read after it.

`lx.RESULTS` is an `equinox.Enumeration`: both attributes are equinox's, reached through
lineax's enumeration, so a release of either may move them. `check_lineax()` says, in
words, which moved; `krylov.LinearSolver` runs it when it is made (on the first
`/linear_solve`: a server imports lineax no sooner), so such a release fails every solve
with that message rather than answering wrong names
(`tests/test_upstream_lineax.py` runs it against the installed releases).
"""

import importlib.metadata
import inspect
from typing import Any

import lineax as lx
import numpy as np


def _items() -> Any:
    # Read statically: equinox's enumeration answers a missing attribute by looking it
    # up in `_name_to_item`, which recurses when that one is the attribute missing.
    return inspect.getattr_static(lx.RESULTS, "_name_to_item", None)


def _code(item: Any) -> int | None:
    """An item's integer code, `None` if it has none."""
    value = getattr(item, "_value", None)
    try:
        code = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything but an array is "none"
        return None
    if code.shape != () or code.dtype.kind not in "iu":
        return None
    return int(code)


def check_lineax() -> None:
    """A `RuntimeError` naming what moved, if the installed lineax (and equinox) no
    longer give `lx.RESULTS` items by name in `_name_to_item`, each with a distinct
    integer code in `_value`, `successful` among them."""
    problems = []
    items = _items()
    if not isinstance(items, dict) or not items:
        problems.append("`lineax.RESULTS._name_to_item` is gone")
    else:
        codes = {name: _code(item) for name, item in items.items()}
        if "successful" not in codes:
            problems.append("`lineax.RESULTS._name_to_item` has no `successful`")
        missing = [name for name, code in codes.items() if code is None]
        if missing:
            problems.append(
                f"`lineax.RESULTS.{missing[0]}._value` is not an integer code"
            )
        elif len(set(codes.values())) != len(codes):
            problems.append("the codes of `lineax.RESULTS` items are not distinct")
    if problems:
        versions = ", ".join(
            f"{name} {importlib.metadata.version(name)}"
            for name in ("lineax", "equinox")
        )
        raise RuntimeError(
            "tesseract_lx's server cannot name the outcome of a lineax solve with "
            f"this lineax ({versions}): "
            + "; ".join(problems)
            + ". Update `tesseract_lx/_server/upstream_lineax.py` for this release."
        )


def result_names() -> dict[int, str]:
    """`{code: name}` of every `lx.RESULTS` item (`check_lineax()` first)."""
    names = {}
    for name, item in _items().items():
        code = _code(item)
        assert code is not None, "`check_lineax()` first"
        names[code] = name
    return names


def result_code(result: Any) -> Any:
    """The integer code of an `lx.RESULTS` item, a JAX array when traced (a jitted
    solve returns it, where the item itself is not an array)."""
    return result._value


def successful_code() -> int:
    """The code of `lx.RESULTS.successful`."""
    return int(np.asarray(result_code(lx.RESULTS.successful)))
