"""Host side of JVP and VJP requests: K (co)tangents at each of P points.

Operands arrive as the primitives carry them: the point's operands, with a leading
axis of P points where flagged in `points`; then the (co)tangents, with the P axis
where flagged and then an axis of K items where flagged in `tangents` (an operand
without it is the same for every item). Answers go back as `(P?, K?, *shape)`.

The plan says how: one request per item (`sequential`, or `concurrent` in flight),
or one batched request per chunk of items at a point (`batched`). The Jacobian is
not fetched here: under its plan the graph contracts it (`_jacobian.py`).
"""

import numpy as np

from ._answers import array_at, check_finite, size
from ._batching import Plan
from ._call import Call
from ._dtypes import conform
from ._points import point
from ._wire.spec import JVP, VJP


NAMES = {
    JVP: ("jvp_inputs", "jvp_outputs", "tangent_vector"),
    VJP: ("vjp_inputs", "vjp_outputs", "cotangent_vector"),
}


def axes(arrays, n: int, points, tangents) -> tuple[int | None, int | None]:
    """`(P, K)`: the sizes of the point and item axes, `None` where absent."""
    count = next((a.shape[0] for a, f in zip(arrays, points) if f), None)
    k = None
    for m, (a, f) in enumerate(zip(arrays[n:], tangents)):
        if f:
            k = a.shape[1 if points[n + m] else 0]
            break
    return count, k


def item(vector: np.ndarray, at_point: bool, per_item: bool, p: int, j: int):
    """Item `j` at point `p` of an operand laid out `(P?, K?, *shape)`."""
    if at_point:
        vector = vector[p]
    return vector[j] if per_item else vector


def run_linear(
    call: Call,
    kind: str,
    plan: Plan,
    src: tuple[str, ...],
    dst: tuple[str, ...],
    dst_leaves: tuple,
    points: tuple[bool, ...],
    tangents: tuple[bool, ...],
    *arrays,
) -> list[np.ndarray]:
    """`J v` (JVP) or `v^T J` (VJP) for every item at every point: `src` are the
    paths the vectors stand at, `dst` the paths of the answers (`dst_leaves` their
    leaves)."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(call.inputs)
    primals, lin = arrays[:n], arrays[n:]
    count, k = axes(arrays, n, points, tangents)
    forward = kind == JVP
    # Each vector in its own leaf's dtype: a float32 Tesseract's JAX VJP refuses a
    # float64 cotangent (and a server without x64 would lower it anyway).
    dtypes = {
        leaf.path: leaf.dtype for leaf in (call.inputs if forward else call.outputs)
    }
    lin = [np.asarray(v, dtypes[s]) for s, v in zip(src, lin)]
    at_points = range(count or 1)
    items = range(k or 1)
    point_flags = points[:n]
    bases = [call.payload(point(primals, point_flags, p)) for p in at_points]
    each = size(point(primals, point_flags, 0))
    names = NAMES[kind]
    sel = (list(src), list(dst)) if forward else (list(dst), list(src))
    client = call.client

    def vectors(p: int, chosen) -> dict:
        """The vectors of the items `chosen` at point `p`, stacked if a range."""
        out = {}
        for m, (s, v) in enumerate(zip(src, lin)):
            at_point, per_item = points[n + m], tangents[m]
            if isinstance(chosen, int):
                out[s] = item(v, at_point, per_item, p, chosen)
            else:
                w = v[p] if at_point else v
                w = (
                    w[chosen]
                    if per_item
                    else np.broadcast_to(w, (len(chosen), *w.shape))
                )
                out[s] = w
        return out

    def payload(p: int, chosen) -> dict:
        return {
            "inputs": bases[p],
            names[0]: sel[0],
            names[1]: sel[1],
            names[2]: vectors(p, chosen),
        }

    outs = {
        d: np.empty(
            (
                *((count,) if count is not None else ()),
                *((k,) if k is not None else ()),
                *leaf.shape,
            ),
            leaf.dtype,
        )
        for d, leaf in zip(dst, dst_leaves)
    }

    def put(d: str, p: int, chosen, value) -> None:
        index = ((p,) if count is not None else ()) + (
            (chosen,) if k is not None else ()
        )
        outs[d][index] = value

    if plan.rule == "batched":
        chunk = plan.max_batch or len(items)
        jobs = [
            (p, range(a, min(a + chunk, len(items))))
            for p in at_points
            for a in range(0, len(items), chunk)
        ]
        endpoint = f"batched_{kind}"
        answers = client.request_many(
            endpoint,
            [payload(p, chosen) for p, chosen in jobs],
            max_in_flight=plan.max_in_flight,
            size=each,
            k=len(jobs[0][1]),
        )
        for (p, chosen), answer in zip(jobs, answers):
            for d, leaf in zip(dst, dst_leaves):
                value = array_at(call, answer, d, endpoint, (len(chosen), *leaf.shape))
                value = conform(value, leaf.dtype, d, endpoint)
                if k is None:  # one item, sent as a batch of one
                    value = value[0]
                put(d, p, slice(chosen.start, chosen.stop), value)
    else:
        jobs = [(p, j) for p in at_points for j in items]
        in_flight = plan.max_in_flight if plan.rule == "concurrent" else 1
        endpoint = kind
        answers = client.request_many(
            kind,
            [payload(p, j) for p, j in jobs],
            max_in_flight=in_flight,
            size=each,
        )
        for (p, j), answer in zip(jobs, answers):
            for d, leaf in zip(dst, dst_leaves):
                value = array_at(call, answer, d, endpoint, leaf.shape)
                put(d, p, j, conform(value, leaf.dtype, d, endpoint))
    for d, leaf in zip(dst, dst_leaves):
        flat = outs[d].reshape(((count or 1) * (k or 1), *leaf.shape))
        check_finite(call, endpoint, d, flat, len(flat))
    return [outs[d] for d in dst]
