"""`Call`: everything static about one Tesseract call, the primitives' parameter.

A call is the Tesseract (its client), the input template (structure and static
values), the operand leaves (paths, shapes, dtypes, differentiability), the batching
rule and the dtype policy. It is hashable and compared by value, except for the
client (by identity), so `jax.jit` does not retrace when a module is rebuilt around the
same client.

The output structure is a function of the call: `_shapes.outputs` finds it (the
schema, an eager answer, or one `/abstract_eval`) the first time it is asked for. An
eager call is sent before anyone asks, so it never needs `/abstract_eval`.
"""

import dataclasses
import warnings
from typing import Any, TYPE_CHECKING

import numpy as np
from jax.core import ShapedArray

from . import _shapes
from ._client import Client
from ._dtypes import check_precision
from ._tree import build, flatten_inputs, json_number, Leaf, Static, Template
from ._wire import paths


if TYPE_CHECKING:
    from ._batching import AbstractBatching


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    client: Client
    template: Template
    inputs: tuple[Leaf, ...]
    batching: "AbstractBatching"
    strict_dtype: bool
    # How a batch of primal points goes: "auto" (ours), or tesseract-jax's
    # `vmap_method` (`None`: refused; "sequential", "expand_dims", ...).
    points: str | None = "auto"
    # Refuse answers holding NaN or Inf (`_answers.check_finite`).
    check_finite: bool = False
    # Warn where a traced `/apply` answers other static outputs than it was traced
    # with (`check_static`).
    check_static: bool = False

    def _key(self) -> tuple:
        return (
            id(self.client),
            self.template,
            self.inputs,
            self.batching,
            self.strict_dtype,
            self.points,
            self.check_finite,
            self.check_static,
        )

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Call) and self._key() == other._key()

    def __repr__(self) -> str:
        return f"Call({self.client!r}, in={self.in_paths}, out={self.out_paths})"

    @property
    def in_paths(self) -> tuple[str, ...]:
        return tuple(leaf.path for leaf in self.inputs)

    @property
    def out_template(self) -> Template:
        return _shapes.outputs(self.client, self.template, self.inputs)[0]

    @property
    def outputs(self) -> tuple[Leaf, ...]:
        return _shapes.outputs(self.client, self.template, self.inputs)[1]

    @property
    def out_paths(self) -> tuple[str, ...]:
        return tuple(leaf.path for leaf in self.outputs)

    @property
    def diff_in(self) -> frozenset[int]:
        return frozenset(i for i, leaf in enumerate(self.inputs) if leaf.differentiable)

    @property
    def diff_out(self) -> tuple[int, ...]:
        return tuple(j for j, leaf in enumerate(self.outputs) if leaf.differentiable)

    @property
    def out_avals(self) -> list[ShapedArray]:
        return [leaf.aval for leaf in self.outputs]

    def payload(self, values: list) -> dict:
        """The `inputs` of a request, with `values` at the operands."""
        return build(self.template, wire_values(self.inputs, values), wire=True)

    def unflatten(self, values: list) -> Any:
        """The output tree, with `values` at the output leaves."""
        return build(self.out_template, list(values))


def wire_values(leaves: tuple[Leaf, ...] | list[Leaf], values: list) -> list:
    """Operands as they go on the wire: arrays, and plain numbers for number fields."""
    return [
        json_number(np.asarray(v).item()) if leaf.number else np.asarray(v)
        for leaf, v in zip(leaves, values)
    ]


def flatten(client: Client, inputs: Any) -> tuple[Template, tuple[Leaf, ...], list]:
    """Check `inputs` against the schema; `(template, leaves, operand values)`.

    Sends nothing but, once per client, the `/openapi.json` request.
    """
    template, leaves, values = flatten_inputs(client.schema.inputs, inputs)
    return template, tuple(leaves), values


def make_call(
    client: Client,
    template: Template,
    leaves: tuple[Leaf, ...],
    batching: "AbstractBatching",
    strict_dtype: bool,
    points: str | None = "auto",
    check_finite: bool = False,
    check_static: bool = False,
) -> Call:
    """The call for these inputs. Sends nothing; refuses a server that computes
    below its declared precision (`_dtypes.check_precision`)."""
    check_precision(client, strict_dtype)
    return Call(
        client,
        template,
        leaves,
        batching,
        strict_dtype,
        points,
        check_finite,
        check_static,
    )


def static_outputs(template: Template, path: str = "") -> list[tuple[str, Any]]:
    """`(path, value)` of every static (non-array) value in an output template."""
    kind, body = template
    if kind == "value":
        return [(path, body.value)]
    if kind == "list":
        items = [(paths.item(i), t) for i, t in enumerate(body)]
    elif kind == "dict":
        items = [(paths.key(k), t) for k, t in body]
    elif kind == "model":
        items = list(body)
    else:
        return []
    return [
        found
        for segment, t in items
        for found in static_outputs(t, paths.join(path, segment))
    ]


_ABSENT = object()


def check_static(call: Call, response: Any) -> None:
    """Warn about each static output of a traced `/apply` answer that differs from
    the value the call was traced with (which is the one the caller holds), as
    tesseract-jax's `check_static_outputs` does; only if the call asks to."""
    if not call.check_static:
        return
    for path, traced in static_outputs(call.out_template):
        try:
            answered = paths.get(response, path) if path else response
        except (KeyError, IndexError, TypeError):
            answered = _ABSENT
        if answered is not _ABSENT and Static(answered) == Static(traced):
            continue
        got = "nothing" if answered is _ABSENT else _show(answered)
        warnings.warn(
            f"The Tesseract's `/apply` answered the static output `{path}` with "
            f"{got}, but the call was traced with {_show(traced)} (from an eager "
            "call at the same shapes, or `/abstract_eval`): static outputs are fixed "
            "when a call is traced, so the caller holds the traced value and the "
            "answered one is ignored. Pass `check_static_outputs=False` to skip this "
            "check.",
            UserWarning,
            stacklevel=2,
        )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
