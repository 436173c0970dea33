"""lineax's iterative solvers as JSON, for `POST /linear_solve`: both ends read this.

A solver travels as `{"name": ..., settings}`:

| name | settings |
|---|---|
| `"GMRES"` | `rtol`, `atol`, `max_steps`, `restart`, `stagnation_iters` |
| `"BiCGStab"` | `rtol`, `atol`, `max_steps` |
| `"CG"` | `rtol`, `atol`, `max_steps`, `stabilise_every` |
| `"LSMR"` | `rtol`, `atol`, `max_steps`, `conlim` |
| `"Normal"` | `inner`: one of the above (not `"Normal"`) |

`max_steps` may be `null` (lineax's default: 10 times the size). Norms are lineax's
default (the max norm): a solver with another norm does not travel. Results travel by
name (`RESULTS_NAMES`): lineax's `RESULTS` item names.
"""

import dataclasses
from typing import Annotated, Any, Literal

import lineax as lx
from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rtol: float = Field(ge=0)
    atol: float = Field(ge=0)
    max_steps: PositiveInt | None = None


class GMRESSpec(_Spec):
    name: Literal["GMRES"]
    restart: PositiveInt = 20
    stagnation_iters: PositiveInt = 20


class BiCGStabSpec(_Spec):
    name: Literal["BiCGStab"]


class CGSpec(_Spec):
    name: Literal["CG"]
    stabilise_every: PositiveInt | None = 10


class LSMRSpec(_Spec):
    name: Literal["LSMR"]
    conlim: float = Field(default=1e8, gt=0)


Inner = Annotated[
    GMRESSpec | BiCGStabSpec | CGSpec | LSMRSpec, Field(discriminator="name")
]


class NormalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["Normal"]
    inner: Inner


SolverSpec = Annotated[
    GMRESSpec | BiCGStabSpec | CGSpec | LSMRSpec | NormalSpec,
    Field(discriminator="name"),
]

NAMES = ("GMRES", "BiCGStab", "CG", "LSMR", "Normal")
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


def from_spec(spec: BaseModel) -> lx.AbstractLinearSolver:
    """The lineax solver of a validated `SolverSpec`."""
    if isinstance(spec, NormalSpec):
        return lx.Normal(from_spec(spec.inner))
    settings = spec.model_dump(exclude={"name"})
    solver_type = {
        GMRESSpec: lx.GMRES,
        BiCGStabSpec: lx.BiCGStab,
        CGSpec: lx.CG,
        LSMRSpec: lx.LSMR,
    }[type(spec)]
    return solver_type(**settings)
