"""lineax operators on a Tesseract, against `jnp.linalg.solve` of the pure-JAX Jacobian.

Operators x solvers x transports (a stock tesseract-runtime server, a tesseract-lx
server, in process), as lineax tests its own operators; each test asserts the exact
requests sent. Grids are 4 x 4 (16 unknowns) so the suite stays fast.
"""

import collections
import dataclasses
import functools
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx

from helpers import (
    ALL_CASES,
    BATCHED,
    has_batched,
    JVP,
    schema_fixes_outputs,
    Tol,
    TRANSPORTS,
    VJP,
)


N = 4
SIZE = N * N
_T = TypeVar("_T")
TOL = Tol(rtol=1e-8, atol=1e-8)
KRYLOV = Tol(rtol=1e-10, atol=1e-10)
SPD = frozenset({lx.positive_semidefinite_tag, lx.symmetric_tag})
STRUCTURE = jax.ShapeDtypeStruct((N, N), jnp.float64)


def _materialising(transport: str) -> str:
    """The one request that materialises a Jacobian (or its transpose) over
    `transport`: the Jacobian itself (bratu and poisson serve `/jacobian`), no
    identity uploaded."""
    return "jacobian"


def _vector(seed: int = 1, shape=(N, N)) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape))


#
# Operators, each with the pure-JAX matrix it stands for
#


@dataclasses.dataclass(frozen=True)
class OperatorCase:
    tesseract: str
    linear: bool  # `TesseractLinearOperator` (else `TesseractJacobianOperator`)
    wrt: str
    of: str
    tags: frozenset = frozenset()

    def inputs(self) -> dict:
        return ALL_CASES[self.tesseract].inputs()

    def make(self, client: tlx.Client, inputs=None, *, batching: str = "auto"):
        cls = (
            tlx.TesseractLinearOperator
            if self.linear
            else tlx.TesseractJacobianOperator
        )
        f = tlx.TesseractModule(client, batching)
        inputs = self.inputs() if inputs is None else inputs
        return cls(f, inputs, self.wrt, self.of, tags=self.tags)

    def matrix(self, inputs=None) -> jax.Array:
        inputs = self.inputs() if inputs is None else inputs
        ref = ALL_CASES[self.tesseract].ref
        x = inputs[self.wrt]
        jac = jax.jacfwd(lambda w: ref({**inputs, self.wrt: w})[self.of])(x)
        return jac.reshape(-1, x.size)

    @property
    def symmetric(self) -> bool:
        return lx.symmetric_tag in self.tags

    @property
    def forward(self) -> str:
        """The endpoint of one `mv`."""
        return "apply" if self.linear else JVP

    @property
    def backward(self) -> str:
        """The endpoint of one `.T.mv` (the operator itself when tagged symmetric)."""
        return self.forward if self.symmetric else VJP


OPERATORS = {
    "bratu_jacobian": OperatorCase("bratu", False, "u", "residual"),
    "poisson_jacobian_spd": OperatorCase("poisson", False, "x", "y", SPD),
    "poisson_linear": OperatorCase("poisson", True, "x", "y"),
}

# name -> (solver, what it asks of the operator, needs a positive definite operator)
SOLVERS = {
    "lu": (lx.LU(), "matrix", False),
    "qr": (lx.QR(), "matrix", False),
    "svd": (lx.SVD(), "matrix", False),
    "cholesky": (lx.Cholesky(), "matrix", True),
    "cg": (lx.CG(**KRYLOV), "mv", True),
    "gmres": (lx.GMRES(**KRYLOV), "mv", False),
    "bicgstab": (lx.BiCGStab(**KRYLOV), "mv", False),
    "lsmr": (lx.LSMR(**KRYLOV), "mv and T.mv", False),
    "normal_cg": (lx.Normal(lx.CG(**KRYLOV)), "mv and T.mv", False),
    "auto_well_posed": (lx.AutoLinearSolver(well_posed=True), "matrix", False),
    "auto_ill_posed": (lx.AutoLinearSolver(well_posed=False), "matrix", False),
}
# `tesseract` first: the conftest starts the servers parametrised tests ask for.
SOLVE_CASES = [
    (op.tesseract, o, s)
    for o, op in OPERATORS.items()
    for s, (_, _, spd) in SOLVERS.items()
    if op.tags >= SPD or not spd
]
# One solver per way of using the operator: a matrix, `mv`, `mv` and `.T.mv`.
REPRESENTATIVE = ("lu", "gmres", "lsmr")
REPRESENTATIVE_CASES = [c for c in SOLVE_CASES if c[2] in REPRESENTATIVE]
OTHER_CASES = [c for c in SOLVE_CASES if c[2] not in REPRESENTATIVE]
OPERATOR_CASES = [(op.tesseract, o) for o, op in OPERATORS.items()]
COUNTED_CASES = [
    ("bratu", "bratu_jacobian", "gmres"),
    ("bratu", "bratu_jacobian", "bicgstab"),
    ("bratu", "bratu_jacobian", "lsmr"),
    ("bratu", "bratu_jacobian", "normal_cg"),
    ("poisson", "poisson_jacobian_spd", "cg"),
    ("poisson", "poisson_linear", "lsmr"),
]

parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)
parametrize_operator = pytest.mark.parametrize("tesseract,operator", OPERATOR_CASES)


#
# Counting mat-vecs, to check that a Krylov solve sends one request per mat-vec
#


class _Tally:
    def __init__(self):
        self.counts = collections.Counter()

    def bump(self, key: str) -> None:
        self.counts[key] += 1


class _Counted(lx.AbstractLinearOperator):
    """Counts the `mv`s (and `.T.mv`s) lineax asks of `operator` at run time."""

    operator: lx.AbstractLinearOperator
    tally: _Tally = eqx.field(static=True)
    key: str = eqx.field(static=True, default="mv")

    def mv(self, vector):
        jax.debug.callback(functools.partial(self.tally.bump, self.key))
        return self.operator.mv(vector)

    def as_matrix(self):
        return self.operator.as_matrix()

    def transpose(self):
        if lx.is_symmetric(self.operator):
            return self
        key = "T.mv" if self.key == "mv" else "mv"
        return _Counted(self.operator.T, self.tally, key)

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


def _forward(fn: "functools._SingleDispatchCallable[_T]") -> None:
    """`fn` of a `_Counted` is `fn` of the operator it counts."""
    fn.register(_Counted)(lambda operator: fn(operator.operator))


_forward(lx.diagonal)
_forward(lx.tridiagonal)
for _fn in (  # the predicates: each returns a `bool`
    lx.is_symmetric,
    lx.is_diagonal,
    lx.is_tridiagonal,
    lx.has_unit_diagonal,
    lx.is_lower_triangular,
    lx.is_upper_triangular,
    lx.is_positive_semidefinite,
    lx.is_negative_semidefinite,
):
    _forward(_fn)
for _fn in (lx.linearise, lx.materialise, lx.conj):
    _fn.register(_Counted)(lambda operator: operator)


#
# Every solver on every operator
#


def _check_solve(client, transport, operator, solver):
    case = OPERATORS[operator]
    lx_solver, asks, _ = SOLVERS[solver]
    op = case.make(client)
    client.stats.clear()
    b = _vector()
    x = lx.linear_solve(op, b, lx_solver).value
    expected = jnp.linalg.solve(case.matrix(), b.reshape(-1)).reshape(N, N)
    np.testing.assert_allclose(x, expected, **TOL)
    if asks == "matrix":
        assert client.stats == {_materialising(transport): 1}
    elif asks == "mv":
        assert set(client.stats) == {case.forward}
    else:
        assert set(client.stats) == {case.forward, case.backward}


@parametrize_transport
@pytest.mark.parametrize("tesseract,operator,solver", REPRESENTATIVE_CASES)
def test_solve(client, transport, operator, solver):
    _check_solve(client, transport, operator, solver)


# Compiling a lineax solve costs ~1 s: the other solvers run on one transport only.
@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract,operator,solver", OTHER_CASES)
def test_solve_every_solver(client, transport, operator, solver):
    _check_solve(client, transport, operator, solver)


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract,operator,solver", COUNTED_CASES)
def test_one_request_per_matvec(client, transport, operator, solver):
    """A Krylov solve sends exactly one request per mat-vec: the same solve on the
    same operator wrapped in a counter takes the same steps (the same numbers)."""
    case = OPERATORS[operator]
    lx_solver, asks, _ = SOLVERS[solver]
    op = case.make(client)
    b = _vector()
    client.stats.clear()
    x = lx.linear_solve(op, b, lx_solver).value
    stats = dict(client.stats)
    tally = _Tally()
    client.stats.clear()
    x_counted = lx.linear_solve(_Counted(op, tally), b, lx_solver).value
    np.testing.assert_array_equal(x_counted, x)
    assert dict(client.stats) == stats
    expected = collections.Counter({case.forward: tally.counts["mv"]})
    expected[case.backward] += tally.counts["T.mv"]
    assert stats == dict(+expected)
    assert tally.counts["mv"] > 0
    assert (tally.counts["T.mv"] > 0) == (asks == "mv and T.mv" and not case.symmetric)


#
# The lineax operator contract
#


@parametrize_transport
@parametrize_operator
def test_mv_and_transpose(client, transport, operator):
    case = OPERATORS[operator]
    op = case.make(client)
    matrix = case.matrix()
    v = _vector()
    # `auto` sends one vector to `/jacobian` if that is measured to take under half a
    # JVP (a stock server with several workers): not what this test is about.
    client.latency.clear()

    client.stats.clear()
    np.testing.assert_allclose(op.mv(v).reshape(-1), matrix @ v.reshape(-1), **TOL)
    assert client.stats == {case.forward: 1}

    client.stats.clear()
    np.testing.assert_allclose(op.T.mv(v).reshape(-1), matrix.T @ v.reshape(-1), **TOL)
    assert client.stats == {case.backward: 1}

    # `.T.T` is the operator itself again.
    client.stats.clear()
    assert eqx.tree_equal(op.T.T, op)
    assert op.T.T.in_structure() == op.in_structure()
    assert op.T.T.out_structure() == op.out_structure()
    assert client.stats == {}
    np.testing.assert_allclose(op.T.T.mv(v), op.mv(v), **TOL)
    assert client.stats == {case.forward: 2}

    client.stats.clear()
    np.testing.assert_allclose(op.as_matrix(), matrix, **TOL)
    assert client.stats == {_materialising(transport): 1}

    client.stats.clear()
    np.testing.assert_allclose(op.T.as_matrix(), matrix.T, **TOL)
    assert client.stats == {_materialising(transport): 1}


@parametrize_transport
@parametrize_operator
def test_tags_and_transpose(client, transport, operator):
    case = OPERATORS[operator]
    op = case.make(client)
    client.stats.clear()
    if case.symmetric:
        assert op.T is op
    else:
        assert op.T is not op
        assert op.T.in_structure() == op.out_structure()
        assert not lx.is_symmetric(op.T)
    lower = dataclasses.replace(case, tags=frozenset({lx.lower_triangular_tag}))
    lower = lower.make(client)
    assert lx.is_lower_triangular(lower) and not lx.is_upper_triangular(lower)
    assert lx.is_upper_triangular(lower.T) and not lx.is_lower_triangular(lower.T)
    assert lx.is_lower_triangular(lower.T.T)
    assert client.stats == {}


@parametrize_transport
@parametrize_operator
def test_construction_and_structure_send_nothing(client, transport, operator):
    case = OPERATORS[operator]
    # The example schemas leave shapes free: the first construction asks the server
    # for its output shapes, once per client and input signature.
    assert not schema_fixes_outputs(client)
    op = case.make(client)
    assert client.stats == {"abstract_eval": 1}
    client.stats.clear()
    other_point = jax.tree.map(lambda x: x + 0.5, case.inputs())
    op2 = case.make(client, other_point)
    assert op.in_structure() == op2.in_structure() == STRUCTURE
    assert op.out_structure() == STRUCTURE
    assert op.in_size() == op.out_size() == SIZE
    for o in (op, op2, op.T, op.T.T, lx.TaggedLinearOperator(op, lx.symmetric_tag)):
        assert o.in_structure() == o.out_structure() == STRUCTURE
        lx.is_symmetric(o)
        lx.is_positive_semidefinite(o)
        lx.is_diagonal(o)
    jax.eval_shape(op.mv, _vector())
    jax.make_jaxpr(lambda v: op.T.mv(v))(_vector())
    assert client.stats == {}


@parametrize_transport
@parametrize_operator
def test_singledispatch(client, transport, operator):
    case = OPERATORS[operator]
    op = case.make(client)
    matrix = case.matrix()
    client.stats.clear()

    assert lx.linearise(op) is op
    assert lx.conj(op) is op
    assert lx.is_symmetric(op) == case.symmetric
    assert lx.is_positive_semidefinite(op) == case.symmetric
    assert not lx.is_negative_semidefinite(op)
    assert not lx.is_diagonal(op)
    assert not lx.is_tridiagonal(op)
    assert not lx.has_unit_diagonal(op)
    assert not lx.is_lower_triangular(op)
    assert not lx.is_upper_triangular(op)
    assert client.stats == {}

    materialised = lx.materialise(op)
    assert client.stats == {_materialising(transport): 1}
    # A (N, N) -> (N, N) operator materialises as a `PyTreeLinearOperator`.
    assert isinstance(materialised, lx.PyTreeLinearOperator)
    assert materialised.in_structure() == op.in_structure()
    assert materialised.out_structure() == op.out_structure()
    assert materialised.tags == op.tags
    np.testing.assert_allclose(materialised.as_matrix(), matrix, **TOL)
    np.testing.assert_allclose(
        materialised.mv(_vector()).reshape(-1), matrix @ _vector().reshape(-1), **TOL
    )

    client.stats.clear()
    np.testing.assert_allclose(lx.diagonal(op), jnp.diag(matrix), **TOL)
    assert sum(client.stats.values()) <= 1

    client.stats.clear()
    lower, diag, upper = lx.tridiagonal(op)
    np.testing.assert_allclose(lower, jnp.diag(matrix, -1), **TOL)
    np.testing.assert_allclose(diag, jnp.diag(matrix), **TOL)
    np.testing.assert_allclose(upper, jnp.diag(matrix, 1), **TOL)
    assert sum(client.stats.values()) <= 1


@parametrize_transport
@pytest.mark.parametrize("tesseract", ["pytree"])
def test_flat_materialise(client, transport):
    # pytree's `y` is elementwise in `x` (m,): flat structures, a diagonal Jacobian.
    inputs = ALL_CASES["pytree"].inputs()
    op = tlx.TesseractJacobianOperator(tlx.TesseractModule(client), inputs, "x", "y")
    ref = ALL_CASES["pytree"].ref
    matrix = jax.jacfwd(lambda x: ref({**inputs, "x": x})["y"])(inputs["x"])
    client.stats.clear()
    materialised = lx.materialise(op)
    assert isinstance(materialised, lx.MatrixLinearOperator)
    np.testing.assert_allclose(materialised.as_matrix(), matrix, **TOL)
    assert client.stats == {_materialising(transport): 1}


#
# lineax's operator algebra
#


def _bratu(client):
    case = OPERATORS["bratu_jacobian"]
    return case.make(client), case.matrix()


def _plus_identity(client):
    op, matrix = _bratu(client)
    return op + lx.IdentityLinearOperator(op.in_structure()), matrix + jnp.eye(SIZE)


def _scaled(client):
    op, matrix = _bratu(client)
    return 2.0 * op, 2.0 * matrix


def _composed(client):
    op, matrix = _bratu(client)
    m = jnp.eye(SIZE) + 0.1 * _vector(2, (SIZE, SIZE))
    # The Tesseract acts on (N, N) arrays: a `PyTreeLinearOperator` on that structure.
    right = lx.PyTreeLinearOperator(m.reshape(N, N, N, N), STRUCTURE)
    return op @ right, matrix @ m


def _tagged_symmetric(client):
    # The Bratu Jacobian (the Laplacian minus a diagonal) is symmetric.
    op, matrix = _bratu(client)
    return lx.TaggedLinearOperator(op, lx.symmetric_tag), matrix


def _tagged_spd_linear(client):
    case = OPERATORS["poisson_linear"]
    return lx.TaggedLinearOperator(case.make(client), SPD), case.matrix()


def _flat_composed(client):
    inputs = ALL_CASES["pytree"].inputs()
    op = tlx.TesseractJacobianOperator(tlx.TesseractModule(client), inputs, "x", "y")
    ref = ALL_CASES["pytree"].ref
    matrix = jax.jacfwd(lambda x: ref({**inputs, "x": x})["y"])(inputs["x"])
    m = jnp.eye(5) + 0.1 * _vector(2, (5, 5))
    return op @ lx.MatrixLinearOperator(m), matrix @ m


# name -> (tesseract, build, the endpoint of one `mv`, a Krylov solver that applies)
COMPOSITIONS = {
    "plus_identity": ("bratu", _plus_identity, JVP, "gmres"),
    "scaled": ("bratu", _scaled, JVP, "gmres"),
    "composed": ("bratu", _composed, JVP, "gmres"),
    "tagged_symmetric": ("bratu", _tagged_symmetric, JVP, "gmres"),
    "tagged_spd_linear": ("poisson", _tagged_spd_linear, "apply", "cg"),
    "flat_composed": ("pytree", _flat_composed, JVP, "gmres"),
}


# lineax's algebra does not depend on the transport: one is enough.
@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("kind", ["matrix", "krylov"])
@pytest.mark.parametrize(
    "tesseract,composition", [(t, name) for name, (t, *_) in COMPOSITIONS.items()]
)
def test_composition(client, transport, composition, kind):
    _, build, forward, krylov = COMPOSITIONS[composition]
    op, matrix = build(client)
    b = _vector(shape=jax.tree.leaves(op.out_structure())[0].shape)
    client.stats.clear()
    solver = lx.LU() if kind == "matrix" else SOLVERS[krylov][0]
    x = lx.linear_solve(op, b, solver).value
    expected = jnp.linalg.solve(matrix, b.reshape(-1)).reshape(b.shape)
    np.testing.assert_allclose(x, expected, **TOL)
    if kind == "matrix":
        # lineax materialises compositions by a vmapped `mv`: still one request,
        # by whichever rule `auto` prefers for SIZE tangents.
        assert sum(client.stats.values()) == 1
        assert set(client.stats) <= {"jacobian", BATCHED[JVP]}
    else:
        assert set(client.stats) == {forward}


#
# jit and gradients
#


@pytest.mark.parametrize(
    "transport,solver", [(t, "lu") for t in TRANSPORTS] + [("tlx", "gmres")]
)
@pytest.mark.parametrize("tesseract", ["bratu"])
def test_jit(client, transport, solver):
    case = OPERATORS["bratu_jacobian"]
    op = case.make(client)
    lx_solver, asks, _ = SOLVERS[solver]
    traces = []

    @jax.jit
    def solve(op, b):
        traces.append(None)
        return lx.linear_solve(op, b, lx_solver).value

    matrix = case.matrix()
    for seed in (1, 2):
        client.stats.clear()
        b = _vector(seed)
        x = solve(op, b)
        expected = jnp.linalg.solve(matrix, b.reshape(-1)).reshape(N, N)
        np.testing.assert_allclose(x, expected, **TOL)
        if asks == "matrix":
            assert client.stats == {_materialising(transport): 1}
        else:
            assert set(client.stats) == {JVP}
    assert len(traces) == 1


@pytest.mark.parametrize(
    "transport,tesseract,operator,solver",
    [(t, "bratu", "bratu_jacobian", "lu") for t in TRANSPORTS]
    + [(t, "poisson", "poisson_linear", "lsmr") for t in TRANSPORTS]
    + [("tlx", "bratu", "bratu_jacobian", "gmres")],
)
def test_grad_wrt_vector(client, transport, operator, solver):
    case = OPERATORS[operator]
    op = case.make(client)
    lx_solver, asks, _ = SOLVERS[solver]
    matrix = case.matrix()

    def loss(b):
        return jnp.sum(jnp.sin(lx.linear_solve(op, b, lx_solver).value))

    def loss_ref(b):
        return jnp.sum(jnp.sin(jnp.linalg.solve(matrix, b.reshape(-1))))

    b = _vector()
    client.stats.clear()
    grad = jax.grad(loss)(b)
    np.testing.assert_allclose(grad, jax.grad(loss_ref)(b), **TOL)
    if asks == "matrix":
        # The transposed solve reuses the factorisation.
        assert client.stats == {_materialising(transport): 1}
    else:
        # The transposed solve runs on `op.T`.
        assert set(client.stats) == {case.forward, case.backward}


@parametrize_transport
@pytest.mark.parametrize("solver", ["lu", "gmres"])
@pytest.mark.parametrize("tesseract", ["poisson"])
def test_grad_wrt_coefficient(client, transport, solver):
    case = OPERATORS["poisson_linear"]
    lx_solver, asks, _ = SOLVERS[solver]
    inputs = case.inputs()
    b = _vector()

    def loss(c):
        op = case.make(client, {**inputs, "c": c})
        return jnp.sum(jnp.sin(lx.linear_solve(op, b, lx_solver).value))

    def loss_ref(c):
        matrix = case.matrix({**inputs, "c": c})
        return jnp.sum(jnp.sin(jnp.linalg.solve(matrix, b.reshape(-1))))

    c = inputs["c"]
    case.make(client)
    client.stats.clear()
    grad = jax.grad(loss)(c)
    np.testing.assert_allclose(grad, jax.grad(loss_ref)(c), **TOL)
    if asks == "matrix":
        # The matrix once; `d(A x)/dc` at the solution, transposed: one VJP.
        assert client.stats == {_materialising(transport): 1, VJP: 1}
    else:
        # `apply`s forward; VJPs for the transposed solve and for `d(A x)/dc`.
        assert set(client.stats) == {"apply", VJP}


@parametrize_transport
@pytest.mark.parametrize("tesseract", ["bratu"])
def test_grad_wrt_jacobian_point_is_refused(client, transport):
    case = OPERATORS["bratu_jacobian"]
    inputs = case.inputs()
    b = _vector()

    def loss(k):
        op = case.make(client, {**inputs, "k": k})
        return jnp.sum(lx.linear_solve(op, b, lx.GMRES(**KRYLOV)).value)

    case.make(client)
    client.stats.clear()
    with pytest.raises(NotImplementedError, match="first derivatives"):
        jax.grad(loss)(inputs["k"])
    assert client.stats == {}


#
# Partial Tesseracts
#


@parametrize_transport
@pytest.mark.parametrize("tesseract", ["bratu_vjp_only", "bratu_jacobian_only"])
def test_partial_tesseract(client, transport, tesseract):
    case = dataclasses.replace(OPERATORS["bratu_jacobian"], tesseract=tesseract)
    # `auto` weighs measured latencies: pin the rule so that counts are exact.
    batching = "batched" if has_batched(transport) else "sequential"
    op = case.make(client, batching=batching)
    matrix = case.matrix()
    v = _vector()
    if tesseract == "bratu_jacobian_only":
        one_mv = one_t_mv = one_matrix = {"jacobian": 1}
    elif has_batched(transport):
        # `mv` from the VJPs of the output basis: one batched VJP.
        one_mv = one_matrix = one_t_mv = {BATCHED[VJP]: 1}
    else:
        one_mv = one_matrix = {VJP: SIZE}
        one_t_mv = {VJP: 1}

    client.stats.clear()
    np.testing.assert_allclose(op.mv(v).reshape(-1), matrix @ v.reshape(-1), **TOL)
    assert client.stats == one_mv

    client.stats.clear()
    np.testing.assert_allclose(op.T.mv(v).reshape(-1), matrix.T @ v.reshape(-1), **TOL)
    assert client.stats == one_t_mv

    client.stats.clear()
    np.testing.assert_allclose(op.as_matrix(), matrix, **TOL)
    assert client.stats == one_matrix

    client.stats.clear()
    x = lx.linear_solve(op, v, lx.LU()).value
    expected = jnp.linalg.solve(matrix, v.reshape(-1)).reshape(N, N)
    np.testing.assert_allclose(x, expected, **TOL)
    assert client.stats == one_matrix


#
# Many right-hand sides
#


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize("tesseract", ["bratu"])
def test_vmap_many_right_hand_sides(client, transport):
    case = OPERATORS["bratu_jacobian"]
    op = case.make(client, batching="batched")
    solver = lx.GMRES(**KRYLOV)
    matrix = case.matrix()
    bs = jnp.stack([_vector(seed) for seed in (1, 2, 3)])

    client.stats.clear()
    xs = jax.vmap(lambda b: lx.linear_solve(op, b, solver).value)(bs)
    expected = jnp.linalg.solve(matrix, bs.reshape(3, -1).T).T.reshape(bs.shape)
    np.testing.assert_allclose(xs, expected, **TOL)
    batched = dict(client.stats)

    # Each right-hand side alone, counting its mat-vecs.
    single = []
    for b in bs:
        tally = _Tally()
        lx.linear_solve(_Counted(op, tally), b, solver)
        single.append(tally.counts["mv"])
    # One batched request per Krylov step, for all three right-hand sides at once.
    assert batched == {BATCHED[JVP]: max(single)}
    assert max(single) < sum(single)


#
# Errors, before any request
#


@parametrize_transport
@pytest.mark.parametrize("tesseract", ["pytree"])
def test_errors(client, transport):
    f = tlx.TesseractModule(client)
    inputs = ALL_CASES["pytree"].inputs()
    with pytest.raises(ValueError, match="`wrt='offset'` is not a differentiable"):
        tlx.TesseractJacobianOperator(f, inputs, "offset", "y")
    with pytest.raises(ValueError, match="`wrt='nope'` is not a differentiable"):
        tlx.TesseractJacobianOperator(f, inputs, "nope", "y")
    with pytest.raises(ValueError, match="`of='nope'` is not a differentiable output"):
        tlx.TesseractJacobianOperator(f, inputs, "x", "nope")
    with pytest.raises(ValueError, match="`of='count'` is not a differentiable output"):
        tlx.TesseractJacobianOperator(f, inputs, "x", "count")
    # (Under the test suite's runtime type checker, the annotation catches it first.)
    with pytest.raises(TypeError, match="wrt"):
        tlx.TesseractJacobianOperator(f, inputs, 3, "y")  # pyright: ignore
    assert client.stats == {}

    op = tlx.TesseractJacobianOperator(f, inputs, "x", "y")
    client.stats.clear()
    with pytest.raises(ValueError, match=r"must have shape \(5,\)"):
        op.mv(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"must have shape \(5,\)"):
        op.T.mv(jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match="structures do not match"):
        lx.linear_solve(op, jnp.zeros(4), lx.GMRES(**KRYLOV))
    assert client.stats == {}

    # (5,) -> (): not square.
    wide = tlx.TesseractJacobianOperator(f, inputs, "x", "stats.norm")
    client.stats.clear()
    b = jnp.asarray(2.0)
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(wide, b, lx.LU())
    with pytest.raises(ValueError, match="non-square"):
        lx.linear_solve(wide, b, lx.AutoLinearSolver(well_posed=True))
    assert client.stats == {}
    # A least-squares solver takes it: the minimum-norm solution, one request.
    x = lx.linear_solve(wide, b, lx.AutoLinearSolver(well_posed=False)).value
    ref = ALL_CASES["pytree"].ref
    row = jax.grad(lambda x: ref({**inputs, "x": x})["stats"]["norm"])(inputs["x"])
    np.testing.assert_allclose(x, jnp.linalg.pinv(row[None]) @ b[None], **TOL)
    assert client.stats == {_materialising(transport): 1}
