"""`tlx.OnServer(optx.Newton(...))`: a whole optimistix solve next to the Tesseract.

`tlx.OnServer` of an optimistix root finder (`optx.Newton`, `optx.Chord`) is an
`optx.AbstractRootFinder`, of a least-squares solver (`optx.GaussNewton`,
`optx.LevenbergMarquardt`) an `optx.AbstractLeastSquaresSolver`. Where the problem
is one Tesseract's residual (`_nonlinear_problem.py`) on a server that runs the
solver (`x-tesseract-lx["nonlinear_solvers"]`), `init` sends the one
`/nonlinear_solve` request (a side-effect-free host callback, planned when traced),
and optimistix's loop then only counts the server's steps: `sol.stats["num_steps"]`
is the server's, and its result optimistix's own (so `throw=True` raises
optimistix's message). Anywhere else the wrapped solver runs here, with a
`tlx.FallbackWarning` and a `Decision`, or a `ValueError` with `allow_local=False`.
"""

import json
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Int, PyTree

from . import _nonlinear_problem as problem, _nonlinear_spec as spec_of
from ._answers import check_finite, malformed, size
from ._batching import Decision
from ._fallback import fall_back
from ._operator import pack, unpack
from ._wire.spec import NONLINEAR_SOLVE


_TAGS = {
    "symmetric": "symmetric_tag",
    "positive_semidefinite": "positive_semidefinite_tag",
    "negative_semidefinite": "negative_semidefinite_tag",
}


class _State(eqx.Module):
    """Either the wrapped solver's state (`local`), or the server's answer: its
    solution, result and steps, and the steps optimistix's loop has counted."""

    local: Any
    solution: PyTree | None
    result: optx.RESULTS | None
    steps: Int[Array, ""] | None
    counted: Int[Array, ""] | None


def _packed(structure: Any, names: tuple[str, ...]) -> bool:
    """Whether `structure` is a bare array for one path, a dict keyed by path else."""
    if len(names) == 1:
        return isinstance(structure, jax.ShapeDtypeStruct)
    return (
        isinstance(structure, dict)
        and tuple(sorted(structure)) == tuple(sorted(names))
        and all(isinstance(s, jax.ShapeDtypeStruct) for s in structure.values())
    )


def _refusal(found: problem.Residual, wrapper: Any, y: Any, options, aux_struct) -> str:
    """Why this solve cannot go to the server; `""` if it can."""
    client = found.call.client
    caps = client.capabilities
    name = type(wrapper.solver).__name__
    if not client.schema.has(NONLINEAR_SOLVE):
        return (
            "the server does not offer `/nonlinear_solve` (a stock `tesseract-runtime "
            "serve`; `tesseract-lx serve` does)"
        )
    if name not in caps.nonlinear_solvers:
        return f"the server does not run {name} (it runs: {caps.nonlinear_solvers})"
    step = json.loads(wrapper.spec)["linear_solver"]["name"]
    if step not in caps.nonlinear_step_solvers:
        return f"the server does not run steps with {step}"
    if options:
        return (
            f"the options {sorted(options)} are not sent to the server (it takes none)"
        )
    if jax.tree.leaves(aux_struct):
        return "`has_aux=True`: the auxiliary output is computed here"
    structure = jax.eval_shape(lambda: y)
    if not _packed(structure, found.wrt):
        return "`y` is not the Tesseract's input arrays (a bare array, or by path)"
    return ""


def _init(self, fn, y, args, options, f_struct, aux_struct, tags) -> _State:
    found, why, client = problem.read(fn, y, args)
    if found is not None:
        why = _refusal(found, self, y, options, aux_struct)
        if not why and not _packed(f_struct, found.of):
            why = "the residual is not the Tesseract's output arrays (bare, or by path)"
    if why:
        name = type(self.solver).__name__
        if not self.allow_local:
            raise ValueError(
                f"`tlx.OnServer({name}(...), allow_local=False)` cannot send this "
                f"solve to the server: {why}."
            )
        reason = f"`OnServer({name})` solves here, one request per step or more: {why}"
        decision = Decision(NONLINEAR_SOLVE, 1, "local", {}, reason, fallback=True)
        fall_back(client, decision, stacklevel=6)
        local = self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)
        return _State(local, None, None, None, None)
    assert found is not None
    tag_names = sorted(
        n for n, attr in _TAGS.items() if getattr(optx, attr, None) in tags
    )
    solution, result, steps = _send(found, y, self, tag_names)
    return _State(None, solution, result, steps, jnp.array(0, jnp.int32))


def _step(self, fn, y, args, options, state: _State, tags):
    if state.local is not None:
        new_y, local, aux = self.solver.step(fn, y, args, options, state.local, tags)
        return new_y, eqx.tree_at(lambda s: s.local, state, local), aux
    assert state.counted is not None
    counted = state.counted + 1
    return state.solution, eqx.tree_at(lambda s: s.counted, state, counted), None


def _terminate(self, fn, y, args, options, state: _State, tags):
    if state.local is not None:
        return self.solver.terminate(fn, y, args, options, state.local, tags)
    assert state.counted is not None and state.steps is not None
    assert state.result is not None
    # The loop counts the server's steps (at least one: `y` becomes the solution),
    # then ends with the server's result.
    done = state.counted >= jnp.maximum(state.steps, 1)
    result = optx.RESULTS.where(done, state.result, optx.RESULTS.successful)
    return done, result


def _postprocess(self, fn, y, aux, args, options, state: _State, tags, result):
    if state.local is not None:
        return self.solver.postprocess(
            fn, y, aux, args, options, state.local, tags, result
        )
    return y, aux, {}


def _send(found: problem.Residual, y: Any, wrapper: Any, tags: list[str]):
    """The `/nonlinear_solve` request: `(solution, result, steps)`. Under `jax.vmap`
    the callback gets the whole batch of problems, sent as one request (chunks of
    the server's `max_batch`) where the server takes a `batch`, else one each."""
    call, wrt, of = found.call, found.wrt, found.of
    leaves = {leaf.path: leaf for leaf in call.inputs}
    structs = [jax.ShapeDtypeStruct(leaves[p].shape, leaves[p].dtype) for p in wrt]
    y_leaves = unpack(wrt, y, structs)
    fixed = [(i, v) for i, v in enumerate(found.point) if v is not None]
    at_y = [i for i, v in enumerate(found.point) if v is None]
    # `y`'s leaves sit at the operands `at_y`, in `call.in_paths` order.
    order = {p: k for k, p in enumerate(wrt)}
    operands = [v for _, v in fixed] + [y_leaves[order[call.in_paths[i]]] for i in at_y]
    where = [i for i, _ in fixed] + at_y
    ranks = [jnp.ndim(v) for v in operands]
    request = {
        "wrt": list(wrt),
        "of": list(of),
        "solver": json.loads(wrapper.spec),
        "max_steps": wrapper.max_steps,
        "tags": tags,
    }

    def host(*arrays):
        arrays = [np.asarray(a) for a in arrays]
        lead = arrays[0].shape[: arrays[0].ndim - ranks[0]]
        full = np.broadcast_shapes(*(a.shape[: len(lead)] for a in arrays))
        n = int(np.prod(full, dtype=np.int64))
        # Each operand as `(n, ...)` where it varies over the batch, `(1, ...)` where
        # it does not (`expand_dims` gives it leading axes of size 1).
        flat = [
            np.broadcast_to(a, (*full, *a.shape[len(lead) :])).reshape(
                (n, *a.shape[len(lead) :])
            )
            if a.shape[: len(lead)] != (1,) * len(lead)
            else a.reshape((1, *a.shape[len(lead) :]))
            for a in arrays
        ]
        varying = [k for k, a in enumerate(flat) if a.shape[0] > 1]
        caps = call.client.capabilities
        chunk = max(int(caps.max_batch or 1), 1) if caps.nonlinear_batch else 1
        answers = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            answers.extend(_request(start, stop, flat, varying))
        solution = [np.stack([a[k] for a in answers]) for k in range(len(wrt))]
        codes, steps = (np.array([a[k] for a in answers], np.int32) for k in (-2, -1))
        return (
            *(v.reshape((*full, *v.shape[1:])) for v in solution),
            codes.reshape(full),
            steps.reshape(full),
        )

    def _request(start: int, stop: int, flat: list, varying: list) -> list:
        """The answers of problems `start:stop`, each as `_take` gives it: one
        request (a `batch` when there are several)."""
        values: list = list(found.point)
        for k, i in enumerate(where):
            values[i] = flat[k][start if k in varying else 0]
        payload = {"inputs": call.payload(values), **request}
        point = [np.asarray(v) for v in values]
        if stop - start == 1:
            answer = call.client.request(NONLINEAR_SOLVE, payload, size=size(point))
            return [_take(call, answer, wrt, structs)]
        stacked = {call.in_paths[where[k]]: flat[k][start:stop] for k in varying}
        payload["batch"] = {"size": stop - start, "inputs": stacked}
        answer = call.client.request(
            NONLINEAR_SOLVE, payload, size=size(point), k=stop - start
        )
        return _take_batch(call, answer, wrt, structs, stop - start)

    result_shapes = (
        *structs,
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    *solution, code, steps = jax.pure_callback(
        host, result_shapes, *operands, vmap_method="expand_dims"
    )
    result = optx.RESULTS.successful
    for i, name in enumerate(spec_of.RESULTS_NAMES):
        result = optx.RESULTS.where(code == i, getattr(optx.RESULTS, name), result)
    # In `y`'s own dtypes: optimistix's loop carries `y` as it was given.
    given = [y] if len(wrt) == 1 else [y[p] for p in wrt]
    solution = [s.astype(jnp.result_type(g)) for s, g in zip(solution, given)]
    return pack(wrt, solution), result, steps


def _take_batch(
    call: Any, answer: Any, wrt: tuple[str, ...], structs: list, n: int
) -> list:
    """The answers of a batch of `n` problems, each as `_take` gives it."""
    get = answer.get if isinstance(answer, dict) else lambda _: None
    solution, names, steps = get("solution"), get("result"), get("num_steps")
    if not (
        isinstance(solution, dict)
        and isinstance(names, list)
        and isinstance(steps, list)
        and len(names) == len(steps) == n
    ):
        raise malformed(
            call,
            NONLINEAR_SOLVE,
            f"the answer to a batch of {n} lacks `solution`, or a `result` and "
            f"`num_steps` for each problem",
        )
    arrays = {p: np.asarray(solution.get(p)) for p in wrt}
    return [
        _take(
            call,
            {
                "solution": {
                    p: a[i] if a.ndim and a.shape[0] == n else None
                    for p, a in arrays.items()
                },
                "result": names[i],
                "num_steps": steps[i],
            },
            wrt,
            structs,
        )
        for i in range(n)
    ]


def _take(call: Any, answer: Any, wrt: tuple[str, ...], structs: list) -> tuple:
    """An answer's solution, result code and steps, checked."""
    try:
        solution, name, steps = (
            answer["solution"],
            answer["result"],
            answer["num_steps"],
        )
    except (KeyError, TypeError):
        raise malformed(
            call,
            NONLINEAR_SOLVE,
            "the answer lacks `solution`, `result` or `num_steps`",
        ) from None
    out = []
    for path, s in zip(wrt, structs):
        value = np.asarray(solution.get(path)) if isinstance(solution, dict) else None
        if value is None or value.shape != tuple(s.shape):
            got = None if value is None else value.shape
            raise malformed(
                call,
                NONLINEAR_SOLVE,
                f"the answer has `solution.{path}` with shape {got}; "
                f"{tuple(s.shape)} was expected",
            )
        check_finite(call, NONLINEAR_SOLVE, path, value, 1)
        out.append(value.astype(s.dtype, copy=False))
    if name not in spec_of.RESULTS_NAMES or not isinstance(steps, int | np.integer):
        raise malformed(
            call,
            NONLINEAR_SOLVE,
            f"the answer has result {name!r} and num_steps {steps!r}; this "
            f"optimistix knows {', '.join(spec_of.RESULTS_NAMES)}",
        )
    code = spec_of.RESULTS_NAMES.index(name)
    return (*out, np.int32(code), np.int32(int(steps)))


def _spec(solver: Any, allow_local: Any, max_steps: Any) -> str:
    """The solver's JSON, made once when the wrapper is (its settings are concrete
    then, not traced); a `TypeError` naming what does not travel."""
    if not isinstance(allow_local, bool):
        raise TypeError(f"`allow_local` must be True or False, got {allow_local!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"`max_steps` must be a positive integer (the server's steps), got "
            f"{max_steps!r}."
        )
    return json.dumps(spec_of.to_spec(solver), sort_keys=True)


class OnServerRootFinder(optx.AbstractRootFinder):
    """`tlx.OnServer` of an optimistix root finder: see `tlx.OnServer`."""

    solver: optx.AbstractRootFinder
    allow_local: bool = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    spec: str = eqx.field(static=True)

    def __init__(
        self,
        solver: optx.AbstractRootFinder,
        allow_local: bool = True,
        max_steps: int = 256,
    ):
        self.spec = _spec(solver, allow_local, max_steps)
        self.solver = solver
        self.allow_local = allow_local
        self.max_steps = max_steps

    @property
    def rtol(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.rtol

    @property
    def atol(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.solver.norm

    init = _init
    step = _step
    terminate = _terminate
    postprocess = _postprocess


class OnServerLeastSquares(optx.AbstractLeastSquaresSolver):
    """`tlx.OnServer` of an optimistix least-squares solver: see `tlx.OnServer`."""

    solver: optx.AbstractLeastSquaresSolver
    allow_local: bool = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    spec: str = eqx.field(static=True)

    def __init__(
        self,
        solver: optx.AbstractLeastSquaresSolver,
        allow_local: bool = True,
        max_steps: int = 256,
    ):
        self.spec = _spec(solver, allow_local, max_steps)
        self.solver = solver
        self.allow_local = allow_local
        self.max_steps = max_steps

    @property
    def rtol(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.rtol

    @property
    def atol(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.solver.norm

    init = _init
    step = _step
    terminate = _terminate
    postprocess = _postprocess
