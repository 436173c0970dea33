"""optimistix solvers to the JSON of `POST /nonlinear_solve` (`_wire/nonlinear.py`),
and the names its results come back by: the client's half of the wire format of
`tlx.OnServer(optx.Newton(...))`.

The server's half (an optimistix solver of a spec) is in
`_server/optimistix_solve.py`; `_wire/` holds the JSON's models only.
"""

from typing import Any

import equinox as eqx
import lineax as lx
import optimistix as optx

from . import _solvers as solvers
from ._wire import nonlinear


# optimistix's `RESULTS` item names, in order: a solve's result travels by name and
# is coded by its index here.
RESULTS_NAMES = tuple(optx.RESULTS._name_to_item)  # pyright: ignore[reportAttributeAccessIssue]

ROOT_FINDERS = (optx.Newton, optx.Chord)
LEAST_SQUARES = (optx.GaussNewton, optx.LevenbergMarquardt)
_TRAVEL = ", ".join(f"optx.{n}" for n in nonlinear.NAMES)


def step_spec(solver: lx.AbstractLinearSolver) -> dict[str, Any]:
    """The JSON of a step's lineax solver; a `TypeError` naming those that travel."""
    inner = getattr(solver, "solver", None)
    if type(solver).__name__ == "OnServer" and inner is not None:
        solver = inner  # the whole solve goes to the server: its steps there too
    if type(solver) is lx.LU:
        return {"name": "LU"}
    if type(solver) is lx.QR:
        return {"name": "QR"}
    if type(solver) is lx.SVD:
        return {"name": "SVD", "rcond": solver.rcond}
    if type(solver) is lx.AutoLinearSolver:
        return {"name": "AutoLinearSolver", "well_posed": solver.well_posed}
    if isinstance(solver, lx.GMRES | lx.BiCGStab | lx.CG):
        return solvers.to_spec(solver)
    raise TypeError(
        f"{type(solver).__name__} cannot run the steps of a nonlinear solve on the "
        f"server: it takes lx.{', lx.'.join(nonlinear.STEP_SOLVERS)} (without a "
        "norm of their own)."
    )


def to_spec(solver: Any) -> dict[str, Any]:
    """The JSON of an optimistix solver; a `TypeError` naming what does not travel."""
    kind = type(solver)
    if kind not in (*ROOT_FINDERS, *LEAST_SQUARES):
        raise TypeError(
            f"{kind.__name__} cannot run on the server: `tlx.OnServer` runs "
            f"{_TRAVEL} (exactly these classes), or a lineax iterative solver."
        )
    spec: dict[str, Any] = {
        "name": kind.__name__,
        "rtol": float(solver.rtol),
        "atol": float(solver.atol),
    }
    if kind in ROOT_FINDERS:
        linear = solver.linear_solver
        spec.update(
            kappa=float(solver.kappa),
            cauchy_termination=bool(solver.cauchy_termination),
        )
        default = kind(rtol=solver.rtol, atol=solver.atol, linear_solver=linear)
    else:
        linear = solver.descent.linear_solver
        default = kind(rtol=solver.rtol, atol=solver.atol, linear_solver=linear)
    spec["linear_solver"] = step_spec(linear)
    # What else it holds must be optimistix's default: a norm, a descent, a search
    # or a `verbose` of its own would not travel (and is never dropped silently).
    for name in ("norm", "descent", "search", "verbose"):
        if not hasattr(solver, name):
            continue
        if not eqx.tree_equal(getattr(solver, name), getattr(default, name)):
            raise TypeError(
                f"{kind.__name__} with a `{name}` of its own cannot run on the server "
                f"(only its settings travel: rtol, atol, the linear solver"
                f"{', kappa, cauchy_termination' if kind in ROOT_FINDERS else ''}): "
                f"use optimistix's default `{name}`."
            )
    return spec
