"""`POST /batched_jacobian_vector_product` and `POST /batched_vector_jacobian_product`.

tesseract-core has no batched JVP/VJP endpoint. The payload models here subclass
tesseract-core's own JVP/VJP models (the very classes its endpoints use, so the
OpenAPI components stay shared and named as on `tesseract-runtime serve`), reuse their
`inputs` and path-set validation, and replace only the (co)tangent validator: each array
carries one leading batch axis, of at most `max_batch` items.

A batch is computed, in this order of preference, by the Tesseract's own
`batched_jacobian_vector_product` / `batched_vector_jacobian_product` (`"own"`); by
`jax.vmap` of its JVP/VJP in the (co)tangent, the primal computed once through the
linearisation cache (`"vmap"`); or by a loop in process (`"loop"`). A `"vmap"` that does
not trace becomes `"loop"`, for good, and `x-tesseract-lx` says so.
"""

import types
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field, field_validator, RootModel
from tesseract_core.runtime.tree_transforms import get_at_path

from .._wire.spec import BATCHED_JVP, BATCHED_VJP, JVP, VJP
from .declare import ServerState
from .limits import check_batch


def _check_batch(vec: dict[str, Any], field: str, max_batch: int) -> int:
    """The common batch size of all arrays of a (co)tangent dict (else a 422)."""
    size, first = None, None
    for path, arr in vec.items():
        shape = np.shape(arr)
        if len(shape) == 0 or shape[0] < 1:
            raise ValueError(
                f"`{field}.{path}` needs a leading batch axis of size >= 1; got an "
                f"array of shape {tuple(shape)}."
            )
        if size is None:
            size, first = shape[0], path
        elif shape[0] != size:
            raise ValueError(
                f"`{field}.{path}` has batch size {shape[0]}, but `{field}.{first}` "
                f"has {size}: every array of `{field}` needs the same leading batch "
                "size."
            )
    if size is None:
        raise ValueError(f"`{field}` is empty.")
    check_batch(size, max_batch, field)
    return size


def _check_keys(vec: dict, expected: set, field: str, against: str) -> None:
    if set(vec) != set(expected):
        raise ValueError(
            f"`{field}` must have exactly the keys of `{against}` "
            f"({sorted(expected)}); got {sorted(vec)}."
        )


def _cast(arr: Any, dtype: Any, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if dtype is None or arr.dtype == dtype:
        return arr
    if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise ValueError(
            f"`{where}` has dtype {arr.dtype}; expected {np.dtype(dtype)}."
        )
    return arr.astype(dtype)


def _jvp_models(In: type, Out: type, max_batch: int) -> tuple[type, type]:
    vec_ann = In.model_fields["tangent_vector"].annotation
    # tesseract-core's response root is `Annotated[dict[...], AfterValidator]`; pydantic
    # keeps the validator (which checks unbatched shapes) in the field's metadata, so
    # the annotation alone is the dict type.
    out_dict = Out.model_fields["root"].annotation

    class BatchedJVPInputSchema(In):
        tangent_vector: vec_ann = Field(  # pyright: ignore[reportInvalidTypeForm]
            ...,
            description=(
                "A batch of tangent vectors: `{jvp_inputs: array}`, each array of "
                "shape `(K, *input_shape)`, with one common batch size "
                f"`1 <= K <= {max_batch}` (`max_batch`)."
            ),
        )

        # Same name as tesseract-core's validator, so that this one replaces it.
        @field_validator("tangent_vector", mode="after")
        @classmethod
        def validate_tangent_vector(cls, tangent_vector: dict, info: Any) -> dict:
            if "jvp_inputs" not in info.data or "inputs" not in info.data:
                raise ValueError(
                    "`tangent_vector` cannot be checked: invalid `inputs` or "
                    "`jvp_inputs`."
                )
            ins = info.data["jvp_inputs"]
            _check_keys(tangent_vector, ins, "tangent_vector", "jvp_inputs")
            k = _check_batch(tangent_vector, "tangent_vector", max_batch)
            out = {}
            for path, arr in tangent_vector.items():
                ref = get_at_path(info.data["inputs"], path)
                ref_shape = tuple(np.shape(ref))
                if tuple(np.shape(arr)[1:]) != ref_shape:
                    raise ValueError(
                        f"`tangent_vector.{path}` has shape {tuple(np.shape(arr))}; "
                        f"expected {(k, *ref_shape)}: the batch axis, then the shape "
                        f"of `inputs.{path}` {ref_shape}."
                    )
                dtype = getattr(ref, "dtype", None)
                out[path] = _cast(arr, dtype, f"tangent_vector.{path}")
            return out

    class BatchedJVPOutputSchema(RootModel):
        root: out_dict = Field(  # pyright: ignore[reportInvalidTypeForm]
            ...,
            description="`{jvp_outputs: array}`, each of shape `(K, *output_shape)`.",
        )

    return BatchedJVPInputSchema, BatchedJVPOutputSchema


def _vjp_models(
    In: type, Out: type, max_batch: int, output_shapes: Callable
) -> tuple[type, type]:
    vec_ann = In.model_fields["cotangent_vector"].annotation
    out_dict = Out.model_fields["root"].annotation

    class BatchedVJPInputSchema(In):
        cotangent_vector: vec_ann = Field(  # pyright: ignore[reportInvalidTypeForm]
            ...,
            description=(
                "A batch of cotangent vectors: `{vjp_outputs: array}`, each array of "
                "shape `(K, *output_shape)`, with one common batch size "
                f"`1 <= K <= {max_batch}` (`max_batch`)."
            ),
        )

        @field_validator("cotangent_vector", mode="after")
        @classmethod
        def validate_cotangent_vector(cls, cotangent_vector: dict, info: Any) -> dict:
            if "vjp_outputs" not in info.data or "inputs" not in info.data:
                raise ValueError(
                    "`cotangent_vector` cannot be checked: invalid `inputs` or "
                    "`vjp_outputs`."
                )
            outs = info.data["vjp_outputs"]
            _check_keys(cotangent_vector, outs, "cotangent_vector", "vjp_outputs")
            k = _check_batch(cotangent_vector, "cotangent_vector", max_batch)
            shapes = output_shapes(info.data["inputs"])
            out = {}
            for path, arr in cotangent_vector.items():
                ref = None
                if shapes is not None:
                    try:
                        ref = get_at_path(shapes, path)
                    except (LookupError, AttributeError):
                        ref = None
                if ref is None:
                    out[path] = np.asarray(arr)
                    continue
                ref_shape = tuple(ref["shape"])
                if tuple(np.shape(arr)[1:]) != ref_shape:
                    raise ValueError(
                        f"`cotangent_vector.{path}` has shape {tuple(np.shape(arr))}; "
                        f"expected {(k, *ref_shape)}: the batch axis, then the shape "
                        f"of output `{path}` {ref_shape}."
                    )
                dtype = np.dtype(ref["dtype"])
                out[path] = _cast(arr, dtype, f"cotangent_vector.{path}")
            return out

    class BatchedVJPOutputSchema(RootModel):
        root: out_dict = Field(  # pyright: ignore[reportInvalidTypeForm]
            ..., description="`{vjp_inputs: array}`, each of shape `(K, *input_shape)`."
        )

    return BatchedVJPInputSchema, BatchedVJPOutputSchema


def _stack(results: list[dict]) -> dict:
    return {k: np.stack([np.asarray(r[k]) for r in results]) for k in results[0]}


def batched_gradient_endpoint(
    kind: str,
    api_module: types.ModuleType,
    stock: dict[str, Callable],
    cached_module: types.ModuleType,
    state: ServerState,
    output_shapes: Callable,
) -> Callable:
    """The endpoint function of `/batched_jacobian_vector_product` (`kind="jvp"`) or
    `/batched_vector_jacobian_product` (`kind="vjp"`): `fn(payload) -> model`."""
    name, unbatched = (BATCHED_JVP, JVP) if kind == "jvp" else (BATCHED_VJP, VJP)
    raw_fn = getattr(api_module, unbatched)
    cached_fn = getattr(cached_module, unbatched)
    own_fn = getattr(api_module, name, None)
    StockIn = stock[unbatched].__annotations__["payload"]
    StockOut = stock[unbatched].__annotations__["return"]
    if kind == "jvp":
        In, Out = _jvp_models(StockIn, StockOut, state.max_batch)
        ins_f, outs_f, vec_f, result_f = (
            "jvp_inputs",
            "jvp_outputs",
            "tangent_vector",
            "jvp_outputs",
        )
    else:
        In, Out = _vjp_models(StockIn, StockOut, state.max_batch, output_shapes)
        ins_f, outs_f, vec_f, result_f = (
            "vjp_inputs",
            "vjp_outputs",
            "cotangent_vector",
            "vjp_inputs",
        )

    def vmapped(inputs: Any, ins: Any, outs: Any, vec: dict) -> Any:
        import jax

        first = {p: v[0] for p, v in vec.items()}
        if state.cache is not None:
            lin = state.cache.linear(kind, raw_fn, inputs, ins, outs, first)
            if lin is None:
                return None
            return jax.vmap(lin)(vec)
        try:
            return jax.vmap(lambda v: raw_fn(inputs, set(ins), set(outs), v))(vec)
        except Exception:
            return None

    def compute(payload: Any) -> Any:
        inputs = payload.inputs
        ins, outs = getattr(payload, ins_f), getattr(payload, outs_f)
        vec = getattr(payload, vec_f)
        k = next(iter(vec.values())).shape[0]
        mode = state.modes[name]

        def loop() -> dict:
            return _stack(
                [
                    # Fresh sets per call: some Tesseracts `pop` from them.
                    cached_fn(
                        inputs, set(ins), set(outs), {p: v[i] for p, v in vec.items()}
                    )
                    for i in range(k)
                ]
            )

        if mode == "own":
            assert own_fn is not None
            out = own_fn(inputs, ins, outs, vec)
        elif mode == "vmap":
            out = vmapped(inputs, ins, outs, vec)
            if out is None:
                # An error of the Tesseract's own is raised by the loop, as it is;
                # if the loop works, vmap does not: loop from now on, and say so.
                out = loop()
                state.fall_back(name)
        else:
            out = loop()
        expected = set(getattr(payload, result_f))
        if set(out) != expected:
            raise ValueError(
                f"`{name}` returned keys {sorted(out)}; expected {sorted(expected)}."
            )
        out = {p: np.asarray(v) for p, v in out.items()}
        for p, v in out.items():
            if v.ndim == 0 or v.shape[0] != k:
                raise ValueError(
                    f"`{name}` returned `{p}` of shape {v.shape}; expected a leading "
                    f"batch axis of size {k}."
                )
        return Out.model_validate(out)

    if kind == "jvp":

        def endpoint(payload: Any) -> Any:
            """Jacobian-vector products for a batch of tangent vectors, in one request.

            As `/jacobian_vector_product`, with one leading batch axis on every array
            of `tangent_vector`; every result array carries the same axis.
            """
            return compute(payload)

    else:

        def endpoint(payload: Any) -> Any:
            """Vector-Jacobian products for a batch of cotangents, in one request.

            As `/vector_jacobian_product`, with one leading batch axis on every array
            of `cotangent_vector`; every result array carries the same axis.
            """
            return compute(payload)

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__annotations__ = {"payload": In, "return": Out}
    return endpoint


def gradient_mode(api_module: types.ModuleType, kind: str, jaxy: bool) -> str | None:
    """How a batch of `kind` (`"jvp"`/`"vjp"`) is computed; `None`: no such endpoint."""
    name, unbatched = (BATCHED_JVP, JVP) if kind == "jvp" else (BATCHED_VJP, VJP)
    if hasattr(api_module, name):
        return "own"
    if hasattr(api_module, unbatched):
        return "vmap" if jaxy else "loop"
    return None
