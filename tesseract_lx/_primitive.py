"""JAX primitives for a Tesseract call, with explicit rules for every transformation.

- `apply_p(*primals)` -> outputs: `/apply`;
- `jvp_p(*primals, *tangents)` -> output tangents: linear in the tangents; its
  transpose is `vjp_p`;
- `vjp_p(*primals, *cotangents)` -> input cotangents: linear in the cotangents; its
  transpose is `jvp_p`.

`jax.pure_callback` wrapped in `custom_jvp` cannot be transposed, which breaks reverse
mode through lineax and optimistix; these primitives can. A Tesseract serves first
derivatives: the JVP of `jvp_p`/`vjp_p` is defined in the (co)tangents only.

**Two batch roles.** A batch of primal points and a batch of (co)tangents at a point
are kept apart, never broadcast into one another. `points` flags the operands that
carry a leading axis of P points; `items` flags the (co)tangents that carry an axis
of K items, after the point axis where both are present. Outputs are laid out
`(P?, K?, *shape)`. Nested `vmap`s fold into these two axes: a `vmap` that batches
any primal operand is one over points, any other one over items.

**Planned when traced.** Evaluating a primitive (lowering it into a compiled
program, or running it eagerly) asks the batching rule for a plan
(`_batching.plan_call`), records it, and emits the plan as graph structure: one host
callback per request pattern (`_points.py`, `_linear.py`), or, under the Jacobian
plan, a callback that takes only the point (`_jacobian.fetch`) and a contraction in
the graph, which XLA hoists out of loops and merges. A compiled program sends the
same requests on every run. Callbacks are side-effect free: XLA drops one whose
result is not used; dead-code rules narrow a JVP or VJP to the outputs in use.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, partial_eval as pe

from . import _jacobian, _linear, _points
from ._batching import Batch, Plan, plan_call, servable, server_of
from ._call import Call
from ._errors import TesseractError
from ._wire import paths
from ._wire.spec import APPLY, JACOBIAN, JVP, VJP


def _is_zero(t) -> bool:
    if type(t) is ad.Zero:
        return True
    return getattr(t, "dtype", None) == jax.dtypes.float0


def _zero(aval) -> ad.Zero:
    return ad.Zero(aval.to_tangent_aval())


def refuse_complex(leaves) -> None:
    """Refuse derivatives through complex arrays, before any request.

    JAX's VJP of a complex map is its transpose, not its conjugate transpose, and a
    Tesseract's hand-written VJP may follow either convention; its schema does not
    say which. A wrong convention gives wrong numbers without an error, so none is
    assumed."""
    bad = [leaf for leaf in leaves if np.dtype(leaf.dtype).kind == "c"]
    if bad:
        names = ", ".join(f"`{leaf.path}` ({leaf.dtype})" for leaf in bad)
        raise TypeError(
            f"Cannot differentiate through complex arrays: {names}. A Tesseract's "
            "JVP and VJP of complex arrays may follow either convention (JAX's "
            "transpose or the conjugate transpose) and its schema does not say which; "
            "split the array into real and imaginary parts in the Tesseract's schema."
        )


def _lead(args, n: int, points, items=()) -> tuple[int | None, int | None]:
    """`(P, K)`: the sizes of the point and item axes, `None` where absent."""
    count = next((a.shape[0] for a, f in zip(args, points) if f), None)
    k = next(
        (
            a.shape[1 if points[n + m] else 0]
            for m, (a, f) in enumerate(zip(args[n:], items))
            if f
        ),
        None,
    )
    return count, k


def _axes(count, k) -> tuple[int, ...]:
    return ((count,) if count is not None else ()) + ((k,) if k is not None else ())


#
# apply_p
#

apply_p = Primitive("tesseract_apply")
apply_p.multiple_results = True


def _apply_abstract(*args, call: Call, points):
    count, _ = _lead(args, len(args), points)
    return [a.update(shape=(*_axes(count, None), *a.shape)) for a in call.out_avals]


def _apply_jvp(primals, tangents, *, call: Call, points):
    nonzero = []
    for i, t in enumerate(tangents):
        if _is_zero(t):
            continue
        if i not in call.diff_in:
            diff = [call.in_paths[j] for j in sorted(call.diff_in)]
            raise ValueError(
                f"Cannot differentiate with respect to `{call.in_paths[i]}`: it is not "
                "a differentiable input of this Tesseract; differentiable inputs are: "
                f"{paths.describe(diff)}."
            )
        nonzero.append(i)
    refuse_complex([call.inputs[i] for i in nonzero])
    outs = apply_p.bind(*primals, call=call, points=points)
    out_tangents = [_zero(jax.typeof(o)) for o in outs]
    # After the bind: an eager `/apply` has just taught the output structure.
    if not nonzero or not call.diff_out:
        return outs, out_tangents
    refuse_complex([call.outputs[j] for j in call.diff_out])
    results = jvp_p.bind(
        *primals,
        *(tangents[i] for i in nonzero),
        call=call,
        # A tangent has its primal's shape: the point axis where the primal has it.
        points=tuple(points) + tuple(points[i] for i in nonzero),
        items=(False,) * len(nonzero),
        jvp_in=tuple(nonzero),
        jvp_out=call.diff_out,
    )
    for j, r in zip(call.diff_out, results):
        out_tangents[j] = r
    return outs, out_tangents


apply_p.def_abstract_eval(_apply_abstract)
ad.primitive_jvps[apply_p] = _apply_jvp


#
# jvp_p and vjp_p: linear in their (co)tangent operands
#

jvp_p = Primitive("tesseract_jvp")
jvp_p.multiple_results = True
vjp_p = Primitive("tesseract_vjp")
vjp_p.multiple_results = True


def _jvp_abstract(*args, call, points, items, jvp_in, jvp_out):
    axes = _axes(*_lead(args, len(call.inputs), points, items))
    return [
        call.outputs[j].aval.update(shape=(*axes, *call.outputs[j].shape))
        for j in jvp_out
    ]


def _vjp_abstract(*args, call, points, items, vjp_in, vjp_out):
    axes = _axes(*_lead(args, len(call.inputs), points, items))
    outs = []
    for i in vjp_in:
        aval = args[i]
        base = aval.shape[1:] if points[i] else aval.shape
        outs.append(aval.update(shape=(*axes, *base)).to_tangent_aval())
    return outs


jvp_p.def_abstract_eval(_jvp_abstract)
vjp_p.def_abstract_eval(_vjp_abstract)


def _refuse_second_order(call: Call, tangents, what: str):
    what = {jvp_p.name: "JVP", vjp_p.name: "VJP"}.get(what, what)
    for i in range(len(call.inputs)):
        if not _is_zero(tangents[i]):
            raise NotImplementedError(
                f"Cannot differentiate a {what} of the Tesseract with respect to its "
                f"primal inputs (here `{call.in_paths[i]}`): that needs a second "
                "derivative, and a Tesseract exposes first derivatives only (no "
                "Hessians, no `jax.jacfwd(jax.grad(...))`). Its JVP and VJP are "
                "linear in their (co)tangents, and differentiable in those."
            )


def _linear_jvp(prim, sel_name: str, primals, tangents, **params):
    """JVP of a primitive linear in its operands after the point's."""
    call = params["call"]
    n = len(call.inputs)
    _refuse_second_order(call, tangents, prim.name)
    outs = prim.bind(*primals, **params)
    lin = [j for j in range(n, len(primals)) if not _is_zero(tangents[j])]
    if not lin:
        return outs, [_zero(jax.typeof(o)) for o in outs]
    new = dict(params)
    new[sel_name] = tuple(params[sel_name][j - n] for j in lin)
    new["points"] = tuple(params["points"][:n]) + tuple(
        params["points"][j] for j in lin
    )
    new["items"] = tuple(params["items"][j - n] for j in lin)
    out_t = prim.bind(*primals[:n], *(tangents[j] for j in lin), **new)
    return outs, out_t


ad.primitive_jvps[jvp_p] = functools.partial(_linear_jvp, jvp_p, "jvp_in")
ad.primitive_jvps[vjp_p] = functools.partial(_linear_jvp, vjp_p, "vjp_out")


def _transpose(kind: str, cts, *args, call, points, items, **params):
    n = len(call.inputs)
    undefined_point = [
        call.in_paths[i] for i, a in enumerate(args[:n]) if ad.is_undefined_primal(a)
    ]
    if undefined_point:
        # A ValueError naming `UndefinedPrimal`, as tesseract-jax raises here.
        raise ValueError(
            "Cannot transpose a Tesseract's derivative with respect to its point "
            f"({paths.describe(undefined_point)} came as an `UndefinedPrimal`): a "
            "JVP or VJP is linear in its (co)tangents only. This happens when "
            "`jax.linear_transpose` is given a function of both the point and the "
            "tangents; close over the point instead, e.g. "
            "`jax.linear_transpose(lambda t: jax.jvp(f, (x,), (t,))[1], x)`."
        )
    primals, lin_args = args[:n], args[n:]
    with_p = any(points)
    with_k = any(items)
    sel_in = params["jvp_in"] if kind == "jvp" else params["vjp_out"]
    sel_out = params["jvp_out"] if kind == "jvp" else params["vjp_in"]
    live = [m for m, ct in enumerate(cts) if not _is_zero(ct)]
    undefined = [m for m, a in enumerate(lin_args) if ad.is_undefined_primal(a)]
    result: list[Any] = [None] * len(args)
    if not undefined:
        return result
    if not live:
        for m in undefined:
            result[n + m] = _zero(lin_args[m].aval)
        return result
    # The cotangents have the outputs' layout: both axes where the outputs have them.
    flags = dict(
        call=call,
        points=tuple(points[:n]) + (with_p,) * len(live),
        items=(with_k,) * len(live),
    )
    if kind == "jvp":
        outs = vjp_p.bind(
            *primals,
            *(cts[m] for m in live),
            **flags,
            vjp_in=tuple(sel_in[m] for m in undefined),
            vjp_out=tuple(sel_out[m] for m in live),
        )
    else:
        outs = jvp_p.bind(
            *primals,
            *(cts[m] for m in live),
            **flags,
            jvp_in=tuple(sel_out[m] for m in live),
            jvp_out=tuple(sel_in[m] for m in undefined),
        )
    for m, o in zip(undefined, outs):
        # An operand shared by every item (every point) has their sum as cotangent.
        if with_k and not items[m]:
            o = jnp.sum(o, axis=1 if with_p else 0)
        if with_p and not points[n + m]:
            o = jnp.sum(o, axis=0)
        result[n + m] = o
    return result


ad.primitive_transposes[jvp_p] = functools.partial(_transpose, "jvp")
ad.primitive_transposes[vjp_p] = functools.partial(_transpose, "vjp")


#
# Dead code: a (co)tangent nobody uses is not asked for.
#


def _linear_dce(sel_name: str, used_outs: list[bool], *args):
    """Keep the outputs in use: `jvp_out` (`vjp_in`) narrows to them, so the request
    asks for those only (`jax.linearize` of `f(x)["r"]` otherwise asks for every
    output of `f`, and `OnServer` cannot recognise the map as `d r / d x`).

    JAX 0.10 calls a rule with `(used_outs, eqn)`, JAX 0.12 with `(used_outs,
    live_ins, eqn)`: the equation comes last either way."""
    eqn = args[-1]
    if not any(used_outs):
        return [False] * len(eqn.invars), None
    if all(used_outs):
        return [True] * len(eqn.invars), eqn
    params = dict(eqn.params)
    params[sel_name] = tuple(s for s, u in zip(params[sel_name], used_outs) if u)
    outvars = [v for v, u in zip(eqn.outvars, used_outs) if u]
    return [True] * len(eqn.invars), eqn.replace(outvars=outvars, params=params)


pe.dce_rules[jvp_p] = functools.partial(_linear_dce, "jvp_out")
pe.dce_rules[vjp_p] = functools.partial(_linear_dce, "vjp_in")


#
# vmap: a new axis is one over points if it batches a primal operand, else over
# items; either folds into the axis of its role.
#


def _batch_rule(
    prim, args, dims, *, call, points, items: tuple[bool, ...] | None = None, **params
):
    n = len(call.inputs)
    linear = items is not None
    items = items or ()
    over_points = any(d is not None for d in dims[:n])
    if over_points and call.points is None:
        raise NotImplementedError(
            "`jax.vmap` over the inputs of a Tesseract call made with "
            "`vmap_method=None`: pass `vmap_method=` one of 'sequential' (one "
            "request per point), 'expand_dims' or 'broadcast_all' (the points "
            "stacked in one request, for a Tesseract that maps over a leading axis), "
            "'auto_experimental', or use `tesseract_lx.TesseractModule`, which asks "
            "the server whether it takes a batch."
        )
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    old_p, old_k = _old_lead(args, dims, n, points, items)
    new_args: list = []
    new_points: list[bool] = list(points)
    new_items: list[bool] = list(items)
    for i, (a, d) in enumerate(zip(args, dims)):
        is_lin = i >= n
        has_p = points[i]
        has_k = is_lin and items[i - n]
        if over_points:
            if d is not None:
                a = jnp.moveaxis(a, d, 0)
            if old_p is not None and (d is not None or has_p):
                # Both the new axis and the old point axis: fold them, in that order.
                if d is None:
                    a = jnp.broadcast_to(a, (size, *a.shape))
                elif not has_p:
                    a = jnp.broadcast_to(a[:, None], (size, old_p, *a.shape[1:]))
                a = a.reshape(size * old_p, *a.shape[2:])
            new_points[i] = has_p or d is not None
        else:
            if d is None and not (has_k and old_k is not None):
                new_args.append(a)
                continue
            at = 1 if has_p else 0  # the item axis comes after the point axis
            if d is not None:
                a = jnp.moveaxis(a, d, at)
            if old_k is not None and (d is not None or has_k):
                shape = a.shape
                if d is None:
                    a = jnp.broadcast_to(
                        jnp.expand_dims(a, at), (*shape[:at], size, *shape[at:])
                    )
                elif not has_k:
                    a = jnp.broadcast_to(
                        jnp.expand_dims(a, at + 1),
                        (*shape[: at + 1], old_k, *shape[at + 1 :]),
                    )
                s = a.shape
                a = a.reshape(*s[:at], size * old_k, *s[at + 2 :])
            new_items[i - n] = has_k or d is not None
        new_args.append(a)
    extra = dict(params)
    if linear:
        extra["items"] = tuple(new_items)
    outs = prim.bind(*new_args, call=call, points=tuple(new_points), **extra)
    if over_points:
        if old_p is not None:
            outs = [o.reshape(size, old_p, *o.shape[1:]) for o in outs]
        return outs, [0] * len(outs)
    at = 1 if any(new_points) else 0
    if old_k is not None:
        outs = [o.reshape(*o.shape[:at], size, old_k, *o.shape[at + 1 :]) for o in outs]
    return outs, [at] * len(outs)


def _old_lead(args, dims, n, points, items) -> tuple[int | None, int | None]:
    """The point and item axes' sizes before this `vmap`'s axis, which sits at
    `dims` in the operands that it batches."""

    def logical(a, d):
        return a.shape if d is None else a.shape[:d] + a.shape[d + 1 :]

    count = next((logical(a, d)[0] for a, d, f in zip(args, dims, points) if f), None)
    k = None
    for m, f in enumerate(items):
        if f:
            shape = logical(args[n + m], dims[n + m])
            k = shape[1 if points[n + m] else 0]
            break
    return count, k


for _p in (apply_p, jvp_p, vjp_p):
    batching.primitive_batchers[_p] = functools.partial(_batch_rule, _p)


#
# Evaluation: the plan, then its callbacks (eagerly called, or staged into the graph)
#


def _staged(fn, avals, *operands):
    def host(*arrays):
        try:
            return tuple(fn(*arrays))
        except TesseractError as e:
            # JAX keeps only the text of this traceback: keep it to our message.
            raise e.with_traceback(None) from None

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    return list(jax.pure_callback(host, shapes, *operands))


def _missing(call: Call, kind: str) -> NotImplementedError:
    return NotImplementedError(
        f"The Tesseract cannot compute a {'JVP' if kind == JVP else 'VJP'}: it serves "
        f"none of the endpoints that give one (`{JVP}`, `{VJP}`, their batched forms "
        f"or `{JACOBIAN}`); it serves: "
        f"{paths.describe(sorted(call.client.schema.endpoints))}."
    )


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
            "name."
        )


def _evaluate(prim, args, params, callback):
    call: Call = params["call"]
    n = len(call.inputs)
    points = params["points"]
    avals = prim.abstract_eval(*map(jax.typeof, args), **params)[0]
    count, k = _lead(args, n, points, params.get("items", ()))
    if count == 0 or k == 0:
        # A batch of no items (`jax.jacfwd` of an empty array): no request.
        return [jnp.zeros(a.shape, a.dtype) for a in avals]
    point_size = sum(
        math.prod(jax.typeof(a).shape[1:] if f else jax.typeof(a).shape)
        for a, f in zip(args[:n], points)
    )
    if prim is apply_p:
        plan = None
        if count is not None and _points.stacked_method(call, points) is None:
            batch = Batch(
                APPLY,
                count,
                1,
                _total(call.inputs),
                _total(call.outputs),
                point_size,
            )
            plan = plan_call(call.client, call.batching, batch)
        fn = functools.partial(_points.run_apply, call, plan, points)
        return callback(fn, avals, *args)
    kind = JVP if prim is jvp_p else VJP
    items = params["items"]
    if kind == JVP:
        wrt, of = params["jvp_in"], params["jvp_out"]
        src = tuple(call.in_paths[i] for i in wrt)
        dst_leaves = tuple(call.outputs[j] for j in of)
    else:
        wrt, of = params["vjp_in"], params["vjp_out"]
        src = tuple(call.out_paths[j] for j in of)
        dst_leaves = tuple(call.inputs[i] for i in wrt)
    dst = tuple(leaf.path for leaf in dst_leaves)
    _check_addressable(src, dst)
    batch = Batch(
        kind,
        count or 1,
        k or 1,
        _total(call.inputs[i] for i in wrt),
        _total(call.outputs[j] for j in of),
        point_size,
    )
    plan = plan_call(call.client, call.batching, batch)
    if not servable(plan, batch, server_of(call.client, kind)):
        raise _missing(call, kind)
    if plan.rule != "jacobian":
        fn = functools.partial(
            _linear.run_linear, call, kind, plan, src, dst, dst_leaves, points, items
        )
        return callback(fn, avals, *args)
    ins = [call.inputs[i] for i in wrt]
    outs = [call.outputs[j] for j in of]
    m, n_in = _total(outs), _total(ins)
    forward = kind == JVP
    # Laid out for the contraction: the vectors' side first (`fetch`).
    sides = (n_in, m) if forward else (m, n_in)
    shape = (*((count,) if any(points[:n]) else ()), *sides)
    jac = jax.ShapeDtypeStruct(shape, _jacobian.dtype_of([*ins, *outs]))
    products = None
    direction = _jacobian.by_products(call, wrt, of)
    if direction is not None:
        # No `/jacobian`: the basis's products with a direction it serves, sent as
        # the module's rule plans them.
        basis = n_in if direction == JVP else m
        sub = Batch(direction, count or 1, basis, n_in, m, batch.size)
        products = plan_call(call.client, call.batching, sub)
        if products.rule == "jacobian" or not servable(
            products, sub, server_of(call.client, direction)
        ):
            name = f"batched_{direction}"
            batched = call.client.serves(name)
            products = Plan(
                "batched" if batched else "concurrent",
                call.client.parallelism_for(name if batched else direction),
            )
    fetch = functools.partial(
        _jacobian.fetch, call, wrt, of, points[:n], products, forward
    )
    (matrix,) = callback(lambda *a: [fetch(*a)], [jac], *args[:n])
    src_shapes = [leaf.shape for leaf in (ins if forward else outs)]
    outs = _jacobian.contract(
        matrix,
        list(args[n:]),
        src_shapes,
        list(dst_leaves),
        points[n:],
        items,
    )
    if call.check_finite:
        # The answer the caller gets, whatever the plan: NaN from a (co)tangent too.
        check = functools.partial(_jacobian.check_contracted, call, dst, dst_leaves)
        outs = callback(check, avals, *outs)
    return outs


def _total(leaves) -> int:
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _impl(prim, *args, **params):
    call = params["call"]
    if prim is apply_p and not any(params["points"]):
        # Eagerly, `/apply` tells its own output structure: no `/abstract_eval`.
        outs = _points.apply_eager(call, [np.asarray(a) for a in args])
        return [jnp.asarray(o) for o in outs]
    outs = _evaluate(prim, args, params, _eager_host)
    return [jnp.asarray(o) for o in outs]


def _eager_host(fn, avals, *operands):
    return [jnp.asarray(o) for o in fn(*(np.asarray(o) for o in operands))]


def _lowering(prim, *args, **params):
    return _evaluate(prim, args, params, _staged)


for _p in (apply_p, jvp_p, vjp_p):
    _p.def_impl(functools.partial(_impl, _p))
    mlir.register_lowering(
        _p,
        mlir.lower_fun(functools.partial(_lowering, _p), multiple_results=True),
    )
