"""The solving of `POST /nonlinear_solve`: `NonlinearSolver`, the optimistix solves of
one app.

Imported on an app's first `/nonlinear_solve` (`nonlinear.py`): it imports JAX,
lineax and optimistix.

The residual `y -> outputs at of` is the Tesseract's own `apply` at the request's
point with `y` at `wrt`; its derivative (a `jax.custom_jvp`) the Tesseract's own
`jacobian_vector_product` there. optimistix runs jitted around them, compiled once per
signature (paths, structures, the point's non-array values, solver settings), in one
of two ways:

- **traced**: a pure JAX Tesseract whose `apply` and JVP trace under `jax.jit` is
  traced *into* the solve (the point's arrays are operands, as in the linearisation
  cache): XLA compiles residual, JVPs and the optimistix loop into one program, with
  no trip to Python per step. Newton-GMRES on bratu at n=256: 93 ms with callbacks,
  see `benchmarks/` for the figures now.
- **callbacks**, everywhere else (a NumPy Tesseract, one that reads concrete values,
  one that declares `TESSERACT_LX = {"pure": False}`): `apply` and the JVP are host
  callbacks, as `krylov.py`'s function mode (a JAX Tesseract's JVP through the
  linearisation cache: the forward pass once per step, then tangent work only). The
  callbacks read the request's point by a *handle*, an int32 operand, so one compiled
  solve serves every point and nothing kept holds a request's payload.

A JAX Tesseract that fails to trace is solved by callbacks from then on for its
signature, which is logged; the answer is the same.

The derivative is forward mode only: optimistix's Newton, Chord, Gauss-Newton and
Levenberg-Marquardt take forward-mode Jacobians (their dense step solvers materialise
by JVPs), and the step solvers that multiply by a transpose (LSMR, Normal; Dogleg's
gradient) are not offered (`_wire/nonlinear.py`).
"""

import contextlib
import dataclasses
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import jax
import lineax as lx
import numpy as np
import optimistix as optx
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from tesseract_core.runtime.tree_transforms import get_at_path

from .._wire import nonlinear, paths
from .._wire.spec import JVP
from . import trees
from .cache import remember
from .krylov import lineax_solver, structures
from .nonlinear_payload import check_payload, NonlinearSolveOutputSchema
from .solve_payload import cast, Invalid, size
from .upstream_optimistix import check_optimistix, message, result_code, result_names


logger = logging.getLogger("tesseract_lx.server")
_MAX_COMPILED = 64
Structs = dict[str, jax.ShapeDtypeStruct]


def step_solver(spec: Any) -> lx.AbstractLinearSolver:
    """The lineax solver of a validated `nonlinear.StepSolver`."""
    if isinstance(spec, nonlinear.LUSpec):
        return lx.LU()
    if isinstance(spec, nonlinear.QRSpec):
        return lx.QR()
    if isinstance(spec, nonlinear.SVDSpec):
        return lx.SVD(rcond=spec.rcond)
    if isinstance(spec, nonlinear.AutoSpec):
        return lx.AutoLinearSolver(well_posed=spec.well_posed)
    return lineax_solver(spec)


def optimistix_solver(spec: Any) -> Any:
    """The optimistix solver of a validated `nonlinear.NonlinearSpec`."""
    kwargs: dict[str, Any] = {"rtol": spec.rtol, "atol": spec.atol}
    if spec.linear_solver is not None:
        kwargs["linear_solver"] = step_solver(spec.linear_solver)
    if isinstance(spec, nonlinear.NewtonSpec | nonlinear.ChordSpec):
        kwargs.update(kappa=spec.kappa, cauchy_termination=spec.cauchy_termination)
    kind = {
        nonlinear.NewtonSpec: optx.Newton,
        nonlinear.ChordSpec: optx.Chord,
        nonlinear.GaussNewtonSpec: optx.GaussNewton,
        nonlinear.LevenbergMarquardtSpec: optx.LevenbergMarquardt,
    }[type(spec)]
    return kind(**kwargs)


def _carried(structs: Structs) -> Structs:
    """How the callbacks' answers travel into the solve: 64-bit arrays as pairs of
    uint32 (a last axis of 2).

    JAX checks a callback's answer against its declared dtype after canonicalising
    it by the *running thread's* x64 setting, and XLA may run a callback on a thread
    of its own, where `jax.enable_x64` (thread-local) does not reach: a float64
    answer would then be refused as float32. A uint32 is itself in every thread.
    """
    return {
        p: jax.ShapeDtypeStruct((*s.shape, 2), np.uint32)
        if np.dtype(s.dtype).itemsize == 8
        else s
        for p, s in structs.items()
    }


def _to_carried(out: dict, structs: Structs) -> dict:
    return {
        p: np.ascontiguousarray(out[p], s.dtype).view(np.uint32).reshape(*s.shape, 2)
        if np.dtype(s.dtype).itemsize == 8
        else np.asarray(out[p], s.dtype)
        for p, s in structs.items()
    }


def _from_carried(out: dict, structs: Structs) -> dict:
    return {
        p: jax.lax.bitcast_convert_type(out[p], s.dtype)
        if np.dtype(s.dtype).itemsize == 8
        else out[p]
        for p, s in structs.items()
    }


def _lead(s: jax.ShapeDtypeStruct, lead: tuple) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype)


def _where(path: str) -> tuple:
    """A wire path as `trees` keys it."""
    return tuple(index for _, index in paths.segments(path))


def _called_apply(apply_cb: Callable, outs: Structs) -> Callable:
    """`(handle, leaves, y) -> residual` by the host callback `apply_cb`."""
    carried = _carried(outs)

    def primal(handle: Any, leaves: list, y: dict) -> dict:
        out = jax.pure_callback(apply_cb, carried, handle, y, vmap_method="sequential")
        return _from_carried(out, outs)

    return primal


def _called_jvp(jvp_cb: Callable, outs: Structs) -> Callable:
    """`(handle, leaves, y, t) -> J t` by the host callback `jvp_cb`."""
    carried = _carried(outs)

    def tangent(handle: Any, leaves: list, y: dict, t: dict) -> dict:
        # `expand_dims`: a dense step solver's `vmap` over the identity reaches the
        # host as one batch of tangents.
        out = jax.pure_callback(
            jvp_cb, carried, handle, y, t, vmap_method="expand_dims"
        )
        return _from_carried(out, outs)

    return tangent


def _solving(optimise: Callable, primal: Callable, tangent: Callable) -> Callable:
    """`(handle, leaves, y0) -> optimise(residual, y0)`, the residual `primal` with
    the derivative `tangent` (see `_called_apply`, `NonlinearSolver._traced`)."""

    def solve(handle: Any, leaves: list, y0: dict) -> Any:
        @jax.custom_jvp
        def residual(y: dict) -> dict:
            return primal(handle, leaves, y)

        @residual.defjvp
        def _(primals: tuple, tangents: tuple) -> tuple:
            (y,), (t,) = primals, tangents
            return residual(y), tangent(handle, leaves, y, t)

        return optimise(residual, y0)

    return solve


@dataclasses.dataclass(frozen=True)
class _Run:
    """The solve of one signature: `single(handle, leaves, y0) -> (solution, result
    code, steps)`; `solve`, the same uncompiled, where it is traced (a batch is then
    its `jax.vmap`), `None` where it calls back (a batch is then a loop); `way`, how
    it computes (logged)."""

    single: Callable
    solve: Callable | None
    way: str


def _stacked_y0(batch: Any, y0: dict, ins: Structs, given: bool) -> dict:
    """The initial values of a batch, `{path: (size, ...)}`: `batch.y0`; else the
    payload's `y0` for every problem where it is `given`; else each problem's inputs
    at `wrt` (`y0`, the payload's inputs there, where they do not differ)."""
    if batch.y0 is not None:
        return {p: np.asarray(v, ins[p].dtype) for p, v in batch.y0.items()}
    return {
        p: np.asarray(batch.inputs[p], ins[p].dtype)
        if p in batch.inputs and not given
        else np.broadcast_to(y0[p], (batch.size, *np.shape(y0[p])))
        for p in ins
    }


def _answer(solution: dict, steps: Any, result: Any) -> NonlinearSolveOutputSchema:
    return NonlinearSolveOutputSchema.model_validate(
        {
            "solution": {p: np.asarray(v) for p, v in solution.items()},
            "num_steps": steps,
            "result": result,
        }
    )


class NonlinearSolveFailed(RuntimeError):
    """A solve that failed, asked to `throw`: answered as a 500 carrying
    optimistix's message (its type names this class)."""


class NonlinearSolver:
    """The `/nonlinear_solve` solves of one app: `check(payload)` before a request
    runs, `solve(payload)` to run it.

    **Arguments:**

    - `api_module`: the Tesseract's module (its `apply`).
    - `cached_module`: the module whose `jacobian_vector_product` goes through the
        linearisation cache (`endpoints.stock_endpoints`; the Tesseract's own without
        a cache).
    - `output_shapes`: `inputs -> {path: {"shape", "dtype"}}` from `abstract_eval`,
        or `None` without one.
    - `jaxy`: whether the Tesseract is JAX code; if not, the solve runs with JAX's
        float64 on in its own thread only, as `krylov.LinearSolver`.
    - `cache`: the app's `LinearisationCache`, or `None`: a batch of tangents at one
        point (a dense step solver materialising the Jacobian) then goes through
        its `vmap` of the linearisation, in one call.
    - `pure`: whether the Tesseract is a pure function of its inputs
        (`TESSERACT_LX["pure"]`); a JAX Tesseract is traced into the solve only then.
    - `max_batch`: the most problems one request may carry (`batch.size`).
    """

    def __init__(
        self,
        api_module: Any,
        cached_module: Any,
        output_shapes: Callable[[Any], Any],
        jaxy: bool,
        cache: Any = None,
        pure: bool = True,
        max_batch: int = 1,
    ):
        check_optimistix()
        self.apply_fn = api_module.apply
        self.jvp_fn = getattr(cached_module, JVP)
        self.raw_jvp = getattr(api_module, JVP)
        self.cache = cache
        self.output_shapes = output_shapes
        self.jaxy = jaxy
        self.traceable = jaxy and pure
        self.max_batch = max_batch
        self.names = result_names()
        self._compiled: OrderedDict[Hashable, _Run] = OrderedDict()
        self._lock = threading.Lock()
        self._points: dict[int, Any] = {}
        self._handles = itertools.count()

    # -- the request ---------------------------------------------------------------

    def check(self, payload: Any) -> None:
        """A 422 naming the field for a payload the solve would refuse, as far as the
        structures known before solving tell."""
        ins, outs = self._structures(payload)
        try:
            check_payload(payload, ins, outs, self.max_batch)
        except Invalid as e:
            raise RequestValidationError([e.error]) from None

    def solve(self, payload: Any) -> NonlinearSolveOutputSchema:
        """The answer to a checked payload."""
        precision = jax.enable_x64(True) if not self.jaxy else contextlib.nullcontext()
        with precision, self._at(payload.inputs) as handle:
            ins, outs = self._structures(payload)
            if outs is None:
                outs = self._probe(payload, ins)
            try:
                check_payload(payload, ins, outs, self.max_batch)
            except Invalid as e:
                raise HTTPException(422, [e.error]) from None
            batch = payload.batch
            y0 = payload.y0
            if y0 is None:
                y0 = {p: get_at_path(payload.inputs, p) for p in ins}
            y0 = cast(y0, ins)
            given = payload.y0 is not None
            y0s = {} if batch is None else _stacked_y0(batch, y0, ins, given)
            if size(ins) == 0 or size(outs) == 0:
                # No unknowns or no equations, which optimistix cannot run on:
                # nothing to change, `y0` solves it, in no steps.
                if batch is None:
                    return _answer(y0, 0, "successful")
                return _answer(y0s, [0] * batch.size, ["successful"] * batch.size)
            spec = payload.solver
            tags = tuple(sorted(set(payload.tags)))
            skeleton, arrays = trees.flatten(payload.inputs)
            shapes = (tuple(sorted(ins.items())), tuple(sorted(outs.items())))
            key = (
                shapes,
                trees.key(skeleton),
                spec.model_dump_json(),
                payload.max_steps,
                tags,
            )
            args = (np.int32(handle), [np.asarray(a) for a in arrays.values()], y0)
            run = self._compile(
                key,
                lambda: self._make(
                    ins,
                    outs,
                    spec,
                    payload.max_steps,
                    tags,
                    (payload.inputs, skeleton, list(arrays)),
                    args,
                ),
            )
            if batch is None:
                # Done before the handle is: JAX may return before its callbacks ran.
                value, code, steps = jax.block_until_ready(run.single(*args))
                name = self.names[int(code)]
                self._throw(payload, [name])
                return _answer(value, int(steps), name)
            if run.solve is not None:
                value, codes, steps = self._vmapped(
                    key, run, payload, arrays, args, y0s
                )
            else:
                value, codes, steps = self._looped(run, payload, y0s)
        names = [self.names[int(c)] for c in codes]
        self._throw(payload, names)
        return _answer(value, [int(n) for n in steps], names)

    def _throw(self, payload: Any, names: list[str]) -> None:
        failed = [n for n in names if n != "successful"]
        if payload.throw and failed:
            raise NonlinearSolveFailed(message(failed[0]))

    def _vmapped(
        self, key: Hashable, run: "_Run", payload: Any, arrays: dict, args: tuple, y0s
    ) -> tuple:
        """A batch of problems by `jax.vmap` of the traced solve: one program."""
        batch, (handle, leaves, _) = payload.batch, args
        stacked = {_where(p): v for p, v in batch.inputs.items()}
        axes = [0 if path in stacked else None for path in arrays]
        leaves = [
            np.asarray(stacked[path], np.asarray(leaf).dtype)
            if path in stacked
            else leaf
            for path, leaf in zip(arrays, leaves, strict=True)
        ]
        solve = run.solve
        assert solve is not None
        vrun = self._compile(
            (key, tuple(axes), batch.size),
            lambda: _Run(
                jax.jit(jax.vmap(solve, in_axes=(None, axes, 0))), None, run.way
            ),
        )
        return jax.block_until_ready(vrun.single(handle, leaves, y0s))

    def _looped(self, run: "_Run", payload: Any, y0s: dict) -> tuple:
        """A batch of problems one after the other, each at its own point."""
        batch, out = payload.batch, []
        for i in range(batch.size):
            arrays = {_where(p): np.asarray(v[i]) for p, v in batch.inputs.items()}
            point = trees.rebuild(payload.inputs, (), arrays)
            with self._at(point) as handle:
                y0 = {p: v[i] for p, v in y0s.items()}
                out.append(jax.block_until_ready(run.single(np.int32(handle), [], y0)))
        values, codes, steps = zip(*out, strict=True)
        value = {p: np.stack([np.asarray(v[p]) for v in values]) for p in y0s}
        return value, codes, steps

    def _structures(self, payload: Any) -> tuple[Structs, Structs | None]:
        """`(at wrt, at of)`; the second `None` if `abstract_eval` does not tell."""
        return structures(payload.inputs, payload.wrt, payload.of, self.output_shapes)

    def _probe(self, payload: Any, ins: Structs) -> Structs:
        """The residual's structure when nothing states it: one `apply` tells."""
        out = self.apply_fn(payload.inputs)
        arrays = {p: np.asarray(get_at_path(out, p)) for p in payload.of}
        return {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in arrays.items()}

    # -- the jitted solve ----------------------------------------------------------

    def _make(
        self,
        ins: Structs,
        outs: Structs,
        spec: Any,
        max_steps: int,
        tags: tuple[str, ...],
        point: tuple[Any, Any, list],
        args: tuple,
    ) -> "_Run":
        """The solve of one signature: traced where the Tesseract allows (compiled
        here, for `args`), else by callbacks. `point` is `(inputs, skeleton, array
        paths)`."""
        wrt, of = tuple(ins), tuple(outs)
        solver = optimistix_solver(spec)
        least_squares = spec.name in nonlinear.LEAST_SQUARES
        tag_set = frozenset(getattr(lx, f"{t}_tag") for t in tags)

        def pack(d: dict, keys: tuple) -> Any:
            return d[keys[0]] if len(keys) == 1 else d

        def unpack(x: Any, keys: tuple) -> dict:
            return {keys[0]: x} if len(keys) == 1 else x

        def optimise(residual: Callable[[dict], dict], y0: dict) -> Any:
            def fn(y: Any, args: Any) -> Any:
                return pack(residual(unpack(y, wrt)), of)

            run = optx.least_squares if least_squares else optx.root_find
            sol = run(
                fn,
                solver,
                pack(y0, wrt),
                max_steps=max_steps,
                throw=False,
                tags=tag_set,
            )
            value = unpack(sol.value, wrt)
            return value, result_code(sol.result), sol.stats["num_steps"]

        # The ways to compute the residual and its JVPs, the fastest first: both
        # traced; `apply` by callback (tesseract-core's JAX recipe validates its
        # outputs in `apply`, which tracers do not pass) and the JVPs traced; both by
        # callbacks, which always trace.
        apply_cb, jvp_cb = self._callbacks(wrt, of, ins, outs)
        called = (_called_apply(apply_cb, outs), _called_jvp(jvp_cb, outs))
        ways = []
        if self.traceable:
            apply_tr, jvp_tr, apply_at = self._traced(wrt, of, outs, *point)
            ways = [("apply and JVP traced", apply_tr, jvp_tr)]
            ways += [("apply called back, JVP traced", apply_at, jvp_tr)]
        for way, primal, tangent in ways:
            try:
                solve = jax.jit(_solving(optimise, primal, tangent))
                compiled = solve.lower(*args).compile()
            except Exception as e:  # noqa: BLE001 - any failure to trace: the next way
                logger.info(
                    "/nonlinear_solve: not with the %s, which does not trace under "
                    "jax.jit (%s: %s)",
                    way,
                    type(e).__name__,
                    e,
                )
                continue
            logger.info("/nonlinear_solve: compiled with the %s", way)
            return _Run(compiled, _solving(optimise, primal, tangent), way)
        way = "apply and JVP called back"
        logger.info("/nonlinear_solve: compiled with the %s", way)
        solve = jax.jit(_solving(optimise, *called))
        # The point's arrays stay out of it: the callbacks read the point by handle.
        return _Run(lambda handle, leaves, y0: solve(handle, [], y0), None, way)

    def _traced(
        self, wrt: tuple, of: tuple, outs: Structs, inputs: Any, skeleton: Any, at: list
    ) -> tuple[Callable, Callable, Callable]:
        """`(primal, tangent, called)`: `(handle, leaves, y) -> residual` and
        `(handle, leaves, y, t) -> J t`, the Tesseract's `apply` and JVP traced at
        the point whose arrays (at the paths `at`) are `leaves`, with `y` at `wrt`;
        and `called`, the residual there by a host callback of `apply` (the point
        from the same operands, so a `jax.vmap` over them is a batch of points).
        They keep of the request its structure and non-array values, not its
        arrays."""
        apply_fn, jvp_fn, points = self.apply_fn, self.raw_jvp, self._points
        template = trees.rebuild(inputs, (), dict.fromkeys(at))
        where = {p: _where(p) for p in wrt}

        def values(leaves: list, y: dict) -> dict:
            out = dict(zip(at, leaves, strict=True))
            out.update({where[p]: v for p, v in y.items()})
            return out

        def point(leaves: list, y: dict) -> Any:
            return trees.traced(template, skeleton, values(leaves, y))

        carried = _carried(outs)
        zeros = _to_carried(
            {p: np.zeros(s.shape, s.dtype) for p, s in outs.items()}, outs
        )

        def apply_at(handle: Any, leaves: list, y: dict) -> dict:
            if int(handle) not in points:
                return zeros  # optimistix's placeholder: see `_callbacks`
            arrays = {k: np.asarray(v) for k, v in values(leaves, y).items()}
            out = apply_fn(trees.rebuild(template, (), arrays))
            return _to_carried({p: get_at_path(out, p) for p in of}, outs)

        def called(handle: Any, leaves: list, y: dict) -> dict:
            out = jax.pure_callback(
                apply_at, carried, handle, leaves, y, vmap_method="sequential"
            )
            return _from_carried(out, outs)

        def cast(out: Any) -> dict:
            return {
                p: jax.numpy.asarray(get_at_path(out, p), outs[p].dtype) for p in of
            }

        def primal(handle: Any, leaves: list, y: dict) -> dict:
            return cast(apply_fn(point(leaves, y)))

        def tangent(handle: Any, leaves: list, y: dict, t: dict) -> dict:
            return cast(jvp_fn(point(leaves, y), set(wrt), set(of), t))

        return primal, tangent, called

    def _callbacks(
        self, wrt: tuple, of: tuple, ins: Structs, outs: Structs
    ) -> tuple[Callable, Callable]:
        """The host functions `(handle, y) -> residual` and `(handle, y, t) -> J t`,
        calling the Tesseract's `apply` and JVP at the point of `handle` with `y` at
        `wrt`. They hold no point: they outlive the request that made them."""
        points, apply_fn, jvp_fn = self._points, self.apply_fn, self.jvp_fn
        cache, raw_jvp = self.cache, self.raw_jvp
        ins_shape = {p: tuple(s.shape) for p, s in ins.items()}
        where = {p: _where(p) for p in wrt}

        def at(handle: Any, y: dict) -> Any:
            point = points.get(int(handle))
            if point is None:
                return None
            arrays = {where[p]: np.asarray(v) for p, v in y.items()}
            return trees.rebuild(point, (), arrays)

        def cast_out(out: Any) -> dict:
            return _to_carried(out, outs)

        # optimistix's least-squares solvers fill a placeholder state with zeros
        # (`tree_full_like(..., 0)`), the handle inside a linearisation among them,
        # and evaluate it once; the value is discarded. Handles start at 1, so
        # handle 0 is that placeholder: zeros, and no call of the Tesseract.
        zeros = cast_out({p: np.zeros(s.shape, s.dtype) for p, s in outs.items()})

        def apply_cb(handle: Any, y: dict) -> dict:
            point = at(handle, y)
            if point is None:
                return zeros
            out = apply_fn(point)
            return cast_out({p: get_at_path(out, p) for p in of})

        def jvp_cb(handle: Any, y: dict, t: dict) -> dict:
            # Leading axes of `t` (and size-1 ones of `handle` and `y`) are a
            # batch of tangents at one point (`vmap_method="expand_dims"`).
            first = np.shape(t[wrt[0]])
            lead = first[: len(first) - len(ins_shape[wrt[0]])]
            if np.size(handle) != 1 or any(
                np.size(v) != int(np.prod(ins_shape[p], dtype=np.int64))
                for p, v in y.items()
            ):
                raise RuntimeError("a batch of points reached a JVP at one point")
            handle = np.asarray(handle).reshape(-1)[0]
            y = {p: np.asarray(v).reshape(ins_shape[p]) for p, v in y.items()}
            k = int(np.prod(lead, dtype=np.int64))
            flat = {p: np.asarray(v).reshape(k, *ins_shape[p]) for p, v in t.items()}
            point = at(handle, y)
            if point is None:
                out = {p: np.zeros((k, *s.shape), s.dtype) for p, s in outs.items()}
            else:
                out = _tangents(point, flat, k)
            out = {p: np.reshape(v, (*lead, *outs[p].shape)) for p, v in out.items()}
            return _to_carried(out, {p: _lead(s, lead) for p, s in outs.items()})

        def _tangents(point: Any, flat: dict, k: int) -> dict:
            """`{path: (k, ...)}`: the JVPs of `k` tangents at `point`."""
            if k > 1 and cache is not None:
                batch = cache.call_batch("jvp", raw_jvp, point, set(wrt), set(of), flat)
                if batch is not None:
                    return {p: np.asarray(batch[p]) for p in of}
            each = [
                jvp_fn(point, set(wrt), set(of), {p: v[i] for p, v in flat.items()})
                for i in range(k)
            ]
            return {p: np.stack([np.asarray(e[p]) for e in each]) for p in of}

        return apply_cb, jvp_cb

    @contextlib.contextmanager
    def _at(self, point: Any) -> Iterator[int]:
        """A handle of `point`, for this block (see `krylov.LinearSolver._at`)."""
        handle = next(self._handles) % (2**31 - 1) + 1  # an int32 operand, not 0
        self._points[handle] = point
        try:
            yield handle
        finally:
            del self._points[handle]

    def _compile(self, key: Hashable, make: Callable[[], "_Run"]) -> "_Run":
        with self._lock:
            run = self._compiled.get(key)
        if run is None:
            run = make()
        with self._lock:
            remember(self._compiled, key, run, limit=_MAX_COMPILED)
        return run
