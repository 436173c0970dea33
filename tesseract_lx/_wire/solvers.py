"""lineax's iterative solvers as JSON, for `POST /linear_solve`: both ends read this.

Pure data (pydantic models of the JSON, no lineax): the client makes a spec of a
lineax solver (`.._solvers.to_spec`), the server a lineax solver of a spec
(`.._server.krylov.lineax_solver`).

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
name: lineax's `RESULTS` item names.
"""

from typing import Annotated, Literal

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
