"""What a tesseract-lx server says it can do, and how a Tesseract declares itself.

Both sides import this module and nothing else of each other: the server writes a
`Capabilities` into `/openapi.json` under `x-tesseract-lx` (and `GET /health` under
`tesseract_lx`); the client reads it back with `Capabilities.from_openapi`. A stock
`tesseract-runtime serve` writes nothing, and `from_openapi` then returns
`Capabilities.stock()`: no batched endpoints, precision unknown, never guessed.

**Batched endpoints** (`POST`, payloads as the unbatched ones):

- `/batched_jacobian_vector_product`: as `/jacobian_vector_product`, with one leading
  batch axis of size K on every array of `tangent_vector`; every result array carries
  the same axis.
- `/batched_vector_jacobian_product`: likewise on `cotangent_vector`.
- `/batched_apply`: `{"inputs": [point_1, ..., point_K]}`, each point a full input of
  `/apply`; the answer is the list of the K outputs, in order. A list of points, not a
  stacked axis: points may differ in anything their schema allows, and no Tesseract
  is assumed to map over a leading axis.
- `/linear_solve`: a lineax solve of the Jacobian at a point, for K right-hand
  sides, in one request (`_server/krylov.py`, `_wire/solvers.py`); its mode is
  `"linearise"` or `"function"`, and the lineax `options` it takes (an initial guess
  `y0` per right-hand side) are stated in `linear_solve_options`.

How the server computes each batch (`modes`): `"own"` (the Tesseract's own
`batched_*` function), `"vmap"` (`jax.vmap` of its function, tried when it is JAX
code and remembered when it does not trace), `"axis"` (the Tesseract declared that
`apply` maps over a leading axis: the points are stacked and sent through once), or
`"loop"` (one call per item, in process: no round trips, always correct).

**Errors.** An exception raised by the Tesseract's own code, in any endpoint, is
answered with status 500 and the body `error_body(...)` builds:

```python
{"detail": "ValueError: x[0] must be >= 0",
 "error": {"type": "ValueError", "message": "x[0] must be >= 0",
           "endpoint": "apply", "traceback": "..."}}  # traceback: debug servers only
```

A request the schema refuses stays a 422 as FastAPI gives it (`detail` a list of
errors, each naming the field in `loc`); a body over `max_body_bytes` is a 413, a batch
over `max_batch` a 422 naming `max_batch`.

**Declarations in `tesseract_api.py`**: a module-level dict, every key optional,

```python
TESSERACT_LX = {
    "pure": True,            # same inputs, same outputs (False: no linearisation cache)
    "precision": "float64",  # what it computes in, when the dtypes do not say
    "apply_batch_axis": 0,   # `apply` maps over axis 0 of every input and output array
}
```
"""

import dataclasses
from typing import Any, Literal


EXTENSION = "x-tesseract-lx"
DECLARATION = "TESSERACT_LX"

APPLY = "apply"
JVP = "jacobian_vector_product"
VJP = "vector_jacobian_product"
JACOBIAN = "jacobian"
ABSTRACT_EVAL = "abstract_eval"
BATCHED_APPLY = "batched_apply"
BATCHED_JVP = f"batched_{JVP}"
BATCHED_VJP = f"batched_{VJP}"
BATCHED = (BATCHED_APPLY, BATCHED_JVP, BATCHED_VJP)
LINEAR_SOLVE = "linear_solve"
NONLINEAR_SOLVE = "nonlinear_solve"
GRADIENTS = (JACOBIAN, JVP, VJP)
# The endpoints that take `binary.MEDIA_TYPE` bodies on a server that says `binary`.
COMPUTATIONAL = (APPLY, *GRADIENTS, *BATCHED, LINEAR_SOLVE, NONLINEAR_SOLVE)

Mode = Literal["own", "vmap", "axis", "loop"]
Precision = Literal["float32", "float64"]
PRECISIONS = ("float32", "float64")


def error_body(
    endpoint: str, type_name: str, message: str, traceback: str | None = None
) -> dict[str, Any]:
    """The JSON body of a 500 answering an exception raised by the Tesseract."""
    error: dict[str, Any] = {
        "type": type_name,
        "message": message,
        "endpoint": endpoint,
    }
    if traceback is not None:
        error["traceback"] = traceback
    detail = f"{type_name}: {message}" if message else type_name
    return {"detail": detail, "error": error}


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What a `tesseract_api.py` says of itself in `TESSERACT_LX` (all optional)."""

    pure: bool = True
    precision: Precision | None = None
    apply_batch_axis: int | None = None

    @classmethod
    def from_module(cls, module: Any) -> "Declaration":
        """Read and check `module.TESSERACT_LX`; a clear `ValueError` if malformed."""
        raw = getattr(module, DECLARATION, None)
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(
                f"`{DECLARATION}` in the Tesseract's `tesseract_api.py` must be a "
                f"dict, got {type(raw).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"`{DECLARATION}` has unknown key(s) {unknown}; known keys: "
                f"{sorted(known)}."
            )
        pure = raw.get("pure", True)
        if not isinstance(pure, bool):
            raise ValueError(f"`{DECLARATION}['pure']` must be a bool, got {pure!r}.")
        precision = raw.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(
                f"`{DECLARATION}['precision']` must be one of {PRECISIONS}, got "
                f"{precision!r}."
            )
        axis = raw.get("apply_batch_axis")
        if axis is not None and axis != 0:
            raise ValueError(
                f"`{DECLARATION}['apply_batch_axis']` must be 0 (a leading axis) or "
                f"absent, got {axis!r}."
            )
        return cls(pure=pure, precision=precision, apply_batch_axis=axis)


def _names(raw: Any) -> tuple[str, ...]:
    """A list of names as stated; anything else states nothing (never guessed)."""
    if not isinstance(raw, list | tuple):
        return ()
    return tuple(x for x in raw if isinstance(x, str))


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a server says it can do (`x-tesseract-lx`); a stock server says nothing.

    - `version`: the tesseract_lx version of the server, `None` for a stock server.
    - `modes`: `{batched endpoint: mode}` for the batched endpoints it serves.
    - `precision`: the floating-point precision it computes in, `None` if unknown
        (then the declared dtypes are all there is, and they are not second-guessed).
    - `pure`: whether its answers depend on their inputs only (it may then cache).
    - `workers`: requests it computes at once.
    - `max_batch`: the most items (tangents, points) one batched request may carry.
    - `max_body_bytes`: the largest request body it accepts.
    - `binary`: the media type of the binary bodies its computational endpoints take
        and answer (`binary.MEDIA_TYPE`), `None` if JSON only.
    - `cache`: the linearisation cache's settings and counters (informative).
    - `linear_solve_options`: the lineax `options` its `/linear_solve` takes (e.g.
        `("y0",)`); `()` when it states none (a stock or older server): then none
        is sent.
    - `nonlinear_solvers`, `nonlinear_step_solvers`: the optimistix solvers (by name,
        `_wire/nonlinear.py`) its `/nonlinear_solve` runs, and the lineax solvers it
        runs their steps with; `()` without the endpoint (a stock or older server).
    - `nonlinear_batch`: whether its `/nonlinear_solve` takes several problems in one
        request (`batch`); `False` when it does not say.
    """

    version: str | None = None
    modes: tuple[tuple[str, str], ...] = ()
    precision: Precision | None = None
    pure: bool = True
    workers: int = 1
    max_batch: int | None = None
    max_body_bytes: int | None = None
    binary: str | None = None
    cache: tuple[tuple[str, Any], ...] = ()
    linear_solve_options: tuple[str, ...] = ()
    nonlinear_solvers: tuple[str, ...] = ()
    nonlinear_step_solvers: tuple[str, ...] = ()
    nonlinear_batch: bool = False

    @classmethod
    def stock(cls) -> "Capabilities":
        return cls()

    @property
    def is_stock(self) -> bool:
        return self.version is None

    def mode(self, endpoint: str) -> str | None:
        return dict(self.modes).get(endpoint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "batched": dict(self.modes),
            "precision": self.precision,
            "pure": self.pure,
            "workers": self.workers,
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "binary": self.binary,
            "linearisation_cache": dict(self.cache),
            "linear_solve_options": list(self.linear_solve_options),
            "nonlinear_solvers": list(self.nonlinear_solvers),
            "nonlinear_step_solvers": list(self.nonlinear_step_solvers),
            "nonlinear_batch": self.nonlinear_batch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Capabilities":
        if not d:
            return cls.stock()
        precision = d.get("precision")
        return cls(
            version=str(d.get("version") or "unknown"),
            modes=tuple(sorted((d.get("batched") or {}).items())),
            precision=precision if precision in PRECISIONS else None,
            pure=bool(d.get("pure", True)),
            workers=int(d.get("workers") or 1),
            max_batch=d.get("max_batch"),
            max_body_bytes=d.get("max_body_bytes"),
            binary=d.get("binary") if isinstance(d.get("binary"), str) else None,
            cache=tuple(sorted((d.get("linearisation_cache") or {}).items())),
            linear_solve_options=_names(d.get("linear_solve_options")),
            nonlinear_solvers=_names(d.get("nonlinear_solvers")),
            nonlinear_step_solvers=_names(d.get("nonlinear_step_solvers")),
            nonlinear_batch=d.get("nonlinear_batch") is True,
        )

    @classmethod
    def from_openapi(cls, doc: dict[str, Any]) -> "Capabilities":
        return cls.from_dict(doc.get(EXTENSION))
