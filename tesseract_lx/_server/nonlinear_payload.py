"""What a `POST /nonlinear_solve` request is, and what it may ask: its payload and
answer models, and the checks of a payload against the problem's structure.

Pure data and NumPy (no JAX, no optimistix): the payload model is built with the app,
and a server imports optimistix on its first nonlinear solve only (`nonlinear.py`).

A payload optimistix or lineax would refuse (a misshapen `y0`, a root find whose
residual is not shaped as its unknown, a step solver for square Jacobians on a
least-squares fit, CG without a definiteness tag) is an `Invalid` naming the field,
answered as a 422, never a 500.
"""

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tesseract_core.runtime import Array
from tesseract_core.runtime.tree_transforms import get_at_path, is_arraylike

from .._wire import nonlinear
from .solve_payload import _arrays, _describe, _square, Invalid


# Steps a solve may take at most; a client asks for fewer.
MAX_STEPS = 100_000
_DEFINITE = {"positive_semidefinite", "negative_semidefinite"}


class NonlinearBatch(BaseModel):
    """Several problems in one request: the same Tesseract, paths and solver, at
    points that differ in some inputs, from initial values of their own."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(..., ge=1, description="The number of problems.")
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="`{path: array}`: the array inputs that differ between the "
        "problems, each stacked along a leading axis of `size`; the others are "
        "`inputs`' own.",
    )
    y0: dict[str, Any] | None = Field(
        None,
        description="The initial values, keyed by `wrt`, stacked the same way; "
        "`null`: each problem's inputs at `wrt`.",
    )

    @field_validator("inputs", "y0", mode="before")
    @classmethod
    def _vectors(cls, value: Any, info: Any) -> Any:  # a `ValidationInfo`
        return _arrays(f"batch.{info.field_name}", value)


def payload_model(StockJVP: type) -> type[BaseModel]:
    """The payload model of `/nonlinear_solve`: the point, and the paths as in the
    Tesseract's own `jacobian_vector_product` payload (`StockJVP`), then the solve."""
    fields = StockJVP.model_fields

    class NonlinearSolveInputSchema(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: fields["inputs"].annotation  # type: ignore[valid-type]
        wrt: fields["jvp_inputs"].annotation = Field(  # type: ignore[valid-type]
            ..., description="The unknowns: differentiable input paths."
        )
        of: fields["jvp_outputs"].annotation = Field(  # type: ignore[valid-type]
            ..., description="The residual: differentiable output paths."
        )
        y0: dict[str, Any] | None = Field(
            None,
            description="The initial value `{path: array}`, keyed by `wrt`, each "
            "shaped as its input; `null`: the values of `inputs` at `wrt`.",
        )
        solver: nonlinear.NonlinearSpec = Field(
            ...,
            description="The optimistix solver and its settings: a root finder "
            "(`Newton`, `Chord`) solves `of(wrt) = 0`, a least-squares solver "
            "(`GaussNewton`, `LevenbergMarquardt`) minimises `|of(wrt)|^2`.",
        )
        max_steps: int = Field(256, ge=1, le=MAX_STEPS, description="Most steps.")
        tags: list[
            Literal["symmetric", "positive_semidefinite", "negative_semidefinite"]
        ] = Field(
            default_factory=list,
            description="lineax tags of the Jacobian (unchecked), as optimistix's "
            "`tags=`.",
        )
        throw: bool = Field(
            False,
            description="Answer a solve that fails with an error carrying "
            "optimistix's message (a 500), rather than with its `result`.",
        )
        batch: NonlinearBatch | None = Field(
            None,
            description="Several problems at once (see `NonlinearBatch`); the "
            "answer's arrays then have a leading axis of `batch.size`, and "
            "`num_steps` and `result` are lists.",
        )

        @field_validator("y0", mode="before")
        @classmethod
        def _vectors(cls, value: Any, info: Any) -> Any:  # a `ValidationInfo`
            return _arrays(str(info.field_name), value)

    return NonlinearSolveInputSchema


class NonlinearSolveOutputSchema(BaseModel):
    solution: dict[str, Array[..., None]] = Field(  # pyright: ignore[reportInvalidTypeForm]
        ..., description="`{path: array}`, keyed by `wrt`."
    )
    num_steps: int | list[int] = Field(
        ..., description="The optimistix solver's steps (per problem of a batch)."
    )
    result: str | list[str] = Field(
        ..., description="optimistix's `RESULTS` name (per problem of a batch)."
    )


def check_payload(payload: Any, ins: dict, outs: dict | None, max_batch: int) -> None:
    """`wrt`, `of`, `y0`, `tags`, `batch` and the solver of a validated payload
    against the problem's structure (`{path: struct}` at `wrt`, at `of`; `outs` is
    `None` when not known yet): an `Invalid` naming the field."""
    for field in ("wrt", "of"):
        if not getattr(payload, field):
            raise Invalid((field,), f"`{field}` is empty: a solve needs paths.")
    if payload.batch is not None:
        _check_batch(payload, ins, max_batch)
    if payload.y0 is not None:
        if set(payload.y0) != set(payload.wrt):
            raise Invalid(
                ("y0",),
                f"`y0` must have exactly the keys of `wrt` ({sorted(payload.wrt)}); "
                f"got {sorted(payload.y0)}.",
            )
        for p, arr in payload.y0.items():
            shape, want = tuple(np.shape(arr)), ins[p]
            if shape != tuple(want.shape):
                raise Invalid(
                    ("y0", p),
                    f"`y0.{p}` has shape {shape}; expected {tuple(want.shape)}, the "
                    f"shape of input `{p}`.",
                )
            dtype = np.asarray(arr).dtype
            if not np.can_cast(dtype, want.dtype, "same_kind"):
                raise Invalid(
                    ("y0", p),
                    f"`y0.{p}` has dtype {dtype}; expected {np.dtype(want.dtype)}.",
                )
    if outs is not None:
        _check_solver(payload, ins, outs)


def _check_solver(payload: Any, ins: dict, outs: dict) -> None:
    """What optimistix and lineax would refuse of the solver on this problem."""
    spec = payload.solver
    square = _square(ins, outs)
    shapes = f"`wrt` ({_describe(ins)}), `of` ({_describe(outs)})"
    if spec.name in nonlinear.ROOT_FINDERS and not square:
        raise Invalid(
            ("solver", "name"),
            f"{spec.name} finds a root of a residual shaped as its unknown; here "
            f"{shapes}. Use GaussNewton or LevenbergMarquardt for a fit.",
        )
    if payload.tags and not square:
        raise Invalid(
            ("tags",),
            f"`tags` {payload.tags} are for a square Jacobian; here {shapes}.",
        )
    step = spec.linear_solver
    name = nonlinear.DEFAULT_STEP[spec.name]["name"] if step is None else step.name
    well_posed = getattr(step, "well_posed", None)
    loc = ("solver", "linear_solver", "name")
    if spec.name == "LevenbergMarquardt":
        # Its damped step is a least-squares problem, whatever the Jacobian's shape.
        if name not in nonlinear.LEAST_SQUARES_CAPABLE and not (
            name == "AutoLinearSolver" and well_posed is not True
        ):
            raise Invalid(
                loc,
                f"LevenbergMarquardt solves a damped least-squares problem at each "
                f"step, which {name} cannot: use QR, SVD or "
                "AutoLinearSolver(well_posed=False).",
            )
    elif not square and (
        name in nonlinear.SQUARE_ONLY
        or (name == "AutoLinearSolver" and well_posed is True)
    ):
        raise Invalid(
            loc,
            f"{name} needs a square Jacobian; here {shapes}. Use QR, SVD or "
            "AutoLinearSolver(well_posed=None).",
        )
    if name == "CG" and not _DEFINITE & set(payload.tags):
        raise Invalid(
            ("tags",),
            "CG needs the tag `positive_semidefinite` or `negative_semidefinite` (it "
            "is not checked: the Jacobian must be so).",
        )


def _check_batch(payload: Any, ins: dict, max_batch: int) -> None:
    batch = payload.batch
    n = batch.size
    if n > max_batch:
        raise Invalid(
            ("batch", "size"),
            f"`batch.size` is {n}; this server takes at most {max_batch} problems "
            "per request (`--max-batch`).",
        )
    if batch.y0 is not None and payload.y0 is not None:
        raise Invalid(("batch", "y0"), "`y0` and `batch.y0` are both given: give one.")
    for p, arr in batch.inputs.items():
        try:
            ref = get_at_path(payload.inputs, p)
        except Exception:  # noqa: BLE001 - any path that does not resolve
            ref = None
        if ref is None or not is_arraylike(ref):
            raise Invalid(
                ("batch", "inputs", p),
                f"`batch.inputs.{p}` names no array input of `inputs`.",
            )
        _check_stacked(("batch", "inputs", p), arr, n, np.shape(ref), ref.dtype)
    if batch.y0 is not None:
        if set(batch.y0) != set(payload.wrt):
            raise Invalid(
                ("batch", "y0"),
                f"`batch.y0` must have exactly the keys of `wrt` "
                f"({sorted(payload.wrt)}); got {sorted(batch.y0)}.",
            )
        for p, arr in batch.y0.items():
            _check_stacked(("batch", "y0", p), arr, n, ins[p].shape, ins[p].dtype)


def _check_stacked(loc: tuple, arr: Any, n: int, shape: tuple, dtype: Any) -> None:
    where = ".".join(loc)
    want = (n, *tuple(shape))
    if tuple(np.shape(arr)) != want:
        raise Invalid(
            loc,
            f"`{where}` has shape {tuple(np.shape(arr))}; expected {want} (`batch."
            "size` problems, each shaped as the input).",
        )
    got = np.asarray(arr).dtype
    if not np.can_cast(got, dtype, "same_kind"):
        raise Invalid(loc, f"`{where}` has dtype {got}; expected {np.dtype(dtype)}.")
