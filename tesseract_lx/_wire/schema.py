"""What a Tesseract takes and returns, read once from its `/openapi.json`.

tesseract-core describes a Tesseract's inputs and outputs as JSON Schema
(`Apply_InputSchema`, `Apply_OutputSchema`). This module turns that into a small tree
of nodes, one per construct tesseract-core allows:

| node | JSON Schema | user-side value |
|---|---|---|
| `ArrayNode` | an encoded array (`shape`, `dtype`, `data`) | an array |
| `ModelNode` | an object with `properties` | a dict of its fields |
| `ListNode` | `type: array` with `items` | a list |
| `DictNode` | `type: object`, `additionalProperties` | a dict, string keys |
| `OptionalNode` | `anyOf [X, null]` | an X or `None` |
| `UnionNode` | any other `anyOf` / `oneOf` | whichever fits |
| `ValueNode` | scalars, strings, `enum`, `const`, any | a Python value |

Differentiability comes from the array node's own `array_flags`, so it holds at any
depth (`xs.[1]`, `fields.{a}`, `mesh.points`). Nothing here sends a request.
"""

import dataclasses
from typing import Any, TypeAlias

from . import paths
from .spec import Capabilities


# A dimension of `None` is free; a shape of `None` is any rank (`Array[..., dtype]`).
Shape: TypeAlias = tuple[int | None, ...] | None


@dataclasses.dataclass(frozen=True)
class ArrayNode:
    shape: Shape
    dtype: str | None
    differentiable: bool

    def describe(self) -> str:
        if self.shape is None:
            shape = "any shape"
        else:
            shape = "shape (" + ", ".join(
                "*" if d is None else str(d) for d in self.shape
            )
            shape += ",)" if len(self.shape) == 1 else ")"
        return f"an array of {shape}, dtype {self.dtype or 'any'}"


@dataclasses.dataclass(frozen=True)
class ModelNode:
    # (name, node, required), in the schema's order.
    fields: tuple[tuple[str, "Node", bool], ...]
    name: str = ""

    def field(self, name: str) -> "Node | None":
        for n, node, _ in self.fields:
            if n == name:
                return node
        return None

    def describe(self) -> str:
        return "a dict with keys " + ", ".join(f"`{n}`" for n, _, _ in self.fields)


@dataclasses.dataclass(frozen=True)
class ListNode:
    item: "Node"

    def describe(self) -> str:
        return "a list"


@dataclasses.dataclass(frozen=True)
class DictNode:
    value: "Node"

    def describe(self) -> str:
        return "a dict with string keys"


@dataclasses.dataclass(frozen=True)
class OptionalNode:
    inner: "Node"

    def describe(self) -> str:
        return f"{self.inner.describe()}, or None"


@dataclasses.dataclass(frozen=True)
class UnionNode:
    options: tuple["Node", ...]

    def describe(self) -> str:
        return " or ".join(o.describe() for o in self.options)


@dataclasses.dataclass(frozen=True)
class ValueNode:
    # JSON type: "integer", "number", "boolean", "string", or None (anything).
    type: str | None
    enum: tuple[Any, ...] | None = None

    @property
    def numeric(self) -> bool:
        return self.type in ("integer", "number", "boolean") and self.enum is None

    def describe(self) -> str:
        if self.enum is not None:
            return "one of " + ", ".join(repr(v) for v in self.enum)
        names = {"integer": "an int", "number": "a float", "boolean": "a bool"}
        return names.get(
            self.type or "", "a string" if self.type == "string" else "a value"
        )


Node: TypeAlias = (
    ArrayNode | ModelNode | ListNode | DictNode | OptionalNode | UnionNode | ValueNode
)


@dataclasses.dataclass(frozen=True)
class Schema:
    """The parsed interface of one Tesseract.

    - `inputs`, `outputs`: the `ModelNode`s of `InputSchema` / `OutputSchema`.
    - `endpoints`: the paths the server serves, without the slash.
    - `capabilities`: what a tesseract-lx server says it can do (stock: nothing).
    """

    inputs: ModelNode
    outputs: ModelNode
    endpoints: frozenset[str]
    capabilities: Capabilities

    def has(self, endpoint: str) -> bool:
        return endpoint in self.endpoints


def node_at(model: ModelNode, path: str) -> Node | None:
    """The schema node a concrete path (`xs.[1]`, `fields.{a}`) leads to, or `None`."""
    node: Node | None = model
    for op, index in paths.segments(path):
        while isinstance(node, OptionalNode):
            node = node.inner
        if op == "getattr" and isinstance(node, ModelNode):
            node = node.field(index)
        elif op == "seq" and isinstance(node, ListNode):
            node = node.item
        elif op == "dict" and isinstance(node, DictNode):
            node = node.value
        else:
            return None
    while isinstance(node, OptionalNode):
        node = node.inner
    return node


def differentiable_patterns(model: ModelNode) -> list[str]:
    """Every differentiable array's path pattern (`xs.[]`, `fields.{}`), as
    tesseract-core writes them."""
    found: list[str] = []

    def go(node: Node, prefix: str) -> None:
        join = lambda seg: f"{prefix}.{seg}" if prefix else seg
        if isinstance(node, ArrayNode):
            if node.differentiable:
                found.append(prefix)
        elif isinstance(node, ModelNode):
            for name, sub, _ in node.fields:
                go(sub, join(name))
        elif isinstance(node, ListNode):
            go(node.item, join("[]"))
        elif isinstance(node, DictNode):
            go(node.value, join("{}"))
        elif isinstance(node, OptionalNode):
            go(node.inner, prefix)
        elif isinstance(node, UnionNode):
            for option in node.options:
                go(option, prefix)

    go(model, "")
    return found


def _resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = doc["components"]["schemas"][name]
    if "allOf" in node and len(node["allOf"]) == 1:
        return _resolve(doc, node["allOf"][0])
    return node


def _is_array(node: dict) -> bool:
    return {"shape", "dtype", "data"} <= node.get("properties", {}).keys()


def _array(node: dict) -> ArrayNode:
    props = node["properties"]
    shape_node = props["shape"]
    shape: Shape
    if "maxItems" not in shape_node:
        shape = None
    else:
        dims: list[int | None] = []
        for item in shape_node.get("prefixItems", []):
            # A fixed dimension `n` is advertised as `enum [1, n]`.
            dims.append(max(item["enum"]) if "enum" in item else None)
        shape = tuple(dims)
    examples = props["dtype"].get("examples")
    dtype = examples[0] if examples else None
    differentiable = "DIFFERENTIABLE" in node.get("array_flags", ())
    return ArrayNode(shape, dtype, differentiable)


def parse_node(doc: dict, node: dict) -> Node:
    """The node of one JSON Schema fragment of a tesseract-core OpenAPI document."""
    node = _resolve(doc, node)
    if _is_array(node):
        return _array(node)
    options = node.get("anyOf") or node.get("oneOf")
    if options:
        nodes = [o for o in options if _resolve(doc, o).get("type") != "null"]
        parsed = tuple(parse_node(doc, o) for o in nodes)
        inner = parsed[0] if len(parsed) == 1 else UnionNode(parsed)
        return OptionalNode(inner) if len(nodes) < len(options) else inner
    if "const" in node:
        return ValueNode(node.get("type"), (node["const"],))
    if "enum" in node:
        return ValueNode(node.get("type"), tuple(node["enum"]))
    kind = node.get("type")
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return DictNode(parse_node(doc, node["additionalProperties"]))
    if kind == "object":
        required = set(node.get("required", ()))
        fields = tuple(
            (name, parse_node(doc, sub), name in required)
            for name, sub in node.get("properties", {}).items()
        )
        return ModelNode(fields, node.get("title", ""))
    if kind == "array" and isinstance(node.get("items"), dict):
        return ListNode(parse_node(doc, node["items"]))
    if isinstance(kind, str) and kind in ("integer", "number", "boolean", "string"):
        return ValueNode(kind)
    return ValueNode(None)


def parse_openapi(doc: dict) -> Schema:
    """Read a Tesseract's interface from its OpenAPI document."""
    schemas = doc["components"]["schemas"]
    inputs = parse_node(doc, schemas["Apply_InputSchema"])
    outputs = parse_node(doc, schemas["Apply_OutputSchema"])
    if not isinstance(inputs, ModelNode) or not isinstance(outputs, ModelNode):
        raise ValueError(
            "The Tesseract's `/openapi.json` does not describe its inputs and outputs "
            "as models (`Apply_InputSchema`, `Apply_OutputSchema`)."
        )
    endpoints = frozenset(path.strip("/") for path in doc.get("paths", {}))
    return Schema(inputs, outputs, endpoints, Capabilities.from_openapi(doc))
