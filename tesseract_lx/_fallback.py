"""Saying so: every substitution the library makes is a `Decision` and a warning."""

import logging
import warnings
from typing import Any

from ._errors import FallbackWarning


logger = logging.getLogger("tesseract_lx")


def fall_back(client: Any, decision: Any, *, stacklevel: int = 3) -> None:
    """Record `decision` (a `tlx.Decision`) in `client.decisions` where a client is
    known, and warn with a `FallbackWarning` carrying its reason."""
    if client is not None:
        client.telemetry.record_decision(decision)
    logger.debug("fallback for %s: %s", decision.kind, decision.reason)
    warnings.warn(decision.reason, FallbackWarning, stacklevel=stacklevel)
