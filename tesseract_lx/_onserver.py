"""`OnServer`: a lineax solver whose Krylov loop runs next to the Tesseract (and, of
an optimistix solver, a whole nonlinear solve there: `_onserver_nonlinear.py`).

`tlx.OnServer(lx.GMRES(rtol=1e-8, atol=1e-8))` is an `lx.AbstractLinearSolver`.
Given a `TesseractJacobianOperator` or a `TesseractLinearOperator` (or a transpose),
or a lineax operator whose map is one Tesseract JVP (optimistix's Newton and
ImplicitAdjoint build those from a `tlx.residual_fn`), on a server that offers
`POST /linear_solve`, `compute` is one request, whatever the number of iterations,
and a `jax.vmap` over right-hand sides is still one request. Anywhere else (another
operator, a stock server) it runs the wrapped solver locally: the same numbers, one
request per mat-vec, and (for a Tesseract operator) `client.decisions` says so.

`transpose` gives the transposed solve on the server, so `jax.grad` and `jax.jvp`
through `lx.linear_solve` cost one more solve request, not one per iteration.
Derivatives with respect to the primal point are refused, as for every
(co)tangent of a Tesseract.
"""

from typing import Any

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

from . import _linear_map as linear_map, _solvers as solvers
from ._batching import Decision
from ._fallback import fall_back
from ._onserver_nonlinear import OnServerLeastSquares, OnServerRootFinder
from ._operator import AbstractTesseractOperator, pack, unpack
from ._primitive import jvp_p
from ._solve import run_solve
from ._wire.spec import LINEAR_SOLVE, VJP


# The tags a server's operator may carry (the rest say nothing a Krylov solver uses).
_TAGS = {
    lx.symmetric_tag: "symmetric",
    lx.positive_semidefinite_tag: "positive_semidefinite",
    lx.negative_semidefinite_tag: "negative_semidefinite",
}


class _Target(eqx.Module):
    """A Jacobian at a point, as `/linear_solve` takes it: the call, its operands
    (the point), the paths differentiated, and whether it is transposed."""

    call: Any = eqx.field(static=True)
    operands: list
    wrt: tuple[str, ...] = eqx.field(static=True)
    of: tuple[str, ...] = eqx.field(static=True)
    ins: tuple = eqx.field(static=True)
    outs: tuple = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)

    @property
    def T(self) -> "_Target":
        return _Target(
            self.call,
            self.operands,
            self.wrt,
            self.of,
            self.ins,
            self.outs,
            self.tags,
            not self.transposed,
        )


def _tags(operator: Any) -> frozenset:
    return frozenset(tag for tag, pred in _PREDICATES.items() if pred(operator))


_PREDICATES = {
    lx.symmetric_tag: lx.is_symmetric,
    lx.positive_semidefinite_tag: lx.is_positive_semidefinite,
    lx.negative_semidefinite_tag: lx.is_negative_semidefinite,
}


def _target(operator: Any) -> tuple[_Target | None, str, Any]:
    """`(target, why not, client)`: the Jacobian behind `operator` if it is one
    Tesseract's, else `None` and the reason; and the Tesseract's client where one
    is involved (to record the decision in).

    A `TesseractJacobianOperator` or `TesseractLinearOperator` (whose Jacobian is the
    operator, at any point) is one; any other operator is one when its `mv` traces to
    a single Tesseract JVP (or VJP) from its whole input to its whole output, at a
    point that does not depend on the input: what optimistix builds from a
    `tlx.residual_fn` (`jax.linearize`, `lx.JacobianLinearOperator`), whatever other
    outputs and inputs the Tesseract has.
    """
    if isinstance(operator, AbstractTesseractOperator):
        call, operands, _, _ = operator._call()
        ins, outs = operator._structure
        target = _Target(
            call,
            list(operands),
            operator.wrt,
            operator.of,
            ins,
            outs,
            frozenset(operator.tags),
            operator.transposed,
        )
        return target, "", call.client
    return _from_jaxpr(operator)


def _from_jaxpr(operator: lx.AbstractLinearOperator) -> tuple[_Target | None, str, Any]:
    one, why, client = linear_map.read(operator.mv, operator.in_structure())
    if one is None:
        return None, why, client
    eqn = one.eqn
    call = eqn.params["call"]
    if eqn.primitive is jvp_p:
        src, dst, transposed = eqn.params["jvp_in"], eqn.params["jvp_out"], False
        src_names, dst_names = call.in_paths, call.out_paths
    else:
        src, dst, transposed = eqn.params["vjp_out"], eqn.params["vjp_in"], True
        src_names, dst_names = call.out_paths, call.in_paths
    # Name every leaf of the operator's vectors by the Tesseract path it stands for.
    in_names = tuple(src_names[src[m]] for m in one.inputs)
    out_names = tuple(dst_names[dst[m]] for m in one.outputs)
    structures = (operator.in_structure(), operator.out_structure())
    for names, structure in zip((in_names, out_names), structures):
        if not _packed(structure, names):
            why = (
                "the operator's vectors are not the Tesseract's arrays (a bare array "
                "for one path, else a dict keyed by path)"
            )
            return None, why, client
    wrt, of = (out_names, in_names) if transposed else (in_names, out_names)
    struct = lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)  # noqa: E731
    leaves = {leaf.path: leaf for leaf in (*call.inputs, *call.outputs)}
    ins = tuple(struct(leaves[p]) for p in wrt)
    outs = tuple(struct(leaves[p]) for p in of)
    tags = _tags(operator)
    return _Target(call, one.point, wrt, of, ins, outs, tags, transposed), "", client


def _packed(structure: Any, names: tuple[str, ...]) -> bool:
    """Whether `structure` is what `pack(names, ...)` makes: the bare array for one
    path, else a dict keyed by path (whose leaves JAX orders by sorted key)."""
    if len(names) == 1:
        return isinstance(structure, jax.ShapeDtypeStruct)
    return (
        isinstance(structure, dict)
        and tuple(sorted(structure)) == names
        and all(isinstance(s, jax.ShapeDtypeStruct) for s in structure.values())
    )


class _ByKind(type(lx.AbstractLinearSolver)):
    """`OnServer(solver)` is of the kind `solver` is: a lineax solver, an optimistix
    root finder, or an optimistix least-squares solver (optimistix tells them apart
    by class, so one class cannot be all three)."""

    def __call__(cls, solver: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cls is OnServer:
            if isinstance(solver, optx.AbstractRootFinder):
                return OnServerRootFinder(solver, *args, **kwargs)
            if isinstance(solver, optx.AbstractLeastSquaresSolver):
                return OnServerLeastSquares(solver, *args, **kwargs)
        return super().__call__(solver, *args, **kwargs)


class OnServer(lx.AbstractLinearSolver, metaclass=_ByKind):
    """Run `solver`'s whole solve on the Tesseract's server: one request per solve.

    **Arguments:**

    - `solver`: a lineax iterative solver: `lx.GMRES`, `lx.BiCGStab`, `lx.CG`,
        `lx.LSMR`, or `lx.Normal` of one of them, with lineax's default norm; or an
        optimistix solver, `optx.Newton`, `optx.Chord` (then this is an
        `optx.AbstractRootFinder`), `optx.GaussNewton` or `optx.LevenbergMarquardt`
        (an `optx.AbstractLeastSquaresSolver`), with optimistix's default norm, and a
        step solver among `lx.LU`, `lx.QR`, `lx.SVD`, `lx.AutoLinearSolver`,
        `lx.GMRES`, `lx.BiCGStab`, `lx.CG` (or `tlx.OnServer` of one).
    - `allow_local`: where the solve cannot go to the server, run `solver` here
        (`True`, the default: the same numbers, one request per mat-vec, with a
        `tlx.FallbackWarning` and a `Decision`) or raise a `ValueError` saying why
        (`False`).
    - `max_steps`: of an optimistix solver only, the most steps the server's solve
        takes (default 256, optimistix's default).

    Used as any lineax solver: `lx.linear_solve(J, b, tlx.OnServer(lx.GMRES(...)))`,
    `optx.Newton(..., linear_solver=tlx.OnServer(...))`. The solve goes to the server
    for a `TesseractJacobianOperator`, a `TesseractLinearOperator` (whose Jacobian is
    the operator), their transposes, and any lineax operator whose `mv` is one
    Tesseract JVP or VJP at a fixed point: the operators optimistix builds from a
    `tlx.residual_fn`, whatever other inputs and outputs the Tesseract has.
    `options={"y0": ...}` goes with it where the server says it takes one.

    It runs `solver` here instead (as the solve is traced: once per compiled solve,
    a `tlx.FallbackWarning`, and a `Decision` with `chosen="local"` and the reason in
    `client.decisions` where a Tesseract is involved) for any other operator, a
    server without `/linear_solve` (a stock `tesseract-runtime serve`), LSMR or
    Normal where the server has no VJP to use inside its loop, a `preconditioner`
    (an operator of this process), and options the server does not say it takes.

    A solve that fails on the server (`max_steps` reached, breakdown) reports
    lineax's own result, so `throw=True` raises lineax's error.

    **Of an optimistix solver**, `optx.root_find(tlx.residual_fn(f, wrt=..., of=...),
    tlx.OnServer(optx.Newton(...)), y0, args)` (and `optx.least_squares` likewise) is
    one `/nonlinear_solve` request, whatever the number of steps: the server runs
    optimistix on the Tesseract in process. `sol.stats["num_steps"]` is the server's
    steps, `sol.result` its result, so `throw=True` raises optimistix's own message.
    The server's solve takes at most 256 steps (optimistix's default `max_steps`;
    `root_find`'s own `max_steps` bounds the steps counted here). A `jax.vmap` over
    `y0` or `args` is one request for the whole batch (chunks of the server's
    `max_batch`). Gradients through the solution go
    through optimistix's adjoint here (`ImplicitAdjoint`: the Jacobian at the root,
    materialised by the module's batching rule, and one VJP; with
    `ImplicitAdjoint(linear_solver=tlx.OnServer(lx.GMRES(...)))` one
    `/linear_solve` and one VJP). It runs `solver` here instead, with a
    `tlx.FallbackWarning` and a `Decision` (or a `ValueError` with
    `allow_local=False`), where the residual is not one Tesseract's outputs as a
    function of its inputs, the server has no `/nonlinear_solve` or does not run
    the solver, `options` are given, or `has_aux=True`.
    """

    solver: lx.AbstractLinearSolver
    allow_local: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        solvers.to_spec(self.solver)  # a TypeError naming the solvers that travel
        if not isinstance(self.allow_local, bool):
            raise TypeError(
                f"`allow_local` must be True or False, got {self.allow_local!r}."
            )

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        target, why, client = _target(operator)
        if target is not None:
            why = _refusal(target, self.solver, options)
        if not why:
            return target, None
        name = type(self.solver).__name__
        if not self.allow_local:
            raise ValueError(
                f"`tlx.OnServer({name}(...), allow_local=False)` cannot send this "
                f"solve to the server: {why}."
            )
        reason = f"`OnServer({name})` solves here, one request per mat-vec: {why}"
        decision = Decision(LINEAR_SOLVE, 1, "local", {}, reason, fallback=True)
        fall_back(client, decision, stacklevel=5)
        return None, self.solver.init(operator, options)

    def compute(self, state, vector, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            return self.solver.compute(local, vector, options)
        return _solve(operator, vector, self.solver, options.get("y0"))

    def transpose(self, state, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            local, options = self.solver.transpose(local, options)
            return (None, local), options
        # As lineax's solvers: an initial guess does not carry over to the transpose.
        return (operator.T, None), {}

    def conj(self, state, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            local, options = self.solver.conj(local, options)
            return (None, local), options
        return state, options  # a Tesseract's Jacobian is real (complex is refused)

    def assume_full_rank(self) -> bool:
        return self.solver.assume_full_rank()


def _needs_transpose(solver: Any) -> bool:
    """Whether `solver` multiplies by the operator's transpose inside one solve."""
    return isinstance(solver, lx.LSMR | lx.Normal)


def _refusal(target: _Target, solver: Any, options: dict[str, Any]) -> str:
    """Why this solve cannot go to the target's server; `""` if it can."""
    client = target.call.client
    if not client.schema.has(LINEAR_SOLVE):
        return (
            "the server does not offer `/linear_solve` (a stock `tesseract-runtime "
            "serve`; `tesseract-lx serve` does)"
        )
    if _needs_transpose(solver):
        function = client.capabilities.mode(LINEAR_SOLVE) == "function"
        if function and not client.schema.has(VJP):
            # The server's loop calls the Tesseract's own functions, and LSMR and
            # Normal need its VJP too.
            return (
                f"{type(solver).__name__} needs the transpose of the Jacobian inside "
                "the solve, and this server's `/linear_solve` calls the Tesseract's "
                "own functions (mode `function`), which have no "
                "`vector_jacobian_product`"
            )
    if "preconditioner" in options:
        return (
            "`options['preconditioner']` is an operator of this process, which the "
            "server cannot apply"
        )
    taken = set(getattr(client.capabilities, "linear_solve_options", ()))
    unsent = sorted(set(options) - taken)
    if unsent:
        said = ", ".join(f"`{o}`" for o in sorted(taken)) or "none"
        return (
            f"the server does not say it takes the option(s) "
            f"{', '.join(f'`{o}`' for o in unsent)} (it takes: {said})"
        )
    return ""


def _solve(target: _Target, vector: Any, solver: Any, y0: Any = None):
    """One `/linear_solve` request: `(solution, result, stats)` as lineax wants."""
    call, operands = target.call, target.operands
    ins, outs = target.ins, target.outs
    # J x = b: b at the outputs `of`, x at the inputs `wrt`; J^T x = b the reverse.
    if target.transposed:
        rhs_paths, sol_paths = target.wrt, target.of
        rhs_structs, sol_structs = ins, outs
    else:
        rhs_paths, sol_paths = target.of, target.wrt
        rhs_structs, sol_structs = outs, ins
    rhs = unpack(rhs_paths, vector, rhs_structs)
    guess = [] if y0 is None else _initial_guess(y0, sol_paths, sol_structs)
    spec = solvers.to_spec(solver)
    tags = sorted(name for tag, name in _TAGS.items() if tag in target.tags)
    n_operands, n_rhs = len(operands), len(rhs)
    result_shapes = (
        *(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in sol_structs),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def host(*arrays):
        arrays = [np.asarray(a) for a in arrays]
        return run_solve(
            call,
            arrays[:n_operands],
            arrays[n_operands : n_operands + n_rhs],
            y0=arrays[n_operands + n_rhs :] or None,
            wrt=target.wrt,
            of=target.of,
            rhs_paths=rhs_paths,
            rhs_shapes=[s.shape for s in rhs_structs],
            sol_paths=sol_paths,
            sol_structs=sol_structs,
            transpose=target.transposed,
            spec=spec,
            tags=tags,
        )

    *solution, code, steps = jax.pure_callback(
        host, result_shapes, *operands, *rhs, *guess, vmap_method="expand_dims"
    )
    result = lx.RESULTS.successful
    for i, name in enumerate(solvers.RESULTS_NAMES):
        item = getattr(lx.RESULTS, name)
        result = lx.RESULTS.where(code == i, item, result)
    value = pack(sol_paths, list(solution))
    return value, result, {"num_steps": steps}


def _initial_guess(y0: Any, paths: tuple[str, ...], structs: tuple) -> list:
    """`options["y0"]`'s leaves; refused as lineax refuses it unless it has the
    solution's structure, shapes and dtypes."""
    want = pack(paths, list(structs))
    got = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), y0
    )
    if jax.tree.structure(got) != jax.tree.structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ):
        raise ValueError(
            "`y0` must have the same structure, shape, and dtype as the solution "
            f"(expected {want}, got {got})."
        )
    return [y0] if len(paths) == 1 else [y0[p] for p in paths]
