"""tesseract-core's own endpoints, with JVPs and VJPs through the linearisation cache.

`stock_endpoints` is `tesseract_core.runtime.core.create_endpoints` on a copy of the
`tesseract_api` module whose `jacobian_vector_product` / `vector_jacobian_product` go
through the `LinearisationCache` (`cache.py`): payloads, validation, results and the
OpenAPI schema are tesseract-core's, unchanged. The copy is a new module object; the
Tesseract's own module is never modified.

`output_shapes_fn` gives the shapes and dtypes of a Tesseract's outputs at a point, from
its `abstract_eval`, memoised per signature in an LRU (the batched VJP checks
cotangents against them).
"""

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from tesseract_core.runtime.core import create_endpoints
from tesseract_core.runtime.schema_generation import create_abstract_eval_schema
from tesseract_core.runtime.tree_transforms import get_at_path, LRUCache

from .cache import LinearisationCache, primal_digest


# Signatures (shapes and dtypes, not values) whose output shapes are remembered.
_MAX_SHAPE_MEMO = 256


def _through_cache(
    api_module: types.ModuleType, cache: LinearisationCache | None
) -> types.ModuleType:
    """A copy of `api_module` whose JVP/VJP go through `cache` (or `api_module`)."""
    if cache is None:
        return api_module
    wrapped = types.ModuleType(api_module.__name__, api_module.__doc__)
    wrapped.__dict__.update(
        {k: v for k, v in vars(api_module).items() if k not in ("__name__", "__doc__")}
    )
    jvp = getattr(api_module, "jacobian_vector_product", None)
    if jvp is not None:
        # Keyword names as tesseract-core calls them: `**dict(payload)`.
        def jacobian_vector_product(inputs, jvp_inputs, jvp_outputs, tangent_vector):
            return cache.call(
                "jvp", jvp, inputs, jvp_inputs, jvp_outputs, tangent_vector
            )

        wrapped.__dict__["jacobian_vector_product"] = functools.wraps(jvp)(
            jacobian_vector_product
        )
    vjp = getattr(api_module, "vector_jacobian_product", None)
    if vjp is not None:

        def vector_jacobian_product(inputs, vjp_inputs, vjp_outputs, cotangent_vector):
            return cache.call(
                "vjp", vjp, inputs, vjp_inputs, vjp_outputs, cotangent_vector
            )

        wrapped.__dict__["vector_jacobian_product"] = functools.wraps(vjp)(
            vector_jacobian_product
        )
    return wrapped


def stock_endpoints(
    api_module: types.ModuleType, cache: LinearisationCache | None
) -> tuple[types.ModuleType, dict[str, Callable]]:
    """tesseract-core's endpoint functions for `api_module`, by name.

    **Returns:** `(module, endpoints)`: the module they call (the copy whose JVP/VJP go
    through `cache`), and `{name: fn}` in tesseract-core's order: `apply`, then those
    the Tesseract defines among `jacobian`, `jacobian_vector_product`,
    `vector_jacobian_product`, then `health`, `abstract_eval`, `test`. Each `fn` takes
    a validated payload (`fn.__annotations__["payload"]`) and returns a pydantic model.
    """
    module = _through_cache(api_module, cache)
    return module, {fn.__name__: fn for fn in create_endpoints(module)}


def _abstract(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _abstract(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_abstract(v) for v in x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return {"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)}
    return x


def output_shapes_fn(api_module: types.ModuleType) -> Callable[[Any], Any]:
    """`inputs -> {output tree of {"shape", "dtype"}}` from the Tesseract's
    `abstract_eval`, memoised per signature (an LRU); `None` when it has none or it
    fails (some Tesseracts have a broken `abstract_eval`: then check less, not fail).
    """
    if not hasattr(api_module, "abstract_eval"):
        return lambda inputs: None
    AbsIn, AbsOut = create_abstract_eval_schema(
        api_module.InputSchema, api_module.OutputSchema
    )
    memo = LRUCache(maxsize=_MAX_SHAPE_MEMO)

    def output_shapes(inputs: Any) -> Any:
        abstract = {"inputs": _abstract(inputs.model_dump())}
        key = primal_digest(abstract)
        hit = memo.get(key)
        if hit is not None:
            return hit[0]
        try:
            payload = AbsIn.model_validate(abstract)
            shapes = AbsOut.model_validate(
                api_module.abstract_eval(getattr(payload, "inputs"))
            ).model_dump()
        except Exception:
            shapes = None
        memo.put(key, (shapes,))
        return shapes

    return output_shapes


def cotangent_check(output_shapes: Callable[[Any], Any]) -> Callable[[Any], None]:
    """`check(payload)` of `/vector_jacobian_product`: a 422 for a cotangent whose
    shape is not its output's at the point.

    tesseract-core checks a cotangent against the output's schema only, where
    `(None,)` means any size: the Tesseract's VJP would raise, a 500.
    """

    def check(payload: Any) -> None:
        shapes = output_shapes(payload.inputs)
        if shapes is None:
            return
        errors = []
        for path, arr in payload.cotangent_vector.items():
            try:
                expected = tuple(get_at_path(shapes, path)["shape"])
            except (LookupError, AttributeError, TypeError):
                continue
            if tuple(np.shape(arr)) != expected:
                msg = (
                    f"Value error, `cotangent_vector.{path}` has shape "
                    f"{tuple(np.shape(arr))}; expected {expected}, the shape of "
                    f"output `{path}` at these inputs."
                )
                errors.append(
                    {
                        "type": "value_error",
                        "loc": ("body", "cotangent_vector"),
                        "msg": msg,
                    }
                )
        if errors:
            raise RequestValidationError(errors)

    return check
