"""A pool of replicas as one Tesseract: their interfaces checked to be the same and
merged, and in words, what they disagree on (`Client.schema`, `Client.capabilities`).
Pure data: nothing here sends a request."""

import dataclasses
from collections.abc import Sequence
from typing import Any

from ._wire.schema import ModelNode, Schema
from ._wire.spec import Capabilities, LINEAR_SOLVE


def merge(schemas: Sequence[Schema], urls: Sequence[str]) -> tuple[Schema, list[str]]:
    """One interface for a pool: the replicas' own, checked to be the same
    Tesseract, with the endpoints any of them serves and their capabilities merged;
    and, in words, what they disagree on."""
    first = schemas[0]
    if len(schemas) == 1:
        return first, []
    for url, schema in zip(urls[1:], schemas[1:]):
        for side in ("inputs", "outputs"):
            mine, theirs = getattr(first, side), getattr(schema, side)
            if mine != theirs:
                raise ValueError(
                    f"`url`: the replicas of a `tlx.Client` must serve the same "
                    f"Tesseract, but the {side} of {url} differ from those of "
                    f"{urls[0]} ({_difference(mine, theirs)}). Give the client the "
                    "addresses of one Tesseract's replicas only."
                )
    capabilities, disagreements = _merge_capabilities(
        [s.capabilities for s in schemas], urls
    )
    endpoints = frozenset().union(*(s.endpoints for s in schemas))
    merged = dataclasses.replace(first, endpoints=endpoints, capabilities=capabilities)
    return merged, disagreements


def _difference(a: ModelNode, b: ModelNode) -> str:
    names_a = [n for n, _, _ in a.fields]
    names_b = [n for n, _, _ in b.fields]
    if names_a != names_b:
        return f"fields {names_a} against {names_b}"
    for (name, node_a, req_a), (_, node_b, req_b) in zip(a.fields, b.fields):
        if node_a != node_b or req_a != req_b:
            return f"`{name}`: {node_a.describe()} against {node_b.describe()}"
    return f"`{a.name}` against `{b.name}`"


def _merge_capabilities(
    caps: Sequence[Capabilities], urls: Sequence[str]
) -> tuple[Capabilities, list[str]]:
    """What a pool can do: see `Client.capabilities`."""
    disagreements = []
    modes: dict[str, str] = {}
    for c in caps:
        for endpoint, mode in c.modes:
            # A `function` solve needs the Tesseract's own VJP: the strictest.
            if endpoint not in modes or (
                endpoint == LINEAR_SOLVE and mode == "function"
            ):
                modes[endpoint] = mode

    def stated(name: str) -> list[tuple[str, Any]]:
        return [(u, getattr(c, name)) for u, c in zip(urls, caps) if getattr(c, name)]

    precisions = stated("precision")
    precision = None
    if precisions:
        values = {p for _, p in precisions}
        precision = "float32" if "float32" in values else "float64"
        if len(values) > 1:
            disagreements.append(_disagreement("precision", precisions, precision))
    batches = stated("max_batch")
    max_batch = min((b for _, b in batches), default=None)
    if len({b for _, b in batches}) > 1:
        disagreements.append(_disagreement("max_batch", batches, max_batch))
    bodies = [b for _, b in stated("max_body_bytes")]
    binaries = {c.binary for c in caps}
    served = [c for c in caps if not c.is_stock]
    # What is not merged here is the first tesseract-lx replica's word.
    merged = dataclasses.replace(
        served[0] if served else caps[0],
        modes=tuple(sorted(modes.items())),
        precision=precision,
        pure=all(c.pure for c in caps),
        workers=min(c.workers for c in caps),
        max_batch=max_batch,
        max_body_bytes=min(bodies, default=None),
        binary=binaries.pop() if len(binaries) == 1 else None,
        # Options a solve may carry: those every tesseract-lx replica takes.
        linear_solve_options=tuple(
            o
            for o in (served[0].linear_solve_options if served else ())
            if all(o in c.linear_solve_options for c in served)
        ),
        # Solvers a whole nonlinear solve may ask for: those every replica runs.
        nonlinear_solvers=_common(served, "nonlinear_solvers"),
        nonlinear_step_solvers=_common(served, "nonlinear_step_solvers"),
        nonlinear_batch=bool(served) and all(c.nonlinear_batch for c in served),
    )
    return merged, disagreements


def _common(served: Sequence[Capabilities], name: str) -> tuple[str, ...]:
    """The names every tesseract-lx replica states under `name`."""
    first = getattr(served[0], name) if served else ()
    return tuple(n for n in first if all(n in getattr(c, name) for c in served))


def _disagreement(name: str, values: Sequence[tuple[str, Any]], chosen: Any) -> str:
    said = ", ".join(f"{v} at {u}" for u, v in values)
    return f"`{name}` ({said}): the client assumes {chosen}, the most restrictive"
