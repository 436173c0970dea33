"""Host side of `/apply`: one point, or P points by the plan.

A batch of points carries a leading axis of size P on the operands flagged in
`points`; the others are shared by every point (and sent as they are: never copied
P times). How the P requests go is the plan's business (`_batching.py`), except for
tesseract-jax's stacked `vmap_method`s, which send the points stacked on a new
leading axis in one `/apply` for a Tesseract that maps over it.
"""

import numpy as np

from . import _shapes
from ._answers import answer_at, check_finite, malformed, outputs_of, size
from ._batching import Plan
from ._call import Call
from ._dtypes import conform
from ._tree import flatten_outputs
from ._wire.schema import ArrayNode, node_at
from ._wire.spec import APPLY, BATCHED_APPLY


STACKED = ("expand_dims", "broadcast_all", "auto_experimental")


def apply_eager(call: Call, arrays: list) -> list[np.ndarray]:
    """One `/apply` whose answer teaches the call's output structure."""
    client = call.client
    payload = {"inputs": call.payload(arrays)}
    response = client.request(APPLY, payload, size=size(arrays))
    template, leaves, values = flatten_outputs(client.schema.outputs, response)
    _shapes.learn(client, call.template, call.inputs, (template, tuple(leaves)))
    outs = [conform(v, leaf.dtype, leaf.path, APPLY) for leaf, v in zip(leaves, values)]
    for leaf, value in zip(leaves, outs):
        check_finite(call, APPLY, leaf.path, value)
    return outs


def point(arrays: list, points: tuple[bool, ...], p: int) -> list:
    """The operands of point `p`: its slice where batched, shared ones as they are."""
    return [a[p] if flag else a for a, flag in zip(arrays, points)]


def run_apply(
    call: Call, plan: Plan | None, points: tuple[bool, ...], *arrays
) -> list[np.ndarray]:
    """The outputs at one point, or stacked over the P points flagged."""
    arrays = [np.asarray(a) for a in arrays]
    client = call.client
    if not any(points):
        payload = {"inputs": call.payload(arrays)}
        response = client.request(APPLY, payload, size=size(arrays))
        return outputs_of(call, response, APPLY)
    count = next(a.shape[0] for a, flag in zip(arrays, points) if flag)
    outs = [np.empty((count, *leaf.shape), leaf.dtype) for leaf in call.outputs]
    if count == 0:
        return outs
    stacking = stacked_method(call, points)
    if stacking is not None:
        return _apply_stacked(call, arrays, points, stacking, count)
    assert plan is not None
    payloads = [call.payload(point(arrays, points, p)) for p in range(count)]
    each = size(point(arrays, points, 0))
    if plan.rule == "batched":
        chunk = plan.max_batch or count
        chunks = [payloads[i : i + chunk] for i in range(0, count, chunk)]
        answers = client.request_many(
            BATCHED_APPLY,
            [{"inputs": c} for c in chunks],
            max_in_flight=plan.max_in_flight,
            size=each,
            k=len(chunks[0]),
        )
        responses = [r for answer in answers for r in _listed(call, answer)]
        endpoint = BATCHED_APPLY
    else:
        in_flight = plan.max_in_flight if plan.rule == "concurrent" else 1
        responses = client.request_many(
            APPLY, [{"inputs": p} for p in payloads], max_in_flight=in_flight, size=each
        )
        endpoint = APPLY
    if len(responses) != count:
        raise malformed(
            call, endpoint, f"{len(responses)} answers came back for {count} points"
        )
    for p, response in enumerate(responses):
        for o, v in zip(outs, outputs_of(call, response, endpoint)):
            o[p] = v
    return outs


def _listed(call: Call, answer) -> list:
    if not isinstance(answer, list):
        raise malformed(call, BATCHED_APPLY, "the answer is not a list of outputs")
    return answer


def stacked_method(call: Call, points: tuple[bool, ...]) -> str | None:
    """tesseract-jax's stacked `vmap_method` this batch goes by, if any.

    Never for a batched number field (a plain number on the wire), and never in
    place of a server that says it takes a batch of points (`/batched_apply`):
    `"auto_experimental"` then defers to it.
    """
    method = call.points
    live = [leaf for leaf, flag in zip(call.inputs, points) if flag]
    if method not in STACKED or any(leaf.number for leaf in live):
        return None
    if method != "auto_experimental":
        return method
    if call.client.schema.has(BATCHED_APPLY):
        return None
    # tesseract-jax's guess: every batched input differentiable and of any rank.
    any_rank = all(
        leaf.differentiable
        and isinstance(node := node_at(call.client.schema.inputs, leaf.path), ArrayNode)
        and node.shape is None
        for leaf in live
    )
    return "expand_dims" if any_rank else None


def _apply_stacked(
    call: Call, arrays: list, points: tuple[bool, ...], method: str, count: int
) -> list[np.ndarray]:
    """P points stacked on a new leading axis, in one `/apply`."""
    stacked = []
    for leaf, a, flag in zip(call.inputs, arrays, points):
        if not flag and not leaf.number:
            a = (
                a[None]
                if method == "expand_dims"
                else np.broadcast_to(a, (count, *a.shape))
            )
        stacked.append(a)
    payload = {"inputs": call.payload(stacked)}
    response = call.client.request(APPLY, payload, size=size(stacked), k=count)
    outs = []
    for leaf in call.outputs:
        value = answer_at(call, response, leaf, APPLY)
        if value.shape[1:] != leaf.shape or value.shape[:1] not in ((count,), (1,)):
            raise ValueError(
                f"`vmap_method={method!r}`: `/apply` of {count} stacked points "
                f"answered `{leaf.path}` with shape {value.shape}, not ({count}, "
                f"*{leaf.shape}): this Tesseract does not map over a leading axis; "
                "use `vmap_method='sequential'`."
            )
        check_finite(call, APPLY, leaf.path, value, len(value))
        outs.append(np.broadcast_to(value, (count, *leaf.shape)))
    return outs
