"""K (co)tangents under `jax.vmap`: every strategy, every transport, exact requests.

K tangents cost K requests (`sequential`, `concurrent`), one `/jacobian`
(`jacobian`) or one batched request (`batched`); `auto` picks from a cost model and
records why in `client.decisions`.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx

from helpers import (
    BATCHED,
    CASES,
    gradient_stats,
    has_batched,
    JVP,
    linear_counts,
    schema_fixes_outputs,
    size,
    STRATEGIES,
    TRANSPORTS,
    tree_allclose,
    VJP,
)
from references import bratu_inputs


KINDS = (JVP, VJP)


def _stack(tree, k: int, seed: int = 0):
    """K random trees shaped like `tree`, stacked on a leading axis."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal((k, *np.shape(x)))), tree
    )


def _vmapped(kind: str, fn, primal, batch, in_axes=0, out_axes=0):
    """`jax.vmap` of a JVP over tangents, or of a VJP over cotangents."""
    if kind == JVP:
        jvp = lambda t: jax.jvp(fn, (primal,), (t,))[1]
        return jax.vmap(jvp, in_axes=in_axes, out_axes=out_axes)(batch)
    _, vjp = jax.vjp(fn, primal)
    return jax.vmap(lambda c: vjp(c)[0], in_axes=in_axes, out_axes=out_axes)(batch)


def _batch_for(kind: str, case, inputs, k: int, seed: int = 0):
    diff, _ = case.split(inputs)
    like = diff if kind == JVP else case.fn(case.ref, inputs)(diff)
    return diff, _stack(like, k, seed)


def _rule(client: tlx.Client, strategy: str, transport: str) -> str:
    """The rule that must have been used, checked against the plan's record: one
    `Decision`, made when the call was traced."""
    (decision,) = client.decisions
    assert f"K={decision.k}" in decision.reason
    if strategy in ("sequential", "concurrent", "jacobian") or (
        strategy == "batched" and has_batched(transport)
    ):
        assert decision.chosen == strategy and "as asked" in decision.reason
        assert not decision.fallback
        return strategy
    # `auto`, or `batched` on a server without the batched endpoints: the cost model
    # picks the cheapest plan the server serves, and says so.
    assert decision.chosen == min(decision.estimates, key=decision.estimates.get)
    assert decision.fallback == (strategy == "batched")
    assert ("batched" in decision.estimates) == has_batched(transport)
    return decision.chosen


@pytest.mark.parametrize("tesseract", ["bratu", "pytree"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_strategy(client, case, kind, strategy, transport):
    k = 3
    f = tlx.TesseractModule(client, batching=strategy)
    inputs = case.inputs()
    diff, batch = _batch_for(kind, case, inputs, k)
    out = _vmapped(kind, case.fn(f, inputs), diff, batch)
    ref = _vmapped(kind, case.fn(case.ref, inputs), diff, batch)
    assert tree_allclose(out, ref)
    rule = _rule(client, strategy, transport)
    assert client.stats == {"apply": 1, **linear_counts(rule, kind, k)}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auto_single_tangent_is_one_plain_request(client, case, kind):
    f = tlx.TesseractModule(client, batching="auto")
    inputs = case.inputs()
    diff, batch = _batch_for(kind, case, inputs, 1)
    out = _vmapped(kind, case.fn(f, inputs), diff, batch)
    assert tree_allclose(out, _vmapped(kind, case.fn(case.ref, inputs), diff, batch))
    assert client.stats == {"apply": 1, kind: 1}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", ["stock"])
def test_auto_on_stock_server_picks_jacobian_for_k_near_input_size(client, case, kind):
    f = tlx.TesseractModule(client, batching="auto")
    inputs = case.inputs()
    k = inputs["u"].size
    u = inputs["u"]
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    batch = _stack(u, k)
    out = _vmapped(kind, g(f), u, batch)
    assert tree_allclose(out, _vmapped(kind, g(case.ref), u, batch))
    (decision,) = client.decisions
    assert decision.chosen == "jacobian" and decision.k == k
    assert client.stats == {"apply": 1, "jacobian": 1}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("batching", ["batched", "jacobian", "auto"])
@pytest.mark.parametrize("transport", ["tlx", "inprocess"])
def test_k64_tangents_are_one_request(client, case, batching):
    """64 tangents under jit: one request (a batched JVP, or the Jacobian that
    `Auto` weighs cheaper at this size), and the `/apply` nobody uses dropped."""
    f = tlx.TesseractModule(client, batching=batching)
    inputs = bratu_inputs(8)
    u = inputs["u"]
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    f(inputs)  # learns the output shapes: no `/abstract_eval` under jit
    client.stats.clear()
    batch = _stack(u, 64)
    out = jax.jit(lambda b: _vmapped(JVP, g(f), u, b))(batch)
    assert tree_allclose(out, _vmapped(JVP, g(case.ref), u, batch))
    (decision,) = client.decisions
    expected = {"batched": BATCHED[JVP], "jacobian": "jacobian"}[decision.chosen]
    assert client.stats == {expected: 1}
    if batching != "auto":
        assert decision.chosen == batching


@pytest.mark.parametrize("tesseract", ["bratu", "pytree"])
@pytest.mark.parametrize("transport", ["tlx", "inprocess", "stock"])
@pytest.mark.parametrize("jac", [jax.jacfwd, jax.jacrev])
@pytest.mark.parametrize("jit", [False, True])
def test_jacfwd_and_jacrev_are_one_jacobian_request(client, case, jac, jit):
    """`jax.jacfwd` (n JVPs of the input basis) and `jax.jacrev` (m VJPs of the
    output basis) under `auto`: the Jacobian itself, in one request that takes only
    the point; the basis is recognised in the graph and answered by a gather."""
    f = tlx.TesseractModule(client, batching="auto")
    inputs = case.inputs()
    diff, _ = case.split(inputs)
    f(inputs)
    client.stats.clear()
    run = jax.jit(jac(case.fn(f, inputs))) if jit else jac(case.fn(f, inputs))
    got = run(diff)
    ref_fn = case.fn(case.ref, inputs)
    assert tree_allclose(got, jac(ref_fn)(diff))
    assert client.stats == ({"jacobian": 1} if jit else {"apply": 1, "jacobian": 1})
    (decision,) = client.decisions
    assert decision.chosen == "jacobian"
    assert decision.chosen == min(decision.estimates, key=decision.estimates.get)
    assert decision.k == size(diff if jac is jax.jacfwd else ref_fn(diff))


#
# vmap semantics
#


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nested_vmap_over_tangents_folds_into_one_batch(client, case, kind, transport):
    strategy = "batched" if has_batched(transport) else "jacobian"
    f = tlx.TesseractModule(client, batching=strategy)
    inputs = case.inputs()
    u = inputs["u"]
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    batch = jnp.asarray(np.random.RandomState(0).standard_normal((2, 3, *u.shape)))

    def nested(fn):
        if kind == JVP:
            one = lambda t: jax.jvp(g(fn), (u,), (t,))[1]
        else:
            _, vjp = jax.vjp(g(fn), u)
            one = lambda c: vjp(c)[0]
        return jax.vmap(jax.vmap(one))(batch)

    out = nested(f)
    assert out.shape == (2, 3, *u.shape)
    assert tree_allclose(out, nested(case.ref))
    assert client.stats == {"apply": 1, **linear_counts(strategy, kind, 1)}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vmap_over_points_of_vmap_over_tangents(client, case, kind, transport):
    """One tangent batch per primal point."""
    strategy = "batched" if has_batched(transport) else "sequential"
    f = tlx.TesseractModule(client, batching=strategy)
    inputs = case.inputs()
    u = inputs["u"]
    points = jnp.stack([u, u + 0.1])
    batch = jnp.asarray(np.random.RandomState(0).standard_normal((3, *u.shape)))

    def per_point(fn):
        g = lambda u: fn({**inputs, "u": u})["residual"]
        return jax.vmap(lambda p: _vmapped(kind, g, p, batch))(points)

    out = per_point(f)
    assert out.shape == (2, 3, *u.shape)
    assert tree_allclose(out, per_point(case.ref))
    per_group = linear_counts(strategy, kind, 3)
    points = {"batched_apply": 1} if has_batched(transport) else {"apply": 2}
    expected = {"abstract_eval": 1, **points}
    expected.update({e: 2 * n for e, n in per_group.items()})
    assert client.stats == expected


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_in_axes_and_out_axes(client, case, kind, transport):
    strategy = "batched" if has_batched(transport) else "sequential"
    f = tlx.TesseractModule(client, batching=strategy)
    inputs = case.inputs()
    u = inputs["u"]
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    # The batch on axis 1 in, axis 2 out.
    batch = jnp.asarray(np.random.RandomState(0).standard_normal((4, 3, 4)))
    out = _vmapped(kind, g(f), u, batch, in_axes=1, out_axes=2)
    assert out.shape == (4, 4, 3)
    assert tree_allclose(out, _vmapped(kind, g(case.ref), u, batch, 1, 2))
    assert client.stats == {"apply": 1, **linear_counts(strategy, kind, 3)}


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_outputs_independent_of_the_batched_input(client, case):
    f = tlx.TesseractModule(client, batching="sequential")
    inputs = case.inputs()
    u = inputs["u"]
    # Nothing batched reaches the Tesseract: one unbatched `/apply`, broadcast.
    out = jax.vmap(lambda s: f(inputs)["residual"] + 0 * s)(jnp.arange(3.0))
    assert out.shape == (3, *u.shape)
    assert tree_allclose(out, jnp.broadcast_to(case.ref(inputs)["residual"], out.shape))
    assert client.stats == {"apply": 1}

    # The primal output of a vmapped JVP does not depend on the tangents.
    client.stats.clear()
    batch = jnp.asarray(np.random.RandomState(0).standard_normal((3, *u.shape)))
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]
    primal, tangents = jax.vmap(
        lambda t: jax.jvp(g(f), (u,), (t,)), out_axes=(None, 0)
    )(batch)
    assert tree_allclose(primal, case.ref(inputs)["residual"])
    ref_t = _vmapped(JVP, g(case.ref), u, batch)
    assert tree_allclose(tangents, ref_t)
    assert client.stats == {"apply": 1, JVP: 3}


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_on_two_workers(stock2, kind):
    case = CASES["bratu"]
    assert stock2.parallelism == 2
    f = tlx.TesseractModule(stock2, batching="concurrent")
    inputs = case.inputs()
    diff, batch = _batch_for(kind, case, inputs, 4)
    out = _vmapped(kind, case.fn(f, inputs), diff, batch)
    assert tree_allclose(out, _vmapped(kind, case.fn(case.ref, inputs), diff, batch))
    assert client_counts(stock2) == {kind: 4}
    assert stock2.stats["apply"] == 1


def test_concurrent_over_primal_points_on_two_workers(stock2):
    case = CASES["bratu"]
    f = tlx.TesseractModule(stock2, batching="concurrent")
    inputs = case.inputs()
    points = jnp.stack([inputs["u"] + 0.1 * j for j in range(4)])
    call = lambda fn: jax.vmap(lambda u: fn({**inputs, "u": u})["residual"])(points)
    assert tree_allclose(call(f), call(case.ref))
    assert stock2.stats == {"abstract_eval": 1, "apply": 4}


def client_counts(client: tlx.Client) -> dict[str, int]:
    return gradient_stats(client.stats)


def _cache_requests(client: tlx.Client) -> int:
    cache = client.health()["tesseract_lx"]["linearisation_cache"]
    return cache.get("hits", 0) + cache.get("misses", 0)


def test_concurrent_over_a_pool_of_urls(served):
    """`Client([url1, url2])` spreads concurrent requests over both replicas."""
    case = CASES["bratu"]
    lx_server = served.get(case.path, "tlx")
    stock = served.get(case.path, "stock")
    pool = tlx.Client([*lx_server.urls, *stock.urls], workers=1)
    assert pool.parallelism == 2
    f = tlx.TesseractModule(pool, batching="concurrent")
    inputs = case.inputs()
    diff, batch = _batch_for(JVP, case, inputs, 4)
    before = _cache_requests(lx_server)
    out = _vmapped(JVP, case.fn(f, inputs), diff, batch)
    assert tree_allclose(out, _vmapped(JVP, case.fn(case.ref, inputs), diff, batch))
    assert client_counts(pool) == {JVP: 4}
    # Round robin: the apply went to one replica, the 4 JVPs two to each.
    assert _cache_requests(lx_server) - before == 2
    pool.close()


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auto_explains_before_it_decides(client, case, transport):
    """`explain` sends no request and names the rule the batch then goes by."""
    f = tlx.TesseractModule(client, batching=tlx.Auto())
    inputs = case.inputs()
    u = inputs["u"]
    before = f.explain(inputs, kind="jvp", k=4, wrt="u", of="residual")
    assert before.chosen == min(before.estimates, key=before.estimates.__getitem__)
    assert before.k == 4 and "K=4" in before.reason
    assert ("batched" in before.estimates) == has_batched(transport)
    assert not client.decisions
    # Only what a traced call at these shapes needs too: the output shapes.
    assert client.stats == (
        {} if schema_fixes_outputs(client) else {"abstract_eval": 1}
    )
    g = lambda u: f({**inputs, "u": u})["residual"]
    batch = _stack(u, 4)
    jax.vmap(lambda t: jax.jvp(g, (u,), (t,))[1])(batch)
    (decision,) = client.decisions
    assert decision.chosen == before.chosen
    with pytest.raises(ValueError, match="`wrt`: no array at 'v'"):
        f.explain(inputs, wrt="v")
    points = f.explain(inputs, kind="apply", k=3)
    assert points.chosen == ("batched" if has_batched(transport) else "sequential")


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", ["tlx", "stock"])
def test_one_tangent_goes_plain_whatever_the_timings(client, transport):
    """K=1 goes to the plain endpoint, however slow its measured latency: a Krylov
    solve sends one per iteration, and a choice on timings would make its requests
    depend on the machine's load."""
    from tesseract_lx._batching import Batch, decide, server_of

    size = 3 * 16
    for _ in range(3):  # the first sample of each is cold, and does not count
        client.latency.record(JVP, size, 1, 40e-3)
        client.latency.record("jacobian", size, 1, 5e-3)
    batch = Batch(JVP, 1, 1, 16, 16, size)
    decision, plan = decide(tlx.Auto(), batch, server_of(client, JVP))
    assert decision.chosen == plan.rule == "sequential"


@pytest.mark.parametrize("tesseract", ["bratu"])
@pytest.mark.parametrize("transport", ["tlx"])
def test_a_local_krylov_loop_leaves_no_decisions(client, case):
    """A lone tangent sent as it is has no decision to record: a local GMRES solve
    leaves `client.decisions` empty (it keeps the last 100 only)."""
    f = tlx.TesseractModule(client, batching=tlx.Auto())
    inputs = case.inputs()
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    b = jnp.ones(inputs["u"].shape)
    lx.linear_solve(J, b, lx.GMRES(rtol=1e-10, atol=1e-10))
    assert client.stats[JVP] > 1 and not client.decisions
