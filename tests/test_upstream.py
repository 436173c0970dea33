"""tesseract-core's own example Tesseracts, through tesseract_lx's public API.

The examples come from tesseract-core's sdist (see `upstream.py`), downloaded once per
session into a temporary directory. Each is served by tesseract-core's own runtime
("stock"), by `tesseract-lx serve` ("tlx"), and loaded in process ("inprocess"); every
result is compared with a pure-JAX reference of the same maths. Inputs are plain
containers shaped as each schema says: nested models and `dict[str, ...]` as dicts,
a LazySequence as a list, Optional arrays as `None` or omitted, Python scalars where a
scalar array is expected, ints, bools and Literals as Python values.

Tolerances follow each example's dtype and maths (`upstream.EXAMPLES[name].note`):
float32 examples at rtol 1e-5, finite differences (meshstats_finitediff) at rtol 1e-6
on float64, the qpax interior-point solve (qp_solve) at rtol 1e-4.
"""

import concurrent.futures
import re
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import tesseract_lx as tlx
from jax.flatten_util import ravel_pytree

from upstream import download_examples, Example, EXAMPLES, get_path


TRANSPORTS = ("stock", "tlx", "inprocess")
# `tlx.serve(..., server=...)` for the transports that are real servers.
SERVERS = {"stock": "tesseract-runtime", "tlx": "tesseract-lx"}
RUNNABLE = [name for name, example in EXAMPLES.items() if example.reason is None]


def _param(name: str):
    why = EXAMPLES[name].unavailable()
    marks = [pytest.mark.skip(reason=f"{name} cannot run here: {why}")] if why else []
    return pytest.param(name, marks=marks)


# Every example with derivative endpoints that runs here (and is installed).
parametrize_example = pytest.mark.parametrize("example", [_param(n) for n in RUNNABLE])
# The same, and those that cannot run here, skipped with the reason.
parametrize_all_examples = pytest.mark.parametrize(
    "example", [_param(n) for n in EXAMPLES]
)
parametrize_transport = pytest.mark.parametrize("transport", TRANSPORTS)


#
# Fixtures: the examples, their servers (each started once), clients
#


@pytest.fixture(scope="session")
def upstream_examples(tmp_path_factory) -> Path:
    """tesseract-core's `examples/`, from the sdist of the installed version."""
    return download_examples(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def upstream_servers(request, upstream_examples):
    """`(example, transport) -> Client` for the servers the collected tests need.

    All are started at once (startup is mostly importing JAX, so they overlap), and
    all are stopped when this module is done, whatever happened.
    """
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name, transport = params.get("example"), params.get("transport")
        if (
            transport in SERVERS
            and name in EXAMPLES
            and EXAMPLES[name].unavailable() is None
            and item.get_closest_marker("skip") is None
        ):
            wanted.add((name, transport))
    exits, lock = [], threading.Lock()

    def start(key: tuple[str, str]) -> tlx.Client:
        name, transport = key
        cm = tlx.serve(
            EXAMPLES[name].api(upstream_examples),
            server=SERVERS[transport],
            # Up to 20 servers import JAX (and torch) at once on 2 cores.
            startup_timeout=300.0,
        )
        client = cm.__enter__()
        with lock:
            exits.append(cm)
        return client

    clients: dict[tuple[str, str], tlx.Client | BaseException] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max(len(wanted), 1)) as pool:
            futures = {key: pool.submit(start, key) for key in sorted(wanted)}
        for key, future in futures.items():
            try:
                clients[key] = future.result()
            except Exception as e:  # noqa: BLE001 - raised by the tests that need it
                clients[key] = e
        yield clients
    finally:
        with concurrent.futures.ThreadPoolExecutor(max(len(exits), 1)) as pool:
            list(pool.map(lambda cm: cm.__exit__(None, None, None), exits))


@pytest.fixture(scope="module")
def inprocess_clients():
    """`example -> Client.from_api(...)`, each made on first use."""
    clients: dict[str, tlx.Client] = {}
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


@pytest.fixture
def ex(example: str) -> Example:
    return EXAMPLES[example]


@pytest.fixture
def inputs(ex: Example, upstream_examples: Path) -> dict:
    return ex.inputs(upstream_examples)


@pytest.fixture
def client(
    ex, transport, upstream_examples, upstream_servers, inprocess_clients
) -> tlx.Client:
    """A client of `example` over `transport`, its `stats` empty."""
    if transport == "inprocess":
        if ex.name not in inprocess_clients:
            inprocess_clients[ex.name] = tlx.Client.from_api(ex.api(upstream_examples))
        client = inprocess_clients[ex.name]
    else:
        client = upstream_servers[(ex.name, transport)]
        if isinstance(client, BaseException):
            raise client
    client.stats.clear()
    return client


#
# Helpers
#


def assert_close(actual: Any, expected: Any, ex: Example, what: str, *, types=False):
    """Same tree, every leaf within `ex`'s tolerance (and, with `types`, a JAX array
    of the reference's dtype, or an equal string)."""
    structure = jax.tree.structure(expected)
    assert jax.tree.structure(actual) == structure, (
        f"{what}: got a tree {jax.tree.structure(actual)}, expected {structure}"
    )
    leaves = jax.tree_util.tree_leaves_with_path(actual)
    for (path, got), want in zip(leaves, jax.tree.leaves(expected)):
        where = f"{ex.name}: {what}{jax.tree_util.keystr(path)}"
        if isinstance(want, str):
            assert got == want, where
            continue
        if types:
            assert isinstance(got, jax.Array), f"{where} is a {type(got).__name__}"
            assert got.dtype == jnp.asarray(want).dtype, f"{where}: dtype {got.dtype}"
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=ex.rtol, atol=ex.atol, err_msg=where
        )


def _like(x: Any, seed: int) -> jax.Array:
    """A deterministic random array of `x`'s shape and dtype."""
    x = jnp.asarray(x)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape), x.dtype)


def _loss(g):
    return lambda x: sum(jnp.sum(y**2) for y in jax.tree.leaves(g(x)))


#
# The sdist
#


def test_download_fails_fast_without_index(tmp_path, monkeypatch):
    """An unreachable index is a clear error, not a hang."""
    # Nothing listens on the loopback discard port: the connection is refused.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Could not download the sdist"):
        download_examples(tmp_path, timeout=120.0)
    assert time.monotonic() - start < 60


#
# apply
#


@parametrize_transport
@parametrize_all_examples
def test_apply(client, ex, inputs, example, transport):
    f = tlx.TesseractModule(client)
    out = f(inputs)
    assert client.stats == {"apply": 1}
    assert_close(out, ex.ref(inputs), ex, "apply", types=True)


@parametrize_transport
@parametrize_example
def test_bad_inputs(client, ex, inputs, example, transport):
    """Refused with the field's name, before any request."""
    f = tlx.TesseractModule(client)
    for bad in ex.bad:
        with pytest.raises((TypeError, ValueError)) as error:
            f(bad.change(inputs))
        assert re.search(bad.field, str(error.value)), (
            f"{ex.name}, {bad.what}: the error does not name {bad.field}: {error.value}"
        )
        assert client.stats == {}, f"{ex.name}, {bad.what}: sent {client.stats}"


#
# Derivatives, with respect to each differentiable input in turn
#


@parametrize_transport
@parametrize_example
def test_jvp(client, ex, inputs, example, transport):
    f = tlx.TesseractModule(client)
    for i, wrt in enumerate(ex.wrt):
        x, t = get_path(inputs, wrt), _like(get_path(inputs, wrt), seed=i)
        got = jax.jvp(ex.fn(f, inputs, wrt), (x,), (t,))
        want = jax.jvp(ex.fn(ex.ref, inputs, wrt), (x,), (t,))
        assert_close(got, want, ex, f"jvp wrt {wrt}")


@parametrize_transport
@parametrize_example
def test_vjp(client, ex, inputs, example, transport):
    f = tlx.TesseractModule(client)
    for i, wrt in enumerate(ex.wrt):
        x = get_path(inputs, wrt)
        g, g_ref = ex.fn(f, inputs, wrt), ex.fn(ex.ref, inputs, wrt)
        out, pullback = jax.vjp(g, x)
        out_ref, pullback_ref = jax.vjp(g_ref, x)
        assert_close(out, out_ref, ex, f"vjp wrt {wrt}: primal")
        ct = {path: _like(y, seed=10 + i) for path, y in out_ref.items()}
        assert_close(pullback(ct), pullback_ref(ct), ex, f"vjp wrt {wrt}")
        grad = jax.grad(_loss(g))(x)
        assert_close(grad, jax.grad(_loss(g_ref))(x), ex, f"grad wrt {wrt}")


@parametrize_transport
@parametrize_example
def test_jacfwd(client, ex, inputs, example, transport):
    f = tlx.TesseractModule(client)
    for wrt in ex.wrt:
        x = get_path(inputs, wrt)
        got = jax.jacfwd(ex.fn(f, inputs, wrt))(x)
        want = jax.jacfwd(ex.fn(ex.ref, inputs, wrt))(x)
        assert_close(got, want, ex, f"jacfwd wrt {wrt}")


@parametrize_transport
@parametrize_example
def test_jacrev(client, ex, inputs, example, transport):
    f = tlx.TesseractModule(client)
    for wrt in ex.wrt:
        x = get_path(inputs, wrt)
        got = jax.jacrev(ex.fn(f, inputs, wrt))(x)
        want = jax.jacrev(ex.fn(ex.ref, inputs, wrt))(x)
        assert_close(got, want, ex, f"jacrev wrt {wrt}")


@parametrize_transport
@parametrize_example
def test_jit(client, ex, inputs, example, transport):
    """`jax.jit` of apply, of a JVP and of a gradient."""
    f = tlx.TesseractModule(client)
    for i, wrt in enumerate(ex.wrt):
        x, t = get_path(inputs, wrt), _like(get_path(inputs, wrt), seed=20 + i)
        g, g_ref = ex.fn(f, inputs, wrt), ex.fn(ex.ref, inputs, wrt)
        assert_close(jax.jit(g)(x), g_ref(x), ex, f"jit(apply) wrt {wrt}")
        jvp = jax.jit(lambda x, t: jax.jvp(g, (x,), (t,)))
        want = jax.jvp(g_ref, (x,), (t,))
        assert_close(jvp(x, t), want, ex, f"jit(jvp) wrt {wrt}")
        grad = jax.jit(jax.grad(_loss(g)))(x)
        assert_close(grad, jax.grad(_loss(g_ref))(x), ex, f"jit(grad) wrt {wrt}")


@parametrize_transport
@parametrize_example
def test_vmap(client, ex, inputs, example, transport):
    """Two primal points at once match the reference at each point."""
    f = tlx.TesseractModule(client)
    for wrt in ex.wrt:
        x = jnp.asarray(get_path(inputs, wrt))
        points = [x, (1.1 * x + 0.05).astype(x.dtype)]
        got = jax.vmap(ex.fn(f, inputs, wrt))(jnp.stack(points))
        g_ref = ex.fn(ex.ref, inputs, wrt)
        want = jax.tree.map(lambda *ys: jnp.stack(ys), *[g_ref(p) for p in points])
        assert_close(got, want, ex, f"vmap wrt {wrt}")


#
# lineax: the Jacobian as an operator, solved on the server where it can be
#


@parametrize_transport
@parametrize_example
def test_onserver_least_squares(client, ex, inputs, example, transport):
    """`tlx.OnServer(lx.Normal(lx.CG))` on each derivative, as a
    `TesseractJacobianOperator`: the minimum-norm least-squares solution of `J x = b`
    (wide or tall), against pure JAX's `lstsq` of the reference's Jacobian. One
    `/linear_solve` where the server offers it (tesseract-lx, for a Tesseract with a
    JVP); elsewhere the same solve runs here, and `client.decisions` says why. (Not
    LSMR: lineax's fails on float32 vectors under x64, in pure JAX too. A derivative
    whose Jacobian is rank-deficient is left out: its normal equations are singular,
    and lineax's `Normal` needs full rank.)"""
    f = tlx.TesseractModule(client)
    jax.block_until_ready(f(inputs))  # the output shapes, without `/abstract_eval`
    tol = max(ex.rtol, 1e-10)
    solver = tlx.OnServer(lx.Normal(lx.CG(rtol=tol, atol=tol)))
    # In process is the tesseract-lx app too.
    on_server = transport != "stock" and client.schema.has("linear_solve")
    solved = 0
    for i, wrt in enumerate(ex.wrt):
        x0 = jnp.asarray(get_path(inputs, wrt))

        def g_ref(x, wrt=wrt):
            out = ex.fn(ex.ref, inputs, wrt)(x.reshape(x0.shape).astype(x0.dtype))
            return ravel_pytree(out if len(ex.of) > 1 else out[ex.of[0]])[0]

        M = jax.jacfwd(g_ref)(x0.reshape(-1).astype(jnp.float64))
        if jnp.linalg.matrix_rank(M) < min(M.shape):
            continue
        J = tlx.TesseractJacobianOperator(f, inputs, wrt=wrt, of=ex.of)
        b = jax.tree.map(
            lambda s: _like(jnp.zeros(s.shape, s.dtype), 20 + i), J.out_structure()
        )
        flat_b, _ = ravel_pytree(b)
        want = jnp.linalg.lstsq(M, flat_b.astype(jnp.float64))[0]
        client.stats.clear()
        client.decisions.clear()
        got = lx.linear_solve(J, b, solver, throw=False)
        assert got.result == lx.RESULTS.successful, f"{ex.name} wrt {wrt}"
        flat, _ = ravel_pytree(got.value)
        scale = max(float(jnp.linalg.norm(want)), 1.0)
        np.testing.assert_allclose(
            flat, want, rtol=0, atol=1e3 * tol * scale, err_msg=f"{ex.name} {wrt}"
        )
        local = [d.chosen for d in client.decisions if d.kind == "linear_solve"]
        if on_server:
            assert client.stats == {"linear_solve": 1}, f"{ex.name} wrt {wrt}"
        else:
            assert "linear_solve" not in client.stats, f"{ex.name} wrt {wrt}"
            assert local == ["local"], f"{ex.name} wrt {wrt}"
        solved += 1
    assert solved, f"{ex.name}: no derivative of full rank to solve with"
