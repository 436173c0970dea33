"""What a Tesseract takes and returns, read once from its `/openapi.json`.

Shapes, dtypes and differentiable paths come from tesseract-core's OpenAPI document:
`differentiable_arrays` on `ApplyInputSchema` / `ApplyOutputSchema` lists the
differentiable leaves; the `Apply_*` models give every other field. Nothing here sends
a request: the client fetches the document once and hands it over.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any


# A dimension of `None` is free; a shape of `None` is any rank (`Array[..., dtype]`).
Shape = tuple[int | None, ...] | None

_PY_TYPES = {"integer": "int64", "number": "float64", "boolean": "bool"}
GRADIENT_ENDPOINTS = (
    "jacobian",
    "jacobian_vector_product",
    "vector_jacobian_product",
)
BATCHED_ENDPOINTS = (
    "batched_jacobian_vector_product",
    "batched_vector_jacobian_product",
)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One field of the input or output tree."""

    path: str
    shape: Shape
    dtype: str | None
    differentiable: bool
    is_array: bool
    required: bool


@dataclasses.dataclass(frozen=True)
class Schema:
    """The parsed interface of one Tesseract."""

    inputs: dict[str, Leaf]
    outputs: dict[str, Leaf]
    endpoints: frozenset[str]
    # Set on tesseract-lx servers: how each batched endpoint computes a batch.
    batched: dict[str, str]
    # Names of the nested models (dicts) of the input tree, as dotted paths.
    input_groups: frozenset[str]

    @property
    def diff_inputs(self) -> tuple[str, ...]:
        return tuple(p for p, leaf in self.inputs.items() if leaf.differentiable)

    @property
    def diff_outputs(self) -> tuple[str, ...]:
        return tuple(p for p, leaf in self.outputs.items() if leaf.differentiable)

    def fixed_output_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Every output array's shape, when the schema fixes all of them."""
        shapes = {}
        for path, leaf in self.outputs.items():
            if not leaf.is_array:
                continue
            if leaf.shape is None or any(d is None for d in leaf.shape):
                return None
            shapes[path] = leaf.shape
        return shapes  # pyright: ignore[reportReturnType]


def _resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = doc["components"]["schemas"][name]
    if "allOf" in node and len(node["allOf"]) == 1:
        return _resolve(doc, node["allOf"][0])
    return node


def _array_shape(node: dict) -> Shape:
    shape = node["properties"]["shape"]
    if "maxItems" not in shape:
        return None
    dims: list[int | None] = []
    for item in shape.get("prefixItems", []):
        # A fixed dimension `n` is advertised as `enum [1, n]` (1 broadcasts).
        dims.append(max(item["enum"]) if "enum" in item else None)
    return tuple(dims)


def _array_dtype(node: dict) -> str | None:
    dtype = node["properties"]["dtype"]
    examples = dtype.get("examples")
    return examples[0] if examples else None


def _is_array_node(node: dict) -> bool:
    props = node.get("properties", {})
    return {"shape", "dtype", "data"} <= props.keys()


def _walk(
    doc: dict, node: dict, prefix: str, required: bool, diff: dict
) -> Iterator[Leaf | str]:
    """Yield every leaf below `node` (and the paths of nested models, as `str`)."""
    node = _resolve(doc, node)
    if _is_array_node(node):
        yield Leaf(
            prefix,
            _array_shape(node),
            _array_dtype(node),
            prefix in diff,
            True,
            required,
        )
        return
    if "properties" in node and node.get("type", "object") == "object":
        if prefix:
            yield prefix
        req = set(node.get("required", ()))
        for name, sub in node["properties"].items():
            path = f"{prefix}.{name}" if prefix else name
            yield from _walk(doc, sub, path, required and name in req, diff)
        return
    # A Python scalar, a string, an optional, a list or a dict of arbitrary keys:
    # passed through as it is, never differentiated.
    dtype = _PY_TYPES.get(node.get("type", ""))
    yield Leaf(prefix, (), dtype, False, False, required)


def _leaves(doc: dict, wrapper: str, inner: str) -> tuple[dict[str, Leaf], set[str]]:
    schemas = doc["components"]["schemas"]
    diff = schemas[wrapper].get("differentiable_arrays", {})
    leaves: dict[str, Leaf] = {}
    groups: set[str] = set()
    for item in _walk(doc, schemas[inner], "", True, diff):
        if isinstance(item, str):
            groups.add(item)
        else:
            leaves[item.path] = item
    return leaves, groups


def parse_openapi(doc: dict) -> Schema:
    """Read a Tesseract's interface from its OpenAPI document."""
    endpoints = frozenset(path.strip("/") for path in doc.get("paths", {}))
    inputs, groups = _leaves(doc, "ApplyInputSchema", "Apply_InputSchema")
    outputs, _ = _leaves(doc, "ApplyOutputSchema", "Apply_OutputSchema")
    ext: dict[str, Any] = doc.get("x-tesseract-lx") or {}
    batched = dict(ext.get("batched") or {})
    return Schema(inputs, outputs, endpoints, batched, frozenset(groups))
