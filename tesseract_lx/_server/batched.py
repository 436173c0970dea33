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


# Per direction: the vector field, the paths it is keyed by, the paths of the result,
# and what the vector's arrays are shaped like.
_FIELDS = {
    "jvp": ("tangent_vector", "jvp_inputs", "jvp_outputs", "input"),
    "vjp": ("cotangent_vector", "vjp_outputs", "vjp_inputs", "output"),
}


def _models(
    kind: str, In: type, Out: type, max_batch: int, reference: Callable
) -> tuple[type, type]:
    """The payload and result models of a batched endpoint: tesseract-core's own
    (`In`, `Out`), with one leading batch axis on the vector's arrays.

    `reference(inputs, path)` is the `(shape, dtype)` of one unbatched array of the
    vector at `path`, or `None` when it cannot be told (then only the batch is checked).
    """
    vec_f, keys_f, result_f, side = _FIELDS[kind]
    # tesseract-core's response root is `Annotated[dict[...], AfterValidator]`; pydantic
    # keeps the validator (which checks unbatched shapes) in the field's metadata, so
    # the annotation alone is the dict type.
    out_dict = Out.model_fields["root"].annotation

    def validate(cls: type, vec: dict, info: Any) -> dict:
        if keys_f not in info.data or "inputs" not in info.data:
            raise ValueError(
                f"`{vec_f}` cannot be checked: invalid `inputs` or `{keys_f}`."
            )
        _check_keys(vec, info.data[keys_f], vec_f, keys_f)
        k = _check_batch(vec, vec_f, max_batch)
        out = {}
        for path, arr in vec.items():
            ref = reference(info.data["inputs"], path)
            if ref is None:
                out[path] = np.asarray(arr)
                continue
            shape, dtype = ref
            if tuple(np.shape(arr)[1:]) != shape:
                raise ValueError(
                    f"`{vec_f}.{path}` has shape {tuple(np.shape(arr))}; expected "
                    f"{(k, *shape)}: the batch axis, then the shape of {side} "
                    f"`{path}` {shape}."
                )
            out[path] = _cast(arr, dtype, f"{vec_f}.{path}")
        return out

    kind_name = kind.upper()
    what = "tangent" if kind == "jvp" else "cotangent"
    Payload = type(
        f"Batched{kind_name}InputSchema",
        (In,),
        {
            "__annotations__": {vec_f: In.model_fields[vec_f].annotation},
            vec_f: Field(
                ...,
                description=(
                    f"A batch of {what} vectors: `{{{keys_f}: array}}`, each array of "
                    f"shape `(K, *{side}_shape)`, with one common batch size "
                    f"`1 <= K <= {max_batch}` (`max_batch`)."
                ),
            ),
            # Named as tesseract-core's validator, so that this one replaces it.
            f"validate_{vec_f}": field_validator(vec_f, mode="after")(
                classmethod(validate)
            ),
        },
    )
    result_side = "output" if kind == "jvp" else "input"
    Result = type(
        f"Batched{kind_name}OutputSchema",
        (RootModel,),
        {
            "__annotations__": {"root": out_dict},
            "root": Field(
                ...,
                description=f"`{{{result_f}: array}}`, each of shape "
                f"`(K, *{result_side}_shape)`.",
            ),
        },
    )
    return Payload, Result


def _input_reference(inputs: Any, path: str) -> tuple[tuple, Any]:
    ref = get_at_path(inputs, path)
    return tuple(np.shape(ref)), getattr(ref, "dtype", None)


def _output_reference(output_shapes: Callable) -> Callable:
    def reference(inputs: Any, path: str) -> tuple[tuple, Any] | None:
        shapes = output_shapes(inputs)
        if shapes is None:
            return None
        try:
            ref = get_at_path(shapes, path)
        except (LookupError, AttributeError):
            return None
        return tuple(ref["shape"]), np.dtype(ref["dtype"])

    return reference


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
    reference = _input_reference if kind == "jvp" else _output_reference(output_shapes)
    In, Out = _models(kind, StockIn, StockOut, state.max_batch, reference)
    ins_f, outs_f = (f"{kind}_inputs", f"{kind}_outputs")
    vec_f, _, result_f, _ = _FIELDS[kind]

    def vmapped(inputs: Any, ins: Any, outs: Any, vec: dict) -> Any:
        import jax

        if state.cache is not None:
            return state.cache.call_batch(kind, raw_fn, inputs, ins, outs, vec)
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
