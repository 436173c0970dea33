"""`POST /batched_apply`: K primal points in one request, K outputs in one answer.

The payload is `{"inputs": [point_1, ..., point_K]}`, each point validated by
tesseract-core's own `/apply` input model; the answer is the JSON list of the K outputs,
each exactly as `/apply` answers it. How the K outputs are computed (`mode`, chosen at
startup and stated in `x-tesseract-lx`):

- `"own"`: the Tesseract defines `batched_apply(inputs: list[InputSchema]) ->
    list[OutputSchema | dict]`; it is called once.
- `"axis"`: the Tesseract declares `TESSERACT_LX = {"apply_batch_axis": 0}`: its
    `apply` maps over axis 0 of every input and output array. The points' arrays are
    stacked along a new axis 0, the stack validated by its input schema and sent
    through `apply` once, and the outputs split along axis 0. Points that differ in
    structure, static values or shapes, or a stack the schema refuses (fixed shapes),
    are looped over instead.
- `"vmap"`: a pure JAX Tesseract: `jax.vmap`, over the stacked arrays, of a function
    that rebuilds the inputs from one point's arrays and calls its `apply` (the
    inputs' and outputs' models are built unvalidated while tracing, since
    tesseract-core's array validation turns arrays into NumPy). If that does not
    trace, the request is looped over, and if the loop succeeds every later one is
    too (`"loop"` in `x-tesseract-lx` from then on).
- `"loop"`: one in-process call per point: no round trips, always correct.

Never is a point assumed to map over a leading axis unless the Tesseract says so:
`Array[..., Float64]` means "any rank", and `y = x / sum(x)` of a stack is not the
stack of `y`s.
"""

import types
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    RootModel,
    ValidationError,
)

from .._wire.spec import BATCHED_APPLY, Declaration
from .declare import ServerState
from .limits import check_batch
from .trees import flatten, Path, traced, unflatten


def stack_points(points: list[BaseModel]) -> tuple[Any, dict[Path, np.ndarray]] | None:
    """`(skeleton, {path: stacked array})` of the points' dumps, or `None` when they
    differ in anything but their array values (or hold no arrays)."""
    flat = [flatten(p.model_dump()) for p in points]
    skeleton = flat[0][0]
    if not flat[0][1] or any(s != skeleton for s, _ in flat[1:]):
        return None
    return skeleton, {
        path: np.stack([np.asarray(arrays[path]) for _, arrays in flat])
        for path in flat[0][1]
    }


def split_outputs(out: Any, k: int) -> list[Any] | None:
    """The K outputs in a stacked output (axis 0), or `None` if an array lacks it."""
    if isinstance(out, BaseModel):
        out = out.model_dump()
    skeleton, arrays = flatten(out)
    arrays = {p: np.asarray(a) for p, a in arrays.items()}
    if any(a.ndim == 0 or a.shape[0] != k for a in arrays.values()):
        return None
    return [unflatten(skeleton, {p: a[i] for p, a in arrays.items()}) for i in range(k)]


# -- tracing `apply` under jax.vmap ---------------------------------------------------


class _Unchecked:
    """Stands in for `OutputSchema` in `apply` while tracing: keeps, checks nothing."""

    def __new__(cls, *args: Any, **fields: Any) -> Any:  # type: ignore[misc]
        return dict(*args, **fields)

    @staticmethod
    def model_validate(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return obj

    @staticmethod
    def model_construct(**fields: Any) -> Any:
        return dict(fields)


def _unchecked_outputs(apply: Callable, OutputSchema: type) -> Callable:
    """`apply`, with its global `OutputSchema` bound to `_Unchecked` (its module's
    globals are copied, never changed)."""
    if not isinstance(apply, types.FunctionType):
        return apply
    names = [k for k, v in apply.__globals__.items() if v is OutputSchema]
    if not names:
        return apply
    scope = dict(apply.__globals__)
    scope.update(dict.fromkeys(names, _Unchecked))
    fn = types.FunctionType(
        apply.__code__, scope, apply.__name__, apply.__defaults__, apply.__closure__
    )
    fn.__kwdefaults__ = apply.__kwdefaults__
    return fn


def vmap_apply(api_module: types.ModuleType, points: list[BaseModel]) -> list | None:
    """The K outputs by `jax.vmap` of `apply`; `None` if the points differ in
    structure or shapes. Raises what tracing raises."""
    import jax

    stacked = stack_points(points)
    if stacked is None:
        return None
    skeleton, arrays = stacked
    paths = list(arrays)
    apply = _unchecked_outputs(api_module.apply, api_module.OutputSchema)
    out_tree: dict[str, Any] = {}

    def one(leaves: list) -> list:
        values = dict(zip(paths, leaves, strict=True))
        inputs = traced(points[0], skeleton, values)
        out_skeleton, out_arrays = flatten(apply(inputs))
        out_tree["skeleton"], out_tree["paths"] = out_skeleton, list(out_arrays)
        return list(out_arrays.values())

    leaves = jax.vmap(one)([arrays[p] for p in paths])
    out_arrays = dict(zip(out_tree["paths"], map(np.asarray, leaves), strict=True))
    k = len(points)
    return [
        unflatten(out_tree["skeleton"], {p: a[i] for p, a in out_arrays.items()})
        for i in range(k)
    ]


# -- the endpoint ---------------------------------------------------------------------


def apply_mode(
    api_module: types.ModuleType, declaration: Declaration, jaxy: bool
) -> str:
    """How `/batched_apply` computes, from what the Tesseract defines and declares."""
    if hasattr(api_module, BATCHED_APPLY):
        return "own"
    if declaration.apply_batch_axis == 0:
        return "axis"
    # Impure code must see every call: a trace is one call for K points.
    if jaxy and declaration.pure:
        return "vmap"
    return "loop"


def _models(ApplyIn: type, ApplyOut: type, max_batch: int) -> tuple[type, type]:
    Point = ApplyIn.model_fields["inputs"].annotation
    Output = ApplyOut.model_fields["root"].annotation

    class BatchedApplyInputSchema(BaseModel):
        inputs: list[Point] = Field(  # type: ignore[valid-type]
            ...,
            min_length=1,
            description=(
                "K >= 1 primal points, each a full input of `/apply` (at most "
                f"`max_batch` = {max_batch})."
            ),
        )
        model_config = ConfigDict(extra="forbid")

        @field_validator("inputs", mode="before")
        @classmethod
        def _at_most_max_batch(cls, inputs: Any) -> Any:
            # Before validating K points, not after.
            if isinstance(inputs, list | tuple):
                check_batch(len(inputs), max_batch, "inputs")
            return inputs

    class BatchedApplyOutputSchema(RootModel):
        root: list[Output] = Field(  # type: ignore[valid-type]
            ..., description="The K outputs, in order, each as `/apply` answers it."
        )

    return BatchedApplyInputSchema, BatchedApplyOutputSchema


def batched_apply_endpoint(
    api_module: types.ModuleType, stock: dict[str, Callable], state: ServerState
) -> Callable:
    """The endpoint function of `/batched_apply`: `fn(payload) -> model`."""
    stock_apply = stock["apply"]
    ApplyIn = stock_apply.__annotations__["payload"]
    ApplyOut = stock_apply.__annotations__["return"]
    In, Out = _models(ApplyIn, ApplyOut, state.max_batch)

    def validated(out: Any) -> Any:
        if isinstance(out, BaseModel):
            out = out.model_dump()
        return ApplyOut.model_validate(out).root

    def loop(points: list) -> list:
        return [stock_apply(ApplyIn.model_construct(inputs=p)).root for p in points]

    def own(points: list) -> list:
        outs = api_module.batched_apply(list(points))
        if not isinstance(outs, list | tuple) or len(outs) != len(points):
            got = len(outs) if isinstance(outs, list | tuple) else type(outs).__name__
            raise ValueError(
                f"`batched_apply` of the Tesseract returned {got} outputs for "
                f"{len(points)} inputs; it must return a list with one per input."
            )
        return [validated(o) for o in outs]

    def axis(points: list) -> list:
        stacked = stack_points(points)
        if stacked is None:
            return loop(points)
        skeleton, arrays = stacked
        Point = type(points[0])
        try:
            inputs = Point.model_validate(unflatten(skeleton, arrays))
        except ValidationError:
            # Fixed shapes: a stack is not a valid input.
            return loop(points)
        outs = split_outputs(api_module.apply(inputs), len(points))
        if outs is None:
            return loop(points)
        return [validated(o) for o in outs]

    def vmap(points: list) -> list:
        try:
            outs = vmap_apply(api_module, points)
        except Exception:
            # It did not trace, or the Tesseract raised: the loop tells which. An
            # error of its own is raised by the loop, as it is; if the loop works,
            # vmap does not: loop from now on, and say so in `x-tesseract-lx`.
            result = loop(points)
            state.fall_back(BATCHED_APPLY)
            return result
        if outs is None:
            return loop(points)  # the points differ: this request only
        return [validated(o) for o in outs]

    compute = {"own": own, "axis": axis, "vmap": vmap, "loop": loop}

    def batched_apply(payload: Any) -> Any:
        """Apply the Tesseract to a batch of inputs, in one request.

        `inputs` is a list of K >= 1 inputs of `/apply`; the answer is the list of
        their K outputs, in order, each as `/apply` answers it.
        """
        points = list(payload.inputs)
        return Out(compute[state.modes[BATCHED_APPLY]](points))

    batched_apply.__annotations__ = {"payload": In, "return": Out}
    return batched_apply
