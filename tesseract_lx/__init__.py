"""Served Tesseracts as first-class citizens of JAX, lineax, optimistix and Equinox.

The names below are imported on first use (PEP 562), not with the package:
`tesseract-lx serve` lives in this package too, and a server of a NumPy Tesseract
imports no JAX (nor its workers the seconds it takes).
"""

import importlib
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:
    from ._apply import apply_tesseract as apply_tesseract
    from ._batching import (
        AbstractBatching as AbstractBatching,
        Auto as Auto,
        Batch as Batch,
        Batched as Batched,
        Concurrent as Concurrent,
        Decision as Decision,
        estimate_cost as estimate_cost,
        Jacobian as Jacobian,
        Plan as Plan,
        Sequential as Sequential,
        Server as Server,
    )
    from ._client import Client as Client
    from ._errors import (
        FallbackWarning as FallbackWarning,
        TesseractConnectionError as TesseractConnectionError,
        TesseractDtypeError as TesseractDtypeError,
        TesseractError as TesseractError,
        TesseractNonFiniteError as TesseractNonFiniteError,
        TesseractServerError as TesseractServerError,
        TesseractTimeoutError as TesseractTimeoutError,
        TesseractValidationError as TesseractValidationError,
    )
    from ._module import TesseractModule as TesseractModule
    from ._onserver import OnServer as OnServer
    from ._operator import (
        AbstractTesseractOperator as AbstractTesseractOperator,
        TesseractJacobianOperator as TesseractJacobianOperator,
        TesseractLinearOperator as TesseractLinearOperator,
    )
    from ._optimistix import residual_fn as residual_fn, ResidualFn as ResidualFn
    from ._progress import progress as progress
    from ._serve import serve as serve


__version__ = "0.2.0"

# Each public name, and the module that holds it.
_HOME = {
    "apply_tesseract": "_apply",
    **dict.fromkeys(
        (
            "AbstractBatching",
            "Auto",
            "Batch",
            "Batched",
            "Concurrent",
            "Decision",
            "estimate_cost",
            "Jacobian",
            "Plan",
            "Sequential",
            "Server",
        ),
        "_batching",
    ),
    "Client": "_client",
    **dict.fromkeys(
        (
            "FallbackWarning",
            "TesseractConnectionError",
            "TesseractDtypeError",
            "TesseractError",
            "TesseractNonFiniteError",
            "TesseractServerError",
            "TesseractTimeoutError",
            "TesseractValidationError",
        ),
        "_errors",
    ),
    "TesseractModule": "_module",
    "OnServer": "_onserver",
    **dict.fromkeys(
        (
            "AbstractTesseractOperator",
            "TesseractJacobianOperator",
            "TesseractLinearOperator",
        ),
        "_operator",
    ),
    "residual_fn": "_optimistix",
    "ResidualFn": "_optimistix",
    "progress": "_progress",
    "serve": "_serve",
}
# Spelled out for type checkers; the same names as `_HOME` (tests/test_layers.py).
__all__ = [
    "AbstractBatching",
    "AbstractTesseractOperator",
    "Auto",
    "Batch",
    "Batched",
    "Client",
    "Concurrent",
    "Decision",
    "FallbackWarning",
    "Jacobian",
    "OnServer",
    "Plan",
    "ResidualFn",
    "Sequential",
    "Server",
    "TesseractConnectionError",
    "TesseractDtypeError",
    "TesseractError",
    "TesseractJacobianOperator",
    "TesseractLinearOperator",
    "TesseractModule",
    "TesseractNonFiniteError",
    "TesseractServerError",
    "TesseractTimeoutError",
    "TesseractValidationError",
    "apply_tesseract",
    "estimate_cost",
    "progress",
    "residual_fn",
    "serve",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tesseract_lx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("_"))})
