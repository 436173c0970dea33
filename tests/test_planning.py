"""Batching planned when traced: a compiled function sends the same requests on
every run, whatever the load; the Jacobian is a graph node that takes only the
point, so XLA hoists it out of loops; rules are objects that own their plans, and
a user's rule (or a subclass of a built-in one) plans as it says.
"""

import threading

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx

from conftest import fresh
from helpers import ALL_CASES, BATCHED, JVP, Tol, tree_allclose, VJP
from references import bratu_inputs, bratu_ref


N = 4
TOL = Tol(rtol=1e-10, atol=1e-10)


@pytest.fixture
def bratu(served, transport):
    client = fresh(served.get(ALL_CASES["bratu"].path, transport))
    tlx.TesseractModule(client)(bratu_inputs(N))  # the output shapes, learnt
    client.stats.clear()
    return client


def _matrix(inputs):
    g = lambda u: bratu_ref({**inputs, "u": u})["residual"]  # noqa: E731
    return jax.jacfwd(g)(inputs["u"]).reshape(N * N, N * N)


def _burn(stop: threading.Event) -> None:
    x = np.random.default_rng(0).normal(size=(300, 300))
    while not stop.is_set():
        x = np.tanh(x @ x.T / 300)


@pytest.mark.parametrize("transport", ["tlx", "stock"])
def test_a_compiled_solve_sends_the_same_requests_every_run(bratu, transport):
    """A jitted vmapped GMRES under `Auto`, run 5 times alone and 5 times beside a
    thread burning the CPU (which slows every request the client measures): the
    same requests every run, and one decision, made when it was compiled."""
    f = tlx.TesseractModule(bratu, batching=tlx.Auto())
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, "u", "residual")
    solve = jax.jit(jax.vmap(lambda b: lx.linear_solve(J, b, lx.GMRES(**TOL)).value))
    rhs = jnp.asarray(np.random.default_rng(0).normal(size=(3, N, N)))
    counts = []
    for burning in (False, True):
        stop = threading.Event()
        burner = threading.Thread(target=_burn, args=(stop,), daemon=True)
        if burning:
            burner.start()
        try:
            for _ in range(5):
                bratu.stats.clear()
                x = solve(rhs)
                counts.append(dict(bratu.stats))
        finally:
            stop.set()
            if burning:
                burner.join()
        want = jnp.linalg.solve(_matrix(inputs), rhs.reshape(3, -1).T).T
        # `x` is bound: the `range(5)` loop above always runs.
        np.testing.assert_allclose(x.reshape(3, -1), want, rtol=1e-8, atol=1e-10)  # pyright: ignore[reportPossiblyUnboundVariable]
    assert all(c == counts[0] for c in counts), counts
    assert len(bratu.decisions) == 1  # planned once, when compiled


@pytest.mark.parametrize("transport", ["tlx", "stock", "inprocess"])
def test_one_jacobian_per_solve_however_many_iterations(bratu, transport):
    """A jitted local GMRES on a `TesseractJacobianOperator` whose plan is the
    Jacobian: one `/jacobian` per solve (lineax linearises the operator once, before
    its loop), whatever the tolerance asks of the iterations; vmapped too."""
    f = tlx.TesseractModule(bratu, batching=tlx.Jacobian())
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, "u", "residual")
    b = jnp.asarray(np.random.default_rng(1).normal(size=(N, N)))
    steps = []
    for tol in (1e-2, 1e-12):
        solver = lx.GMRES(rtol=tol, atol=tol, restart=4)
        solve = jax.jit(lambda b: lx.linear_solve(J, b, solver))
        bratu.stats.clear()
        sol = solve(b)
        steps.append(int(sol.stats["num_steps"]))
        assert bratu.stats == {"jacobian": 1}
        bratu.stats.clear()
        jax.jit(jax.vmap(lambda b: lx.linear_solve(J, b, solver).value))(
            jnp.stack([b, 2 * b])
        )
        assert bratu.stats == {"jacobian": 1}
    assert steps[1] > steps[0] > 0
    np.testing.assert_allclose(
        sol.value.reshape(-1), jnp.linalg.solve(_matrix(inputs), b.reshape(-1))
    )


@pytest.mark.parametrize("transport", ["tlx"])
def test_xla_hoists_the_jacobian_out_of_a_krylov_loop(bratu, transport):
    """lineax's own `JacobianLinearOperator` under `jax.vmap` over right-hand sides
    with the Jacobian plan: the request takes only the point, so XLA hoists it out
    of GMRES's Arnoldi loop: one request per restart cycle of 3 iterations, not one
    per iteration, for a short solve and for a long one."""
    f = tlx.TesseractModule(bratu, batching=tlx.Jacobian())
    inputs = bratu_inputs(N)
    fn = tlx.residual_fn(f, wrt="u", of="residual")
    args = {"k": inputs["k"], "f": inputs["f"]}
    rhs = jnp.asarray(np.random.default_rng(2).normal(size=(3, N, N)))
    counts, steps = [], []
    for tol in (1e-1, 1e-13):
        solver = lx.GMRES(rtol=tol, atol=tol, restart=3)

        @jax.jit
        def solve(rhs):
            op = lx.JacobianLinearOperator(fn, inputs["u"], args)

            def one(b):
                sol = lx.linear_solve(op, b, solver)
                return sol.value, sol.stats["num_steps"]

            return jax.vmap(one)(rhs)

        bratu.stats.clear()
        x, n = solve(rhs)
        counts.append(dict(bratu.stats))
        steps.append(int(jnp.max(n)))
    assert steps[1] > steps[0] + 3
    for count, cycles in zip(counts, steps):
        # Out of the Arnoldi loop, so once per restart cycle (lineax's outer loop
        # calls it inside a `cond`, which XLA does not hoist from): 3 mat-vecs each.
        assert set(count) == {"jacobian"} and count["jacobian"] <= cycles + 1
    want = jnp.linalg.solve(_matrix(inputs), rhs.reshape(3, -1).T).T
    np.testing.assert_allclose(x.reshape(3, -1), want, rtol=1e-8, atol=1e-10)


#
# Rules of the user's own
#


class EveryOther(tlx.AbstractBatching):
    """A user's rule: batched requests of 2 items, or one by one where the server
    has no batched endpoint."""

    def plan(self, batch, server):
        if server.serves(f"batched_{batch.kind}"):
            return tlx.Plan("batched", 1, 2)
        return tlx.Plan("sequential")

    def cost(self, batch, server):
        return tlx.estimate_cost(self.plan(batch, server), batch, server)


@pytest.mark.parametrize("transport", ["tlx", "stock"])
def test_a_rule_of_the_users_own(bratu, transport):
    f = tlx.TesseractModule(bratu, batching=EveryOther())
    inputs = bratu_inputs(N)
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    ts = jnp.asarray(np.random.default_rng(3).normal(size=(5, N, N)))
    jvps = lambda fn: jax.vmap(lambda t: jax.jvp(g(fn), (inputs["u"],), (t,))[1])  # noqa: E731
    out = jax.jit(jvps(f))(ts)
    assert tree_allclose(out, jvps(bratu_ref)(ts))
    expected = {BATCHED[JVP]: 3} if transport == "tlx" else {JVP: 5}
    assert bratu.stats == expected
    (decision,) = bratu.decisions
    assert decision.chosen == ("batched" if transport == "tlx" else "sequential")
    rule = EveryOther()
    server = tlx.Server(frozenset({JVP}), 1, None, True, lambda *a: None)
    batch = tlx.Batch(JVP, 1, 4, 16, 16, 33)
    assert rule.plan(batch, server) == tlx.Plan("sequential")
    assert rule.cost(batch, server) == pytest.approx(4 * 3e-3)


class MySequential(tlx.Sequential):
    pass


class MyConcurrent(tlx.Concurrent):
    pass


class MyJacobian(tlx.Jacobian):
    pass


class MyBatched(tlx.Batched):
    pass


class MyAuto(tlx.Auto):
    pass


@pytest.mark.parametrize("transport", ["tlx"])
@pytest.mark.parametrize(
    "rule,expected",
    [
        (MySequential(), {JVP: 4}),
        (MyConcurrent(max_in_flight=2), {JVP: 4}),
        (MyJacobian(), {"jacobian": 1}),
        (MyBatched(max_batch=2), {BATCHED[JVP]: 2}),
        (MyAuto(jacobian=False), {BATCHED[JVP]: 1}),
    ],
)
def test_a_subclass_of_a_rule_is_that_rule(bratu, transport, rule, expected):
    f = tlx.TesseractModule(bratu, batching=rule)
    inputs = bratu_inputs(N)
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    ts = jnp.asarray(np.random.default_rng(4).normal(size=(4, N, N)))
    jvps = lambda fn: jax.vmap(lambda t: jax.jvp(g(fn), (inputs["u"],), (t,))[1])  # noqa: E731
    assert tree_allclose(jax.jit(jvps(f))(ts), jvps(bratu_ref)(ts))
    assert bratu.stats == expected


def test_a_rule_must_say_how():
    class Silent(tlx.AbstractBatching):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Silent()  # pyright: ignore[reportAbstractUsage]  # what is tested


#
# Two batch roles: points and (co)tangents, kept apart
#


@pytest.mark.parametrize("transport", ["tlx", "stock"])
@pytest.mark.parametrize("kind", [JVP, VJP])
def test_points_of_tangents_are_carried_as_such(bratu, transport, kind):
    """`jax.vmap` over P points of `jax.jacfwd` (`jax.jacrev`): P x n items, planned
    as one Jacobian per point, whichever order the two `vmap`s come in."""
    f = tlx.TesseractModule(bratu, batching=tlx.Auto())
    inputs = bratu_inputs(N)
    us = jnp.stack([inputs["u"] + 0.1 * p for p in range(3)])
    jac = jax.jacfwd if kind == JVP else jax.jacrev
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    out = jax.jit(jax.vmap(jac(g(f))))(us)
    assert tree_allclose(out, jax.vmap(jac(g(bratu_ref)))(us))
    assert bratu.stats == {"jacobian": 3}
    (decision,) = bratu.decisions
    assert decision.k == 3 * N * N and "at each of P=3 points" in decision.reason
    bratu.stats.clear()
    out = jax.jit(jac(jax.vmap(g(f))))(us)
    assert tree_allclose(out, jac(jax.vmap(g(bratu_ref)))(us))
    assert set(bratu.stats) <= {"jacobian", "batched_apply", "apply"}
    assert bratu.stats["jacobian"] == 3


@pytest.mark.parametrize("transport", ["tlx"])
def test_a_tangent_shared_by_every_point(bratu, transport):
    """A `vmap` over points with one tangent for all: the tangent is not copied
    per point, and its cotangent (by transposition) sums over the points."""
    f = tlx.TesseractModule(bratu, batching=tlx.Batched())
    inputs = bratu_inputs(N)
    us = jnp.stack([inputs["u"], inputs["u"] + 0.2])
    t = jnp.ones((N, N))
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    at = lambda fn: jax.vmap(lambda u: jax.jvp(g(fn), (u,), (t,))[1])  # noqa: E731
    assert tree_allclose(jax.jit(at(f))(us), at(bratu_ref)(us))
    lin = lambda fn: (
        lambda t: jnp.sum(  # noqa: E731
            jax.vmap(lambda u: jax.jvp(g(fn), (u,), (t,))[1])(us) ** 2
        )
    )
    assert tree_allclose(jax.grad(lin(f))(t), jax.grad(lin(bratu_ref))(t))
