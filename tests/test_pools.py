"""`tlx.Client([url1, url2, ...])`: a pool of replicas, each asked what it serves.

A pool may mix servers: a `tesseract-lx serve` (batched endpoints, `/linear_solve`)
and a stock `tesseract-runtime serve` of the same Tesseract. Every replica is asked
for its `/openapi.json` once, on first use; a request goes only to the replicas that
serve its endpoint, in turn. So every batching rule computes right on a mixed pool,
and `tlx.OnServer` sends its solve to the replica that can run it.
"""

import contextlib
import json
import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import orjson
import pytest
import requests
import tesseract_lx as tlx
from tesseract_lx._wire.encoding import encode_array

from helpers import BATCHED, CASES, JVP, linear_counts, STRATEGIES, tree_allclose
from references import bratu_inputs, bratu_ref
from test_faults import raw_server, reply


BRATU = CASES["bratu"].path
LINEAR_SOLVE = "linear_solve"
N = 4


@contextlib.contextmanager
def pool(*clients: tlx.Client, **options) -> Iterator[tlx.Client]:
    """A new client of the servers behind `clients`, closed on the way out."""
    client = tlx.Client([u for c in clients for u in c.urls], **options)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def mixed(served):
    """bratu on a tesseract-lx replica and a stock one, in that order."""
    with pool(served.get(BRATU, "tlx"), served.get(BRATU, "stock")) as client:
        yield client


@pytest.fixture
def stocks(served):
    """bratu on two stock replicas."""
    one, two = served.get(BRATU, "stock"), served.get(BRATU, "stock", workers=2)
    with pool(one, two) as client:
        yield client


def _jvp_batch(k: int = 3):
    inputs = bratu_inputs(N)
    u = inputs["u"]
    tangents = jnp.asarray(np.random.default_rng(0).standard_normal((k, *u.shape)))
    g = lambda fn: lambda u: fn({**inputs, "u": u})["residual"]  # noqa: E731
    return u, tangents, g


def _chosen(client: tlx.Client, strategy: str) -> str:
    """The rule that was used: as asked (never a fallback), or as `auto` decided
    (and recorded)."""
    if strategy != "auto":
        assert {d.chosen for d in client.decisions} <= {strategy}
        return strategy
    (decision,) = client.decisions
    if decision.estimates:  # none for the standard basis: the Jacobian itself
        assert decision.chosen == min(decision.estimates, key=decision.estimates.get)
    return decision.chosen


def test_a_mixed_pool_states_what_each_endpoint_has(mixed, stocks):
    """Some replica serves the batched endpoints and `/linear_solve` (the
    tesseract-lx one); the plain ones both do. In-flight counts per endpoint are the
    workers of the replicas that serve it."""
    for endpoint in (BATCHED[JVP], LINEAR_SOLVE, JVP, "apply"):
        assert mixed.serves(endpoint) and mixed.schema.has(endpoint)
    assert not mixed.capabilities.is_stock
    assert mixed.capabilities.mode(LINEAR_SOLVE) is not None
    assert mixed.parallelism == 2
    assert mixed.parallelism_for(JVP) == 2
    assert mixed.parallelism_for(BATCHED[JVP]) == 1
    assert mixed.parallelism_for(LINEAR_SOLVE) == 1
    assert not stocks.serves(LINEAR_SOLVE) and not stocks.serves(BATCHED[JVP])
    assert stocks.capabilities.is_stock
    assert stocks.parallelism == stocks.parallelism_for(JVP) == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_rule_on_a_mixed_pool(mixed, strategy):
    """A vmapped JVP of 3 tangents and a `jax.jacfwd` (16 tangents), under every
    rule, right against pure JAX; batched requests reach the tesseract-lx replica
    only (the stock one answers them 404)."""
    f = tlx.TesseractModule(mixed, batching=strategy)
    u, tangents, g = _jvp_batch()
    vmapped = lambda fn: jax.vmap(lambda t: jax.jvp(g(fn), (u,), (t,))[1])  # noqa: E731
    assert tree_allclose(vmapped(f)(tangents), vmapped(bratu_ref)(tangents))
    rule = _chosen(mixed, strategy)
    assert mixed.stats == {"apply": 1, **linear_counts(rule, JVP, 3)}

    mixed.stats.clear()
    mixed.decisions.clear()
    jac = jax.jacfwd(g(f))(u)
    assert tree_allclose(jac, jax.jacfwd(g(bratu_ref))(u))
    rule = _chosen(mixed, strategy)
    assert mixed.stats == {"apply": 1, **linear_counts(rule, JVP, u.size)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_onserver_on_a_mixed_pool_goes_to_the_tesseract_lx_replica(mixed, jit):
    """One `/linear_solve` request, answered (the stock replica would 404), and the
    same solution as pure JAX; nothing solved here."""
    f = tlx.TesseractModule(mixed)
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    b = jnp.asarray(np.random.default_rng(1).standard_normal((N, N)))
    solver = tlx.OnServer(lx.GMRES(rtol=1e-10, atol=1e-10))
    solve = lambda b: lx.linear_solve(J, b, solver).value  # noqa: E731
    mixed.stats.clear()
    x = (jax.jit(solve) if jit else solve)(b)
    matrix = jax.jacfwd(lambda u: bratu_ref({**inputs, "u": u})["residual"])
    expected = jnp.linalg.solve(matrix(inputs["u"]).reshape(N * N, -1), b.reshape(-1))
    assert tree_allclose(x.reshape(-1), expected, rtol=1e-7, atol=1e-9)
    assert mixed.stats == {LINEAR_SOLVE: 1}
    assert not [d for d in mixed.decisions if d.chosen == "local"]


def test_onserver_on_a_pool_of_stock_servers_solves_here(stocks):
    """No replica serves `/linear_solve`: the solve runs here, one request per
    mat-vec, and says so in a decision."""
    f = tlx.TesseractModule(stocks, batching="sequential")
    inputs = bratu_inputs(N)
    J = tlx.TesseractJacobianOperator(f, inputs, wrt="u", of="residual")
    b = jnp.asarray(np.random.default_rng(1).standard_normal((N, N)))
    solver = tlx.OnServer(lx.GMRES(rtol=1e-10, atol=1e-10))
    stocks.stats.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning: not this test's
        x = lx.linear_solve(J, b, solver).value
    matrix = jax.jacfwd(lambda u: bratu_ref({**inputs, "u": u})["residual"])
    expected = jnp.linalg.solve(matrix(inputs["u"]).reshape(N * N, -1), b.reshape(-1))
    assert tree_allclose(x.reshape(-1), expected, rtol=1e-7, atol=1e-9)
    assert LINEAR_SOLVE not in stocks.stats and stocks.stats[JVP] > 2
    assert [d.chosen for d in stocks.decisions if d.kind == LINEAR_SOLVE] == ["local"]


def test_replicas_of_different_tesseracts_are_refused(served):
    with pool(served.get(BRATU, "tlx"), served.get(CASES["poisson"].path, "tlx")) as c:
        with pytest.raises(ValueError, match="must serve the same Tesseract") as info:
            c.schema
    assert "inputs" in str(info.value) and c.urls[1] in str(info.value)


#
# Routing, counted per replica: servers of our own that answer with a real
# Tesseract's `/openapi.json` (one tesseract-lx's, one stock's) and a fixed answer
#


def _openapi(client: tlx.Client) -> dict:
    return requests.get(f"{client.urls[0]}/openapi.json", timeout=30).json()


def _fake(doc: dict):
    body = orjson.dumps({"y": encode_array(np.arange(3.0))})

    def answer(handler):
        if handler.path == "/openapi.json":
            reply(handler, 200, json.dumps(doc).encode())
        else:
            reply(handler, 200, body)

    return raw_server(answer)


def test_each_replica_is_asked_once_and_routed_to_by_endpoint(served):
    """Nothing is asked before first use; then each replica's `/openapi.json`
    once; batched and solve requests go to the replica that serves them, plain ones
    to both in turn."""
    lx_doc, stock_doc = (
        _openapi(served.get(BRATU, "tlx")),
        _openapi(served.get(BRATU, "stock")),
    )
    with _fake(lx_doc) as (lx_url, lx_seen), _fake(stock_doc) as (stock_url, seen):
        client = tlx.Client([lx_url, stock_url])
        assert not lx_seen and not seen
        payload = {"inputs": {}}
        for _ in range(4):
            client.request(JVP, payload)
            client.request(BATCHED[JVP], payload)
        client.request(LINEAR_SOLVE, payload)
        client.request_many(JVP, [payload] * 4, max_in_flight=4)
        assert client.serves(BATCHED[JVP]) and not client.capabilities.is_stock
        client.close()
    assert len(lx_seen["/openapi.json"]) == len(seen["/openapi.json"]) == 1
    assert len(lx_seen[f"/{JVP}"]) == len(seen[f"/{JVP}"]) == 4
    assert len(lx_seen[f"/{BATCHED[JVP]}"]) == 4 and f"/{BATCHED[JVP]}" not in seen
    assert len(lx_seen[f"/{LINEAR_SOLVE}"]) == 1 and f"/{LINEAR_SOLVE}" not in seen
    assert client.stats == {JVP: 8, BATCHED[JVP]: 4, LINEAR_SOLVE: 1}


def test_replicas_that_disagree_are_warned_about(served):
    """Two tesseract-lx replicas stating different `max_batch` and `precision`: the
    most restrictive of each, and a warning naming both replicas."""
    doc = _openapi(served.get(BRATU, "tlx"))
    other = json.loads(json.dumps(doc))
    ext = other["x-tesseract-lx"]
    ext["max_batch"], ext["precision"], ext["workers"] = 7, "float32", 3
    with _fake(doc) as (url_a, _), _fake(other) as (url_b, _):
        client = tlx.Client([url_a, url_b])
        with pytest.warns(UserWarning, match="disagree") as caught:
            capabilities = client.capabilities
        client.close()
    message = str(caught[0].message)
    assert "`max_batch`" in message and "`precision`" in message
    assert url_a in message and url_b in message
    assert capabilities.max_batch == 7 and capabilities.precision == "float32"
    assert client.parallelism == doc["x-tesseract-lx"]["workers"] + 3
