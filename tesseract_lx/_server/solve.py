"""`POST /linear_solve`: a whole lineax solve next to the Tesseract, in one request.

A matrix-free Newton-Krylov solve sends one JVP per Krylov iteration: the round trips
are the whole cost. Here the server runs the Krylov loop itself, on the linear map
`J = d(outputs at jvp_outputs) / d(inputs at jvp_inputs)` at the primal point, and
answers once.

Payload:

```python
{"inputs": {...},                 # the primal point, as for /apply
 "jvp_inputs": [...], "jvp_outputs": [...],   # as for /jacobian_vector_product
 "rhs": {path: array},            # K right-hand sides, a leading axis of size K on
                                  # every array, keyed by jvp_outputs (transpose:
                                  # jvp_inputs)
 "transpose": false,              # solve J^T x = rhs
 "solver": {"name": "GMRES", "rtol": 1e-8, "atol": 1e-8, ...},  # `_wire/solvers.py`
 "y0": {path: array}}             # optional: K initial guesses, keyed as the
                                  # solution (jvp_inputs; transpose: jvp_outputs)
```

The answer: `{"solution": {path: (K, ...)}, "num_steps": [K ints], "result": [K names
of lineax's RESULTS]}` (a solve that fails is an answer, not an error: the client
decides, as lineax's `throw=` does). `y0` is lineax's `options["y0"]`, per right-hand
side; the lineax options taken are stated in `x-tesseract-lx["linear_solve_options"]`
(`OPTIONS`). A payload lineax would refuse (misshapen `rhs` or `y0`, a square solver
for a map that is not square, CG without a definiteness tag, `y0` for `Normal` of a
wide map) is a 422 naming the field, never a 500.

How the map is computed (`mode`, in `x-tesseract-lx["batched"]["linear_solve"]`):

- `"linearise"`: a JAX Tesseract with the linearisation cache: the cached (compiled)
    linearisation of its `jacobian_vector_product` is the operator, a
    `lx.FunctionLinearOperator`, whose transpose JAX derives; the solve is jitted once
    per signature and vmapped over the K right-hand sides.
- `"function"`: any other Tesseract with a `jacobian_vector_product`: the Krylov loop
    calls it in process at every iteration (no HTTP inside the loop); a transposed
    solve calls its `vector_jacobian_product`, as LSMR and Normal do inside one
    solve (`twoway.py`); without one, those get a 422.

Three modules: this one, the endpoint (made with the app); `solve_payload.py`, the
payload and answer models and the checks of a payload; `krylov.py`, the solving
(`LinearSolver`, made on the first request, with JAX and lineax). The jitted solves are
kept (an LRU) per signature; they close over static pieces only (paths, structures, the
solver, flags), never over a request's payload or arrays (see `krylov.py`).
"""

import threading
import types
from collections.abc import Callable
from typing import Any, TYPE_CHECKING

from .._wire.spec import JVP, LINEAR_SOLVE
from .declare import ServerState
from .solve_payload import LinearSolveOutputSchema, OPTIONS as OPTIONS, payload_model


if TYPE_CHECKING:
    from .krylov import LinearSolver


def solve_mode(api_module: types.ModuleType, state: ServerState) -> str | None:
    """How `/linear_solve` computes; `None`: no JVP, no endpoint."""
    if not hasattr(api_module, JVP):
        return None
    return "linearise" if state.cache is not None else "function"


def linear_solve_endpoint(
    api_module: types.ModuleType,
    stock: dict[str, Callable],
    state: ServerState,
    output_shapes: Callable[[Any], Any],
    jaxy: bool,
) -> tuple[Callable, Callable[[Any], None]]:
    """`(endpoint, check)`: the endpoint function of `/linear_solve`, and the check of
    a validated payload before it runs (422s naming the field).

    Both call one `krylov.LinearSolver`, made on the first `/linear_solve` request:
    only a solve needs JAX and lineax, and a server of a NumPy Tesseract that is never
    asked for one never imports them.
    """
    Payload = payload_model(stock[JVP].__annotations__["payload"])
    made: list[LinearSolver] = []
    lock = threading.Lock()

    def solver() -> "LinearSolver":
        with lock:
            if not made:
                from .krylov import LinearSolver

                made.append(LinearSolver(api_module, state, output_shapes, jaxy))
        return made[0]

    def linear_solve(payload: Any) -> LinearSolveOutputSchema:
        """Solve the linear system of the Jacobian at a point (or its transpose) for a
        batch of right-hand sides, in one request: the Krylov loop runs here.

        See `POST /linear_solve` in tesseract_lx's serving documentation.
        """
        return solver().solve(payload)

    def check(payload: Any) -> None:
        solver().check(payload)

    linear_solve.__name__ = linear_solve.__qualname__ = LINEAR_SOLVE
    linear_solve.__annotations__ = {
        "payload": Payload,
        "return": LinearSolveOutputSchema,
    }
    return linear_solve, check
