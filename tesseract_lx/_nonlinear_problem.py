"""What an optimistix problem `fn(y, args)` is, read off the jaxpr of `fn`.

`tlx.OnServer(optx.Newton(...))` sends the whole solve to the server when the
residual is one Tesseract's outputs `of` as a function of its inputs `wrt`, the rest
of its inputs not depending on `y`: what `tlx.residual_fn` builds, whatever other
inputs and outputs the Tesseract has. As `_linear_map.py` reads a linear operator,
trace `fn` with `jax.make_jaxpr` and read the jaxpr:

1. dead code goes (an output the residual does not return is not asked for);
2. what does not depend on `y` is the point: computed here, in the caller's trace;
3. what depends on `y` must be one `tesseract_apply`, each leaf of `y` an input
    operand of it, each leaf of the residual an output of it, up to equations that
    only pass values through.
"""

import dataclasses
from typing import Any

import jax
from jax.extend.core import Literal
from jax.interpreters import partial_eval as pe

from . import _linear_map as linear_map
from ._primitive import apply_p


@dataclasses.dataclass(frozen=True)
class Residual:
    """A residual that is one Tesseract's: its `call`, the values of its operands
    (`None` at `wrt`, where `y` goes), and the paths `y` and the residual stand
    for, in the order JAX flattens them."""

    call: Any
    point: list
    wrt: tuple[str, ...]
    of: tuple[str, ...]


def read(fn: Any, y: Any, args: Any) -> tuple[Residual | None, str, Any]:
    """`(residual or None, why not, client)` for optimistix's `fn` (returning
    `(f, aux)`) at `y`; `client` is the first Tesseract's the residual calls."""
    structure = jax.eval_shape(lambda: y)
    try:
        closed = jax.make_jaxpr(lambda v: fn(v, args)[0])(structure)
    except Exception as e:  # noqa: BLE001 - any function may be handed to us
        return None, f"`fn` does not trace ({type(e).__name__}: {e})", None
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), True)
    calls = [e for e in jaxpr.eqns if e.primitive in linear_map._CALLS]
    if not calls:
        return None, "the residual calls no Tesseract", None
    client = calls[0].params["call"].client
    point, depends = linear_map._split(jaxpr, closed.consts)
    rename: dict[Any, Any] = {}
    kept = []
    for eqn in depends:
        through = linear_map._passes_through(eqn)
        if through is None:
            kept.append(eqn)
        else:
            for out, src in zip(eqn.outvars, through):
                rename[out] = rename.get(src, src)
    if len(kept) != 1 or kept[0].primitive is not apply_p:
        names = ", ".join(sorted({e.primitive.name for e in kept})) or "nothing"
        why = "the residual is not one Tesseract's outputs as a function of its inputs"
        return None, f"{why} (it computes {names} from `y`)", client
    (eqn,) = kept
    if any(eqn.params["points"]):
        return None, "the Tesseract call is batched inside the residual", client
    call = eqn.params["call"]
    ys = list(jaxpr.invars)
    values: list = []
    wrt_of: dict[int, int] = {}  # y leaf -> operand
    for i, v in enumerate(eqn.invars):
        v = rename.get(v, v)
        if isinstance(v, Literal):
            values.append(v.val)
        elif v in point:
            values.append(point[v])
        elif any(v is w for w in ys):
            j = next(j for j, w in enumerate(ys) if w is v)
            if j in wrt_of:
                return None, "a leaf of `y` goes to two inputs", client
            wrt_of[j] = i
            values.append(None)
        else:
            return None, "an input of the Tesseract is computed from `y`", client
    if sorted(wrt_of) != list(range(len(ys))):
        return None, "a leaf of `y` is not an input of the Tesseract", client
    outs = [rename.get(v, v) for v in jaxpr.outvars]
    of_index = []
    for v in outs:
        j = next((j for j, w in enumerate(eqn.outvars) if w is v), None)
        if j is None:
            return (
                None,
                "the residual is not the Tesseract's outputs as they are",
                client,
            )
        of_index.append(j)
    if len(set(of_index)) != len(of_index):
        return None, "the residual repeats an output", client
    wrt = tuple(call.in_paths[wrt_of[j]] for j in range(len(ys)))
    of = tuple(call.out_paths[j] for j in of_index)
    return Residual(call, values, wrt, of), "", client
