"""Every private name of tesseract-core the server side uses, and nothing else
(lineax's are in `upstream_lineax.py`).

tesseract-core has no public hook for two things the server needs:

- **where `binref` arrays are read.** Its array validator
    (`tesseract_core.runtime.array_encoding.decode_array`) reads a `json+binref` array
    through the module-level `load_binref_arraydict(val, base_dir)`, looked up when it
    runs, and reads absolute paths, `..` and fsspec URLs as given. `confine_binrefs`
    wraps that function once per process; the wrapper refuses a buffer outside the
    input folder *while a request of a tesseract-lx app is validated* (`confined()`,
    a context variable that `guard.Confine` sets per request), and is tesseract-core's
    own function otherwise, so other users of tesseract-core in the same process
    (`tlx.Client.from_api` runs in the caller's) see no change.
- **a metrics backend that keeps nothing**: `mpa._current_backend`, the context
    variable `mpa.start_run` sets (`routes.py`).

`check_upstream()` says, in words, which of these assumptions a tesseract-core release
breaks; the server refuses to start rather than serve without the guard
(`tests/test_binref_guard.py` runs it against the installed release).
"""

import contextlib
import contextvars
import functools
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from pydantic_core import PydanticCustomError
from tesseract_core.runtime import array_encoding, mpa


# `mpa.start_run`'s backend, per context (`routes._null_run` sets its own).
current_backend: contextvars.ContextVar = mpa._current_backend

# tesseract-core's array errors are `array_*`: its union validator
# (`schema_types._simplify_array_errors`) answers with the first such error, so this
# type is the one a client sees (a `value_error` would lose to `array_non_numeric`).
REFUSED = "array_binref_refused"
REFUSAL = (
    "a binref array must name a file inside the server's input folder, by a relative "
    "path without `..` or `:`; absolute paths and URLs are refused."
)

_BUFFER = re.compile(r"^(?P<path>.+?)(:\d+(:\d+)?)?$")
_LOADER = "load_binref_arraydict"
_ATTRIBUTE = f"tesseract_core.runtime.array_encoding.{_LOADER}"
_INSTALL = threading.Lock()
_CONFINED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tesseract_lx_binrefs_confined", default=False
)


def outside(buffer: Any) -> bool:
    """Whether a binref `buffer` (`<path>[:<offset>[:<size>]]`) may read outside the
    folder it is joined to: not a string, absolute (`/`, `\\`, `~`), any `:` left in
    its path (a URL scheme, a drive letter, fsspec's `a::b` chaining), or a `..`
    segment (also percent-encoded)."""
    if not isinstance(buffer, str):
        return True
    match = _BUFFER.match(buffer)
    path = match.group("path") if match else buffer
    if not path or path.startswith(("/", "\\", "~")) or ":" in path:
        return True
    segments = re.split(r"[/\\]", path)
    return any(urllib.parse.unquote(s).strip() == ".." for s in segments)


@contextlib.contextmanager
def confined() -> Iterator[None]:
    """Within: binref arrays validated by tesseract-core are confined to the input
    folder (in this context and those copied from it, e.g. a worker thread's)."""
    token = _CONFINED.set(True)
    try:
        yield
    finally:
        _CONFINED.reset(token)


def is_confined() -> bool:
    return _CONFINED.get()


def _guarded(load: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    @functools.wraps(load)
    def load_binref_arraydict(val: Any, base_dir: Any) -> Any:
        if _CONFINED.get():
            if outside(val["data"]["buffer"]):
                # Re-raised as it is by tesseract-core's `decode_array`: a 422
                # naming the field, its message ours.
                raise PydanticCustomError(REFUSED, REFUSAL)
        return load(val, base_dir)

    load_binref_arraydict.__tesseract_lx_guard__ = load  # type: ignore[attr-defined]
    return load_binref_arraydict


def check_upstream() -> None:
    """A `RuntimeError` naming what moved, if the installed tesseract-core no longer
    reads binrefs through `array_encoding.load_binref_arraydict` from
    `decode_array`, or lost `mpa._current_backend`."""
    problems = []
    loader = getattr(array_encoding, _LOADER, None)
    if not callable(loader):
        problems.append(f"`{_ATTRIBUTE}` is gone")
    decode = getattr(array_encoding, "decode_array", None)
    code = getattr(decode, "__code__", None)
    if code is None or _LOADER not in code.co_names:
        problems.append(
            "`tesseract_core.runtime.array_encoding.decode_array` no longer calls "
            f"`{_LOADER}` by its module-level name"
        )
    elif getattr(decode, "__globals__", None) is not vars(array_encoding):
        problems.append("`decode_array` no longer lives in `array_encoding`")
    if not isinstance(getattr(mpa, "_current_backend", None), contextvars.ContextVar):
        problems.append("`tesseract_core.runtime.mpa._current_backend` is gone")
    if problems:
        raise RuntimeError(
            "tesseract_lx's server cannot confine binref inputs to the input folder "
            "with this tesseract-core: "
            + "; ".join(problems)
            + ". Update `tesseract_lx/_server/upstream.py` for this release."
        )


def confine_binrefs() -> None:
    """Wrap tesseract-core's binref loader (once per process; idempotent): refused
    outside the input folder within `confined()`, unchanged elsewhere."""
    check_upstream()
    with _INSTALL:
        current = getattr(array_encoding, _LOADER)
        if getattr(current, "__tesseract_lx_guard__", None) is None:
            setattr(array_encoding, _LOADER, _guarded(current))
