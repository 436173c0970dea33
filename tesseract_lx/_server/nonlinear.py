"""`POST /nonlinear_solve`: a whole optimistix solve next to the Tesseract, in one
request.

With `tlx.OnServer(lx.GMRES(...))` as Newton's linear solver a root find costs two
requests per Newton step; over a network each is a round trip. Here the server runs
the optimistix solve itself, on the Tesseract in process, and answers once.

Payload (`nonlinear_payload.py`):

```python
{"inputs": {...},                  # the point, as for /apply
 "wrt": [...], "of": [...],        # the unknowns (inputs), the residual (outputs)
 "y0": {path: array},              # optional: the initial value, keyed by `wrt`
 "solver": {"name": "Newton", "rtol": 1e-8, "atol": 1e-8,
            "linear_solver": {"name": "GMRES", "rtol": 1e-8, "atol": 1e-8}},
 "max_steps": 256, "tags": [], "throw": false}
```

The solver's name says the problem: `Newton` and `Chord` find a root of `of` as a
function of `wrt` (shaped alike), `GaussNewton` and `LevenbergMarquardt` minimise
its sum of squares (`_wire/nonlinear.py`). The answer: `{"solution": {path: array},
"num_steps": int, "result": name of optimistix's RESULTS}`; a solve that fails is an
answer, not an error (the client decides, as optimistix's `throw=` does), unless
`throw` asks for optimistix's message in a 500.

How the residual is computed (`optimistix_solve.py`): the Tesseract's own `apply`
and `jacobian_vector_product`, traced into the jitted optimistix solve for a pure JAX
Tesseract, else called from it as host callbacks (a JAX Tesseract's JVP then through
the linearisation cache).
"""

import threading
import types
from collections.abc import Callable
from typing import Any, TYPE_CHECKING

from .._wire import nonlinear
from .._wire.spec import JVP, NONLINEAR_SOLVE
from .declare import ServerState
from .nonlinear_payload import NonlinearSolveOutputSchema, payload_model


if TYPE_CHECKING:
    from .optimistix_solve import NonlinearSolver


def serves_nonlinear(api_module: types.ModuleType) -> bool:
    """Whether `/nonlinear_solve` is served: the Tesseract has a JVP."""
    return hasattr(api_module, JVP)


# What `x-tesseract-lx` states: the optimistix solvers, and their step solvers.
SOLVERS = nonlinear.NAMES
STEP_SOLVERS = nonlinear.STEP_SOLVERS


def nonlinear_solve_endpoint(
    api_module: types.ModuleType,
    cached_module: types.ModuleType,
    stock: dict[str, Callable],
    state: ServerState,
    output_shapes: Callable[[Any], Any],
    jaxy: bool,
) -> tuple[Callable, Callable[[Any], None]]:
    """`(endpoint, check)`: the endpoint function of `/nonlinear_solve`, and the check
    of a validated payload before it runs (422s naming the field).

    Both call one `optimistix_solve.NonlinearSolver`, made on the first request: only
    a solve needs JAX and optimistix.
    """
    Payload = payload_model(stock[JVP].__annotations__["payload"])
    made: list[NonlinearSolver] = []
    lock = threading.Lock()

    def solver() -> "NonlinearSolver":
        with lock:
            if not made:
                from .optimistix_solve import NonlinearSolver

                made.append(
                    NonlinearSolver(
                        api_module,
                        cached_module,
                        output_shapes,
                        jaxy,
                        state.cache,
                        pure=state.declaration.pure,
                        max_batch=state.max_batch,
                    )
                )
        return made[0]

    def nonlinear_solve(payload: Any) -> NonlinearSolveOutputSchema:
        """Run an optimistix root find or least-squares fit of the Tesseract's
        outputs `of` in its inputs `wrt`, in one request: the whole loop runs here.

        See `POST /nonlinear_solve` in tesseract_lx's serving documentation.
        """
        return solver().solve(payload)

    def check(payload: Any) -> None:
        solver().check(payload)

    nonlinear_solve.__name__ = nonlinear_solve.__qualname__ = NONLINEAR_SOLVE
    nonlinear_solve.__annotations__ = {
        "payload": Payload,
        "return": NonlinearSolveOutputSchema,
    }
    return nonlinear_solve, check
