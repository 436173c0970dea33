"""What a served Tesseract declares, and what the server says it can do.

At startup the server reads the Tesseract's `TESSERACT_LX` declaration
(`.._wire.spec.Declaration`), works out the precision it computes in, and from then on
answers `x-tesseract-lx` in `/openapi.json` and `tesseract_lx` in `GET /health` from a
`ServerState`: a `Capabilities` rebuilt on every call, since batched modes can fall
back to `"loop"` and the cache's counters move.
"""

import importlib.metadata
import sys
import types
from typing import Any

from .._wire.binary import MEDIA_TYPE
from .._wire.spec import Capabilities, Declaration, Precision
from .cache import CacheSettings, LinearisationCache


try:
    __version__ = importlib.metadata.version("tesseract_lx")
except importlib.metadata.PackageNotFoundError:  # a source checkout, not installed
    __version__ = "0.2.0"


class DeclarationError(ValueError):
    """A malformed `TESSERACT_LX` in a `tesseract_api.py`: the server does not start."""


def read_declaration(api_module: types.ModuleType) -> Declaration:
    """The module's `TESSERACT_LX`, checked: a `DeclarationError` names a bad key."""
    try:
        return Declaration.from_module(api_module)
    except ValueError as e:
        where = getattr(api_module, "__file__", None) or api_module.__name__
        raise DeclarationError(f"{e} (in {where})") from None


def uses_jax(api_module: types.ModuleType) -> bool:
    """Whether a `tesseract_api` module looks JAX-based: it holds JAX or Equinox
    modules, or objects defined in them (then tracing is tried)."""
    roots = ("jax", "equinox", "tesseract_core.runtime.jax_recipes")
    for value in vars(api_module).values():
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(value, "__module__", None) or ""
        if isinstance(name, str) and name.startswith(roots):
            return True
    return False


def compute_precision(
    api_module: types.ModuleType, declaration: Declaration
) -> Precision | None:
    """The precision a Tesseract computes in: declared, else JAX's x64 flag for JAX
    code (as the module left it: never switched here), else unknown (`None`)."""
    if declaration.precision is not None:
        return declaration.precision
    if uses_jax(api_module) and "jax" in sys.modules:
        jax = sys.modules["jax"]
        return "float64" if jax.config.jax_enable_x64 else "float32"
    return None


class ServerState:
    """What a tesseract-lx app knows about itself, shared by all its routes.

    - `declaration`: the Tesseract's `TESSERACT_LX`.
    - `modes`: `{batched endpoint: "own" | "axis" | "vmap" | "loop"}`; a `"vmap"` that
        does not trace is replaced by `"loop"`.
    - `cache`: the `LinearisationCache`, `None` when off; `settings` its settings
        (`enabled=False` when switched off), `cache_off` why it is off.
    - `precision`, `workers`, `max_batch`, `max_body_bytes`: as reported.
    - `binary`: whether the computational endpoints take binary bodies (`lean.py`).
    - `solve_options`: the lineax `options` `/linear_solve` takes (`()` without it).
    - `nonlinear_solvers`, `nonlinear_step_solvers`: what `/nonlinear_solve` runs
        (`()` without it); `nonlinear_batch`: whether it takes a `batch`.
    """

    def __init__(
        self,
        *,
        declaration: Declaration,
        modes: dict[str, str],
        cache: LinearisationCache | None,
        settings: CacheSettings,
        cache_off: str | None,
        precision: Precision | None,
        workers: int,
        max_batch: int,
        max_body_bytes: int,
        binary: bool = False,
        solve_options: tuple[str, ...] = (),
    ):
        self.declaration = declaration
        self.modes = modes
        self.cache = cache
        self.settings = settings
        self.cache_off = cache_off
        self.precision: Precision | None = precision
        self.workers = workers
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.binary = binary
        self.solve_options = solve_options
        self.nonlinear_solvers: tuple[str, ...] = ()
        self.nonlinear_step_solvers: tuple[str, ...] = ()
        self.nonlinear_batch = False

    def fall_back(self, endpoint: str) -> None:
        """`endpoint` loops from now on (and `/openapi.json` says so)."""
        self.modes[endpoint] = "loop"

    def cache_info(self) -> dict[str, Any]:
        if self.cache is not None:
            return {**self.cache.stats(), "active": True}
        return {**self.settings.as_dict(), "active": False, "off": self.cache_off}

    def capabilities(self) -> Capabilities:
        return Capabilities(
            version=__version__,
            modes=tuple(sorted(self.modes.items())),
            precision=self.precision,
            pure=self.declaration.pure,
            workers=self.workers,
            max_batch=self.max_batch,
            max_body_bytes=self.max_body_bytes,
            binary=MEDIA_TYPE if self.binary else None,
            cache=tuple(sorted(self.cache_info().items())),
            linear_solve_options=self.solve_options,
            nonlinear_solvers=self.nonlinear_solvers,
            nonlinear_step_solvers=self.nonlinear_step_solvers,
            nonlinear_batch=self.nonlinear_batch,
        )

    def info(self) -> dict[str, Any]:
        """`x-tesseract-lx` of `/openapi.json` (and `tesseract_lx` of `/health`)."""
        return self.capabilities().to_dict()
