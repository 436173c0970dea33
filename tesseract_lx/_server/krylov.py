"""The solving of `POST /linear_solve`: `LinearSolver`, the lineax solves of one app.

Imported on an app's first `/linear_solve` (`solve.py`): it imports JAX and lineax,
which a server of a NumPy Tesseract never needs otherwise.

Every solve is a `jax.vmap` over the K right-hand sides of one `lx.linear_solve`,
jitted once per signature (paths, structures, solver settings, flags) and kept in an
LRU. What a jitted solve closes over is static; what a request brings is its arguments:

- by the **linearisation** (mode `"linearise"`): the cached linearisation of the
    Tesseract's `jacobian_vector_product` at the point (`cache.py`), a
    `jax.tree_util.Partial` whose leaves are the residuals;
- by the Tesseract's **functions** (mode `"function"`): a *handle* of the request's
    primal point, which the host callbacks (its JVP and VJP, called in process at every
    Krylov iteration) receive as an operand and look the point up by. The point itself
    is not an array JAX could carry (a model, with non-array fields, in dtypes JAX
    without float64 would change), and a point in the jitted solve would compile it per
    point; the handle is an int32 scalar, so one compiled solve serves every point.

So requests at different points never read each other's point, whatever runs them at
once, and nothing kept holds a request's payload or arrays (the table of points holds a
point while its request runs, and no longer).
"""

import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import jax
import lineax as lx
import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from tesseract_core.runtime.tree_transforms import get_at_path

from .._wire import solvers
from .._wire.spec import JVP, LINEAR_SOLVE, VJP
from .cache import remember
from .declare import ServerState
from .solve_payload import (
    BOTH_WAYS,
    cast,
    check_function_mode,
    check_payload,
    Invalid,
    LinearSolveOutputSchema,
    size,
)
from .twoway import TwoWay
from .upstream_lineax import check_lineax, result_code, result_names, successful_code


# Jitted solves (and what is known per signature) kept; past this, the least recently
# used is forgotten (a sweep over tolerances makes a new solve for each).
_MAX_COMPILED = 64

# `{path: jax.ShapeDtypeStruct}`: one side of the map.
Structs = dict[str, jax.ShapeDtypeStruct]
# `(solution, result codes, steps)`, each with a leading axis of K.
Answers = tuple[Any, Any, Any]


def lineax_solver(spec: Any) -> lx.AbstractLinearSolver:
    """The lineax solver of a validated `solvers.SolverSpec`."""
    if isinstance(spec, solvers.NormalSpec):
        return lx.Normal(lineax_solver(spec.inner))
    settings = spec.model_dump(exclude={"name"})
    solver_type = {
        solvers.GMRESSpec: lx.GMRES,
        solvers.BiCGStabSpec: lx.BiCGStab,
        solvers.CGSpec: lx.CG,
        solvers.LSMRSpec: lx.LSMR,
    }[type(spec)]
    return solver_type(**settings)


def _solve_batch(
    op_fn: Callable,
    op_t: Callable | None,
    ins: Structs,
    outs: Structs,
    transpose: bool,
    tags: tuple[str, ...],
    solver: lx.AbstractLinearSolver,
    args: Any,
    rhs: dict,
    y0: dict | None,
) -> Answers:
    """The lineax solve with the map `op_fn(args, v)` (`{path: array}` at `ins` to
    `{path: array}` at `outs`), or its transpose, of every right-hand side of `rhs` (and
    initial guess of `y0`, or `None`), by `jax.vmap`.

    The transpose is `op_t(args, w)` when given, else JAX's transpose of `op_fn`.
    Either side with one path is a bare array to lineax, as on the client's operator
    (so a square map is square to lineax).
    """
    in_keys, out_keys = tuple(ins), tuple(outs)
    sol_keys = out_keys if transpose else in_keys

    def pack(d: dict) -> Any:
        return next(iter(d.values())) if len(d) == 1 else d

    def unpack(x: Any, keys: tuple) -> dict:
        return {keys[0]: x} if len(keys) == 1 else x

    def fn(a: Any, v: Any) -> Any:
        return pack(op_fn(a, unpack(v, in_keys)))

    tag_set = frozenset(getattr(lx, f"{t}_tag") for t in tags)
    if op_t is None:
        # lineax closure-converts `fn`: `args` becomes an operand of its solve.
        op = lx.FunctionLinearOperator(lambda v: fn(args, v), pack(ins), tag_set)
    else:

        def fn_t(a: Any, w: Any) -> Any:
            return pack(op_t(a, unpack(w, out_keys)))

        dst = jax.eval_shape(fn, args, pack(ins))
        op = TwoWay(fn, fn_t, args, pack(ins), dst, tag_set)
    op = op.T if transpose else op

    def one(b: Any, guess: Any) -> Answers:
        options = {} if guess is None else {"y0": guess}
        sol = lx.linear_solve(op, b, solver, options=options, throw=False)
        steps = sol.stats.get("num_steps", 0)
        return unpack(sol.value, sol_keys), result_code(sol.result), steps

    if y0 is None:
        return jax.vmap(lambda b: one(b, None))(pack(rhs))
    return jax.vmap(one)(pack(rhs), pack(y0))


def structures(
    inputs: Any, ins: Any, outs: Any, output_shapes: Callable[[Any], Any]
) -> tuple[Structs, Structs | None]:
    """`({path: struct} at the input paths `ins`, at the output paths `outs`)` of a
    payload's `inputs`; the second `None` if `output_shapes` (`abstract_eval`) does
    not tell."""
    at_ins = {}
    for p in ins:
        x = np.asarray(get_at_path(inputs, p))
        at_ins[p] = jax.ShapeDtypeStruct(x.shape, x.dtype)
    shapes = output_shapes(inputs)
    if shapes is None:
        return at_ins, None
    at_outs = {}
    for p in outs:
        ref = get_at_path(shapes, p)
        at_outs[p] = jax.ShapeDtypeStruct(tuple(ref["shape"]), np.dtype(ref["dtype"]))
    return at_ins, at_outs


class LinearSolver:
    """The `/linear_solve` solves of one app: `check(payload)` before a request runs,
    `solve(payload)` to run it.

    **Arguments:**

    - `api_module`: the Tesseract's module (its `jacobian_vector_product`, and
        `vector_jacobian_product` if it has one).
    - `state`: the app's `ServerState`: its linearisation cache, `max_batch`, and the
        mode of `/linear_solve` in `state.modes`, which this object moves from
        `"linearise"` to `"function"` when a linearisation does not trace.
    - `output_shapes`: `inputs -> {path: {"shape", "dtype"}}` from `abstract_eval`,
        or `None` without one.
    - `jaxy`: whether the Tesseract is JAX code. If not, the solve runs with JAX's
        float64 on, in its own thread only (`jax.enable_x64`), so a float64
        Tesseract's Krylov loop is not run in float32; the process's setting is left
        as it is. (A JAX Tesseract keeps its own setting: it is the precision it
        computes in.)

    Raises what `check_lineax()` raises, if lineax moved what this uses.

    The app's runner computes one request at a time, but this object does not rely on
    it: its memos are under a lock, and each function-mode solve reads its own point
    by its handle, so solves called at once (as `tests/test_solve_server.py` does,
    past the runner) each get their own answer.
    """

    def __init__(
        self,
        api_module: Any,
        state: ServerState,
        output_shapes: Callable[[Any], Any],
        jaxy: bool,
    ):
        check_lineax()
        self.state = state
        self.output_shapes = output_shapes
        self.jaxy = jaxy
        self.jvp_fn = getattr(api_module, JVP)
        self.vjp_fn = getattr(api_module, VJP, None)
        self.names = result_names()
        # LRUs per signature, keyed and valued by static pieces only: the jitted solves,
        # whether JAX transposes a linearisation, the output structure of one.
        self._compiled: OrderedDict[Hashable, Callable] = OrderedDict()
        self._transposable: OrderedDict[Hashable, bool] = OrderedDict()
        self._images: OrderedDict[Hashable, Structs] = OrderedDict()
        self._lock = threading.Lock()
        # The primal points of the function-mode solves running now, by handle: each
        # is there while its request runs (`_at`), and read by its host callbacks.
        self._points: dict[int, Any] = {}
        self._handles = itertools.count()

    @property
    def mode(self) -> str:
        return self.state.modes[LINEAR_SOLVE]

    # -- the request ---------------------------------------------------------------

    def check(self, payload: Any) -> None:
        """A 422 naming the field for a payload the solve would refuse, as far as the
        structures known before solving tell."""
        ins, outs = self._structures(payload)
        try:
            check_payload(payload, ins, outs, self.state.max_batch)
            if self.mode == "function":
                check_function_mode(payload, self.vjp_fn is not None)
        except Invalid as e:
            raise RequestValidationError([e.error]) from None

    def solve(self, payload: Any) -> LinearSolveOutputSchema:
        """The answer to a checked payload."""
        precision = jax.enable_x64(True) if not self.jaxy else contextlib.nullcontext()
        with precision:
            solver = lineax_solver(payload.solver)
            ins, outs = self._structures(payload)
            out = None
            if self.mode == "linearise":
                out = self._by_linearisation(payload, solver, ins, outs)
                if out is None:
                    # It does not trace: its functions in process from now on, as the
                    # batched endpoints loop (and `x-tesseract-lx` says so).
                    self.state.modes[LINEAR_SOLVE] = "function"
            if out is None:
                out = self._by_function(payload, solver, ins, outs)
            value, result, steps = jax.tree.map(np.asarray, out)
        return LinearSolveOutputSchema.model_validate(
            {
                "solution": value,
                "num_steps": [int(s) for s in steps.reshape(-1)],
                "result": [self.names[int(r)] for r in result.reshape(-1)],
            }
        )

    def _structures(self, payload: Any) -> tuple[Structs, Structs | None]:
        """`(at jvp_inputs, at jvp_outputs)`; the second `None` if not known before
        solving (the Tesseract has no `abstract_eval`)."""
        return structures(
            payload.inputs, payload.jvp_inputs, payload.jvp_outputs, self.output_shapes
        )

    def _prepare(
        self, payload: Any, ins: Structs, outs: Structs
    ) -> tuple[dict, dict | None]:
        """`rhs` and `y0` checked against the map's structure, now known (a 422 as
        `check` gives it, raised so that the runner passes it on), cast to its
        dtypes."""
        try:
            check_payload(payload, ins, outs, self.state.max_batch)
        except Invalid as e:
            raise HTTPException(422, [e.error]) from None
        rhs_structs, sol_structs = (ins, outs) if payload.transpose else (outs, ins)
        rhs = cast(payload.rhs, rhs_structs)
        y0 = None if payload.y0 is None else cast(payload.y0, sol_structs)
        return rhs, y0

    @staticmethod
    def _empty(payload: Any, ins: Structs, outs: Structs, rhs: dict) -> Answers:
        """The answer for a map with no rows or no columns, which lineax's Krylov
        solvers cannot run on: the solution (of least norm) is zero, in no steps."""
        k = next(iter(rhs.values())).shape[0]
        sol_structs = outs if payload.transpose else ins
        value = {p: np.zeros((k, *s.shape), s.dtype) for p, s in sol_structs.items()}
        return value, np.full(k, successful_code()), np.zeros(k, np.int64)

    # -- by the cached linearisation -------------------------------------------------

    def _by_linearisation(
        self,
        payload: Any,
        solver: lx.AbstractLinearSolver,
        ins: Structs,
        outs: Structs | None,
    ) -> Answers | None:
        """The solve on the linearisation of the Tesseract's JVP at the point, cached
        (`cache.py`); `None` if the JVP does not trace under JAX. (`outs`: the
        structure `abstract_eval` states, if any; the linearisation's own is used.)"""
        zeros = {p: np.zeros(s.shape, s.dtype) for p, s in ins.items()}
        assert self.state.cache is not None
        fwd_in, fwd_out = tuple(payload.jvp_inputs), tuple(payload.jvp_outputs)
        lin = self.state.cache.linear(
            "jvp", self.jvp_fn, payload.inputs, fwd_in, fwd_out, zeros
        )
        if lin is None:
            return None
        in_sig = tuple(sorted(ins.items()))
        if payload.transpose or payload.solver.name in BOTH_WAYS:
            if not self._transposes((fwd_in, fwd_out, in_sig), lin.partial, ins):
                # JAX cannot transpose this map (it calls back to the host): the
                # Tesseract's own VJP is its transpose, as in function mode.
                return self._by_function(payload, solver, ins, outs)
        # The map's own structure: what lineax checks `rhs` and `y0` against.
        outs = self._image((fwd_in, fwd_out, in_sig), lin.partial, ins, fwd_out)
        rhs, y0 = self._prepare(payload, ins, outs)
        if size(ins) == 0 or size(outs) == 0:
            return self._empty(payload, ins, outs, rhs)
        flags = (payload.transpose, tuple(payload.tags), solver)

        def solve(partial: Any, rhs: dict, y0: dict | None) -> Answers:
            return _solve_batch(_apply, None, ins, outs, *flags, partial, rhs, y0)

        if not lin.jitted:  # a new map per point: nothing to compile once
            return solve(lin.partial, rhs, y0)
        # The linearisation is an argument, and jit keys on its structure itself.
        key = ("linearise", fwd_in, fwd_out, in_sig, *flags[:2], repr(solver))
        return self._compile(key, lambda: jax.jit(solve))(lin.partial, rhs, y0)

    def _transposes(self, signature: Hashable, fn: Callable, ins: Structs) -> bool:
        """Whether JAX can transpose the linear map `fn` (tried once per signature)."""
        with self._lock:
            known = self._transposable.get(signature)
        if known is None:
            try:
                outs = jax.eval_shape(fn, ins)
                jax.eval_shape(jax.linear_transpose(fn, ins), outs)
                known = True
            except Exception:  # noqa: BLE001 - whatever JAX raises, it cannot
                known = False
        with self._lock:
            remember(self._transposable, signature, known, limit=_MAX_COMPILED)
        return known

    def _image(
        self, signature: Hashable, fn: Callable, ins: Structs, fwd_out: tuple
    ) -> Structs:
        """The structure of `fn`'s values at `fwd_out` (traced once per signature)."""
        with self._lock:
            outs = self._images.get(signature)
        if outs is None:
            shapes = jax.eval_shape(fn, ins)
            outs = {
                p: jax.ShapeDtypeStruct(shapes[p].shape, shapes[p].dtype)
                for p in fwd_out
            }
        with self._lock:
            remember(self._images, signature, outs, limit=_MAX_COMPILED)
        return outs

    # -- by the Tesseract's own functions ------------------------------------------

    def _by_function(
        self,
        payload: Any,
        solver: lx.AbstractLinearSolver,
        ins: Structs,
        outs: Structs | None,
    ) -> Answers:
        """The solve calling the Tesseract's JVP (and VJP, its transpose) at every
        Krylov iteration, in process; one jitted solve per signature, the point's
        handle its argument."""
        fwd_in, fwd_out = tuple(payload.jvp_inputs), tuple(payload.jvp_outputs)
        with self._at(payload.inputs) as handle:
            if outs is None:
                outs = self._probe(payload.inputs, ins, fwd_in, fwd_out)
            rhs, y0 = self._prepare(payload, ins, outs)
            if size(ins) == 0 or size(outs) == 0:
                return self._empty(payload, ins, outs, rhs)
            flags = (payload.transpose, tuple(payload.tags), solver)
            shapes = (tuple(sorted(ins.items())), tuple(sorted(outs.items())))
            key = ("function", fwd_in, fwd_out, shapes, *flags[:2], repr(solver))
            run = self._compile(key, lambda: self._function_solve(ins, outs, *flags))
            # Done before the handle is: JAX may return before its callbacks ran.
            return jax.block_until_ready(run(np.int32(handle), rhs, y0))

    def _function_solve(
        self,
        ins: Structs,
        outs: Structs,
        transpose: bool,
        tags: tuple[str, ...],
        solver: lx.AbstractLinearSolver,
    ) -> Callable:
        """The jitted `(handle, rhs, y0) -> answers` of one signature: J is the
        Tesseract's JVP, J^T its VJP, each a host callback of `(handle, vector)`."""
        fwd_in, fwd_out = tuple(ins), tuple(outs)
        jvp = self._callback(self.jvp_fn, fwd_in, fwd_out, outs)

        def op_fn(handle: Any, v: dict) -> Any:
            return jax.pure_callback(jvp, outs, handle, v, vmap_method="sequential")

        op_t: Callable | None = None
        if self.vjp_fn is not None:
            vjp = self._callback(self.vjp_fn, fwd_in, fwd_out, ins)

            def transposed(handle: Any, w: dict) -> Any:
                return jax.pure_callback(vjp, ins, handle, w, vmap_method="sequential")

            op_t = transposed

        def solve(handle: Any, rhs: dict, y0: dict | None) -> Answers:
            flags = (transpose, tags, solver)
            return _solve_batch(op_fn, op_t, ins, outs, *flags, handle, rhs, y0)

        return jax.jit(solve)

    @contextlib.contextmanager
    def _at(self, point: Any) -> Iterator[int]:
        """A handle of `point`, for this block: what the host callbacks of a
        function-mode solve receive and read the point by."""
        handle = next(self._handles) % 2**31  # an int32 operand
        self._points[handle] = point
        try:
            yield handle
        finally:
            del self._points[handle]

    def _callback(
        self, fn: Callable, fwd_in: tuple, fwd_out: tuple, structs: Structs
    ) -> Callable:
        """The host function `(handle, vector) -> {path: array}` calling `fn` (the
        Tesseract's JVP or VJP) at the point of `handle`, its answer in `structs`'
        dtypes. It holds no point: it outlives the request that made it."""
        points = self._points

        def call(handle: Any, v: dict) -> dict:
            point = points[int(handle)]
            v = {p: np.asarray(x) for p, x in v.items()}
            out = fn(point, set(fwd_in), set(fwd_out), v)
            return {
                p: np.asarray(out[p]).astype(s.dtype, copy=False)
                for p, s in structs.items()
            }

        return call

    def _probe(
        self, point: Any, ins: Structs, fwd_in: tuple, fwd_out: tuple
    ) -> Structs:
        """The map's output structure at `point` when nothing states it (no
        `abstract_eval`): one JVP of zeros tells."""
        zeros = {p: np.zeros(s.shape, s.dtype) for p, s in ins.items()}
        out = self.jvp_fn(point, set(fwd_in), set(fwd_out), zeros)
        out = {p: np.asarray(out[p]) for p in fwd_out}
        return {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in out.items()}

    # -- compile and remember --------------------------------------------------------

    def _compile(self, key: Hashable, make: Callable[[], Callable]) -> Callable:
        """The jitted solve of `key`, made by `make()` unless kept (an LRU)."""
        with self._lock:
            run = self._compiled.get(key)
        if run is None:
            run = make()
        with self._lock:
            remember(self._compiled, key, run, limit=_MAX_COMPILED)
        return run


def _apply(partial: Any, v: dict) -> Any:
    """A linearisation (a `jax.tree_util.Partial`) applied to `v`."""
    return partial(v)
