"""optimistix's solvers as JSON, for `POST /nonlinear_solve`: both ends read this.

Pure data (pydantic models of the JSON, no optimistix, no lineax): the client makes a
spec of an optimistix solver (`.._nonlinear_spec.to_spec`), the server an optimistix
solver of a spec (`.._server.optimistix_solve.optimistix_solver`).

A solver travels as `{"name": ..., settings}`; its name says the problem:

- `"Newton"`, `"Chord"`: a root find (`optx.root_find`); settings `rtol`, `atol`,
    `kappa`, `cauchy_termination`, `linear_solver`;
- `"GaussNewton"`, `"LevenbergMarquardt"`: a least-squares fit
    (`optx.least_squares`); settings `rtol`, `atol`, `linear_solver`.

`linear_solver` is the lineax solver of each step: `null` for the optimistix solver's
default, one of `/linear_solve`'s Krylov solvers without a transpose inside (`GMRES`,
`BiCGStab`, `CG`; `_wire/solvers.py`), or a dense one the server materialises the
Jacobian for (`{"name": "LU"}`, `{"name": "QR"}`, `{"name": "SVD", "rcond": null}`,
`{"name": "AutoLinearSolver", "well_posed": null}`). Norms are optimistix's default
(`max_norm`): a solver with another norm does not travel. Results travel by name:
optimistix's `RESULTS` item names.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .solvers import BiCGStabSpec, CGSpec, GMRESSpec


class LUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["LU"]


class QRSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["QR"]


class SVDSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["SVD"]
    rcond: float | None = Field(default=None, ge=0)


class AutoSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["AutoLinearSolver"]
    well_posed: bool | None = None


StepSolver = Annotated[
    GMRESSpec | BiCGStabSpec | CGSpec | LUSpec | QRSpec | SVDSpec | AutoSpec,
    Field(discriminator="name"),
]
# The step solvers that need a square Jacobian (lineax refuses them otherwise).
SQUARE_ONLY = frozenset({"GMRES", "BiCGStab", "CG", "LU"})
# Those that solve a least-squares problem (a tall or wide Jacobian).
LEAST_SQUARES_CAPABLE = frozenset({"QR", "SVD"})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rtol: float = Field(ge=0)
    atol: float = Field(ge=0)
    linear_solver: StepSolver | None = None


class NewtonSpec(_Spec):
    name: Literal["Newton"]
    kappa: float = Field(default=1e-2, gt=0)
    cauchy_termination: bool = True


class ChordSpec(_Spec):
    name: Literal["Chord"]
    kappa: float = Field(default=1e-2, gt=0)
    cauchy_termination: bool = True


class GaussNewtonSpec(_Spec):
    name: Literal["GaussNewton"]


class LevenbergMarquardtSpec(_Spec):
    name: Literal["LevenbergMarquardt"]


NonlinearSpec = Annotated[
    NewtonSpec | ChordSpec | GaussNewtonSpec | LevenbergMarquardtSpec,
    Field(discriminator="name"),
]

ROOT_FINDERS = ("Newton", "Chord")
LEAST_SQUARES = ("GaussNewton", "LevenbergMarquardt")
NAMES = (*ROOT_FINDERS, *LEAST_SQUARES)
STEP_SOLVERS = ("GMRES", "BiCGStab", "CG", "LU", "QR", "SVD", "AutoLinearSolver")
# What a step solver is when `linear_solver` is `null`: optimistix's defaults.
DEFAULT_STEP = {
    "Newton": {"name": "AutoLinearSolver", "well_posed": None},
    "Chord": {"name": "AutoLinearSolver", "well_posed": None},
    "GaussNewton": {"name": "AutoLinearSolver", "well_posed": None},
    "LevenbergMarquardt": {"name": "QR"},
}
