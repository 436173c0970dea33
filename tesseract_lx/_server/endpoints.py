"""Endpoint functions of a tesseract-lx server: tesseract-core's own, plus batched ones.

`create_endpoints` returns plain functions with a pydantic `payload` annotation and a
return annotation, exactly as `tesseract_core.runtime.core.create_endpoints` does, so
that one list serves both the HTTP routes (`_server.py`) and an in-process client
(`fn.__annotations__["payload"].model_validate(d)`, call, `.model_dump()`).

**What is tesseract-core's and what is not.**

- The stock endpoints (`apply`, `jacobian`, `jacobian_vector_product`,
  `vector_jacobian_product`, `abstract_eval`, ...) *are* tesseract-core's, built by its
  `create_endpoints` on a wrapped copy of the `tesseract_api` module whose
  `jacobian_vector_product` / `vector_jacobian_product` go through the linearisation
  cache (`_linearise.py`). Payloads, validation and errors are therefore unchanged.
- tesseract-core has no batched JVP/VJP endpoint. `batched_jacobian_vector_product` and
  `batched_vector_jacobian_product` are defined here. Their payload models subclass
  tesseract-core's own JVP/VJP models (from `create_gradient_schema`), reusing the
  `inputs` and path-set validation, and replace only the (co)tangent validator: each
  array carries one leading batch axis. tesseract-core's validator cannot be reused as
  is, since it checks the unbatched shape.

A batch is computed, in this order of preference, by the Tesseract's own
`batched_jacobian_vector_product` / `batched_vector_jacobian_product` (`"own"`); by
`jax.vmap` of its JVP/VJP in the (co)tangent, the primal being computed once
(`"vmap"`); or by a loop in process (`"loop"`). `batched_modes(endpoints)` says which.
"""

import functools
import importlib.metadata
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from pydantic import Field, field_validator, RootModel
from tesseract_core.runtime.core import create_endpoints as _stock_endpoints
from tesseract_core.runtime.schema_generation import (
    create_abstract_eval_schema,
    create_gradient_schema,
)
from tesseract_core.runtime.tree_transforms import get_at_path

from .cache import (
    CacheSettings,
    enable_tesseract_vjp_cache,
    LinearisationCache,
    primal_digest,
)
from .._wire.schema import BATCHED_ENDPOINTS


try:
    __version__ = importlib.metadata.version("tesseract_lx")
except importlib.metadata.PackageNotFoundError:  # a source checkout, not installed
    __version__ = "0.1.0"

BATCHED = BATCHED_ENDPOINTS


class LxState:
    """What a tesseract-lx server adds, shared by all its endpoints (`fn.lx_state`).

    - `modes`: `{"batched_jacobian_vector_product": "own" | "vmap" | "loop", ...}`.
    - `cache`: the `LinearisationCache`, or `None` when switched off.
    """

    def __init__(
        self,
        modes: dict[str, str],
        cache: LinearisationCache | None,
        settings: CacheSettings,
    ):
        self.modes = modes
        self.cache = cache
        self.settings = settings

    def info(self) -> dict[str, Any]:
        """The `x-tesseract-lx` block of `/openapi.json` (and of `/health`)."""
        if self.cache is None:
            # Off, or on but idle: a Tesseract that does not use JAX has nothing to
            # linearise.
            cache_info: dict[str, Any] = {**self.settings.as_dict(), "active": False}
        else:
            cache_info = {**self.cache.stats(), "active": True}
        return {
            "version": __version__,
            "batched": dict(self.modes),
            "linearisation_cache": cache_info,
        }


def _uses_jax(api_module: types.ModuleType) -> bool:
    """Whether a `tesseract_api` module looks JAX-based (then tracing is tried)."""
    roots = ("jax", "equinox", "tesseract_core.runtime.jax_recipes")
    for value in vars(api_module).values():
        name = (
            getattr(value, "__name__", "")
            if isinstance(value, types.ModuleType)
            else ""
        )
        name = name or getattr(value, "__module__", None) or ""
        if isinstance(name, str) and name.startswith(roots):
            return True
    return False


def _wrap_api_module(
    api_module: types.ModuleType, cache: LinearisationCache | None
) -> types.ModuleType:
    """A copy of `api_module` whose JVP/VJP go through `cache` (or `api_module`)."""
    if cache is None:
        return api_module
    wrapped = types.ModuleType(api_module.__name__, api_module.__doc__)
    wrapped.__dict__.update(
        {k: v for k, v in vars(api_module).items() if k not in ("__name__", "__doc__")}
    )
    for name, kind in (
        ("jacobian_vector_product", "jvp"),
        ("vector_jacobian_product", "vjp"),
    ):
        fn = getattr(api_module, name, None)
        if fn is None:
            continue

        def cached(inputs, ins, outs, vec, _fn=fn, _kind=kind):
            return cache.call(_kind, _fn, inputs, ins, outs, vec)

        # Keyword names as tesseract-core calls them: `**dict(payload)`.
        if kind == "jvp":

            def through_cache(
                inputs, jvp_inputs, jvp_outputs, tangent_vector, _c=cached
            ):
                return _c(inputs, jvp_inputs, jvp_outputs, tangent_vector)
        else:

            def through_cache(
                inputs, vjp_inputs, vjp_outputs, cotangent_vector, _c=cached
            ):
                return _c(inputs, vjp_inputs, vjp_outputs, cotangent_vector)

        setattr(wrapped, name, functools.wraps(fn)(through_cache))
    return wrapped


def _err(message: str) -> ValueError:
    # A ValueError in a validator becomes a 422 (FastAPI) or a `ValidationError`
    # (in process), with `loc` naming the (co)tangent field.
    return ValueError(message)


def _check_batch(vec: dict[str, Any], field: str) -> int:
    """The common batch size of all arrays of a (co)tangent dict, or a 422."""
    size, first = None, None
    for path, arr in vec.items():
        shape = np.shape(arr)
        if len(shape) == 0 or shape[0] < 1:
            raise _err(
                f"`{field}.{path}` needs a leading batch axis of size >= 1; got an "
                f"array of shape {tuple(shape)}."
            )
        if size is None:
            size, first = shape[0], path
        elif shape[0] != size:
            raise _err(
                f"`{field}.{path}` has batch size {shape[0]}, but `{field}.{first}` "
                f"has {size}: every array of `{field}` needs the same leading batch "
                "size."
            )
    if size is None:
        raise _err(f"`{field}` is empty.")
    return size


def _check_keys(vec: dict, expected: set, field: str, against: str) -> None:
    if set(vec) != set(expected):
        raise _err(
            f"`{field}` must have exactly the keys of `{against}` "
            f"({sorted(expected)}); got {sorted(vec)}."
        )


def _cast(arr: Any, dtype: Any, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if dtype is None or arr.dtype == dtype:
        return arr
    if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise _err(f"`{where}` has dtype {arr.dtype}; expected {np.dtype(dtype)}.")
    return arr.astype(dtype)


def _batched_schemas(api_module: types.ModuleType, kind: str, output_shapes: Callable):
    """Payload and response models of a batched endpoint, from tesseract-core's own."""
    In, Out = create_gradient_schema(
        api_module.InputSchema, api_module.OutputSchema, kind
    )
    vec_field = "tangent_vector" if kind == "jvp" else "cotangent_vector"
    vec_ann = In.model_fields[vec_field].annotation
    # tesseract-core's response root is `Annotated[dict[...], AfterValidator]`;
    # pydantic keeps the validator (which checks unbatched shapes) apart, in the
    # field's metadata, so the annotation alone is the dict type.
    out_dict = Out.model_fields["root"].annotation

    if kind == "jvp":

        class BatchedJVPInputSchema(In):
            tangent_vector: vec_ann = Field(
                ...,
                description=(
                    "A batch of tangent vectors: `{jvp_inputs: array}`, each array of "
                    "shape `(K, *input_shape)`, with one common batch size `K >= 1`."
                ),
            )

            # Same name as tesseract-core's validator, so that this one replaces it.
            @field_validator("tangent_vector", mode="after")
            @classmethod
            def validate_tangent_vector(cls, tangent_vector: dict, info) -> dict:
                if "jvp_inputs" not in info.data or "inputs" not in info.data:
                    raise _err(
                        "`tangent_vector` cannot be checked: invalid `inputs` or "
                        "`jvp_inputs`."
                    )
                _check_keys(
                    tangent_vector,
                    info.data["jvp_inputs"],
                    "tangent_vector",
                    "jvp_inputs",
                )
                k = _check_batch(tangent_vector, "tangent_vector")
                out = {}
                for path, arr in tangent_vector.items():
                    ref = get_at_path(info.data["inputs"], path)
                    ref_shape = tuple(np.shape(ref))
                    if tuple(np.shape(arr)[1:]) != ref_shape:
                        raise _err(
                            f"`tangent_vector.{path}` has shape "
                            f"{tuple(np.shape(arr))}; expected {(k, *ref_shape)}: "
                            f"the batch axis, then the shape of `inputs.{path}` "
                            f"{ref_shape}."
                        )
                    dtype = getattr(ref, "dtype", None)
                    out[path] = _cast(arr, dtype, f"tangent_vector.{path}")
                return out

        class BatchedJVPOutputSchema(RootModel):
            root: out_dict = Field(
                ...,
                description=(
                    "`{jvp_outputs: array}`, each of shape `(K, *output_shape)`."
                ),
            )

        return BatchedJVPInputSchema, BatchedJVPOutputSchema

    class BatchedVJPInputSchema(In):
        cotangent_vector: vec_ann = Field(
            ...,
            description=(
                "A batch of cotangent vectors: `{vjp_outputs: array}`, each array of "
                "shape `(K, *output_shape)`, with one common batch size `K >= 1`."
            ),
        )

        @field_validator("cotangent_vector", mode="after")
        @classmethod
        def validate_cotangent_vector(cls, cotangent_vector: dict, info) -> dict:
            if "vjp_outputs" not in info.data or "inputs" not in info.data:
                raise _err(
                    "`cotangent_vector` cannot be checked: invalid `inputs` or "
                    "`vjp_outputs`."
                )
            _check_keys(
                cotangent_vector,
                info.data["vjp_outputs"],
                "cotangent_vector",
                "vjp_outputs",
            )
            k = _check_batch(cotangent_vector, "cotangent_vector")
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
                    raise _err(
                        f"`cotangent_vector.{path}` has shape "
                        f"{tuple(np.shape(arr))}; expected {(k, *ref_shape)}: the "
                        f"batch axis, then the shape of output `{path}` {ref_shape}."
                    )
                out[path] = _cast(
                    arr, np.dtype(ref["dtype"]), f"cotangent_vector.{path}"
                )
            return out

    class BatchedVJPOutputSchema(RootModel):
        root: out_dict = Field(
            ...,
            description="`{vjp_inputs: array}`, each of shape `(K, *input_shape)`.",
        )

    return BatchedVJPInputSchema, BatchedVJPOutputSchema


def _output_shapes_fn(api_module: types.ModuleType) -> Callable:
    """`inputs -> {output tree of {"shape", "dtype"}}` via the Tesseract's
    `abstract_eval`, memoised per signature; `None` when that is unavailable/broken.
    """
    if not hasattr(api_module, "abstract_eval"):
        return lambda inputs: None
    AbsIn, AbsOut = create_abstract_eval_schema(
        api_module.InputSchema, api_module.OutputSchema
    )
    memo: dict[str, Any] = {}

    def to_abstract(x):
        if isinstance(x, dict):
            return {k: to_abstract(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(to_abstract(v) for v in x)
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return {"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)}
        return x

    def output_shapes(inputs):
        abstract = {"inputs": to_abstract(inputs.model_dump())}
        key = primal_digest(abstract)
        if key not in memo:
            try:
                payload = AbsIn.model_validate(abstract)
                memo[key] = AbsOut.model_validate(
                    api_module.abstract_eval(payload.inputs)
                ).model_dump()
            except Exception:
                # Some Tesseracts have a broken `abstract_eval`: check less, not fail.
                memo[key] = None
        return memo[key]

    return output_shapes


def _stack(results: list[dict]) -> dict:
    return {k: np.stack([np.asarray(r[k]) for r in results]) for k in results[0]}


def _batched_endpoint(
    kind: str,
    api_module: types.ModuleType,
    wrapped: types.ModuleType,
    state: LxState,
    output_shapes: Callable,
) -> Callable:
    name = BATCHED[0] if kind == "jvp" else BATCHED[1]
    unbatched = (
        "jacobian_vector_product" if kind == "jvp" else "vector_jacobian_product"
    )
    raw_fn = getattr(api_module, unbatched)
    cached_fn = getattr(wrapped, unbatched)
    own_fn = getattr(api_module, name, None)
    In, Out = _batched_schemas(api_module, kind, output_shapes)
    ins_f, outs_f, vec_f = (
        ("jvp_inputs", "jvp_outputs", "tangent_vector")
        if kind == "jvp"
        else ("vjp_inputs", "vjp_outputs", "cotangent_vector")
    )
    result_keys_f = outs_f if kind == "jvp" else ins_f

    def vmapped(inputs, ins, outs, vec):
        first = {p: v[0] for p, v in vec.items()}
        if state.cache is not None:
            lin = state.cache.linear(kind, raw_fn, inputs, ins, outs, first)
            if lin is None:
                return None
            return jax.vmap(lin)(vec)
        try:
            return jax.vmap(lambda v: raw_fn(inputs, ins, outs, v))(vec)
        except Exception:
            return None

    def compute(payload) -> Any:
        inputs = payload.inputs
        ins, outs = getattr(payload, ins_f), getattr(payload, outs_f)
        vec = getattr(payload, vec_f)
        k = next(iter(vec.values())).shape[0]
        mode = state.modes[name]
        out = None
        if mode == "own":
            out = own_fn(inputs, ins, outs, vec)
        elif mode == "vmap":
            out = vmapped(inputs, ins, outs, vec)
            if out is None:
                # Did not trace: loop from now on, and say so in `/openapi.json`.
                state.modes[name] = "loop"
        if out is None:
            out = _stack(
                [
                    cached_fn(inputs, ins, outs, {p: v[i] for p, v in vec.items()})
                    for i in range(k)
                ]
            )
        expected = set(getattr(payload, result_keys_f))
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

        def batched_jacobian_vector_product(payload: In) -> Out:
            """Jacobian-vector products for a batch of tangent vectors, in one request.

            As `/jacobian_vector_product`, with one leading batch axis on every array
            of `tangent_vector`; every result array carries the same axis.
            """
            return compute(payload)

        fn = batched_jacobian_vector_product
    else:

        def batched_vector_jacobian_product(payload: In) -> Out:
            """Vector-Jacobian products for a batch of cotangents, in one request.

            As `/vector_jacobian_product`, with one leading batch axis on every array
            of `cotangent_vector`; every result array carries the same axis.
            """
            return compute(payload)

        fn = batched_vector_jacobian_product
    # Plain annotations, for FastAPI and in-process clients alike.
    fn.__annotations__ = {"payload": In, "return": Out}
    return fn


def prepare(
    api_module: types.ModuleType, *, cache: bool | CacheSettings = True
) -> tuple[types.ModuleType, list[Callable], LxState]:
    """The pieces `create_endpoints` and `_server.create_app` are built from.

    **Returns:** `(wrapped_module, batched_endpoints, state)`: the `tesseract_api` copy
    whose JVP/VJP go through the linearisation cache, the batched endpoint functions,
    and the shared `LxState`.
    """
    if isinstance(cache, CacheSettings):
        settings = cache
    else:
        settings = CacheSettings.from_env(enabled=bool(cache))
    jaxy = _uses_jax(api_module)
    lin_cache = LinearisationCache(settings) if (settings.enabled and jaxy) else None
    if settings.enabled and settings.tesseract_vjp_cache:
        enable_tesseract_vjp_cache(max(settings.max_entries, 1))
    wrapped = _wrap_api_module(api_module, lin_cache)

    modes = {}
    for name, unbatched in zip(
        BATCHED, ("jacobian_vector_product", "vector_jacobian_product"), strict=True
    ):
        if hasattr(api_module, name):
            modes[name] = "own"
        elif hasattr(api_module, unbatched):
            modes[name] = "vmap" if jaxy else "loop"
    state = LxState(modes, lin_cache, settings)
    output_shapes = _output_shapes_fn(api_module)
    batched = [
        _batched_endpoint(kind, api_module, wrapped, state, output_shapes)
        for kind, name in (("jvp", BATCHED[0]), ("vjp", BATCHED[1]))
        if name in modes
    ]
    for fn in batched:
        fn.lx_state = state
    return wrapped, batched, state


def create_endpoints(
    api_module: types.ModuleType, *, cache: bool | CacheSettings = True
) -> list[Callable]:
    """tesseract-core's endpoints for `api_module`, plus the two batched ones.

    **Arguments:**

    - `api_module`: a loaded `tesseract_api` module
        (`tesseract_core.runtime.core.load_module_from_path`).
    - `cache`: the linearisation cache: `True` (settings from the environment, see
        `CacheSettings.from_env`), `False`, or explicit `CacheSettings`.

    **Returns:** a list of endpoint functions, each named as its route, with
    `__annotations__["payload"]` (a pydantic model; absent for `health`) and
    `__annotations__["return"]`. `health` returns `{"status": "ok", "tesseract_lx":
    {...}}`. Every function has the attribute `lx_state` (an `LxState`).

    !!! Example

        ```python
        endpoints = {fn.__name__: fn for fn in create_endpoints(api)}
        fn = endpoints["batched_jacobian_vector_product"]
        payload = fn.__annotations__["payload"].model_validate(payload_dict)
        result = fn(payload).model_dump()
        ```
    """
    wrapped, batched, state = prepare(api_module, cache=cache)
    endpoints = []
    for fn in _stock_endpoints(wrapped):
        if fn.__name__ == "health":
            fn = _health(state)
        fn.lx_state = state
        endpoints.append(fn)
    return endpoints + batched


def _health(state: LxState) -> Callable:
    def health() -> dict[str, Any]:
        """Health status of the Tesseract, with what tesseract-lx adds."""
        return {"status": "ok", "tesseract_lx": state.info()}

    return health


def batched_modes(endpoints: list[Callable]) -> dict[str, str]:
    """`{"batched_jacobian_vector_product": "own" | "vmap" | "loop", ...}` of an
    endpoint list from `create_endpoints`.
    """
    return dict(endpoints[0].lx_state.modes)


def lx_info(endpoints: list[Callable]) -> dict[str, Any]:
    """The `x-tesseract-lx` block for an endpoint list from `create_endpoints`."""
    return endpoints[0].lx_state.info()
