"""User trees <-> operands, checked against the schema.

A Tesseract call's inputs are a tree of plain containers shaped as the schema says.
`flatten_inputs` walks it against the schema's nodes and splits it into

- **operands**: the arrays (and traced Python numbers), the only things JAX sees;
- a **template**: everything else, hashable, with `("operand", i)` where operand `i`
  goes. Static values (strings, ints, `Literal`s, `None`) live in the template.

`flatten_outputs` does the same for an answer of `/apply` (or of `/abstract_eval`),
and `build` puts a tree back together from a template and values. Every refusal
names the offending path (tesseract-core's syntax) and says what was expected, and
happens before any request.

Template grammar: `("model", ((name, t), ...))`, `("list", (t, ...))`,
`("dict", ((key, t), ...))`, `("operand", i)`, `("value", Static)`.
"""

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orjson
from jax.core import ShapedArray, Tracer
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from ._wire import paths
from ._wire.schema import (
    ArrayNode,
    DictNode,
    ListNode,
    ModelNode,
    Node,
    OptionalNode,
    UnionNode,
    ValueNode,
)


Template = tuple


class Static:
    """A static (non-array) value in a template: hashed by its JSON text, as sent
    (`json_number`: NaN is not `null`, so not `None`)."""

    __slots__ = ("value", "_key")

    def __init__(self, value: Any):
        self.value = value
        try:
            self._key = orjson.dumps(
                json_number(value),
                option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
            )
        except TypeError:
            self._key = repr(value).encode()

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Static) and self._key == other._key

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One operand (input) or result (output) of a call.

    `number`: a Python `int`/`float`/`bool` field of the schema, sent and received as
    a JSON number but handled as a 0-d array (so it can be traced).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    differentiable: bool
    number: bool = False

    @property
    def aval(self) -> ShapedArray:
        return ShapedArray(self.shape, np.dtype(self.dtype))


_NUMBER_DTYPES = {"integer": "int64", "number": "float64", "boolean": "bool"}


def canonical_dtype(dtype: Any) -> np.dtype:
    """A dtype as JAX holds it under the current x64 setting."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype)))


def _is_tracer(x: Any) -> bool:
    return isinstance(x, Tracer)


def _is_arraylike(x: Any) -> bool:
    if isinstance(x, str | bytes | list | tuple | dict) or x is None:
        return False
    if isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float):
        return True
    return hasattr(x, "__array__") or hasattr(x, "__jax_array__")


def _type_name(x: Any) -> str:
    if isinstance(x, jax.Array | np.ndarray):
        return f"an array of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, str | int | float):
        return f"{type(x).__name__} {x!r}"
    return type(x).__name__


class _Walk:
    """One flattening pass: collects operands and their values."""

    def __init__(self):
        self.leaves: list[Leaf] = []
        self.values: list[Any] = []

    def operand(self, leaf: Leaf, value: Any) -> Template:
        self.leaves.append(leaf)
        self.values.append(value)
        return ("operand", len(self.leaves) - 1)


def _fail(exc: type[Exception], path: str, what: str, got: Any) -> Exception:
    where = f"`{path}`" if path else "The inputs"
    message = f"{where} must be {what}; got {_type_name(got)}."
    return invalid(path, message) if exc is ValueError else exc(message)


def invalid(path: str, message: str) -> ValidationError:
    """A refusal of the inputs' values (shape, a missing or unknown field, a value
    not allowed): a pydantic `ValidationError`, which is a `ValueError`, as
    tesseract-core's own validation of the payload raises (tesseract-jax's callers
    catch it so). Its one line error has `loc` `("inputs", *path)` and our message.
    """
    try:
        loc = tuple(index for _, index in paths.segments(path)) if path else ()
    except ValueError:  # a dict key no path can name (`{}`)
        loc = (path,)
    line = InitErrorDetails(
        type=PydanticCustomError("tesseract_input", "{message}", {"message": message}),
        loc=("inputs", *loc),
        input=None,
    )
    return ValidationError.from_exception_data("InputSchema", [line], hide_input=True)


def reason(error: Exception) -> str:
    """The message of a refusal, without pydantic's listing around it."""
    if isinstance(error, ValidationError):
        return "; ".join(line["msg"] for line in error.errors())
    return str(error)


def _array(node: ArrayNode, x: Any, path: str, walk: _Walk) -> Template:
    if isinstance(x, list | tuple):
        # "expects an array, but got list": tesseract-jax's words for this refusal.
        name = type(x).__name__
        raise TypeError(
            f"`{path}` must be {node.describe()}; got a Python {name}: convert it "
            f"with `jnp.asarray`, as `{path}` expects an array, but got {name} "
            "(lists stand for `list[...]` fields only)."
        )
    if not _is_arraylike(x):
        raise _fail(TypeError, path, node.describe(), x)
    x = x if _is_tracer(x) or isinstance(x, jax.Array) else np.asarray(x)
    dtype = x.dtype
    if dtype.kind not in "biufc":
        # NumPy would turn `"1.5"` into 1.5, `None` into NaN and a date into its
        # count of seconds: never what a Tesseract's array means.
        raise TypeError(
            f"`{path}` must be {node.describe()}; got an array of dtype {dtype}, "
            "which is not numeric: convert it to a numeric array first."
        )
    if node.dtype is not None:
        want = canonical_dtype(node.dtype)
        if (
            (dtype.kind == "c" and want.kind != "c")
            or (dtype.kind == "f" and want.kind in "iub")
            or (dtype.kind in "iu" and want.kind == "b")
        ):
            raise TypeError(
                f"`{path}` must have dtype {node.dtype}; got {dtype}, which does not "
                "convert without loss."
            )
        dtype = want
    else:
        dtype = canonical_dtype(dtype)
    shape = tuple(np.shape(x))
    if node.shape is not None:
        ok = len(node.shape) == len(shape) and all(
            d is None or d == s for d, s in zip(node.shape, shape)
        )
        if not ok:
            # tesseract-core's words follow ours: "Expected shape: (3,). Found: (4,)."
            raise invalid(
                path,
                f"`{path}` must be {node.describe()}; got shape {shape}. Expected "
                f"shape: {tuple(node.shape)}. Found: {shape}.",
            )
    value = (
        jnp.asarray(x, dtype)
        if _is_tracer(x) or isinstance(x, jax.Array)
        else (np.asarray(x, dtype))
    )
    return walk.operand(Leaf(path, shape, str(dtype), node.differentiable), value)


def _value(node: ValueNode, x: Any, path: str, walk: _Walk) -> Template:
    if isinstance(x, jax.Array | np.ndarray | np.generic) and np.ndim(x) == 0:
        if node.type == "number" and (_is_tracer(x) or isinstance(x, jax.Array)):
            # A float field given a (possibly traced) JAX scalar: optimistix and lineax
            # trace Python floats. It travels as an operand, never differentiated.
            dtype = canonical_dtype("float64")
            leaf = Leaf(path, (), str(dtype), False, number=True)
            return walk.operand(leaf, jnp.asarray(x, dtype))
        if _is_tracer(x):
            raise TypeError(
                f"`{path}` must be {node.describe()}, a concrete Python value: it is "
                "not an array input of the Tesseract and cannot be traced (pass it "
                "from outside `jax.jit`, or as a static argument)."
            )
        x = np.asarray(x).item()
    if node.enum is not None:
        if x not in node.enum:
            raise _fail(ValueError, path, node.describe(), x)
        return ("value", Static(x))
    ok = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
    }.get(node.type or "", lambda v: not _is_tracer(v))
    if not ok(x):
        raise _fail(TypeError, path, node.describe(), x)
    return ("value", Static(x))


def _node(node: Node, x: Any, path: str, walk: _Walk) -> Template:
    if isinstance(node, ArrayNode):
        return _array(node, x, path, walk)
    if isinstance(node, ValueNode):
        return _value(node, x, path, walk)
    if isinstance(node, OptionalNode):
        if x is None:
            return ("value", Static(None))
        return _node(node.inner, x, path, walk)
    if isinstance(node, ModelNode):
        return _model(node, x, path, walk)
    if isinstance(node, ListNode):
        if not isinstance(x, list | tuple):
            raise _fail(TypeError, path, f"a list of {node.item.describe()}s", x)
        return (
            "list",
            tuple(
                _node(node.item, v, paths.join(path, paths.item(i)), walk)
                for i, v in enumerate(x)
            ),
        )
    if isinstance(node, DictNode):
        if not isinstance(x, Mapping):
            raise _fail(TypeError, path, "a dict with string keys", x)
        items = []
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"`{path}` must have string keys; got {k!r}.")
            items.append(
                (k, _node(node.value, v, paths.join(path, paths.key(k)), walk))
            )
        return ("dict", tuple(items))
    assert isinstance(node, UnionNode)
    errors = []
    for option in node.options:
        trial = _Walk()
        try:
            template = _node(option, x, path, trial)
        except (TypeError, ValueError) as e:
            errors.append(reason(e))
            continue
        offset = len(walk.leaves)
        walk.leaves += trial.leaves
        walk.values += trial.values
        return _shift(template, offset)
    raise TypeError(
        f"`{path}` fits none of its schema's options: " + " / ".join(errors)
    )


def _shift(template: Template, offset: int) -> Template:
    kind, body = template
    if kind == "operand":
        return ("operand", body + offset)
    if kind == "list":
        return ("list", tuple(_shift(t, offset) for t in body))
    if kind in ("model", "dict"):
        return (kind, tuple((k, _shift(t, offset)) for k, t in body))
    return template


def _model(node: ModelNode, x: Any, path: str, walk: _Walk) -> Template:
    if not isinstance(x, Mapping):
        raise _fail(TypeError, path, node.describe(), x)
    known = [name for name, _, _ in node.fields]
    unknown = [k for k in x if k not in known]
    if unknown:
        where = f"`{path}`" if path else "the Tesseract"
        bad = paths.describe([paths.join(path, str(k)) for k in unknown])
        raise invalid(
            path, f"Unknown input {bad}; {where} takes: {paths.describe(known)}."
        )
    missing = [n for n, _, required in node.fields if required and n not in x]
    if missing:
        raise invalid(
            path,
            f"Missing input {paths.describe([paths.join(path, m) for m in missing])}; "
            f"{'`' + path + '`' if path else 'the Tesseract'} takes: "
            f"{paths.describe(known)}.",
        )
    # In the schema's order, not the caller's: `jax.jit` hands back dicts with sorted
    # keys, and a call's identity must not depend on how the caller ordered theirs.
    body = tuple(
        (name, _node(sub, x[name], paths.join(path, name), walk))
        for name, sub, _ in node.fields
        if name in x
    )
    return ("model", body)


def flatten_inputs(node: ModelNode, inputs: Any) -> tuple[Template, list[Leaf], list]:
    """`(template, leaves, values)` of a call's inputs; raises naming the bad path."""
    walk = _Walk()
    template = _model(node, inputs, "", walk)
    return template, walk.leaves, walk.values


def _out_array(node: ArrayNode, x: Any, path: str, walk: _Walk) -> Template:
    if isinstance(x, Mapping) and "shape" in x and "dtype" in x:  # `/abstract_eval`
        shape, dtype = tuple(x["shape"]), x["dtype"]
        value = None
    else:
        value = np.asarray(x)
        shape, dtype = value.shape, value.dtype
    dtype = canonical_dtype(node.dtype or dtype)
    leaf = Leaf(path, tuple(int(d) for d in shape), str(dtype), node.differentiable)
    return walk.operand(leaf, value)


def _out(node: Node, x: Any, path: str, walk: _Walk) -> Template:
    if x is None and isinstance(node, ValueNode) and node.type == "number":
        # A required float answered `null`: pydantic's JSON writes NaN and Inf so
        # (`json_number`). The number is lost; NaN says so, `None` would break jit.
        x = math.nan
    if x is None:
        return ("value", Static(None))
    if isinstance(node, OptionalNode):
        return _out(node.inner, x, path, walk)
    if isinstance(node, ArrayNode):
        return _out_array(node, x, path, walk)
    if isinstance(node, ValueNode):
        if node.numeric:
            dtype = canonical_dtype(_NUMBER_DTYPES[node.type or "number"])
            value = None if isinstance(x, Mapping) else np.asarray(x, dtype)
            return walk.operand(Leaf(path, (), str(dtype), False, True), value)
        return ("value", Static(x))
    if isinstance(node, ModelNode):
        if not isinstance(x, Mapping):
            raise ValueError(f"The Tesseract answered `{path}` with {_type_name(x)}.")
        return (
            "model",
            tuple(
                (name, _out(sub, x[name], paths.join(path, name), walk))
                for name, sub, _ in node.fields
                if name in x
            ),
        )
    if isinstance(node, ListNode):
        return (
            "list",
            tuple(
                _out(node.item, v, paths.join(path, paths.item(i)), walk)
                for i, v in enumerate(x)
            ),
        )
    if isinstance(node, DictNode):
        return (
            "dict",
            tuple(
                (k, _out(node.value, v, paths.join(path, paths.key(k)), walk))
                for k, v in x.items()
            ),
        )
    assert isinstance(node, UnionNode)
    for option in node.options:
        fits = (
            isinstance(option, ArrayNode)
            and (isinstance(x, np.ndarray) or (isinstance(x, Mapping) and "dtype" in x))
            or isinstance(option, ModelNode | DictNode)
            and isinstance(x, Mapping)
            or isinstance(option, ListNode)
            and isinstance(x, list)
            or isinstance(option, ValueNode)
            and not isinstance(x, Mapping | list | np.ndarray)
        )
        if fits:
            return _out(option, x, path, walk)
    return ("value", Static(x))


def flatten_outputs(node: ModelNode, outputs: Any) -> tuple[Template, list[Leaf], list]:
    """`(template, leaves, values)` of an answer of `/apply`, or of `/abstract_eval`
    (then every value is `None`: only shapes and dtypes are known)."""
    walk = _Walk()
    template = _out(node, outputs, "", walk)
    return template, walk.leaves, walk.values


def fixed_outputs(node: ModelNode) -> tuple[Template, list[Leaf]] | None:
    """The output structure when the schema alone fixes it: every field required,
    every array of fixed shape and dtype, no lists, dicts, optionals or strings."""
    walk = _Walk()

    def go(node: Node, path: str) -> Template | None:
        if isinstance(node, ArrayNode):
            if node.shape is None or None in node.shape or node.dtype is None:
                return None
            dtype = str(canonical_dtype(node.dtype))
            leaf = Leaf(path, tuple(node.shape), dtype, node.differentiable)  # type: ignore[arg-type]
            return walk.operand(leaf, None)
        if isinstance(node, ValueNode) and node.numeric:
            dtype = str(canonical_dtype(_NUMBER_DTYPES[node.type or "number"]))
            return walk.operand(Leaf(path, (), dtype, False, True), None)
        if isinstance(node, ModelNode):
            body = []
            for name, sub, required in node.fields:
                t = go(sub, paths.join(path, name)) if required else None
                if t is None:
                    return None
                body.append((name, t))
            return ("model", tuple(body))
        return None

    template = go(node, "")
    return None if template is None else (template, walk.leaves)


# JSON has no NaN or Infinity: orjson writes them as `null`, which a `float` field
# refuses (or, if optional, takes for `None`). pydantic reads these strings as the
# numbers, as Python's `float()` does.
def json_number(x: Any) -> Any:
    """`x` with every non-finite Python float (at any depth) as pydantic's string."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"
    if isinstance(x, list | tuple):
        return [json_number(v) for v in x]
    if isinstance(x, dict):
        return {k: json_number(v) for k, v in x.items()}
    return x


def build(template: Template, values: list, *, wire: bool = False) -> Any:
    """The tree a template describes, with `values[i]` at `("operand", i)`.

    `wire=True` builds a request payload: models are dicts either way.
    """
    kind, body = template
    if kind == "operand":
        return values[body]
    if kind == "value":
        return json_number(body.value) if wire else copy.deepcopy(body.value)
    if kind == "list":
        return [build(t, values, wire=wire) for t in body]
    return {k: build(t, values, wire=wire) for k, t in body}


def abstract(leaves: list[Leaf]) -> list[Any]:
    """Stand-ins for operands in an `/abstract_eval` payload."""
    # A traced float field has no value yet; any float fills its place.
    return [
        1.0 if leaf.number else {"shape": list(leaf.shape), "dtype": leaf.dtype}
        for leaf in leaves
    ]
