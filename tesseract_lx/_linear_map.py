"""What a lineax operator's map is, read off the jaxpr of its `mv`.

`tlx.OnServer` sends a solve to the server when the operator's map is one Tesseract
JVP (or VJP) at a fixed point. Operators come from anywhere: optimistix builds them
with `jax.linearize` or `lx.JacobianLinearOperator` from a `tlx.residual_fn`, users
wrap them in tags or transposes. Rather than look inside each kind, trace `mv` with
`jax.make_jaxpr` (public JAX) and read the jaxpr:

1. dead code goes (`pe.dce_jaxpr`, with the primitives' own rules: an output the
   map does not return is not asked for, and the forward `/apply` that
   `lx.JacobianLinearOperator` also traces goes);
2. what does not depend on the vector is the point: computed here, in the caller's
   trace (under `jax.jit`, traced values);
3. what depends on the vector must be one `tesseract_jvp` / `tesseract_vjp`, up to
   equations that only pass values through (identity `custom_jvp_call` wrappers,
   a `convert_element_type` to the same dtype, `copy`, an identity `pjit`).
"""

import dataclasses
from typing import Any

import jax
import jax.core
from jax.extend.core import JaxprEqn, Literal, Var
from jax.interpreters import partial_eval as pe

from ._primitive import apply_p, jvp_p, vjp_p


@dataclasses.dataclass(frozen=True)
class OneCall:
    """A map that is one Tesseract JVP or VJP: `eqn` (its `tesseract_jvp` or
    `tesseract_vjp` equation), `point` (the values of its point operands), and for
    each of the map's input (output) leaves, in the order JAX flattens them, the
    index of the equation's linear operand (output) it is."""

    eqn: JaxprEqn
    point: list
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


_CALLS = (apply_p, jvp_p, vjp_p)


def read(fn: Any, structure: Any) -> tuple[OneCall | None, str, Any]:
    """`(one call or None, why not, client)` for the linear map `fn` on vectors of
    `structure`; `client` is the first Tesseract's the map calls, if any."""
    try:
        closed = jax.make_jaxpr(fn)(structure)
    except Exception as e:  # noqa: BLE001 - any operator may be handed to us
        return None, f"its `mv` does not trace ({type(e).__name__}: {e})", None
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), True)
    calls = [e for e in jaxpr.eqns if e.primitive in _CALLS]
    if not calls:
        return None, "the operator is not a Tesseract's Jacobian", None
    client = calls[0].params["call"].client
    point, linear = _split(jaxpr, closed.consts)
    rename: dict[Any, Any] = {}
    kept = []
    for eqn in linear:
        through = _passes_through(eqn)
        if through is None:
            kept.append(eqn)
        else:
            for out, src in zip(eqn.outvars, through):
                rename[out] = rename.get(src, src)
    if len(kept) != 1 or kept[0].primitive not in (jvp_p, vjp_p):
        names = ", ".join(sorted({e.primitive.name for e in kept})) or "nothing"
        why = "the operator's map is not a single Tesseract JVP or VJP"
        return None, f"{why} (it computes {names})", client
    (eqn,) = kept
    if any(eqn.params["points"]) or any(eqn.params["items"]):
        return None, "the operator's map is batched inside", client
    n = len(eqn.params["call"].in_paths)
    values = []
    for v in eqn.invars[:n]:
        v = rename.get(v, v)
        if isinstance(v, Literal):
            values.append(v.val)
        elif v in point:
            values.append(point[v])
        else:
            why = "the point depends on the vector: the map is not linear"
            return None, why, client
    operands = [rename.get(v, v) for v in eqn.invars[n:]]
    results = [rename.get(v, v) for v in jaxpr.outvars]
    if sorted(map(id, operands)) != sorted(map(id, jaxpr.invars)) or sorted(
        map(id, results)
    ) != sorted(map(id, eqn.outvars)):
        why = (
            "the operator's map does not take its whole input to its whole output "
            "through the Tesseract"
        )
        return None, why, client
    inputs = tuple(_index(operands, v) for v in jaxpr.invars)
    outputs = tuple(_index(eqn.outvars, v) for v in results)
    return OneCall(eqn, values, inputs, outputs), "", client


def _index(seq: list, v: Any) -> int:
    return next(i for i, w in enumerate(seq) if w is v)


def _split(jaxpr, consts) -> tuple[dict, list[JaxprEqn]]:
    """`({var: value} of what does not depend on the input, the equations that
    do})`: the first computed here, by JAX, in the caller's trace."""
    unknown = set(jaxpr.invars)
    known, linear = [], []
    for eqn in jaxpr.eqns:
        if any(isinstance(v, Var) and v in unknown for v in eqn.invars):
            linear.append(eqn)
            unknown.update(eqn.outvars)
        else:
            known.append(eqn)
    needed = list(
        {
            id(v): v
            for eqn in linear
            for v in eqn.invars
            if isinstance(v, Var) and v not in unknown
        }.values()
    )
    sub = jaxpr.replace(invars=[], outvars=needed, eqns=known)
    values = jax.core.eval_jaxpr(sub, list(consts))
    return dict(zip(needed, values)), linear


def _passes_through(eqn: JaxprEqn) -> list | None:
    """The inputs an equation's outputs are, if it only passes values through."""
    name = eqn.primitive.name
    if name == "copy":
        return list(eqn.invars)
    if name == "convert_element_type":
        (v,) = eqn.invars
        aval = getattr(v, "aval", None)
        same = aval is not None and aval.dtype == eqn.params["new_dtype"]
        return [v] if same else None  # (weak typing changes no value)
    for key in ("call_jaxpr", "jaxpr"):
        inner = eqn.params.get(key)
        if inner is None:
            continue
        inner = getattr(inner, "jaxpr", inner)
        if inner.eqns or inner.constvars:
            return None
        index = {id(v): i for i, v in enumerate(inner.invars)}
        if not all(id(v) in index for v in inner.outvars):
            return None
        return [eqn.invars[index[id(v)]] for v in inner.outvars]
    return None
