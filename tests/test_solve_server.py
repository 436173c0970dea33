"""`POST /linear_solve` on the server: initial guesses (`y0`), what it refuses, and
what it keeps after a request.

Real servers (the session's `tesseract-lx serve` processes) of the Bratu residual in
JAX (`/linear_solve` mode `linearise`) and in NumPy (mode `function`), each compared
with the same lineax solve on the Jacobian as a matrix (pure lineax, float64) and
with `np.linalg.solve`.
"""

import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import requests
from tesseract_lx._server import create_app
from tesseract_lx._server.lean import BinaryRoutes
from tesseract_lx._wire.encoding import ACCEPT, decode_tree, encode_tree
from tesseract_lx._wire.spec import Capabilities

from helpers import EXAMPLES, PARTIAL


N = 4
TESSERACTS = {
    "jax": EXAMPLES / "bratu" / "tesseract_api.py",
    "numpy": EXAMPLES / "bratu_numpy" / "tesseract_api.py",
}
# Spec, lineax solver, tags. GMRES restarts every 2 steps: without a guess it takes
# many, so a good guess shows.
SOLVERS = {
    "GMRES": (
        {"name": "GMRES", "rtol": 1e-10, "atol": 1e-10, "restart": 2},
        lx.GMRES(rtol=1e-10, atol=1e-10, restart=2),
        [],
    ),
    "BiCGStab": (
        {"name": "BiCGStab", "rtol": 1e-10, "atol": 1e-10},
        lx.BiCGStab(rtol=1e-10, atol=1e-10),
        [],
    ),
    "CG": (
        {"name": "CG", "rtol": 1e-10, "atol": 1e-10},
        lx.CG(rtol=1e-10, atol=1e-10),
        ["positive_semidefinite"],
    ),
    "LSMR": (
        {"name": "LSMR", "rtol": 1e-10, "atol": 1e-10},
        lx.LSMR(rtol=1e-10, atol=1e-10),
        [],
    ),
    "Normal": (
        {"name": "Normal", "inner": {"name": "CG", "rtol": 1e-10, "atol": 1e-10}},
        lx.Normal(lx.CG(rtol=1e-10, atol=1e-10)),
        [],
    ),
}


def _point(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "u": 0.1 * rng.normal(size=(N, N)),
        "k": np.float64(1.0),
        "f": rng.normal(size=(N, N)),
    }


def _neg_laplacian(u: np.ndarray) -> np.ndarray:
    p = np.pad(u, 1)
    return (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) * (
        N + 1
    ) ** 2


def _jacobian(point: dict) -> np.ndarray:
    """d residual / d u, as an (N*N, N*N) matrix, in NumPy."""
    columns = [
        (_neg_laplacian(e) - point["k"] * np.exp(point["u"]) * e).ravel()
        for e in np.eye(N * N).reshape(-1, N, N)
    ]
    return np.stack(columns, axis=1)


def _solve(url: str, payload: dict) -> dict:
    r = requests.post(
        f"{url}/linear_solve",
        json=encode_tree(payload),
        headers={"Accept": ACCEPT},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return decode_tree(r.json())


def _refused(url: str, payload: dict) -> dict:
    r = requests.post(
        f"{url}/linear_solve",
        json=encode_tree(payload),
        headers={"Accept": ACCEPT},
        timeout=120,
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    return error


@pytest.fixture(scope="module")
def urls(served) -> dict[str, str]:
    return {name: served.get(path, "tlx").urls[0] for name, path in TESSERACTS.items()}


def _payload(point: dict, rhs: np.ndarray, transpose: bool, solver: str) -> dict:
    spec, _, tags = SOLVERS[solver]
    key = "u" if transpose else "residual"
    return {
        "inputs": point,
        "jvp_inputs": ["u"],
        "jvp_outputs": ["residual"],
        "rhs": {key: rhs},
        "transpose": transpose,
        "tags": tags,
        "solver": spec,
    }


#
# y0
#


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tesseract", list(TESSERACTS))
def test_y0_against_pure_lineax(urls, tesseract, transpose, solver):
    """Two right-hand sides in one request: the first starts from the exact
    solution, the second from a random guess. Both solutions are lineax's (and
    `np.linalg.solve`'s); from the exact solution it stops at once, as lineax does,
    and far sooner than without a guess."""
    point = _point()
    rng = np.random.default_rng(1)
    matrix = _jacobian(point)
    matrix = matrix.T if transpose else matrix
    b = rng.normal(size=(2, N * N))
    exact = np.linalg.solve(matrix, b.T).T
    guess = np.stack([exact[0], rng.normal(size=N * N)])
    sol_key = "residual" if transpose else "u"

    payload = _payload(point, b.reshape(2, N, N), transpose, solver)
    plain = _solve(urls[tesseract], payload)
    started = _solve(
        urls[tesseract], {**payload, "y0": {sol_key: guess.reshape(2, N, N)}}
    )

    # Pure lineax, on the same maths as a matrix, from the same guesses.
    _, lx_solver, tags = SOLVERS[solver]
    tag_set = frozenset(getattr(lx, f"{t}_tag") for t in tags)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tag_set)

    def pure(b, y0):
        sol = lx.linear_solve(operator, b, lx_solver, options={"y0": y0}, throw=False)
        return sol.value, sol.stats["num_steps"]

    want, want_steps = jax.vmap(pure)(jnp.asarray(b), jnp.asarray(guess))

    for answer in (plain, started):
        assert answer["result"] == ["successful", "successful"]
        got = np.asarray(answer["solution"][sol_key]).reshape(2, N * N)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    steps = started["num_steps"]
    assert steps[0] <= max(1, int(want_steps[0])), (steps, want_steps)
    assert steps[0] < plain["num_steps"][0], (steps, plain["num_steps"])


@pytest.mark.parametrize("tesseract", list(TESSERACTS))
def test_y0_refusals_name_the_field(urls, tesseract):
    url = urls[tesseract]
    point = _point()
    payload = _payload(point, np.ones((2, N, N)), False, "GMRES")
    cases = [
        # keys, not the solution's
        ({"residual": np.ones((2, N, N))}, ["body", "y0"], "exactly the keys"),
        # K, not that of `rhs`
        ({"u": np.ones((3, N, N))}, ["body", "y0", "u"], "has shape (3, 4, 4)"),
        # the shape at `u`
        ({"u": np.ones((2, N, N + 1))}, ["body", "y0", "u"], "expected (2, *(4, 4))"),
    ]
    for y0, loc, words in cases:
        error = _refused(url, {**payload, "y0": y0})
        assert error["loc"] == loc and words in error["msg"], error
    # Normal of a wide map (2 inputs, 1 output) solves for another unknown.
    wide = {
        **payload,
        "jvp_inputs": ["u", "f"],
        "solver": SOLVERS["Normal"][0],
        "y0": {"u": np.ones((2, N, N)), "f": np.ones((2, N, N))},
    }
    error = _refused(url, wide)
    assert error["loc"] == ["body", "y0"] and "Normal of a wide system" in error["msg"]
    # ... which LSMR takes, and solves.
    answer = _solve(url, {**wide, "solver": SOLVERS["LSMR"][0]})
    assert answer["result"] == ["successful", "successful"]


def test_linear_solve_options_are_stated(urls, served):
    for url in urls.values():
        doc = requests.get(f"{url}/openapi.json", timeout=30).json()
        assert doc["x-tesseract-lx"]["linear_solve_options"] == ["y0"]
        assert Capabilities.from_openapi(doc).linear_solve_options == ("y0",)
    # A stock server, and an older tesseract-lx one, say nothing: nothing is sent.
    stock = served.get(TESSERACTS["numpy"], "stock").urls[0]
    doc = requests.get(f"{stock}/openapi.json", timeout=30).json()
    assert Capabilities.from_openapi(doc).linear_solve_options == ()
    older = {"version": "0.1.0", "batched": {"linear_solve": "linearise"}}
    assert Capabilities.from_dict(older).linear_solve_options == ()
    # A Tesseract without a JVP has no `/linear_solve`, and no options for it.
    app = create_app(PARTIAL / "bratu_jacobian_only" / "tesseract_api.py")
    assert app.state.tesseract_lx.info()["linear_solve_options"] == []


#
# What lineax would raise is a 422, never a 500
#


def test_what_lineax_refuses_is_a_422(urls):
    url = urls["jax"]
    payload = _payload(_point(), np.ones((1, N, N)), False, "GMRES")
    # Not square: one scalar input, a (4, 4) output.
    error = _refused(url, {**payload, "jvp_inputs": ["k"], "rhs": payload["rhs"]})
    assert error["loc"] == ["body", "solver", "name"]
    assert error["msg"].startswith("Value error, GMRES needs a square Jacobian")
    # CG without a definiteness tag.
    error = _refused(url, {**payload, "solver": SOLVERS["CG"][0], "tags": []})
    assert error["loc"] == ["body", "tags"] and "CG needs the tag" in error["msg"]
    # A tag of a map that is not square.
    error = _refused(
        url,
        {
            **payload,
            "jvp_inputs": ["k"],
            "solver": SOLVERS["LSMR"][0],
            "tags": ["symmetric"],
        },
    )
    assert error["loc"] == ["body", "tags"] and "square Jacobian" in error["msg"]
    # No path to solve for.
    error = _refused(url, {**payload, "jvp_inputs": []})
    assert error["loc"] == ["body", "jvp_inputs"]
    # Integer right-hand sides are cast to the map's float64.
    answer = _solve(url, {**payload, "rhs": {"residual": np.ones((1, N, N), int)}})
    assert np.asarray(answer["solution"]["u"]).dtype == np.float64


#
# Nothing kept of a request
#


def _route(app):
    """The `/linear_solve` route of an app: its payload model, check and function."""
    (middleware,) = [m for m in app.user_middleware if m.cls is BinaryRoutes]
    return middleware.kwargs["routes"]["linear_solve"]


@pytest.mark.parametrize("tesseract", list(TESSERACTS))
def test_a_request_is_not_kept(tesseract):
    """After a request (the first of its signature: the one whose solve is compiled
    and kept), neither its payload nor its arrays are alive: what is cached closes
    over static pieces only."""
    app = create_app(TESSERACTS[tesseract])
    route = _route(app)
    rng = np.random.default_rng(4)
    for transpose in (False, True):
        body = _payload(_point(5), rng.normal(size=(2, N, N)), transpose, "GMRES")
        key = "residual" if transpose else "u"
        body["y0"] = {key: rng.normal(size=(2, N, N))}
        payload = route.payload.model_validate(encode_tree(body))
        route.check(payload)
        answer = route.fn(payload)
        assert answer.result == ["successful", "successful"]
        alive = [
            weakref.ref(payload),
            weakref.ref(payload.inputs),
            weakref.ref(payload.inputs.u),
            weakref.ref(payload.inputs.f),
            *(weakref.ref(v) for v in (*payload.rhs.values(), *payload.y0.values())),
        ]
        del payload, answer
        gc.collect()
        assert [r for r in alive if r() is not None] == []


#
# Concurrent requests at different points
#


def _pure_lineax(point: dict, rhs: np.ndarray, transpose: bool, solver: str):
    """The same solve by pure lineax, on the Jacobian at `point` as a matrix."""
    matrix = _jacobian(point)
    matrix = matrix.T if transpose else matrix
    _, lx_solver, tags = SOLVERS[solver]
    tag_set = frozenset(getattr(lx, f"{t}_tag") for t in tags)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tag_set)
    solve = lambda b: lx.linear_solve(operator, b, lx_solver, throw=False).value  # noqa: E731
    return np.asarray(jax.vmap(solve)(jnp.asarray(rhs.reshape(len(rhs), -1))))


def _concurrently(solve, jobs: list) -> list:
    """`solve(job)` for every job, all at once in their own threads (released
    together, so their Krylov loops overlap); the answers, or what was raised."""
    barrier = threading.Barrier(len(jobs))
    answers: list = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = solve(jobs[i])
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            answers[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return answers


def _jobs(solver: str) -> list:
    """Solves at four points far apart (`k` 0.5 ... 2, other `u` and `f`), plain and
    transposed."""
    rng = np.random.default_rng(7)
    jobs = []
    for i, k in enumerate((0.5, 1.0, 1.5, 2.0)):
        point = {**_point(10 + i), "k": np.float64(k)}
        jobs.append((point, rng.normal(size=(2, N, N)), bool(i % 2), solver))
    return jobs


def _check_answers(jobs: list, answers: list, solution_of) -> None:
    for (point, rhs, transpose, solver), answer in zip(jobs, answers, strict=True):
        if isinstance(answer, BaseException):
            raise answer
        got = solution_of(answer, "residual" if transpose else "u")
        want = _pure_lineax(point, rhs, transpose, solver)
        np.testing.assert_allclose(got.reshape(2, -1), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["GMRES", "LSMR"])
@pytest.mark.parametrize(
    "tesseract, cache", [("numpy", True), ("jax", True), ("jax", False)]
)
def test_concurrent_solves_keep_their_points(tesseract, cache, solver):
    """`/linear_solve`'s endpoint function called from four threads at once, at four
    points (past the route's one-at-a-time runner, as a caller of the function
    could): every answer is pure lineax's at its own point. In `function` mode (the
    NumPy Tesseract; the JAX one without its cache) the Krylov loops call the
    Tesseract's JVP and VJP back at each iteration, each at its own request's point.
    """
    app = create_app(TESSERACTS[tesseract], cache=cache)
    route = _route(app)
    mode = "linearise" if tesseract == "jax" and cache else "function"
    assert app.state.tesseract_lx.modes["linear_solve"] == mode

    def solve(job):
        payload = route.payload.model_validate(encode_tree(_payload(*job)))
        route.check(payload)
        return route.fn(payload)

    jobs = _jobs(solver)
    for _ in range(2):  # the first round compiles, the second runs compiled solves
        answers = _concurrently(solve, jobs)
        _check_answers(
            jobs, answers, lambda a, key: np.asarray(a.model_dump()["solution"][key])
        )
    assert app.state.tesseract_lx.modes["linear_solve"] == mode


@pytest.mark.parametrize("tesseract", list(TESSERACTS))
def test_concurrent_requests_keep_their_points(urls, tesseract):
    """The same over HTTP: four requests at once to a running server."""
    jobs = _jobs("LSMR")
    answers = _concurrently(lambda job: _solve(urls[tesseract], _payload(*job)), jobs)
    _check_answers(jobs, answers, lambda a, key: np.asarray(a["solution"][key]))
