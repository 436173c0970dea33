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
 "solver": {"name": "GMRES", "rtol": 1e-8, "atol": 1e-8, ...}}  # `_wire/solvers.py`
```

The answer: `{"solution": {path: (K, ...)}, "num_steps": [K ints], "result": [K names
of lineax's RESULTS]}` (a solve that fails is an answer, not an error: the client
decides, as lineax's `throw=` does).

How the map is computed (`mode`, in `x-tesseract-lx["batched"]["linear_solve"]`):

- `"linearise"`: a JAX Tesseract with the linearisation cache: the cached (compiled)
    linearisation of its `jacobian_vector_product` is the operator, a
    `lx.FunctionLinearOperator`, whose transpose JAX derives; the solve is jitted once
    per signature and vmapped over the K right-hand sides.
- `"function"`: any other Tesseract with a `jacobian_vector_product`: the Krylov loop
    calls it in process at every iteration (no HTTP inside the loop); a transposed
    solve calls its `vector_jacobian_product`. LSMR and Normal, which need both
    directions inside one solve, get a 422 here.
"""

import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tesseract_core.runtime import Array
from tesseract_core.runtime.tree_transforms import get_at_path

from .._wire import solvers
from .._wire.encoding import decode_array, is_encoded_array
from .._wire.spec import JVP, LINEAR_SOLVE, VJP
from .cache import remember
from .declare import ServerState
from .limits import check_batch


_MAX_COMPILED = 64
# The solvers that multiply by the transpose inside one solve.
_BOTH_WAYS = frozenset({"LSMR", "Normal"})


def solve_mode(api_module: types.ModuleType, state: ServerState) -> str | None:
    """How `/linear_solve` computes; `None`: no JVP, no endpoint."""
    if not hasattr(api_module, JVP):
        return None
    return "linearise" if state.cache is not None else "function"


def _models(StockJVP: type) -> type:
    fields = StockJVP.model_fields

    class LinearSolveInputSchema(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: fields["inputs"].annotation  # type: ignore[valid-type]
        jvp_inputs: fields["jvp_inputs"].annotation  # type: ignore[valid-type]
        jvp_outputs: fields["jvp_outputs"].annotation  # type: ignore[valid-type]
        rhs: dict[str, Any] = Field(
            ...,
            description="K right-hand sides: `{path: array}`, each of shape "
            "`(K, *shape)`, keyed by `jvp_outputs` (by `jvp_inputs` if `transpose`); "
            "arrays as in any payload (`json`/`base64` encodings), or raw in a binary "
            "body.",
        )
        transpose: bool = Field(False, description="Solve with the transpose.")
        tags: list[
            Literal["symmetric", "positive_semidefinite", "negative_semidefinite"]
        ] = Field(
            default_factory=list,
            description="lineax tags of the Jacobian (unchecked); CG needs "
            "`positive_semidefinite` or `negative_semidefinite`.",
        )
        solver: solvers.SolverSpec = Field(
            ..., description="The lineax iterative solver and its settings."
        )

        @field_validator("rhs", mode="before")
        @classmethod
        def _arrays(cls, rhs: Any) -> Any:
            if not isinstance(rhs, dict):
                return rhs
            out = {}
            for p, x in rhs.items():
                if is_encoded_array(x):
                    x = decode_array(x)  # json or base64; a binref is refused
                arr = np.asarray(x)
                if arr.dtype.kind not in "fiub":
                    raise ValueError(f"`rhs.{p}` must be a real numeric array.")
                out[p] = arr
            return out

    return LinearSolveInputSchema


class LinearSolveOutputSchema(BaseModel):
    solution: dict[str, Array[..., None]] = Field(  # pyright: ignore[reportInvalidTypeForm]
        ..., description="`{path: (K, *shape)}`."
    )
    num_steps: list[int] = Field(..., description="Solver steps, per right-hand side.")
    result: list[str] = Field(
        ..., description="lineax's `RESULTS` name, per right-hand side."
    )


def _error(loc: tuple, msg: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *loc), "msg": f"Value error, {msg}"}]
    )


def linear_solve_endpoint(
    api_module: types.ModuleType,
    stock: dict[str, Callable],
    state: ServerState,
    output_shapes: Callable[[Any], Any],
    jaxy: bool,
) -> tuple[Callable, Callable[[Any], None]]:
    """`(endpoint, check)`: the endpoint function of `/linear_solve`, and the check of
    a validated payload before it runs (422s naming the field).

    For a Tesseract that is not JAX code, JAX's float64 is switched on in this
    process: the solve runs in JAX, and would otherwise run a float64 Tesseract's
    Krylov loop in float32. (A JAX Tesseract keeps its own setting: it is the
    precision it computes in.)
    """
    import jax
    import lineax as lx

    from .twoway import TwoWay

    if not jaxy:
        jax.config.update("jax_enable_x64", True)

    Payload = _models(stock[JVP].__annotations__["payload"])
    jvp_fn = getattr(api_module, JVP)
    vjp_fn = getattr(api_module, VJP, None)

    def structures(payload: Any) -> tuple[dict, dict | None]:
        """`({in path: ShapeDtypeStruct}, {out path: ...} or None if unknown)`."""
        ins = {}
        for p in payload.jvp_inputs:
            x = np.asarray(get_at_path(payload.inputs, p))
            ins[p] = jax.ShapeDtypeStruct(x.shape, x.dtype)
        shapes = output_shapes(payload.inputs)
        if shapes is None:
            return ins, None
        outs = {}
        for p in payload.jvp_outputs:
            ref = get_at_path(shapes, p)
            outs[p] = jax.ShapeDtypeStruct(tuple(ref["shape"]), np.dtype(ref["dtype"]))
        return ins, outs

    def check(payload: Any) -> None:
        ins, outs = structures(payload)
        domain = outs if not payload.transpose else ins
        keys = payload.jvp_inputs if payload.transpose else payload.jvp_outputs
        against = "jvp_inputs" if payload.transpose else "jvp_outputs"
        if set(payload.rhs) != set(keys):
            raise _error(
                ("rhs",),
                f"`rhs` must have exactly the keys of `{against}` ({sorted(keys)}); "
                f"got {sorted(payload.rhs)}.",
            )
        k = None
        for p, arr in payload.rhs.items():
            shape = np.shape(arr)
            if len(shape) == 0 or shape[0] < 1 or (k is not None and shape[0] != k):
                raise _error(
                    ("rhs", p),
                    f"`rhs.{p}` has shape {tuple(shape)}: every array needs the same "
                    "leading axis of K >= 1 right-hand sides.",
                )
            k = shape[0]
            if domain is not None and tuple(shape[1:]) != domain[p].shape:
                raise _error(
                    ("rhs", p),
                    f"`rhs.{p}` has shape {tuple(shape)}; expected (K, "
                    f"*{domain[p].shape}).",
                )
        if k is None:
            raise _error(("rhs",), "`rhs` holds no right-hand side.")
        check_batch(k, state.max_batch, "rhs")
        live = state.modes[LINEAR_SOLVE]
        if live == "function" and payload.solver.name in _BOTH_WAYS and vjp_fn is None:
            raise _error(
                ("solver", "name"),
                f"{payload.solver.name} needs the transpose of the Jacobian inside the "
                "solve, and this Tesseract has no `vector_jacobian_product`; use "
                "GMRES, BiCGStab or CG.",
            )
        if live == "function" and payload.transpose and vjp_fn is None:
            raise _error(
                ("transpose",),
                "a transposed solve needs the Tesseract's `vector_jacobian_product`, "
                "which it does not define.",
            )

    # The solve, jitted once per signature: (map, K right-hand sides) -> answers.
    def solve_all(op_fn, src, dst_keys, transpose, solver, rhs, tags=(), op_t=None):
        """`vmap` over the K right-hand sides `rhs` of a lineax solve with the map
        `op_fn` (`{src path: array} -> {dst path: array}`, `src` its structure), or
        its transpose: JAX's transpose of `op_fn`, or `op_t` when given (the map's
        transpose, `{dst path: array} -> {src path: array}`). Either side with one
        path is a bare array to lineax, as on the client's operator (so a square map
        is square to lineax)."""
        src_keys, dst_keys = tuple(src), tuple(dst_keys)
        sol_keys = dst_keys if transpose else src_keys

        def pack(d: dict) -> Any:
            return next(iter(d.values())) if len(d) == 1 else d

        def unpack(x: Any, keys: tuple) -> dict:
            return {keys[0]: x} if len(keys) == 1 else x

        fn = lambda v: pack(op_fn(unpack(v, src_keys)))  # noqa: E731
        tag_set = frozenset(getattr(lx, f"{t}_tag") for t in tags)
        if op_t is None:
            op = lx.FunctionLinearOperator(fn, pack(src), tag_set)
        else:
            dst = jax.eval_shape(op_fn, src)
            fn_t = lambda w: pack(op_t(unpack(w, dst_keys)))  # noqa: E731
            op = TwoWay(fn, fn_t, pack(src), pack(dst), tag_set)
        op = op.T if transpose else op

        def one(b):
            sol = lx.linear_solve(op, b, solver, throw=False)
            steps = sol.stats.get("num_steps", 0)
            return unpack(sol.value, sol_keys), sol.result._value, steps

        return jax.vmap(one)(pack(rhs))

    # The jitted solves, per signature and solver settings; the least recently used
    # is forgotten past `_MAX_COMPILED` (a sweep over tolerances makes a new one each).
    compiled: OrderedDict[Any, Callable] = OrderedDict()

    def remembered(key: Any, make: Callable[[], Callable]) -> Callable:
        run = compiled.get(key)
        if run is None:
            run = make()
        remember(compiled, key, run, limit=_MAX_COMPILED)
        return run

    transposes: OrderedDict[Any, bool] = OrderedDict()

    def transposable(key: Any, fn: Callable, ins: dict) -> bool:
        """Whether JAX can transpose the linear map `fn` (once per signature)."""
        known = transposes.get(key)
        if known is None:
            try:
                outs = jax.eval_shape(fn, ins)
                jax.eval_shape(jax.linear_transpose(fn, ins), outs)
                known = True
            except Exception:
                known = False
        remember(transposes, key, known, limit=_MAX_COMPILED)
        return known

    def linearised(payload: Any, solver: Any, ins: dict, outs: Any, rhs: dict) -> Any:
        first = {p: np.zeros(s.shape, s.dtype) for p, s in ins.items()}
        assert state.cache is not None
        lin = state.cache.linear(
            "jvp",
            jvp_fn,
            payload.inputs,
            payload.jvp_inputs,
            payload.jvp_outputs,
            first,
        )
        if lin is None:
            return None
        transpose, tags = payload.transpose, tuple(payload.tags)
        paths_ = (tuple(payload.jvp_inputs), tuple(payload.jvp_outputs))
        if (transpose or payload.solver.name in _BOTH_WAYS) and not transposable(
            (paths_, tuple(sorted(ins.items()))), lin.partial, ins
        ):
            # JAX cannot transpose this map (it calls back to the host): the
            # Tesseract's own VJP is its transpose, as in function mode.
            return by_function(payload, solver, ins, outs, rhs)

        def solve(partial: Any, rhs: dict) -> Any:
            outs = payload.jvp_outputs
            return solve_all(partial, ins, outs, transpose, solver, rhs, tags)

        if not lin.jitted:  # a new map per point: nothing to compile once
            return solve(lin.partial, rhs)
        # Everything the jitted function closes over (the map's own structure, from
        # the compiled linearisation, is an argument: jit keys on it itself).
        key = ("linearise", paths_, tuple(sorted(ins.items())), transpose, tags)
        key = (*key, repr(solver))
        return remembered(key, lambda: jax.jit(solve))(lin.partial, rhs)

    # Function mode: the callbacks read the point of the request being computed (the
    # runner computes one request at a time), so the jitted solve is one per signature.
    current: dict[str, Any] = {}

    def host(fn: Callable, ins: Any, outs: Any, keys: Any) -> Callable:
        def call(v: dict) -> dict:
            v = {p: np.asarray(x) for p, x in v.items()}
            out = fn(current["inputs"], set(ins), set(outs), v)
            return {p: np.asarray(out[p]) for p in keys}

        return call

    def by_function(payload: Any, solver: Any, ins: dict, outs: Any, rhs: dict) -> Any:
        fwd_in, fwd_out = tuple(payload.jvp_inputs), tuple(payload.jvp_outputs)
        current["inputs"] = payload.inputs
        try:
            if outs is None:  # no abstract_eval: one JVP of zeros tells
                zeros = {p: np.zeros(s.shape, s.dtype) for p, s in ins.items()}
                probe = host(jvp_fn, fwd_in, fwd_out, fwd_out)(zeros)
                outs = {
                    p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in probe.items()
                }
            tags, transpose = tuple(payload.tags), payload.transpose
            shapes = (tuple(sorted(ins.items())), tuple(sorted(outs.items())))
            key = ("function", fwd_in, fwd_out, shapes, transpose, tags)
            key = (*key, repr(solver))

            def make() -> Callable:
                # J is the Tesseract's JVP, J^T its VJP: each a host call.
                jvp = host(jvp_fn, fwd_in, fwd_out, fwd_out)

                def op_fn(v):
                    return jax.pure_callback(jvp, outs, v, vmap_method="sequential")

                op_t: Callable | None = None
                if vjp_fn is not None:
                    vjp = host(vjp_fn, fwd_in, fwd_out, fwd_in)
                    op_t = lambda w: jax.pure_callback(  # noqa: E731
                        vjp, ins, w, vmap_method="sequential"
                    )

                return jax.jit(
                    lambda rhs: solve_all(
                        op_fn, ins, fwd_out, transpose, solver, rhs, tags, op_t
                    )
                )

            return remembered(key, make)(rhs)
        finally:
            current.clear()

    names = {
        int(item._value): name
        for name, item in lx.RESULTS._name_to_item.items()  # pyright: ignore
    }

    def linear_solve(payload: Any) -> LinearSolveOutputSchema:
        """Solve the linear system of the Jacobian at a point (or its transpose) for a
        batch of right-hand sides, in one request: the Krylov loop runs here.

        See `POST /linear_solve` in tesseract_lx's serving documentation.
        """
        solver = solvers.from_spec(payload.solver)
        ins, outs = structures(payload)
        rhs = {p: np.asarray(x) for p, x in payload.rhs.items()}
        out = None
        if state.modes[LINEAR_SOLVE] == "linearise":
            out = linearised(payload, solver, ins, outs, rhs)
            if out is None:
                # It does not trace: its functions in process from now on, as the
                # batched endpoints loop (and `x-tesseract-lx` says so).
                state.modes[LINEAR_SOLVE] = "function"
        if out is None:
            out = by_function(payload, solver, ins, outs, rhs)
        value, result, steps = out
        return LinearSolveOutputSchema.model_validate(
            {
                "solution": {p: np.asarray(v) for p, v in value.items()},
                "num_steps": [int(s) for s in np.asarray(steps).reshape(-1)],
                "result": [names[int(r)] for r in np.asarray(result).reshape(-1)],
            }
        )

    linear_solve.__name__ = linear_solve.__qualname__ = LINEAR_SOLVE
    linear_solve.__annotations__ = {
        "payload": Payload,
        "return": LinearSolveOutputSchema,
    }
    return linear_solve, check
