"""lineax solvers to the JSON of `POST /linear_solve` (`_wire/solvers.py`), and the
names its results come back by: the client's half of `tlx.OnServer`'s wire format.

The server's half (a lineax solver of a spec) is in `_server/krylov.py`; `_wire/` holds
the JSON's models only, and neither imports lineax there.
"""

import dataclasses
from typing import Any

import lineax as lx

from ._wire.solvers import NAMES


# lineax's `RESULTS` item names, in order: a solve's result travels by name and is
# coded by its index here.
RESULTS_NAMES = tuple(lx.RESULTS._name_to_item)  # pyright: ignore[reportAttributeAccessIssue]


def _settings(solver: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = getattr(solver, key)
        out[key] = value if value is None else type(value)(value)
    return out


def _default_norm(solver: Any) -> bool:
    fields = {f.name: f for f in dataclasses.fields(solver)}
    return "norm" not in fields or solver.norm is fields["norm"].default


def to_spec(solver: lx.AbstractLinearSolver) -> dict[str, Any]:
    """The JSON of a lineax solver; a `TypeError` naming the solvers that travel."""
    base = ("rtol", "atol", "max_steps")
    if not _default_norm(solver):
        raise TypeError(
            f"{type(solver).__name__} with a norm of its own cannot run on the server "
            "(a function does not travel): use lineax's default norm."
        )
    if isinstance(solver, lx.GMRES):
        keys = (*base, "restart", "stagnation_iters")
        return {"name": "GMRES", **_settings(solver, keys)}
    if isinstance(solver, lx.BiCGStab):
        return {"name": "BiCGStab", **_settings(solver, base)}
    if isinstance(solver, lx.CG):
        return {"name": "CG", **_settings(solver, (*base, "stabilise_every"))}
    if isinstance(solver, lx.LSMR):
        return {"name": "LSMR", **_settings(solver, (*base, "conlim"))}
    if isinstance(solver, lx.Normal) and not isinstance(solver.inner_solver, lx.Normal):
        return {"name": "Normal", "inner": to_spec(solver.inner_solver)}
    raise TypeError(
        f"{type(solver).__name__} cannot run on the server: `tlx.OnServer` takes "
        f"lineax's iterative solvers, {', '.join(f'lx.{n}' for n in NAMES)} (Normal "
        "of one of the others)."
    )
