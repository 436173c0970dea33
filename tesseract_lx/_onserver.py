"""`OnServer`: a lineax solver whose Krylov loop runs next to the Tesseract.

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

from ._batching import Decision
from ._operator import AbstractTesseractOperator, pack, unpack
from ._primitive import jvp_p, vjp_p
from ._wire import solvers
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


def _target(operator: Any) -> _Target | None:
    """The Jacobian behind `operator`, if it is one Tesseract's on a server with
    `/linear_solve`: a `TesseractJacobianOperator`, a `TesseractLinearOperator` (its
    Jacobian is the operator, at any point), or a lineax operator whose map is
    a single Tesseract JVP (or VJP) of its whole input, as optimistix builds them
    (`jax.linearize` of a `tlx.residual_fn`). `None` otherwise."""
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
    else:
        if isinstance(operator, lx.JacobianLinearOperator):
            operator = lx.linearise(operator)
        if not isinstance(operator, lx.FunctionLinearOperator):
            return None
        target = _from_jaxpr(operator)
        if target is None:
            return None
    return target if target.call.client.schema.has(LINEAR_SOLVE) else None


def _from_jaxpr(operator: lx.FunctionLinearOperator) -> _Target | None:
    """A `FunctionLinearOperator` whose (closure-converted) map is exactly one
    `tesseract_jvp` or `tesseract_vjp` equation from its inputs to its outputs."""
    fn = operator.fn
    closed = getattr(fn, "jaxpr", None)
    consts = getattr(fn, "consts", None)
    if closed is None or consts is None:
        return None
    jaxpr = getattr(closed, "jaxpr", closed)
    if len(jaxpr.eqns) != 1:
        return None
    (eqn,) = jaxpr.eqns
    if eqn.primitive not in (jvp_p, vjp_p) or any(eqn.params["batched"]):
        return None
    call = eqn.params["call"]
    n = len(call.in_paths)
    if list(eqn.invars[n:]) != list(jaxpr.invars) or list(eqn.outvars) != list(
        jaxpr.outvars
    ):
        return None
    values = dict(zip(jaxpr.constvars, consts))
    operands = []
    for v in eqn.invars[:n]:
        if isinstance(v, jax.extend.core.Literal):
            operands.append(v.val)
        elif v in values:
            operands.append(values[v])
        else:
            return None  # the point depends on the operator's input: not linear
    if eqn.primitive is jvp_p:
        src, dst, transposed = eqn.params["jvp_in"], eqn.params["jvp_out"], False
    else:
        src, dst, transposed = eqn.params["vjp_in"], eqn.params["vjp_out"], True
    wrt = tuple(call.in_paths[i] for i in src)
    of = tuple(call.out_paths[j] for j in dst)
    struct = lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)  # noqa: E731
    ins = tuple(struct(call.inputs[i]) for i in src)
    outs = tuple(struct(call.outputs[j]) for j in dst)
    # The operator's vectors must be what `_solve` packs: a bare array for one path,
    # else a dict keyed by path (JAX flattens it by sorted key: the eqn's order).
    structures = (operator.in_structure(), operator.out_structure())
    sides = (of, wrt) if transposed else (wrt, of)
    for names, structure in zip(sides, structures):
        if len(names) == 1:
            ok = not isinstance(structure, dict | list | tuple)
        else:
            ok = isinstance(structure, dict) and sorted(structure) == list(names)
        if not ok:
            return None
    tags = frozenset(operator.tags)
    return _Target(call, operands, wrt, of, ins, outs, tags, transposed)


class OnServer(lx.AbstractLinearSolver):
    """Run `solver`'s whole solve on the Tesseract's server: one request per solve.

    **Arguments:**

    - `solver`: a lineax iterative solver: `lx.GMRES`, `lx.BiCGStab`, `lx.CG`,
        `lx.LSMR`, or `lx.Normal` of one of them, with lineax's default norm.

    Used as any lineax solver: `lx.linear_solve(J, b, tlx.OnServer(lx.GMRES(...)))`,
    `optx.Newton(..., linear_solver=tlx.OnServer(...))`. The solve goes to the server
    for a `TesseractJacobianOperator`, a `TesseractLinearOperator` (whose Jacobian is
    the operator), their transposes, and the operators optimistix builds from a
    `tlx.residual_fn`, on a `tesseract-lx serve` server; anything else runs `solver`
    here, one request per mat-vec, and records a `Decision` with `chosen="local"` in
    `client.decisions` where it knows the client (as the solve is traced: once per
    compiled solve). A solve that fails on the
    server (`max_steps` reached, breakdown) reports lineax's own result, so
    `throw=True` raises lineax's error.
    """

    solver: lx.AbstractLinearSolver

    def __check_init__(self):
        solvers.to_spec(self.solver)  # a TypeError naming the solvers that travel

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        target = _target(operator)
        client = _client(operator)
        why = (
            "the server does not offer `/linear_solve`, or the operator is not one "
            "Tesseract's Jacobian"
        )
        if target is not None and _needs_transpose(self.solver):
            client = target.call.client
            function = client.capabilities.mode(LINEAR_SOLVE) == "function"
            if function and not client.schema.has(VJP):
                # The server's loop calls the Tesseract's own functions, and
                # LSMR and Normal need its VJP too.
                why = (
                    f"{type(self.solver).__name__} needs the transpose of the Jacobian "
                    "inside the solve, and this server's `/linear_solve` calls the "
                    "Tesseract's own functions (mode `function`), which have no "
                    "`vector_jacobian_product`"
                )
                target = None
        if target is not None:
            return target, None
        if client is not None:
            reason = f"the solve runs here, one request per mat-vec: {why}"
            client.decisions.append(Decision(LINEAR_SOLVE, 1, "local", {}, reason))
        return None, self.solver.init(operator, options)

    def compute(self, state, vector, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            return self.solver.compute(local, vector, options)
        return _solve(operator, vector, self.solver)

    def transpose(self, state, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            local, options = self.solver.transpose(local, options)
            return (None, local), options
        return (operator.T, None), options

    def conj(self, state, options: dict[str, Any]):
        operator, local = state
        if operator is None:
            local, options = self.solver.conj(local, options)
            return (None, local), options
        return state, options  # Tesseracts compute over the reals

    def assume_full_rank(self) -> bool:
        return self.solver.assume_full_rank()


def _needs_transpose(solver: Any) -> bool:
    """Whether `solver` multiplies by the operator's transpose inside one solve."""
    return isinstance(solver, lx.LSMR | lx.Normal)


def _client(operator: Any) -> Any:
    """The client of a Tesseract operator, to record a decision in; else `None`."""
    if isinstance(operator, AbstractTesseractOperator):
        return operator.module.client
    return None


def _solve(target: _Target, vector: Any, solver: Any):
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
    spec = solvers.to_spec(solver)
    tags = sorted(name for tag, name in _TAGS.items() if tag in target.tags)
    n_operands = len(operands)
    result_shapes = (
        *(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in sol_structs),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def host(*arrays):
        from ._dispatch import run_solve

        return run_solve(
            call,
            [np.asarray(a) for a in arrays[:n_operands]],
            [np.asarray(a) for a in arrays[n_operands:]],
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
        host, result_shapes, *operands, *rhs, vmap_method="expand_dims"
    )
    result = lx.RESULTS.successful
    for i, name in enumerate(solvers.RESULTS_NAMES):
        item = getattr(lx.RESULTS, name)
        result = lx.RESULTS.where(code == i, item, result)
    value = pack(sol_paths, list(solution))
    return value, result, {"num_steps": steps}
