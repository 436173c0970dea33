"""Saying so: every substitution the library makes is a `Decision` and a warning."""

import logging
import threading
import warnings
import weakref
from typing import Any

from ._errors import FallbackWarning


logger = logging.getLogger("tesseract_lx")


def fall_back(client: Any, decision: Any, *, stacklevel: int = 3) -> None:
    """Record `decision` (a `tlx.Decision`) in `client.decisions` where a client is
    known, and warn with a `FallbackWarning` carrying its reason."""
    if client is not None:
        client.decisions.append(decision)
    logger.debug("fallback for %s: %s", decision.kind, decision.reason)
    warnings.warn(decision.reason, FallbackWarning, stacklevel=stacklevel)


_SEEN: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def first_time(client: Any, key: Any) -> bool:
    """Whether `key` is new for `client` (and remember it)."""
    with _LOCK:
        seen = _SEEN.setdefault(client, set())
        new = key not in seen
        seen.add(key)
    return new
