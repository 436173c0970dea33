"""JAX primitives for a Tesseract call, with explicit differentiation rules.

Three primitives, all lowered to a side-effect-free host callback (so XLA drops one
whose result nobody uses):

- `apply_p(*primals)` -> outputs: one `/apply`;
- `jvp_p(*primals, *tangents)` -> output tangents: `/jacobian_vector_product`,
  linear in the tangents; its transpose is `vjp_p`;
- `vjp_p(*primals, *cotangents)` -> input cotangents: `/vector_jacobian_product`,
  linear in the cotangents; its transpose is `jvp_p`.

`jax.pure_callback` wrapped in `custom_jvp` cannot be transposed, which breaks reverse
mode through lineax and optimistix; these primitives can. The JVP of `jvp_p`/`vjp_p`
is defined in the (co)tangent only: a Tesseract serves first derivatives.

vmap: every primitive carries `batched`, one flag per operand. Flagged operands share
a leading batch axis of size K; the outputs then carry it too. Nested vmaps fold into
one K. How K (co)tangents or points reach the server is `_dispatch.py`'s business,
by the rules of `_batching.py`.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, partial_eval as pe

from . import _dispatch
from ._call import Call
from ._errors import TesseractError
from ._wire import paths


def _is_zero(t) -> bool:
    if type(t) is ad.Zero:
        return True
    return getattr(t, "dtype", None) == jax.dtypes.float0


def _zero(aval) -> ad.Zero:
    return ad.Zero(aval.to_tangent_aval())


def _strip(aval, batched: bool):
    return aval.update(shape=aval.shape[1:]) if batched else aval


def _batch_size(args, batched) -> int | None:
    for a, b in zip(args, batched):
        if b:
            return a.shape[0]
    return None


def _with_batch(avals, k: int | None):
    if k is None:
        return list(avals)
    return [a.update(shape=(k, *a.shape)) for a in avals]


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


#
# apply_p
#

apply_p = Primitive("tesseract_apply")
apply_p.multiple_results = True


def _apply_abstract(*args, call: Call, batched):
    k = _batch_size(args, batched)
    return _with_batch(call.out_avals, k)


def _apply_jvp(primals, tangents, *, call: Call, batched):
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
    outs = apply_p.bind(*primals, call=call, batched=batched)
    out_tangents = [_zero(jax.typeof(o)) for o in outs]
    # After the bind: an eager `/apply` has just taught the output structure.
    if not nonzero or not call.diff_out:
        return outs, out_tangents
    refuse_complex([call.outputs[j] for j in call.diff_out])
    tans = [tangents[i] for i in nonzero]
    results = jvp_p.bind(
        *primals,
        *tans,
        call=call,
        batched=tuple(batched) + tuple(batched[i] for i in nonzero),
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


def _jvp_abstract(*args, call, batched, jvp_in, jvp_out):
    k = _batch_size(args, batched)
    return _with_batch([call.outputs[j].aval for j in jvp_out], k)


def _vjp_abstract(*args, call, batched, vjp_in, vjp_out):
    k = _batch_size(args, batched)
    avals = [_strip(args[i], batched[i]) for i in vjp_in]
    return _with_batch([a.to_tangent_aval() for a in avals], k)


jvp_p.def_abstract_eval(_jvp_abstract)
vjp_p.def_abstract_eval(_vjp_abstract)


def _refuse_second_order(call: Call, n: int, tangents, what: str):
    for i in range(n):
        if not _is_zero(tangents[i]):
            raise NotImplementedError(
                f"Cannot differentiate a {what} of the Tesseract with respect to its "
                f"point (here `{call.in_paths[i]}`): a Tesseract exposes first "
                "derivatives only (no Hessians, no `jax.jacfwd(jax.grad(...))`)."
            )


def _linear_jvp(prim, sel_name: str, primals, tangents, **params):
    """JVP of a primitive linear in its operands after the first `n` (the point)."""
    call, batched = params["call"], params["batched"]
    n = len(call.in_paths)
    _refuse_second_order(call, n, tangents, prim.name)
    outs = prim.bind(*primals, **params)
    lin = [j for j in range(n, len(primals)) if not _is_zero(tangents[j])]
    if not lin:
        return outs, [_zero(jax.typeof(o)) for o in outs]
    sel = params[sel_name]
    keep = [j - n for j in lin]
    new = dict(params)
    new[sel_name] = tuple(sel[m] for m in keep)
    new["batched"] = tuple(batched[:n]) + tuple(batched[j] for j in lin)
    out_t = prim.bind(*primals[:n], *(tangents[j] for j in lin), **new)
    return outs, out_t


ad.primitive_jvps[jvp_p] = functools.partial(_linear_jvp, jvp_p, "jvp_in")
ad.primitive_jvps[vjp_p] = functools.partial(_linear_jvp, vjp_p, "vjp_out")


def _transpose(kind: str, cts, *args, call, batched, **params):
    n = len(call.in_paths)
    for a in args[:n]:
        if ad.is_undefined_primal(a):
            raise NotImplementedError(
                "A Tesseract's derivative is linear in its (co)tangents only; it "
                "cannot be transposed with respect to its point."
            )
    primals = args[:n]
    lin_args = args[n:]
    any_batched = any(batched)
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
    cts_live = [cts[m] for m in live]
    ct_batched = tuple(batched[:n]) + (any_batched,) * len(live)
    if kind == "jvp":
        outs = vjp_p.bind(
            *primals,
            *cts_live,
            call=call,
            batched=ct_batched,
            vjp_in=tuple(sel_in[m] for m in undefined),
            vjp_out=tuple(sel_out[m] for m in live),
        )
    else:
        outs = jvp_p.bind(
            *primals,
            *cts_live,
            call=call,
            batched=ct_batched,
            jvp_in=tuple(sel_out[m] for m in live),
            jvp_out=tuple(sel_in[m] for m in undefined),
        )
    for m, o in zip(undefined, outs):
        if any_batched and not batched[n + m]:
            # The operand was shared by every batch member: its cotangent sums.
            o = jnp.sum(o, axis=0)
        result[n + m] = o
    return result


ad.primitive_transposes[jvp_p] = functools.partial(_transpose, "jvp")
ad.primitive_transposes[vjp_p] = functools.partial(_transpose, "vjp")


#
# Dead code: a (co)tangent nobody uses is not asked for.
#


def _linear_dce(sel_name: str, used_outs: list[bool], eqn):
    """Keep the outputs in use: `jvp_out` (`vjp_in`) narrows to them, so the request
    asks for those only (`jax.linearize` of `f(x)["r"]` otherwise asks for every
    output of `f`, and `OnServer` cannot recognise the map as `d r / d x`)."""
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
# Batching: fold every vmap level into one leading axis.
#


def _batch_rule(prim, args, dims, *, batched, **params):
    call = params["call"]
    if call.points is None and any(d is not None for d in dims[: len(call.inputs)]):
        raise NotImplementedError(
            "`jax.vmap` over the inputs of a Tesseract call made with "
            "`vmap_method=None`: pass `vmap_method=` one of 'sequential' (one "
            "request per point), 'expand_dims' or 'broadcast_all' (the points "
            "stacked in one request, for a Tesseract that maps over a leading axis), "
            "'auto_experimental', or use `tesseract_lx.TesseractModule`, which asks "
            "the server whether it takes a batch."
        )
    k_new = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    # The size of the axis folded in by an inner vmap: the operand's logical axis 0,
    # which is physical axis 1 when this vmap's axis sits in front of it.
    k_old = (
        next(
            (a.shape[1] if d == 0 else a.shape[0])
            for a, d, old in zip(args, dims, batched)
            if old
        )
        if any(batched)
        else None
    )
    new_args = []
    flags = []
    for a, d, old in zip(args, dims, batched):
        new = d is not None
        if new:
            a = jnp.moveaxis(a, d, 0)
        if k_old is not None and (new or old):
            if not new:
                a = jnp.broadcast_to(a, (k_new, *a.shape))
            elif not old:
                a = jnp.broadcast_to(a[:, None], (k_new, k_old, *a.shape[1:]))
            a = a.reshape(k_new * k_old, *a.shape[2:])
        new_args.append(a)
        flags.append(new or old)
    outs = prim.bind(*new_args, batched=tuple(flags), **params)
    if k_old is not None:
        outs = [o.reshape(k_new, k_old, *o.shape[1:]) for o in outs]
    return outs, [0] * len(outs)


for _p in (apply_p, jvp_p, vjp_p):
    batching.primitive_batchers[_p] = functools.partial(_batch_rule, _p)


#
# Evaluation: eagerly, and under jit as a host callback.
#

_HOST = {
    apply_p: _dispatch.run_apply,
    jvp_p: _dispatch.run_jvp,
    vjp_p: _dispatch.run_vjp,
}


def _impl(prim, *args, **params):
    # Eagerly, `/apply` tells its own output structure: no `/abstract_eval` first.
    avals = None
    if prim is not apply_p or any(params["batched"]):
        avals = prim.abstract_eval(*map(jax.typeof, args), **params)[0]
    arrays = [np.asarray(a) for a in args]
    outs = _HOST[prim](arrays, result_avals=avals, **params)
    return [jnp.asarray(o) for o in outs]


def _lowering(prim, *args, **params):
    avals = prim.abstract_eval(*map(jax.typeof, args), **params)[0]
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]

    def host(*arrays):
        arrays = [np.asarray(a) for a in arrays]
        try:
            return tuple(_HOST[prim](arrays, result_avals=avals, **params))
        except TesseractError as e:
            # JAX keeps only the text of this traceback: keep it to our message.
            raise e.with_traceback(None) from None

    return jax.pure_callback(host, shapes, *args)


for _p in (apply_p, jvp_p, vjp_p):
    _p.def_impl(functools.partial(_impl, _p))
    mlir.register_lowering(
        _p,
        mlir.lower_fun(functools.partial(_lowering, _p), multiple_results=True),
    )
