"""What a `POST /linear_solve` request is, and what it may ask: its payload and answer
models, and the checks of a payload against the linear map's structure.

Pure data and NumPy (no JAX, no lineax): the payload model is built with the app, and
a server of a NumPy Tesseract imports JAX on its first solve only (`solve.py`).

A payload lineax would refuse (misshapen `rhs` or `y0`, a square solver for a map that
is not square, CG without a definiteness tag, `y0` for `Normal` of a wide map) is an
`Invalid` naming the field, answered as a 422, never a 500.
"""

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tesseract_core.runtime import Array

from .._wire import solvers
from .._wire.encoding import decode_array, is_encoded_array
from .limits import check_batch


# The solvers that multiply by the transpose inside one solve.
BOTH_WAYS = frozenset({"LSMR", "Normal"})
# The solvers lineax runs on square maps only (it raises in `init` otherwise).
_SQUARE = frozenset({"GMRES", "BiCGStab", "CG"})
# lineax's `options` that `/linear_solve` takes (stated in `x-tesseract-lx`), and the
# solvers that read `y0` (`Normal` on tall and square maps only).
OPTIONS = ("y0",)
_TAKE_Y0 = frozenset({"GMRES", "BiCGStab", "CG", "LSMR", "Normal"})


def _arrays(field: str, value: Any) -> Any:
    """`{path: array}` of a payload's vector field, its arrays decoded (`json` or
    `base64`; raw in a binary body): real numeric NumPy arrays, else a `ValueError`
    naming the array."""
    if not isinstance(value, dict):
        return value
    out = {}
    for p, x in value.items():
        if is_encoded_array(x):
            if x["data"].get("encoding") == "binref":
                raise ValueError(
                    f"`{field}.{p}` is a binref array, which `/linear_solve` does not "
                    "read: send it `json` or `base64` encoded, or in a binary body."
                )
            try:
                x = decode_array(x)
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"`{field}.{p}` cannot be decoded: {e}") from None
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`{field}.{p}` is not an array: {e}") from None
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"`{field}.{p}` must be a real numeric array.")
        out[p] = arr
    return out


def payload_model(StockJVP: type) -> type[BaseModel]:
    """The payload model of `/linear_solve`: the point and the map as in the
    Tesseract's own `jacobian_vector_product` payload (`StockJVP`), then the solve."""
    fields = StockJVP.model_fields

    class LinearSolveInputSchema(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: fields["inputs"].annotation  # type: ignore[valid-type]
        jvp_inputs: fields["jvp_inputs"].annotation  # type: ignore[valid-type]
        jvp_outputs: fields["jvp_outputs"].annotation  # type: ignore[valid-type]
        rhs: dict[str, Any] = Field(
            ...,
            description="K right-hand sides: `{path: array}`, each of shape "
            "`(K, *shape)`, keyed by `jvp_outputs` (by `jvp_inputs` if `transpose`); "
            "arrays as in any payload (`json`/`base64` encodings), or raw in a binary "
            "body.",
        )
        transpose: bool = Field(False, description="Solve with the transpose.")
        tags: list[
            Literal["symmetric", "positive_semidefinite", "negative_semidefinite"]
        ] = Field(
            default_factory=list,
            description="lineax tags of the Jacobian (unchecked); CG needs "
            "`positive_semidefinite` or `negative_semidefinite`.",
        )
        solver: solvers.SolverSpec = Field(
            ..., description="The lineax iterative solver and its settings."
        )
        y0: dict[str, Any] | None = Field(
            None,
            description="An initial guess per right-hand side (lineax's "
            "`options['y0']`): `{path: array}` keyed as the solution (by `jvp_inputs`; "
            "by `jvp_outputs` if `transpose`), each of shape `(K, *shape)` with the K "
            "of `rhs`. Taken by every solver but `Normal` of a wide system (fewer "
            "equations than unknowns).",
        )

        @field_validator("rhs", "y0", mode="before")
        @classmethod
        def _vectors(cls, value: Any, info: Any) -> Any:  # a `ValidationInfo`
            return _arrays(str(info.field_name), value)

    return LinearSolveInputSchema


class LinearSolveOutputSchema(BaseModel):
    solution: dict[str, Array[..., None]] = Field(  # pyright: ignore[reportInvalidTypeForm]
        ..., description="`{path: (K, *shape)}`."
    )
    num_steps: list[int] = Field(..., description="Solver steps, per right-hand side.")
    result: list[str] = Field(
        ..., description="lineax's `RESULTS` name, per right-hand side."
    )


class Invalid(Exception):
    """A payload refused: where (`loc` under `body`) and why; `error` is the entry of
    a 422's `detail`."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(msg)
        # As FastAPI words a `ValueError` raised in a validator.
        msg = f"Value error, {msg}"
        self.error = {"type": "value_error", "loc": ("body", *loc), "msg": msg}


def size(structs: dict) -> int:
    """The number of elements of `{path: struct}`."""
    return sum(int(np.prod(s.shape, dtype=np.int64)) for s in structs.values())


def _square(a: dict, b: dict) -> bool:
    """Whether lineax sees the two sides of a map as one structure (a side with one
    path is a bare array to it, with several a dict keyed by path)."""

    def same(x: Any, y: Any) -> bool:
        return tuple(x.shape) == tuple(y.shape) and np.dtype(x.dtype) == np.dtype(
            y.dtype
        )

    if len(a) == 1 and len(b) == 1:
        return same(*a.values(), *b.values())
    return set(a) == set(b) and all(same(a[k], b[k]) for k in a)


def _describe(structs: dict) -> str:
    return ", ".join(
        f"`{p}` {tuple(s.shape)} {np.dtype(s.dtype)}" for p, s in structs.items()
    )


def check_payload(payload: Any, ins: dict, outs: dict | None, max_batch: int) -> None:
    """`rhs`, `y0`, `tags` and the solver of a validated payload against the map's
    structure (`{path: struct}` at `jvp_inputs`, at `jvp_outputs`; `outs` is `None`
    when not known yet, and then only what can be told is checked): an `Invalid`
    naming the field."""
    k = _check_rhs(payload, max_batch)
    _check_shapes(payload, ins, outs, k)
    if outs is not None:
        _check_solver(payload, ins, outs)


def _check_rhs(payload: Any, max_batch: int) -> int:
    """The map's paths, and the keys of `rhs` and their K; K."""
    for field in ("jvp_inputs", "jvp_outputs"):
        if not getattr(payload, field):
            raise Invalid((field,), f"`{field}` is empty: a solve needs a map.")
    rhs_of = "jvp_inputs" if payload.transpose else "jvp_outputs"
    rhs_keys = getattr(payload, rhs_of)
    if set(payload.rhs) != set(rhs_keys):
        raise Invalid(
            ("rhs",),
            f"`rhs` must have exactly the keys of `{rhs_of}` ({sorted(rhs_keys)}); "
            f"got {sorted(payload.rhs)}.",
        )
    k = None
    for p, arr in payload.rhs.items():
        shape = np.shape(arr)
        if len(shape) == 0 or shape[0] < 1 or (k is not None and shape[0] != k):
            raise Invalid(
                ("rhs", p),
                f"`rhs.{p}` has shape {tuple(shape)}: every array needs the same "
                "leading axis of K >= 1 right-hand sides.",
            )
        k = shape[0]
    if k is None:
        raise Invalid(("rhs",), "`rhs` holds no right-hand side.")
    try:
        check_batch(k, max_batch, "rhs")
    except ValueError as e:
        raise Invalid(("rhs",), str(e)) from None
    return k


def _check_shapes(payload: Any, ins: dict, outs: dict | None, k: int) -> None:
    """The keys of `y0`, and every array of `rhs` and `y0`: K, then the shape and a
    dtype that casts to the map's at its path."""
    # J x = b: b at `jvp_outputs`, x at `jvp_inputs`; J^T x = b the reverse.
    sol_of = "jvp_outputs" if payload.transpose else "jvp_inputs"
    rhs_structs, sol_structs = (ins, outs) if payload.transpose else (outs, ins)
    fields = [("rhs", payload.rhs, rhs_structs)]
    if payload.y0 is not None:
        sol_keys = getattr(payload, sol_of)
        if set(payload.y0) != set(sol_keys):
            raise Invalid(
                ("y0",),
                f"`y0` must have exactly the keys of the solution, `{sol_of}` "
                f"({sorted(sol_keys)}); got {sorted(payload.y0)}.",
            )
        fields.append(("y0", payload.y0, sol_structs))
    for name, vectors, structs in fields:
        for p, arr in vectors.items():
            shape, dtype = tuple(np.shape(arr)), np.asarray(arr).dtype
            want = None if structs is None else structs[p]
            if (
                len(shape) == 0
                or shape[0] != k
                or (want is not None and shape[1:] != tuple(want.shape))
            ):
                tail = "*shape" if want is None else f"*{tuple(want.shape)}"
                raise Invalid(
                    (name, p),
                    f"`{name}.{p}` has shape {shape}; expected ({k}, {tail}): the "
                    f"{k} right-hand sides of `rhs`, then the shape at `{p}`.",
                )
            if want is not None and not np.can_cast(dtype, want.dtype, "same_kind"):
                raise Invalid(
                    (name, p),
                    f"`{name}.{p}` has dtype {dtype}; expected {np.dtype(want.dtype)}.",
                )


def _check_solver(payload: Any, ins: dict, outs: dict) -> None:
    """What lineax would refuse of the solver, its tags and `y0` on this map."""
    spec = payload.solver
    if payload.tags and not _square(ins, outs):
        raise Invalid(
            ("tags",),
            f"`tags` {payload.tags} are for a square Jacobian, the same shapes and "
            f"dtypes at `jvp_inputs` ({_describe(ins)}) as at `jvp_outputs` "
            f"({_describe(outs)}).",
        )
    if spec.name in _SQUARE and not _square(ins, outs):
        raise Invalid(
            ("solver", "name"),
            f"{spec.name} needs a square Jacobian, the same shapes and dtypes at "
            f"`jvp_inputs` ({_describe(ins)}) as at `jvp_outputs` ({_describe(outs)}); "
            "use LSMR or Normal.",
        )
    if spec.name == "CG" and not {"positive_semidefinite", "negative_semidefinite"} & {
        *payload.tags
    }:
        raise Invalid(
            ("tags",),
            "CG needs the tag `positive_semidefinite` or `negative_semidefinite` (it "
            "is not checked: the Jacobian must be so).",
        )
    if payload.y0 is not None:
        # The solved operator's rows are at `rhs`, its columns at the solution.
        rows, columns = (ins, outs) if payload.transpose else (outs, ins)
        if spec.name not in _TAKE_Y0:
            raise Invalid(("y0",), f"{spec.name} takes no initial guess `y0`.")
        if spec.name == "Normal" and size(rows) < size(columns):
            raise Invalid(
                ("y0",),
                "Normal of a wide system (fewer equations than unknowns) solves for "
                "another unknown than the solution, so lineax cannot start it from "
                "`y0`; send no `y0`, or use LSMR.",
            )


def check_function_mode(payload: Any, has_vjp: bool) -> None:
    """What a solve by the Tesseract's own functions needs of them: its
    `vector_jacobian_product` for a transpose (a transposed solve, LSMR, Normal)."""
    if has_vjp:
        return
    if payload.solver.name in BOTH_WAYS:
        raise Invalid(
            ("solver", "name"),
            f"{payload.solver.name} needs the transpose of the Jacobian inside the "
            "solve, and this Tesseract has no `vector_jacobian_product`; use "
            "GMRES, BiCGStab or CG.",
        )
    if payload.transpose:
        raise Invalid(
            ("transpose",),
            "a transposed solve needs the Tesseract's `vector_jacobian_product`, "
            "which it does not define.",
        )


def cast(vectors: dict, structs: dict) -> dict:
    """`vectors` in the dtypes of `structs` (`check_payload` said they cast)."""
    return {
        p: np.asarray(v).astype(structs[p].dtype, copy=False)
        for p, v in vectors.items()
    }
