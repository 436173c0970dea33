"""How a batch of K (co)tangents, or of K primal points, reaches the server.

The primitives hand over NumPy arrays with flags saying which carry a leading batch
axis. Tangent batches (the point fixed) go by one of these rules:

| rule | requests for K tangents |
|---|---|
| `sequential` | K, one after another |
| `concurrent` | K, in flight at once over the server's workers / the client's URLs |
| `jacobian` | 1 `/jacobian`, contracted here with the K tangents |
| `batched` | 1 `/batched_jacobian_vector_product` (tesseract-lx servers) |
| `auto` | the cheapest of those the server allows, by `estimate_costs` |

Batches of primal points are grouped by point (a vmap over points of a vmap over
tangents sends one tangent batch per point), then sent as one request when the schema
admits a leading batch axis on every array (`Array[..., dtype]`), else one group after
another (`concurrent`: all at once).

Missing endpoints: a JVP comes from `/jacobian` or from the VJPs of the output basis,
a VJP from `/jacobian` or from the JVPs of the input basis.
"""

import collections
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, TYPE_CHECKING

import jax
import numpy as np

from ._errors import TesseractDtypeError
from ._wire.schema import BATCHED_ENDPOINTS


if TYPE_CHECKING:
    from ._primitive import Call


logger = logging.getLogger("tesseract_lx")

STRATEGIES = ("sequential", "concurrent", "jacobian", "batched", "auto")
JVP, VJP = "jacobian_vector_product", "vector_jacobian_product"
# Cost model defaults until the client has measured its own latencies.
_ROUND_TRIP = 3e-3  # seconds per request on loopback
_BYTES_PER_SECOND = 150e6  # base64 + JSON, both ways
# A vectorised (co)tangent costs this fraction of a lone request's compute.
_PER_ITEM = 0.25


#
# Trees and payloads
#


def nest(items) -> dict:
    """`{"a.b": x}` -> `{"a": {"b": x}}`."""
    tree: dict = {}
    for path, value in items:
        *head, last = path.split(".")
        node = tree
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def get_path(tree: Any, path: str) -> Any:
    if isinstance(tree, dict) and path in tree:
        return tree[path]
    for key in path.split("."):
        tree = tree[key]
    return tree


def _inputs(call: "Call", primals: Sequence[Any]) -> dict:
    return nest([*zip(call.in_paths, primals), *call.statics])


def _expected_dtype(call: "Call", path: str, outputs: bool = True) -> np.dtype | None:
    leaves = call.client.schema.outputs if outputs else call.client.schema.inputs
    leaf = leaves.get(path)
    if leaf is None or leaf.dtype is None:
        return None
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(leaf.dtype)))


def _computed_in_float32(x: np.ndarray) -> bool:
    """Whether float64 values carry float32 precision only.

    tesseract-core casts a Tesseract's float32 results to the float64 its schema
    declares, so the dtype alone does not tell (a JAX Tesseract without
    `jax_enable_x64` does this). Every value then fits in float32's 24-bit mantissa,
    while results computed in float64 almost never do. Not evidence: exactly
    representable values such as `0.5` or `3.0`, and values below `1e-6`, which in
    float64 are often the few-bit remains of a cancellation (a residual near a root).
    """
    if x.dtype != np.float64 or x.size < 4:
        return False
    values = x[np.isfinite(x) & (np.abs(x) >= 1e-6)].ravel()
    if not np.array_equal(values, values.astype(np.float32).astype(np.float64)):
        return False
    # Mantissas as 53-bit integers: more than 16 significant bits is evidence.
    mantissa = np.frexp(values)[0] * 2.0**53
    significant = np.sum(np.mod(mantissa, 2.0**37) != 0)
    return bool(significant >= max(3, values.size // 4))


def _check(call: "Call", path: str, x: Any, dtype: np.dtype | None) -> np.ndarray:
    """The server's answer for `path`, in `dtype`, refusing a silent precision loss."""
    x = np.asarray(x)
    if dtype is None:
        return x
    lower = x.dtype.kind in "fc" and dtype.kind in "fc"
    lower = lower and x.dtype.itemsize < dtype.itemsize
    if lower or (dtype == np.float64 and _computed_in_float32(x)):
        got = x.dtype if lower else "float32 precision (sent as float64)"
        msg = (
            f"The Tesseract answered `{path}` in {got} but {dtype} was asked for: "
            "it computes in lower precision (does its `tesseract_api.py` enable "
            "`jax_enable_x64`?)."
        )
        if call.strict_dtype:
            raise TesseractDtypeError(msg + " Pass `strict_dtype=False` to accept.")
        warnings.warn(msg, stacklevel=2)
    return x.astype(dtype, copy=False)


#
# Output shapes, for tracing
#


def output_avals(call: "Call", in_avals) -> list:
    """Output avals for one (unbatched) input signature; at most one request, ever.

    In order: the schema's fixed shapes, the shapes an eager `/apply` returned, one
    `/abstract_eval` per new signature.
    """
    client = call.client
    key = (call, tuple((a.shape, str(a.dtype)) for a in in_avals))
    found = client.output_shapes.get(key)
    if found is None:
        fixed = client.schema.fixed_output_shapes()
        if fixed is not None:
            found = {p: (fixed[p], None) for p in call.out_paths}
        else:
            abstract = [
                {"shape": list(a.shape), "dtype": str(a.dtype)} for a in in_avals
            ]
            if "abstract_eval" not in client.schema.endpoints:
                raise ValueError(
                    "Cannot trace this Tesseract call: its output shapes are not "
                    "fixed by its schema and it has no `/abstract_eval`. Call it once "
                    "eagerly (outside `jax.jit`) with the same input shapes first."
                )
            result = client.request(
                "abstract_eval", {"inputs": _inputs(call, abstract)}
            )
            found = {}
            for p in call.out_paths:
                leaf = get_path(result, p)
                found[p] = (tuple(leaf["shape"]), leaf.get("dtype"))
        client.output_shapes[key] = found
    avals = []
    for p in call.out_paths:
        shape, dtype = found[p]
        dtype = _expected_dtype(call, p) or jax.dtypes.canonicalize_dtype(dtype)
        avals.append(jax.core.ShapedArray(tuple(shape), dtype))
    return avals


#
# Unbatched requests
#


def _apply_one(call: "Call", primals) -> list[np.ndarray]:
    out = call.client.request("apply", {"inputs": _inputs(call, primals)})
    return [
        _check(call, p, get_path(out, p), _expected_dtype(call, p))
        for p in call.out_paths
    ]


def _missing(call: "Call", what: str):
    have = sorted(call.client.schema.endpoints)
    return NotImplementedError(
        f"The Tesseract cannot compute a {what}: it serves none of the endpoints that "
        f"give one (`{JVP}`, `{VJP}` or `jacobian`); it serves: "
        + ", ".join(f"`{e}`" for e in have)
        + "."
    )


def _jacobian(call: "Call", primals, ins: list[str], outs: list[str], size: int):
    """`{(out, in): J}` with `J` of shape `out.shape + in.shape`, in one request."""
    result = call.client.request(
        "jacobian",
        {"inputs": _inputs(call, primals), "jac_inputs": ins, "jac_outputs": outs},
        size=size,
    )
    return {(o, i): np.asarray(get_path(result, o)[i]) for o in outs for i in ins}


def _contract(jac, lin: dict[str, np.ndarray], src, dst, dst_shapes, k, forward):
    """Apply `jac` (or its transpose) to K stacked (co)tangents."""
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


#
# Tangent batches at one point
#


@dataclasses.dataclass(frozen=True)
class Decision:
    """Why `auto` sent a batch the way it did (also logged at DEBUG level)."""

    kind: str
    k: int
    chosen: str
    estimates: dict[str, float]
    reason: str


def available(call: "Call", kind: str) -> list[str]:
    """The rules the server allows for a batch of this kind, cheapest-first order."""
    ep = call.client.schema.endpoints
    rules = []
    if f"batched_{kind}" in ep:
        rules.append("batched")
    if "jacobian" in ep:
        rules.append("jacobian")
    if kind in ep:
        rules += ["concurrent", "sequential"]
    return rules


def estimate_costs(
    call: "Call", kind: str, k: int, n_in: int, n_out: int, size: int = 0
) -> dict[str, float]:
    """Seconds each rule the server allows is expected to take for K (co)tangents.

    **Arguments:**

    - `kind`: `"jacobian_vector_product"` or `"vector_jacobian_product"`.
    - `k`: how many (co)tangents.
    - `n_in`, `n_out`: sizes of the differentiated inputs and outputs.
    - `size`: elements of the point, which keys the client's measured latencies.

    Measured latencies (`client.latency`, per endpoint and size) are used where the
    client has them; otherwise defaults for loopback. A single request costs `one`;
    `sequential` K of them; `concurrent` as many waves as K needs over the workers;
    `batched` one request whose extra cost per tangent is measured (or guessed as a
    quarter of a lone request's compute); `jacobian` one request carrying
    `n_in * n_out` numbers, then a local contraction.
    """
    client = call.client
    lat = client.latency
    batched_name = f"batched_{kind}"
    one = lat.get(kind, size)
    if one is None:
        one = lat.get(batched_name, size, 1) or _ROUND_TRIP
    compute = max(one - _ROUND_TRIP, 0.1 * one)
    transfer = 8 * k * (n_in + n_out) / _BYTES_PER_SECOND
    costs = {}
    for rule in available(call, kind):
        if rule == "sequential":
            costs[rule] = k * one
        elif rule == "concurrent" and client.parallelism > 1:
            costs[rule] = math.ceil(k / client.parallelism) * one
        elif rule == "jacobian":
            fetch = lat.get("jacobian", size)
            if fetch is None:
                rows = min(n_in, n_out)
                fetch = one + _PER_ITEM * compute * (rows - 1)
                fetch += 8 * n_in * n_out / _BYTES_PER_SECOND
            costs[rule] = fetch + 2e-9 * k * n_in * n_out
        elif rule == "batched":
            measured = lat.get(batched_name, size, k)
            if measured is None:
                measured = one + _PER_ITEM * compute * (k - 1) + transfer
            costs[rule] = measured
    return costs


def choose(call: "Call", kind: str, k: int, n_in: int, n_out: int, size: int) -> str:
    """The rule for K (co)tangents: the module's, or under `auto` the cheapest."""
    # A rule the server cannot serve (e.g. `sequential` without a JVP endpoint)
    # falls back to the cheapest one it can.
    if call.batching != "auto" and call.batching in available(call, kind):
        return call.batching
    costs = estimate_costs(call, kind, k, n_in, n_out, size)
    if k == 1 and kind in call.client.schema.endpoints:
        # One tangent: the plain endpoint, unless the whole Jacobian is measured to
        # be cheaper by far than a measured JVP (a server where JVPs are slow): a
        # flip on timing noise would surprise. A batch of one is never better.
        costs = {r: c for r, c in costs.items() if r in ("sequential", "jacobian")}
        measured = call.client.latency.get(kind, size) is not None
        if not measured or costs.get("jacobian", np.inf) > 0.5 * costs["sequential"]:
            costs.pop("jacobian", None)
    chosen = min(costs, key=costs.__getitem__)
    ranked = ", ".join(f"{r}={c * 1e3:.2f} ms" for r, c in sorted(costs.items()))
    reason = f"K={k}, n_in={n_in}, n_out={n_out}: estimated {ranked}"
    decision = Decision(kind, k, chosen, costs, reason)
    call.client.decisions.append(decision)
    logger.debug("auto picked %s for %s: %s", chosen, kind, reason)
    return chosen


def _linear_batch(call: "Call", kind: str, primals, src, dst, lin, k, dst_shapes):
    """K (co)tangents at one point: `lin[path]` has shape `(K, *shape)`.

    `kind` is JVP (src = input paths, dst = output paths) or VJP (the reverse).
    """
    client = call.client
    forward = kind == JVP
    n_src = sum(math.prod(lin[s].shape[1:]) for s in src)
    n_dst = sum(math.prod(dst_shapes[d]) for d in dst)
    rules = available(call, kind)
    if kind not in client.schema.endpoints and not (
        set(rules) & {"batched", "jacobian"}
    ):
        return _by_other_direction(call, kind, primals, src, dst, lin, k, dst_shapes)
    size = sum(np.size(p) for p in primals)
    n_in, n_out = (n_src, n_dst) if forward else (n_dst, n_src)
    rule = choose(call, kind, k, n_in, n_out, size)
    inputs = _inputs(call, primals)
    names = ("jvp_inputs", "jvp_outputs", "tangent_vector")
    if not forward:
        names = ("vjp_inputs", "vjp_outputs", "cotangent_vector")
    sel = (list(src), list(dst)) if forward else (list(dst), list(src))
    if rule == "jacobian":
        ins, outs = sel
        jac = _jacobian(call, primals, ins, outs, size)
        return _contract(jac, lin, src, dst, dst_shapes, k, forward)
    if rule == "batched":
        name = f"batched_{kind}"
        payload = {"inputs": inputs, names[0]: sel[0], names[1]: sel[1], names[2]: lin}
        result = client.request(name, payload, size=size, k=k)
        return {d: np.asarray(get_path(result, d)) for d in dst}
    payloads = [
        {
            "inputs": inputs,
            names[0]: sel[0],
            names[1]: sel[1],
            names[2]: {s: lin[s][j] for s in src},
        }
        for j in range(k)
    ]
    results = client.request_many(
        kind, payloads, concurrent=rule == "concurrent", size=size
    )
    return {d: np.stack([np.asarray(get_path(r, d)) for r in results]) for d in dst}


def _by_other_direction(call: "Call", kind, primals, src, dst, lin, k, dst_shapes):
    """A JVP from the VJPs of the output basis (or a VJP from JVPs): the Jacobian."""
    other = VJP if kind == JVP else JVP
    if other not in call.client.schema.endpoints and not available(call, other):
        raise _missing(call, "JVP" if kind == JVP else "VJP")
    # Rows of the Jacobian: the other direction applied to the basis of `dst`.
    sizes = {d: math.prod(dst_shapes[d]) for d in dst}
    total = sum(sizes.values())
    basis, start = {}, 0
    for d in dst:
        eye = np.zeros((total, sizes[d]))
        eye[start : start + sizes[d]] = np.eye(sizes[d])
        basis[d] = eye.reshape(total, *dst_shapes[d])
        start += sizes[d]
    src_shapes = {s: lin[s].shape[1:] for s in src}
    rows = _linear_batch(call, other, primals, dst, src, basis, total, src_shapes)
    jac = {}
    start = 0
    for d in dst:
        for s in src:
            m = rows[s][start : start + sizes[d]].reshape(sizes[d], -1)
            if kind == JVP:
                jac[(d, s)] = m.reshape(*dst_shapes[d], *src_shapes[s])
            else:
                jac[(s, d)] = m.T.reshape(*src_shapes[s], *dst_shapes[d])
        start += sizes[d]
    return _contract(jac, lin, src, dst, dst_shapes, k, kind == JVP)


#
# Entry points from the primitives
#


def _groups(arrays, batched, n: int):
    """Batch members grouped by primal point: `[(indices, primals)]`."""
    k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
    if not any(batched[:n]):
        return k, [(list(range(k)), list(arrays[:n]))]
    groups: dict[bytes, tuple[list[int], list]] = collections.OrderedDict()
    for j in range(k):
        point = [a[j] if b else a for a, b in zip(arrays[:n], batched[:n])]
        key = b"".join(np.ascontiguousarray(p).tobytes() for p in point)
        groups.setdefault(key, ([], point))[0].append(j)
    return k, list(groups.values())


def _admits_batch_axis(call: "Call") -> bool:
    """Whether every array of the schema takes any rank (`Array[..., dtype]`): then
    a leading batch axis passes through the Tesseract as it is."""
    schema = call.client.schema
    leaves = [*schema.inputs.values(), *schema.outputs.values()]
    return all(leaf.shape is None for leaf in leaves if leaf.is_array)


def _stacked(arrays, batched, k: int) -> list[np.ndarray]:
    return [
        a if b else np.broadcast_to(a, (k, *a.shape)) for a, b in zip(arrays, batched)
    ]


def run_apply(arrays, *, result_avals, call: "Call", batched) -> list[np.ndarray]:
    if any(batched) and _admits_batch_axis(call):
        k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
        return _apply_one(call, _stacked(arrays, batched, k))
    if not any(batched):
        outs = _apply_one(call, arrays)
        shapes = {p: (o.shape, str(o.dtype)) for p, o in zip(call.out_paths, outs)}
        key = (call, tuple((a.shape, str(a.dtype)) for a in arrays))
        call.client.output_shapes.setdefault(key, shapes)
        return outs
    n = len(arrays)
    k, groups = _groups(arrays, batched, n)
    client = call.client
    payloads = [{"inputs": _inputs(call, point)} for _, point in groups]
    results = client.request_many(
        "apply", payloads, concurrent=_concurrent_points(call)
    )
    outs = [np.empty(a.shape, a.dtype) for a in result_avals]
    for (idx, _), result in zip(groups, results):
        for o, p in zip(outs, call.out_paths):
            o[idx] = _check(call, p, get_path(result, p), o.dtype)
    return outs


def _concurrent_points(call: "Call") -> bool:
    return call.batching == "concurrent" or (
        call.batching == "auto" and call.client.parallelism > 1
    )


def _run_linear(kind, arrays, result_avals, call: "Call", batched, src_idx, dst_idx):
    n = len(call.in_paths)
    if kind == JVP:
        src = [call.in_paths[i] for i in src_idx]
        dst = [call.out_paths[j] for j in dst_idx]
    else:
        src = [call.out_paths[j] for j in src_idx]
        dst = [call.in_paths[i] for i in dst_idx]
    k_avals = any(batched)
    shapes = {
        d: tuple(a.shape[1:] if k_avals else a.shape) for d, a in zip(dst, result_avals)
    }
    if not k_avals:
        lin = {s: a[None] for s, a in zip(src, arrays[n:])}
        out = _linear_batch(call, kind, arrays[:n], src, dst, lin, 1, shapes)
        return [
            _check(call, d, out[d][0], np.dtype(a.dtype))
            for d, a in zip(dst, result_avals)
        ]
    if any(batched[:n]) and _admits_batch_axis(call):
        # One request: the batch axis rides on the primals and (co)tangents alike.
        k = next(a.shape[0] for a, b in zip(arrays, batched) if b)
        full = _stacked(arrays, batched, k)
        lin = {s: a[None] for s, a in zip(src, full[n:])}
        batch_shapes = {d: (k, *shapes[d]) for d in dst}
        out = _linear_batch(call, kind, full[:n], src, dst, lin, 1, batch_shapes)
        return [
            _check(call, d, out[d][0], np.dtype(a.dtype))
            for d, a in zip(dst, result_avals)
        ]
    k, groups = _groups(arrays, batched, n)
    outs = [np.empty(a.shape, a.dtype) for a in result_avals]
    for idx, point in groups:
        rows = [a[idx] for a in _stacked(arrays[n:], batched[n:], k)]
        lin = dict(zip(src, rows))
        out = _linear_batch(call, kind, point, src, dst, lin, len(idx), shapes)
        for o, d in zip(outs, dst):
            o[idx] = _check(call, d, out[d], o.dtype)
    return outs


def run_jvp(arrays, *, result_avals, call, batched, jvp_in, jvp_out, out_avals):
    return _run_linear(JVP, arrays, result_avals, call, batched, jvp_in, jvp_out)


def run_vjp(arrays, *, result_avals, call, batched, vjp_in, vjp_out):
    return _run_linear(VJP, arrays, result_avals, call, batched, vjp_out, vjp_in)


__all__ = ["BATCHED_ENDPOINTS", "STRATEGIES", "Decision", "estimate_costs"]
