"""Served Tesseracts as first-class citizens of JAX, lineax, optimistix and Equinox."""

from ._apply import apply_tesseract as apply_tesseract
from ._batching import (
    AbstractBatching as AbstractBatching,
    Auto as Auto,
    Batched as Batched,
    Concurrent as Concurrent,
    Decision as Decision,
    estimate_costs as estimate_costs,
    Jacobian as Jacobian,
    Sequential as Sequential,
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
