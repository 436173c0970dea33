"""Host side of `tlx.OnServer`: one `/linear_solve` request per primal point.

The callback is vmapped as `expand_dims`: every operand has one leading axis per
`vmap` level, of size 1 where that level does not batch it. The levels that batch
the point are told by the point's operands themselves (a size above 1), never by
comparing their values: each point gets one request carrying every right-hand
side (and initial guess) at it.
"""

import math

import numpy as np

from ._answers import check_finite, malformed, size
from ._call import Call
from ._solvers import RESULTS_NAMES
from ._wire.spec import LINEAR_SOLVE


def _arrange(a: np.ndarray, base, lead, order) -> np.ndarray:
    """`a`, broadcast to `lead + base`, its leading axes put in `order`."""
    lead_a = a.shape[: a.ndim - len(base)]
    a = a.reshape((1,) * (len(lead) - len(lead_a)) + a.shape)
    a = np.broadcast_to(a, (*lead, *base))
    a = np.transpose(a, (*order, *range(len(lead), len(lead) + len(base))))
    return a


def run_solve(
    call: Call,
    primals: list,
    rhs: list,
    *,
    y0: list | None,
    wrt,
    of,
    rhs_paths,
    rhs_shapes,
    sol_paths,
    sol_structs,
    transpose: bool,
    spec: dict,
    tags: list,
):
    """`/linear_solve` for the right-hand sides at each point.

    Returns `(*solution leaves, result codes, step counts)`, each with the leading
    axes of the batch (codes index `solvers.RESULTS_NAMES`).
    """
    base = [leaf.shape for leaf in call.inputs]
    rhs_base = [tuple(shape) for shape in rhs_shapes]
    sol_base = [tuple(s.shape) for s in sol_structs]
    guesses = y0 or []
    everything = [
        *zip(primals, base),
        *zip(rhs, rhs_base),
        *zip(guesses, sol_base),
    ]
    rank = max((a.ndim - len(b) for a, b in everything), default=0)

    def lead_of(a, b):
        own = a.shape[: a.ndim - len(b)]
        return (1,) * (rank - len(own)) + own

    lead = tuple(np.broadcast_shapes(*(lead_of(a, b) for a, b in everything)))
    at_points = [
        d
        for d in range(rank)
        if any(lead_of(a, b)[d] > 1 for a, b in zip(primals, base))
    ]
    rest = [d for d in range(rank) if d not in at_points]
    order = [*at_points, *rest]
    count = math.prod(lead[d] for d in at_points)
    items = math.prod(lead[d] for d in rest)

    def folded(a, b):
        return _arrange(a, b, lead, order).reshape(count, items, *b)

    flat_p = [folded(a, b) for a, b in zip(primals, base)]
    flat_r = [folded(r, b) for r, b in zip(rhs, rhs_base)]
    flat_y0 = [folded(y, b) for y, b in zip(guesses, sol_base)]
    sols = [np.empty((count, items, *s.shape), s.dtype) for s in sol_structs]
    codes = np.empty((count, items), np.int32)
    steps = np.empty((count, items), np.int32)
    for p in range(count):
        point = [a[p, 0] for a in flat_p]
        payload = {
            "inputs": call.payload(point),
            "jvp_inputs": list(wrt),
            "jvp_outputs": list(of),
            "rhs": {path: r[p] for path, r in zip(rhs_paths, flat_r)},
            "transpose": transpose,
            "solver": spec,
            "tags": tags,
        }
        if flat_y0:
            payload["y0"] = {path: y[p] for path, y in zip(sol_paths, flat_y0)}
        answer = call.client.request(LINEAR_SOLVE, payload, size=size(point), k=items)
        _take(call, answer, p, items, sols, sol_paths, codes, steps)
    # Back to the batch's own order of axes.
    shape = tuple(lead[d] for d in order)
    inverse = list(np.argsort(order))

    def unfold(a, b):
        a = a.reshape((*shape, *b))
        return np.transpose(a, (*inverse, *range(rank, rank + len(b))))

    return (
        *(unfold(s, s.shape[2:]) for s in sols),
        unfold(codes, ()),
        unfold(steps, ()),
    )


def _take(call: Call, answer, p: int, items: int, sols, sol_paths, codes, steps):
    """One answer's solutions, result codes and step counts, checked."""
    try:
        solution, results = answer["solution"], answer["result"]
        counts = answer["num_steps"]
    except (KeyError, TypeError):
        raise malformed(
            call, LINEAR_SOLVE, "the answer lacks `solution`, `result` or `num_steps`"
        ) from None
    for out, path in zip(sols, sol_paths):
        value = np.asarray(solution.get(path))
        if value.shape != (items, *out.shape[2:]):
            raise malformed(
                call,
                LINEAR_SOLVE,
                f"the answer has `solution.{path}` with shape {value.shape}; "
                f"{(items, *out.shape[2:])} was expected",
            )
        check_finite(call, LINEAR_SOLVE, path, value, items)
        out[p] = value
    unknown = set(results) - set(RESULTS_NAMES)
    if unknown or len(results) != items or len(counts) != items:
        raise malformed(
            call,
            LINEAR_SOLVE,
            f"the answer has results {sorted(map(str, results))} for {items} "
            f"right-hand sides; this lineax knows {', '.join(RESULTS_NAMES)}",
        )
    codes[p] = [RESULTS_NAMES.index(r) for r in results]
    steps[p] = counts
