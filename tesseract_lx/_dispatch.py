"""Host side of the primitives: NumPy operands in, requests out, NumPy results back.

The primitives hand over arrays with flags saying which carry a leading batch axis.
Batches are grouped by primal point (a vmap over points of a vmap over tangents
sends one tangent batch per point); each group goes by the rule `_batching.plan`
resolves. A JVP the server cannot compute comes from the VJPs of the output basis
(or `/jacobian`), a VJP from the JVPs of the input basis.

Every answer passes `check_finite` on its way back: a call made with
`check_finite=True` refuses NaN and Inf there, naming the endpoint and the path.
"""

import collections
import math
from typing import Any

import numpy as np

from . import _shapes
from ._batching import plan
from ._call import Call
from ._dtypes import conform
from ._errors import TesseractNonFiniteError
from ._tree import flatten_outputs, Leaf
from ._wire import paths
from ._wire.schema import ArrayNode, node_at
from ._wire.solvers import RESULTS_NAMES
from ._wire.spec import APPLY, BATCHED_APPLY, JACOBIAN, JVP, LINEAR_SOLVE, VJP


STACKED = ("expand_dims", "broadcast_all", "auto_experimental")


def check_finite(
    call: Call,
    endpoint: str,
    path: str,
    value: Any,
    k: int | None = None,
    wrt: str | None = None,
) -> None:
    """Refuse NaN and Inf in the answer at `path`, if the call asks to.

    `k`: the answer stacks K items along its first axis (a batch). `wrt`: the
    input a `/jacobian` block is the derivative with respect to.
    """
    if not call.check_finite:
        return
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        return
    finite = np.isfinite(value)
    if finite.all():
        return
    bad = value[~finite]
    what = " and ".join(
        name
        for name, found in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any()))
        if found
    )
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    where = []
    if k is not None and k > 1:
        where.append(f"item {first[0]} of the batch of {k}")
    index = first[1:] if k is not None else first
    if index:
        where.append(f"index {index}")
    at = f", the first at {', '.join(where)}" if where else ""
    client = call.client
    error = TesseractNonFiniteError(
        endpoint,
        None,
        f"the answer holds {what} at `{path}`"
        + (f" with respect to `{wrt}`" if wrt else "")
        + f" ({bad.size} of {value.size} "
        f"value{'s' if value.size > 1 else ''}{at}); `check_finite=True` refuses NaN "
        "and Inf in answers.",
        client.urls[0] if len(client.urls) == 1 else ", ".join(client.urls),
    )
    client.last_error = error
    raise error


def _size(arrays) -> int:
    return int(sum(np.size(a) for a in arrays))


def _answer(response: Any, leaf: Leaf, endpoint: str) -> np.ndarray:
    """The output `leaf` of an `/apply` answer, in the dtype it expects."""
    try:
        value = paths.get(response, leaf.path)
    except KeyError:
        raise ValueError(
            f"`/{endpoint}` answered without output `{leaf.path}`, which the "
            "output structure (from the schema or `/abstract_eval`) promised."
        ) from None
    return conform(value, leaf.dtype, leaf.path, endpoint)


def _pick(call: Call, response: Any, endpoint: str) -> list[np.ndarray]:
    """The call's output leaves out of an `/apply` answer, in the expected dtypes."""
    outs = []
    for leaf in call.outputs:
        value = _answer(response, leaf, endpoint)
        if value.shape != leaf.shape:
            raise ValueError(
                f"`/{endpoint}` answered `{leaf.path}` with shape {value.shape}, but "
                f"{leaf.shape} was expected (from the schema or `/abstract_eval`)."
            )
        check_finite(call, endpoint, leaf.path, value)
        outs.append(value)
    return outs


def _apply_eager(call: Call, arrays) -> list[np.ndarray]:
    """One `/apply` whose answer teaches the call's output structure."""
    client = call.client
    payload = {"inputs": call.payload(arrays)}
    response = client.request(APPLY, payload, size=_size(arrays))
    template, leaves, values = flatten_outputs(client.schema.outputs, response)
    _shapes.learn(client, call.template, call.inputs, (template, tuple(leaves)))
    outs = [conform(v, leaf.dtype, leaf.path, APPLY) for leaf, v in zip(leaves, values)]
    for leaf, value in zip(leaves, outs):
        check_finite(call, APPLY, leaf.path, value)
    return outs


def _groups(arrays, batched, n: int) -> tuple[int, list[tuple[list[int], list]]]:
    """Batch members grouped by primal point: `(K, [(indices, primals)])`."""
    k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
    if not any(batched[:n]):
        return k, [(list(range(k)), list(arrays[:n]))]
    groups: dict[bytes, tuple[list[int], list]] = collections.OrderedDict()
    for j in range(k):
        point = [a[j] if b else a for a, b in zip(arrays[:n], batched[:n])]
        key = b"".join(
            np.ascontiguousarray(p).tobytes() + str(np.shape(p)).encode() for p in point
        )
        groups.setdefault(key, ([], point))[0].append(j)
    return k, list(groups.values())


def _chunks(items: list, size: int | None) -> list[list]:
    if not size or size >= len(items):
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


def _empty_batch(arrays, batched, result_avals) -> list[np.ndarray] | None:
    """The answer to a batch of no items (`jax.jacfwd` of an empty array, a vmap over
    zero points): empty, and no request."""
    k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
    if k:
        return None
    return [np.zeros(a.shape, a.dtype) for a in result_avals]


def run_apply(arrays, *, result_avals, call: Call, batched) -> list[np.ndarray]:
    client = call.client
    if not any(batched):
        if result_avals is None:
            return _apply_eager(call, arrays)
        payload = {"inputs": call.payload(arrays)}
        response = client.request(APPLY, payload, size=_size(arrays))
        return _pick(call, response, APPLY)
    empty = _empty_batch(arrays, batched, result_avals)
    if empty is not None:
        return empty
    stacking = _stacking(call, batched)
    if stacking is not None:
        return _apply_stacked(call, arrays, batched, stacking)
    n = len(arrays)
    _, groups = _groups(arrays, batched, n)
    size = _size(groups[0][1])
    how = plan(client, call.batching, APPLY, len(groups), size, 0, size)
    points = [call.payload(point) for _, point in groups]
    if how.rule == "batched":
        chunks = _chunks(points, how.max_batch)
        answers = client.request_many(
            BATCHED_APPLY,
            [{"inputs": chunk} for chunk in chunks],
            max_in_flight=how.max_in_flight,
            size=size,
            k=len(chunks[0]),
        )
        responses = [r for answer in answers for r in answer]
        endpoint = BATCHED_APPLY
    else:
        in_flight = how.max_in_flight if how.rule == "concurrent" else 1
        responses = client.request_many(
            APPLY, [{"inputs": p} for p in points], max_in_flight=in_flight, size=size
        )
        endpoint = APPLY
    outs = [np.empty(a.shape, a.dtype) for a in result_avals]
    for (idx, _), response in zip(groups, responses):
        for o, v in zip(outs, _pick(call, response, endpoint)):
            o[idx] = v
    return outs


def _stacking(call: Call, batched) -> str | None:
    """tesseract-jax's stacked `vmap_method` this batch goes by, if any.

    Never for a batched number field (a plain number on the wire), and never in
    place of a server that says it takes a batch of points (`/batched_apply`):
    `"auto_experimental"` then defers to it.
    """
    method = call.points
    live = [leaf for leaf, b in zip(call.inputs, batched) if b]
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


def _apply_stacked(call: Call, arrays, batched, method: str) -> list[np.ndarray]:
    """K points stacked on a new leading axis, in one `/apply`."""
    k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
    stacked = []
    for leaf, a, b in zip(call.inputs, arrays, batched):
        if not b and not leaf.number:
            a = (
                a[None]
                if method == "expand_dims"
                else np.broadcast_to(a, (k, *a.shape))
            )
        stacked.append(a)
    payload = {"inputs": call.payload(stacked)}
    response = call.client.request(APPLY, payload, size=_size(stacked), k=k)
    outs = []
    for leaf in call.outputs:
        value = _answer(response, leaf, APPLY)
        if value.shape[1:] != leaf.shape or value.shape[:1] not in ((k,), (1,)):
            raise ValueError(
                f"`vmap_method={method!r}`: `/apply` of {k} stacked points answered "
                f"`{leaf.path}` with shape {value.shape}, not ({k}, *{leaf.shape}): "
                "this Tesseract does not map over a leading axis; use "
                "`vmap_method='sequential'`."
            )
        check_finite(call, APPLY, leaf.path, value, len(value))
        outs.append(np.broadcast_to(value, (k, *leaf.shape)))
    return outs


#
# (Co)tangents at one point
#

_NAMES = {
    JVP: ("jvp_inputs", "jvp_outputs", "tangent_vector"),
    VJP: ("vjp_inputs", "vjp_outputs", "cotangent_vector"),
}


def _missing(call: Call, kind: str) -> NotImplementedError:
    return NotImplementedError(
        f"The Tesseract cannot compute a {'JVP' if kind == JVP else 'VJP'}: it serves "
        f"none of the endpoints that give one (`{JVP}`, `{VJP}` or `{JACOBIAN}`); it "
        f"serves: {paths.describe(sorted(call.client.schema.endpoints))}."
    )


def _contract(jac, lin, src, dst, dst_shapes, k: int, forward: bool) -> dict:
    """Apply `jac` (`{(out, in): block}`), or its transpose, to K stacked vectors."""
    out = {}
    for d in dst:
        size = math.prod(dst_shapes[d])
        acc = np.zeros((k, size))
        for s in src:
            block = jac[(d, s)] if forward else jac[(s, d)]
            m = block.reshape(size, -1) if forward else block.reshape(-1, size).T
            acc = acc + lin[s].reshape(k, -1) @ m.T
        out[d] = acc.reshape(k, *dst_shapes[d])
    return out


def _basis(lin: dict, src, k: int, n: int) -> np.ndarray | None:
    """Where the K vectors' single 1 sits, if they are the standard basis in some
    order (`jax.jacfwd`, `jax.jacrev`, `as_matrix`): the K x n matrix they stack is a
    permutation matrix. `None` otherwise."""
    if k < 2 or k != n:
        return None
    flat = [lin[s].reshape(k, -1) for s in src]
    matrix = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    if np.count_nonzero(matrix) != k:
        return None
    where = np.argmax(matrix != 0, axis=1)
    if (matrix[np.arange(k), where] != 1).any() or len(np.unique(where)) != k:
        return None
    return where


def _rows(jac, src, dst, dst_shapes, where: np.ndarray, forward: bool) -> dict:
    """`_contract` of `jac` with the standard basis in the order `where`: its
    blocks, rearranged."""
    out = {}
    for d in dst:
        size = math.prod(dst_shapes[d])
        if forward:  # column j of [J_d,s1 | J_d,s2 | ...]
            blocks = [jac[(d, s)].reshape(size, -1) for s in src]
            m = np.concatenate(blocks, axis=1).T
        else:  # row j of [J_s1,d; J_s2,d; ...]
            m = np.concatenate([jac[(s, d)].reshape(-1, size) for s in src], axis=0)
        out[d] = m[where].reshape(len(where), *dst_shapes[d])
    return out


def linear(call: Call, kind: str, primals, src, dst, lin, k: int, dst_shapes) -> dict:
    """K (co)tangents at one point: `lin[path]` has shape `(K, *shape)`.

    `kind` is JVP (`src` input paths, `dst` output paths) or VJP (the reverse).
    Returns `{dst path: (K, *shape)}`.
    """
    client = call.client
    forward = kind == JVP
    _check_addressable(src, dst)
    # Each vector in its own leaf's dtype: a float32 Tesseract's JAX VJP refuses a
    # float64 cotangent (and a server without x64 would lower it anyway).
    dtypes = {
        leaf.path: leaf.dtype for leaf in (call.inputs if forward else call.outputs)
    }
    lin = {s: np.asarray(lin[s], dtypes[s]) for s in src}
    rules = set(_available(call, kind))
    if not rules:
        return _by_other_direction(call, kind, primals, src, dst, lin, k, dst_shapes)
    n_src = sum(math.prod(lin[s].shape[1:]) for s in src)
    n_dst = sum(math.prod(dst_shapes[d]) for d in dst)
    n_in, n_out = (n_src, n_dst) if forward else (n_dst, n_src)
    size = _size(primals)
    basis = _basis(lin, src, k, n_src)
    how = plan(
        client, call.batching, kind, k, n_in, n_out, size, basis=basis is not None
    )
    inputs = call.payload(primals)
    sel = (list(src), list(dst)) if forward else (list(dst), list(src))
    if how.rule == "jacobian":
        payload = {"inputs": inputs, "jac_inputs": sel[0], "jac_outputs": sel[1]}
        result = client.request(JACOBIAN, payload, size=size)
        jac = {(o, i): np.asarray(result[o][i]) for o in sel[1] for i in sel[0]}
        for (o, i), block in jac.items():
            check_finite(call, JACOBIAN, o, block, wrt=i)
        if basis is not None:
            out = _rows(jac, src, dst, dst_shapes, basis, forward)
        else:
            out = _contract(jac, lin, src, dst, dst_shapes, k, forward)
        # The answer the caller gets, whatever the rule: NaN in a (co)tangent too.
        for d in dst:
            check_finite(call, JACOBIAN, d, out[d], k)
        return out
    names = _NAMES[kind]
    base = {"inputs": inputs, names[0]: sel[0], names[1]: sel[1]}
    if how.rule == "batched":
        bounds = [(c[0], c[-1] + 1) for c in _chunks(list(range(k)), how.max_batch)]
        payloads = [
            {**base, names[2]: {s: lin[s][a:b] for s in src}} for a, b in bounds
        ]
        results = client.request_many(
            f"batched_{kind}",
            payloads,
            max_in_flight=how.max_in_flight,
            size=size,
            k=bounds[0][1] - bounds[0][0],
        )
        out = {d: np.concatenate([np.asarray(r[d]) for r in results]) for d in dst}
        for d in dst:
            check_finite(call, f"batched_{kind}", d, out[d], k)
        return out
    payloads = [{**base, names[2]: {s: lin[s][j] for s in src}} for j in range(k)]
    in_flight = how.max_in_flight if how.rule == "concurrent" else 1
    results = client.request_many(kind, payloads, max_in_flight=in_flight, size=size)
    out = {d: np.stack([np.asarray(r[d]) for r in results]) for d in dst}
    for d in dst:
        check_finite(call, kind, d, out[d], k)
    return out


def _check_addressable(*groups) -> None:
    """Refuse, before the request, derivative paths tesseract-core cannot take."""
    bad = []
    for path in (p for group in groups for p in group):
        try:
            paths.segments(path)
        except ValueError:
            bad.append(path)
    if bad:
        raise ValueError(
            f"Cannot differentiate at {paths.describe(sorted(bad))}: tesseract-core's "
            "derivative endpoints name their inputs and outputs by path, and a path "
            "cannot name a dict entry whose key is empty (`{}`). Give that entry a "
            "non-empty key."
        )


def _available(call: Call, kind: str) -> list[str]:
    schema = call.client.schema
    return [e for e in (f"batched_{kind}", JACOBIAN, kind) if schema.has(e)]


def _by_other_direction(call: Call, kind, primals, src, dst, lin, k, dst_shapes):
    """A JVP from the VJPs of the output basis (or a VJP from JVPs): the Jacobian."""
    other = VJP if kind == JVP else JVP
    if not _available(call, other):
        raise _missing(call, kind)
    sizes = {d: math.prod(dst_shapes[d]) for d in dst}
    total = sum(sizes.values())
    basis, start = {}, 0
    for d in dst:
        eye = np.zeros((total, sizes[d]))
        eye[start : start + sizes[d]] = np.eye(sizes[d])
        basis[d] = eye.reshape(total, *dst_shapes[d])
        start += sizes[d]
    src_shapes = {s: lin[s].shape[1:] for s in src}
    rows = linear(call, other, primals, dst, src, basis, total, src_shapes)
    jac, start = {}, 0
    for d in dst:
        for s in src:
            m = rows[s][start : start + sizes[d]].reshape(sizes[d], -1)
            if kind == JVP:
                jac[(d, s)] = m.reshape((*dst_shapes[d], *src_shapes[s]))
            else:
                jac[(s, d)] = m.T.reshape((*src_shapes[s], *dst_shapes[d]))
        start += sizes[d]
    return _contract(jac, lin, src, dst, dst_shapes, k, kind == JVP)


def _stacked(arrays, batched, k: int) -> list[np.ndarray]:
    return [
        a if b else np.broadcast_to(a, (k, *a.shape)) for a, b in zip(arrays, batched)
    ]


def _run_linear(kind, arrays, result_avals, call: Call, batched, src_idx, dst_idx):
    n = len(call.inputs)
    if kind == JVP:
        src = [call.inputs[i].path for i in src_idx]
        dst_leaves = [call.outputs[j] for j in dst_idx]
    else:
        src = [call.outputs[j].path for j in src_idx]
        dst_leaves = [call.inputs[i] for i in dst_idx]
    dst = [leaf.path for leaf in dst_leaves]
    shapes = {leaf.path: leaf.shape for leaf in dst_leaves}
    endpoint = kind

    def conformed(d: str, x, dtype) -> np.ndarray:
        return conform(x, str(np.dtype(dtype)), d, endpoint)

    if not any(batched):
        lin = {s: a[None] for s, a in zip(src, arrays[n:])}
        out = linear(call, kind, arrays[:n], src, dst, lin, 1, shapes)
        return [conformed(d, out[d][0], a.dtype) for d, a in zip(dst, result_avals)]
    empty = _empty_batch(arrays, batched, result_avals)
    if empty is not None:
        return empty
    k, groups = _groups(arrays, batched, n)
    outs = [np.empty(a.shape, a.dtype) for a in result_avals]
    vectors = _stacked(arrays[n:], batched[n:], k)
    for idx, point in groups:
        lin = {s: v[idx] for s, v in zip(src, vectors)}
        out = linear(call, kind, point, src, dst, lin, len(idx), shapes)
        for o, d in zip(outs, dst):
            o[idx] = conformed(d, out[d], o.dtype)
    return outs


def run_jvp(arrays, *, result_avals, call, batched, jvp_in, jvp_out):
    return _run_linear(JVP, arrays, result_avals, call, batched, jvp_in, jvp_out)


def run_vjp(arrays, *, result_avals, call, batched, vjp_in, vjp_out):
    return _run_linear(VJP, arrays, result_avals, call, batched, vjp_out, vjp_in)


#
# A whole linear solve on the server
#


def run_solve(
    call: Call,
    primals: list,
    rhs: list,
    *,
    y0: list | None = None,
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
    """`/linear_solve` for right-hand sides stacked on leading axes (`jax.vmap`'s
    `expand_dims`: size 1 where unbatched); one request per distinct primal point.

    Returns `(*solution leaves, result codes, step counts)`, each with the leading
    axes of the batch (codes index `solvers.RESULTS_NAMES`).
    """
    base = [leaf.shape for leaf in call.inputs]
    rhs_base = [tuple(shape) for shape in rhs_shapes]
    sol_base = [tuple(s.shape) for s in sol_structs]
    arrays = [*primals, *rhs, *(y0 or [])]
    shapes = [*base, *rhs_base, *(sol_base if y0 else [])]
    lead = np.broadcast_shapes(
        *(a.shape[: a.ndim - len(shape)] for a, shape in zip(arrays, shapes))
    )
    k = math.prod(lead)
    flat_p = [
        np.broadcast_to(a, (*lead, *shape)).reshape(k, *shape)
        for a, shape in zip(primals, base)
    ]
    flat_r = [
        np.broadcast_to(r, (*lead, *b)).reshape(k, *b) for r, b in zip(rhs, rhs_base)
    ]
    # An initial guess per right-hand side (`options["y0"]`), broadcast as they are.
    flat_y0 = [
        np.broadcast_to(y, (*lead, *s.shape)).reshape(k, *s.shape)
        for y, s in zip(y0 or [], sol_structs)
    ]
    batched = [True] * len(flat_p)
    _, groups = _groups(flat_p, batched, len(flat_p))
    sols = [np.empty((k, *s.shape), s.dtype) for s in sol_structs]
    codes = np.empty(k, np.int32)
    steps = np.empty(k, np.int32)
    for idx, point in groups:
        payload = {
            "inputs": call.payload(point),
            "jvp_inputs": list(wrt),
            "jvp_outputs": list(of),
            "rhs": {p: r[idx] for p, r in zip(rhs_paths, flat_r)},
            "transpose": transpose,
            "solver": spec,
            "tags": tags,
        }
        if flat_y0:
            payload["y0"] = {p: y[idx] for p, y in zip(sol_paths, flat_y0)}
        answer = call.client.request(
            LINEAR_SOLVE, payload, size=_size(point), k=len(idx)
        )
        for out, p in zip(sols, sol_paths):
            value = np.asarray(answer["solution"].get(p))
            if value.shape != (len(idx), *out.shape[1:]):
                raise ValueError(
                    f"`/{LINEAR_SOLVE}` answered `solution.{p}` with shape "
                    f"{value.shape}; expected {(len(idx), *out.shape[1:])}."
                )
            check_finite(call, LINEAR_SOLVE, p, value, len(idx))
            out[idx] = value
        unknown = set(answer["result"]) - set(RESULTS_NAMES)
        if unknown:
            raise ValueError(
                f"`/{LINEAR_SOLVE}` answered results {sorted(unknown)}, which this "
                f"lineax does not know ({', '.join(RESULTS_NAMES)})."
            )
        codes[idx] = [RESULTS_NAMES.index(r) for r in answer["result"]]
        steps[idx] = answer["num_steps"]
    return (
        *(s.reshape((*lead, *s.shape[1:])) for s in sols),
        codes.reshape(lead),
        steps.reshape(lead),
    )
