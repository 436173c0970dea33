"""Fuzzing: the server's endpoints against their own OpenAPI document, and the
client's wire encoding.

**The server.** Every computational endpoint of `tesseract-lx serve`, the batched
ones, `/linear_solve` and `/nonlinear_solve` included, gets requests that
schemathesis generates from the server's own `/openapi.json`: valid by the schema
(`positive`) and invalid by it (`negative`).
`examples/tesseracts/pytree` (nested inputs, a static int) runs in a real server
process over HTTP, `examples/tesseracts/bratu` in process (schemathesis' ASGI
transport on `create_app`). What must hold, for every request:

- no 5xx, but the one kind a schema cannot rule out (`_tesseracts_own_500`), and
    a nonlinear solve that failed when asked to `throw` (optimistix's message);
- every 4xx carries a message (`detail`), every request invalid by the schema is a
    4xx, and every 200 is what the schema documents;
- the server still answers correctly afterwards (no crash, no state poisoned).

Arrays drawn from a schema alone are almost never decodable (a random base64 string
for a shape of 10**20): most valid requests have their arrays redrawn to fit their
declared shapes and dtypes, most with the shapes of related inputs tied, and with
(co)tangents, right-hand sides and initial guesses keyed and shaped as the point
says, and solvers that stop soon (`_deeper`), so that requests reach the Tesseract,
the linearisation cache, the batched modes and the Krylov loop.

**The wire encoding.** Random trees of NumPy arrays survive `encode_tree` ->
`orjson` -> `decode_tree` bit for bit (`Client.request`'s path).
"""

import base64
import collections
import concurrent.futures
import copy
import dataclasses
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import numpy as np
import orjson
import pytest
import schemathesis
import tesseract_lx as tlx
from hypothesis import given, HealthCheck, settings
from schemathesis import GenerationMode
from tesseract_core.runtime.config import (
    override_config,
    snapshot_config,
    update_config,
)
from tesseract_core.runtime.file_interactions import is_absolute_path
from tesseract_lx._server import create_app
from tesseract_lx._transport import Response
from tesseract_lx._wire.encoding import decode_tree, encode_tree

from helpers import tree_allclose
from references import bratu_inputs, bratu_ref, pytree_inputs, pytree_ref


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "tesseracts"

ENDPOINTS = (
    "apply",
    "jacobian",
    "jacobian_vector_product",
    "vector_jacobian_product",
    "abstract_eval",
    "batched_apply",
    "batched_jacobian_vector_product",
    "batched_vector_jacobian_product",
    "linear_solve",
    "nonlinear_solve",
)
# Requests per endpoint and Tesseract (positive and negative together): the file
# runs in well under a minute on 2 cores. More for a deeper search:
# `TESSERACT_LX_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`.
EXAMPLES_PER_ENDPOINT = int(os.environ.get("TESSERACT_LX_FUZZ_EXAMPLES", "10"))


#
# The fuzzed Tesseracts
#


def _at(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class Fuzzed:
    """A Tesseract to fuzz, and what its schema cannot say about it.

    - `shapes`: its array inputs' declared shapes (`None`: any size), which its
        abstract inputs' schema does not state;
    - `tied`: two inputs whose shapes its maths needs equal (the schema says only
        that each has any size);
    - `out_shape(inputs, path)`: the shape of output `path` at encoded `inputs`;
    - `square`: differentiable `(input, output)` paths of the same shape (a square
        Jacobian, which every `/linear_solve` solver takes).
    """

    path: Path
    shapes: dict[str, tuple[int | None, ...]]
    tied: tuple[str, str]
    out_shape: Callable[[dict, str], list]
    ref: Callable[[dict], dict]
    make_inputs: Callable[[int], dict]
    square: tuple[tuple[str, str], ...] = ()


PYTREE = Fuzzed(
    EXAMPLES / "pytree" / "tesseract_api.py",
    shapes={"params.a": (3,), "params.b": (), "x": (None,), "offset": (None,)},
    tied=("x", "offset"),
    out_shape=lambda inputs, path: inputs["x"]["shape"] if path == "y" else [],
    ref=pytree_ref,
    make_inputs=lambda seed: pytree_inputs(seed=seed),
    square=(("x", "y"), ("offset", "y"), ("params.b", "stats.norm")),
)
BRATU = Fuzzed(
    EXAMPLES / "bratu" / "tesseract_api.py",
    shapes={"u": (None, None), "k": (), "f": (None, None)},
    tied=("u", "f"),
    out_shape=lambda inputs, path: inputs["u"]["shape"],
    ref=bratu_ref,
    make_inputs=lambda seed: bratu_inputs(n=4, seed=seed),
    square=(("u", "residual"), ("f", "residual")),
)


@pytest.fixture(scope="module")
def pytree_server():
    """A real `tesseract-lx serve` process of its own (the fuzz changes what a
    server remembers: cache entries, batched modes; shared servers must not see it),
    started in the background while the in-process fuzz runs. Its binref input
    folder is private and empty (`tlx.serve`'s default)."""
    serving = tlx.serve(PYTREE.path, server="tesseract-lx")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(serving.__enter__)
        try:
            yield started
        finally:
            if started.exception() is None:
                serving.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pytree_http(pytree_server):
    client = pytree_server.result()
    return PYTREE, schemathesis.openapi.from_url(f"{client.urls[0]}/openapi.json")


@pytest.fixture(scope="module")
def bratu_asgi(tmp_path_factory):
    """The same app in process, through schemathesis' ASGI transport; its binref
    input folder empty too (tesseract-core's runtime config, restored after)."""
    with override_config(snapshot_config()):
        update_config(input_path=str(tmp_path_factory.mktemp("inputs")))
        app = create_app(BRATU.path)
        yield BRATU, schemathesis.openapi.from_asgi("/openapi.json", app)


#
# Requests that reach the Tesseract
#


def _is_array_dict(x: Any) -> bool:
    return (
        isinstance(x, dict)
        and isinstance(x.get("shape"), list)
        and isinstance(x.get("dtype"), str)
    )


# Sizes 0, 1, 2 (empty, broadcastable, general): each new shape costs the Tesseract
# a compilation, a fuzz of many shapes would spend its time in XLA.
_SIZES = 3


def _small(shape: list) -> list | None:
    """A drawn shape made small (sizes mod `_SIZES`), or `None` if it is no array's
    shape (negative, huge or non-integer sizes stay as drawn: the server must
    refuse them)."""
    out = []
    for d in shape:
        if isinstance(d, float) and d.is_integer():
            d = int(d)
        if type(d) is not int or not 0 <= d < 2**63:
            return None
        out.append(d % _SIZES)
    return out


@st.composite
def _data(draw, shape: list, dtype: str) -> dict:
    """An array dict's `data` that decodes to `shape` and `dtype`: base64, or a JSON
    list when finite (JSON has no NaN)."""
    arr = draw(hnp.arrays(np.dtype(dtype), tuple(shape)))
    finite = arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all())
    if arr.dtype.kind == "c" or not finite or draw(st.booleans()):
        buffer = base64.b64encode(arr.tobytes()).decode()
        return {"buffer": buffer, "encoding": "base64"}
    return {"buffer": arr.ravel().tolist(), "encoding": "json"}


@st.composite
def _size(draw, drawn: list, i: int, abstract: bool) -> Any:
    """A free size of a fitted shape: the drawn one mod `_SIZES` (small). An
    abstract shape keeps one drawn negative or huge: the server must refuse it."""
    d = drawn[i] if i < len(drawn) else draw(st.integers(0, _SIZES - 1))
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    if type(d) is int and 0 <= d < 2**63:
        return d % _SIZES
    return d if abstract and type(d) is int else draw(st.integers(0, _SIZES - 1))


@st.composite
def _fitted(draw, point: Any, fuzzed: Fuzzed) -> Any:
    """A drawn point whose arrays have their declared shapes (free sizes drawn) and
    data to match (`ShapeDType`s of `/abstract_eval`: no data). In most points the
    `tied` inputs share a shape. Ints are mostly made small: a static int is
    compiled once per value. (Hypothesis draws 0 most: it means "fit".)"""
    if not isinstance(point, dict):
        return point
    point = copy.deepcopy(point)
    arrays = {}
    for path, declared in fuzzed.shapes.items():
        try:
            node = _at(point, path)
        except (KeyError, TypeError):
            continue
        if _is_array_dict(node) and node["dtype"] in np.sctypeDict:
            abstract = "data" not in node
            drawn = node["shape"]
            node["shape"] = [
                draw(_size(drawn, i, abstract)) if size is None else size
                for i, size in enumerate(declared)
            ]
            arrays[path] = node
    a, b = fuzzed.tied
    if a in arrays and b in arrays and draw(st.integers(0, 3)) < 3:
        arrays[b]["shape"] = list(arrays[a]["shape"])
    for node in arrays.values():
        if "data" in node and _small(node["shape"]) is not None:
            node["data"] = draw(_data(node["shape"], node["dtype"]))
    for key, value in point.items():
        if type(value) is int and draw(st.integers(0, 3)) < 3:
            point[key] = value % _SIZES
    return point


@st.composite
def _keyed(
    draw, keys: list, shape_of: Callable[[str], Any], k: int | None
) -> dict | None:
    """Arrays keyed by `keys`, each of `shape_of(path)` (with a leading axis of `k`
    when given); now and then one a size too big, which the server must refuse
    (422). `None` when a shape cannot be told."""
    if not keys:
        return {}
    wrong = draw(st.integers(0, 4 * len(keys) - 1)) - 3 * len(keys)  # < 0: none
    vectors = {}
    for i, path in enumerate(keys):
        try:
            shape = _small(list(shape_of(path)))
        except (KeyError, TypeError):
            return None
        if shape is None or math.prod(shape) > 64:
            return None
        shape = shape if k is None else [k, *shape]
        if i == wrong:
            shape = [*shape[:-1], shape[-1] + 1] if shape else [1]
        dtype = draw(st.sampled_from(["float64", "float32", "int32"]))
        data = draw(_data(shape, dtype))
        vectors[path] = {"object_type": "array", "shape": shape, "dtype": dtype}
        vectors[path]["data"] = data
    return vectors


# Solvers that stop soon whatever they are given (a drawn one may ask for 2**62
# steps at zero tolerance: that is a long answer, not a wrong one).
_SOLVERS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["GMRES", "BiCGStab", "CG", "LSMR"]),
        "rtol": st.sampled_from([0.0, 1e-8, 1e-3]),
        "atol": st.sampled_from([0.0, 1e-8, 1e-3]),
        "max_steps": st.integers(1, 30),
    }
)
_SOLVERS = st.one_of(
    _SOLVERS, _SOLVERS.map(lambda inner: {"name": "Normal", "inner": inner})
)
_TOLERANCES = st.sampled_from([0.0, 1e-8, 1e-3])
_STEP_SOLVERS = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"name": st.sampled_from(["LU", "QR", "SVD", "AutoLinearSolver"])}
    ),
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["GMRES", "BiCGStab", "CG"]),
            "rtol": _TOLERANCES,
            "atol": _TOLERANCES,
            "max_steps": st.integers(1, 10),
        }
    ),
)
_NONLINEAR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(
            ["Newton", "Chord", "GaussNewton", "LevenbergMarquardt"]
        ),
        "rtol": _TOLERANCES,
        "atol": _TOLERANCES,
        "linear_solver": _STEP_SOLVERS,
    }
)


@st.composite
def _nonlinear(draw, body: dict, fuzzed: Fuzzed) -> dict:
    """`/nonlinear_solve`: mostly a square problem (every solver runs on it), an
    initial value shaped as the point says (now and then a size too big), and a
    solver that stops soon."""
    if fuzzed.square and draw(st.integers(0, 3)) < 3:
        wrt, of = map(list, zip(draw(st.sampled_from(fuzzed.square))))
        body = {**body, "wrt": wrt, "of": of}
    wrt = body.get("wrt")
    out = {**body, "solver": draw(_NONLINEAR), "max_steps": draw(st.integers(1, 4))}
    if draw(st.booleans()) and isinstance(wrt, list):
        shape_of = lambda p: _at(body["inputs"], p)["shape"]  # noqa: E731
        y0 = draw(_keyed(wrt, shape_of, None))
        if y0 is not None:
            out["y0"] = y0
    if draw(st.booleans()):
        out["tags"] = ["positive_semidefinite"]
    return out


@st.composite
def _vectors(draw, body: dict, fuzzed: Fuzzed, batched: bool) -> dict:
    """Tangents (cotangents) keyed by `jvp_inputs` (`vjp_outputs`), each shaped as
    its input (output) at the point, with a leading batch axis when `batched`;
    `/linear_solve`'s right-hand sides and initial guesses likewise, and a solver
    that stops soon."""
    input_shape = lambda p: _at(body["inputs"], p)["shape"]  # noqa: E731
    output_shape = lambda p: fuzzed.out_shape(body["inputs"], p)  # noqa: E731
    if "solver" in body and "of" in body:
        return draw(_nonlinear(body, fuzzed))
    if "rhs" in body:
        ins, outs = body.get("jvp_inputs"), body.get("jvp_outputs")
        if not isinstance(ins, list) or not isinstance(outs, list):
            return body
        if draw(st.integers(0, 3)) == 3:
            return body
        if fuzzed.square and (not ins or not outs or draw(st.booleans())):
            # Mostly a square map: every solver runs on it.
            ins, outs = map(list, zip(draw(st.sampled_from(fuzzed.square))))
            body = {**body, "jvp_inputs": ins, "jvp_outputs": outs}
        transpose = body.get("transpose") is True
        (rhs_keys, rhs_shape), (sol_keys, sol_shape) = (
            ((ins, input_shape), (outs, output_shape))
            if transpose
            else ((outs, output_shape), (ins, input_shape))
        )
        k = draw(st.integers(1, 3))
        rhs = draw(_keyed(rhs_keys, rhs_shape, k))
        if rhs is None:
            return body
        out = {**body, "rhs": rhs, "solver": draw(_SOLVERS)}
        if draw(st.booleans()):
            out["y0"] = draw(_keyed(sol_keys, sol_shape, k))
        elif "y0" in out:
            del out["y0"]
        if draw(st.booleans()):
            out["tags"] = ["positive_semidefinite"]
        return out
    if "tangent_vector" in body:
        field, keys, shape_of = "tangent_vector", body.get("jvp_inputs"), input_shape
    elif "cotangent_vector" in body:
        field, keys = "cotangent_vector", body.get("vjp_outputs")
        shape_of = output_shape
    else:
        return body
    if not isinstance(keys, list) or draw(st.integers(0, 3)) == 3:
        return body
    vectors = draw(_keyed(keys, shape_of, draw(st.integers(1, 3)) if batched else None))
    return body if vectors is None else {**body, field: vectors}


def _deeper(body: Any, fuzzed: Fuzzed, batched: bool) -> st.SearchStrategy:
    if not isinstance(body, dict):
        return st.just(body)
    inputs = body.get("inputs")
    if isinstance(inputs, list):
        points = st.tuples(*(_fitted(p, fuzzed) for p in inputs)).map(list)
    else:
        points = _fitted(inputs, fuzzed)
    fitted = points.map(lambda inputs: {**body, "inputs": inputs})
    # Fitted first: hypothesis' simplest choice, the one it draws most often.
    return st.one_of(
        fitted.flatmap(lambda b: _vectors(b, fuzzed, batched)), st.just(body)
    )


_BINREF = re.compile(r"^(?P<path>.+?)(?P<rest>(\:\d+(\:\d+)?)?)$")


def _confine_binrefs(tree: Any) -> None:
    """Point every binref array at a relative name, in place.

    tesseract-core's decoder reads absolute paths, `..` and fsspec URLs, whatever
    the input folder: a drawn `http://...` would be fetched. Our server refuses
    them (`_server/guard.py`, tested in `test_security.py`); should that ever
    break, the fuzz still stays within the server's empty input folder, so it never
    reads a file, nor contacts any address.
    """
    if isinstance(tree, list):
        for v in tree:
            _confine_binrefs(v)
    if not isinstance(tree, dict):
        return
    buffer = tree.get("buffer")
    if tree.get("encoding") == "binref" and isinstance(buffer, str):
        found = _BINREF.match(buffer)
        path, rest = (found["path"], found["rest"]) if found else (buffer, "")
        if is_absolute_path(path) or ".." in path or "/" in path or "\\" in path:
            tree["buffer"] = "missing.bin" + rest
    for v in tree.values():
        _confine_binrefs(v)


#
# What every answer must be
#


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _has_message(body: Any) -> bool:
    """FastAPI's `detail`: a message, a list of errors with messages and locations,
    or (406, tesseract-core's encoding negotiation) a dict with a message."""
    if not isinstance(body, dict):
        return False
    detail = body.get("detail")
    if isinstance(detail, str):
        return bool(detail.strip())
    if isinstance(detail, list):
        return bool(detail) and all(
            isinstance(e, dict) and e.get("msg") and "loc" in e for e in detail
        )
    return isinstance(detail, dict) and bool(detail.get("message"))


def _points(body: Any) -> list:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    points = inputs if isinstance(inputs, list) else [inputs]
    return [p for p in points if isinstance(p, dict)]


def _tesseracts_own_500(fuzzed: Fuzzed, body: Any, answer: Any) -> bool:
    """The one 500 accepted: the Tesseract's maths raised because its `tied` inputs
    have different shapes.

    Each is valid by the schema (two arrays of any size: it says nothing of their
    sizes being equal), so only the Tesseract can tell, by raising; the server then
    answers 500 with the Tesseract's own words (`docs/serving/spec.md`, Errors). Any
    other 500, or one without the Tesseract's words, fails the test.
    """
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return False
    if "incompatible shapes for broadcasting" not in error["message"]:
        return False
    a, b = fuzzed.tied
    return any(
        _is_array_dict(p.get(a))
        and _is_array_dict(p.get(b))
        and _small(p[a]["shape"]) is not None  # both shapes of arrays
        and _small(p[b]["shape"]) is not None
        and p[a]["shape"] != p[b]["shape"]
        for p in _points(body)
    )


def _thrown(body: Any, answer: Any) -> bool:
    """A nonlinear solve that failed, asked to `throw`: a 500 with optimistix's
    message (`docs/serving/spec.md`)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    return (
        isinstance(body, dict)
        and body.get("throw") is True
        and isinstance(error, dict)
        and error.get("type") == "NonlinearSolveFailed"
        and bool(error.get("message"))
    )


def _check(fuzzed: Fuzzed, case: Any, response: Any) -> None:
    status, answer = response.status_code, _json(response)
    where = f"{case.operation.path} answered {status}: {response.text[:2000]}"
    if status >= 500:
        assert _tesseracts_own_500(fuzzed, case.body, answer) or _thrown(
            case.body, answer
        ), where
        return
    if status >= 400:
        assert _has_message(answer), where
    # An invalid request refused (4xx), a 200 as documented, as schemathesis checks.
    checks = schemathesis.checks  # pyright: ignore[reportAttributeAccessIssue]
    case.validate_response(
        response,
        checks=[checks.negative_data_rejection, checks.response_schema_conformance],
    )


def _numpy(x: Any) -> Any:
    return np.asarray(x) if isinstance(x, jax.Array) else x


def _still_serving(fuzzed: Fuzzed, schema: Any) -> None:
    """After the fuzz: the server answers, and correctly (nothing poisoned)."""
    points = [fuzzed.make_inputs(seed) for seed in (1, 2)]
    refs = [fuzzed.ref(p) for p in points]
    encoded = [encode_tree(jax.tree.map(_numpy, p)) for p in points]
    for endpoint, body, expected in (
        ("apply", {"inputs": encoded[0]}, refs[0]),
        ("batched_apply", {"inputs": encoded}, refs),
    ):
        case = schema[f"/{endpoint}"]["POST"].Case(body=body)
        response = case.call()
        assert response.status_code == 200, response.text
        assert tree_allclose(decode_tree(response.json()), expected)


#
# The fuzz
#


# tesseract-core's binref decoder multiplies drawn sizes before refusing them; its
# JSON decoder casts a float 2**63 to int64 with a warning (and wraps it to -2**63:
# its range check compares in float64, a bug of tesseract-core's); schemathesis'
# strategies use `random`.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random`:hypothesis.errors.HypothesisDeprecationWarning"
)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("target", ["bratu_asgi", "pytree_http"])
def test_fuzz_endpoint(target, endpoint, request, pytree_server):
    """`EXAMPLES_PER_ENDPOINT` requests to `endpoint`, each answered as it must be;
    then the server still answers correctly."""
    fuzzed, schema = request.getfixturevalue(target)
    operation = schema[f"/{endpoint}"]["POST"]
    batched = endpoint.startswith("batched_") or endpoint == "linear_solve"
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

    def deeper(case):
        return st.tuples(_deeper(case.body, fuzzed, batched), _ACCEPT).map(
            lambda args: _with_body(case, *args)
        )

    seen = collections.Counter()

    @settings(
        max_examples=EXAMPLES_PER_ENDPOINT,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(case=st.one_of(positive.flatmap(deeper), negative))
    def fuzz(case):
        _confine_binrefs(case.body)
        response = case.call()
        mode = case.meta.generation.mode.value if case.meta else "?"
        seen[mode, response.status_code] += 1
        _check(fuzzed, case, response)

    fuzz()
    print(f"{target} /{endpoint}: {dict(sorted(seen.items()))}")
    _still_serving(fuzzed, schema)


# The encodings a client asks for, mostly (a drawn `Accept` is mostly a 406); `None`
# keeps the drawn one.
_ACCEPT = st.sampled_from(
    [
        "application/json+base64",
        "application/json",
        "application/json+binref",
        "application/json+base64, application/json;q=0.5",
        None,
    ]
)


def _with_body(case: Any, body: Any, accept: str | None) -> Any:
    case.body = body
    if accept is not None:
        case.headers = {**(case.headers or {}), "accept": accept}
    return case


#
# The wire encoding
#


_DTYPES = ("float32", "float64", "int32", "int64", "bool", "uint8")
# Bit patterns random bytes rarely hit: NaNs with payloads (quiet, signalling,
# negative), infinities, -0, the smallest subnormal, the extreme ints.
_SPECIAL = {
    "float64": [
        0x7FF8000000000001,
        0xFFF4000000000000,
        0x7FF0000000000001,
        0x7FF0000000000000,
        0x8000000000000000,
        0x0000000000000001,
    ],
    "float32": [0x7FC00001, 0xFFA00000, 0x7F800001, 0xFF800000, 0x80000000, 1],
    "int64": [2**63 - 1, 2**63],
    "int32": [2**31 - 1, 2**31],
    "uint8": [255],
}


@st.composite
def _elements(draw, dtype: np.dtype, n: int) -> np.ndarray:
    """`n` values of `dtype`, as bit patterns: random bytes (every byte string is
    a value, but for bool), some overwritten by special ones."""
    if dtype == np.bool_:
        return draw(hnp.arrays(dtype, n))
    raw = bytearray(
        draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    )
    special = _SPECIAL.get(dtype.name)
    if special and n:
        where = st.tuples(st.integers(0, n - 1), st.sampled_from(special))
        for i, value in draw(st.lists(where, max_size=n)):
            size = dtype.itemsize
            raw[i * size : (i + 1) * size] = value.to_bytes(size, "little")
    return np.frombuffer(bytes(raw), dtype.newbyteorder("<")).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """An array as sent (any layout, any byte order), and the array it must decode
    to (native byte order, C-contiguous)."""

    sent: Any
    expected: np.ndarray


_LAYOUTS = ("contiguous", "transposed", "strided", "reversed", "fortran", "scalar")


@st.composite
def _leaves(draw) -> _Leaf:
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    layout = draw(st.sampled_from(_LAYOUTS))
    # The array sent is a view of `base`, which is bigger when the view skips.
    if layout == "transposed":
        base_shape, view = shape[::-1], lambda a: a.T
    elif layout == "strided":
        base_shape = tuple(2 * n for n in shape)
        view = lambda a: a[(slice(None, None, 2),) * a.ndim]  # noqa: E731
    elif layout == "reversed":
        base_shape, view = shape, lambda a: a[(slice(None, None, -1),) * a.ndim]
    elif layout == "fortran":
        base_shape, view = shape, np.asfortranarray
    elif layout == "scalar":  # a NumPy scalar, not an array
        base_shape, view = (), lambda a: a[()]
    else:
        base_shape, view = shape, lambda a: a
    base = draw(_elements(dtype, math.prod(base_shape))).reshape(base_shape)
    sent = base
    if draw(st.booleans()):
        # The same bits, big-endian: `byteswap` moves bytes, it computes nothing.
        sent = base.byteswap().view(dtype.newbyteorder(">"))
    expected = np.array(view(base), order="C")
    return _Leaf(view(sent), expected)


# Keys of the wire format's own array dicts among them: a tree may use them too.
_KEYS = st.one_of(
    st.sampled_from(["data", "shape", "dtype", "object_type", "buffer", "encoding"]),
    st.text(max_size=3),
)
_TREES = st.recursive(
    _leaves(),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_KEYS, children, max_size=4)
    ),
    max_leaves=6,
)


def _tree_map(fn: Callable, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tree_map(fn, v) for v in tree]
    return fn(tree)


def _assert_bitwise_equal(out: Any, expected: Any, where: str = "") -> None:
    """Same structure; every array of the same native dtype and shape, with the
    same bytes (NaN payloads included)."""
    if isinstance(expected, dict):
        assert isinstance(out, dict) and list(out) == list(expected), where
        for k in expected:
            _assert_bitwise_equal(out[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, list):
        assert isinstance(out, list) and len(out) == len(expected), where
        for i, (o, e) in enumerate(zip(out, expected)):
            _assert_bitwise_equal(o, e, f"{where}[{i}]")
    else:
        assert isinstance(out, np.ndarray), (where, out)
        assert out.dtype == expected.dtype and out.dtype.isnative, (where, out.dtype)
        assert out.shape == expected.shape, (where, out.shape, expected.shape)
        assert out.tobytes() == expected.tobytes(), (where, out, expected)


_WIRE_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_WIRE_SETTINGS
@given(tree=_TREES)
def test_wire_round_trip_is_bitwise(tree):
    """`encode_tree` then `decode_tree`, in process and through JSON bytes as
    `Client.request` sends and reads them (`orjson`)."""
    sent = _tree_map(lambda leaf: leaf.sent, tree)
    expected = _tree_map(lambda leaf: leaf.expected, tree)
    encoded = encode_tree(sent)
    _assert_bitwise_equal(decode_tree(encoded), expected)
    body = orjson.dumps(encoded, option=orjson.OPT_SERIALIZE_NUMPY)
    _assert_bitwise_equal(decode_tree(orjson.loads(body)), expected)
    # The dtypes sent are the names a Tesseract's schema accepts (`float64`, not
    # `>f8`).
    for leaf, enc in _leaf_pairs(tree, encoded):
        assert enc["dtype"] == leaf.expected.dtype.name
        assert enc["shape"] == list(leaf.expected.shape)


def _leaf_pairs(tree: Any, encoded: Any) -> list:
    if isinstance(tree, dict):
        return [p for k in tree for p in _leaf_pairs(tree[k], encoded[k])]
    if isinstance(tree, list):
        return [p for t, e in zip(tree, encoded) for p in _leaf_pairs(t, e)]
    return [(tree, encoded)]


class _Echo:
    """A transport whose server answers every request with its own body."""

    url = "http://127.0.0.1:9"
    binary = False  # JSON, whatever the server says

    def send(
        self, method: str, endpoint: str, body: bytes | None = None, headers=None
    ) -> Any:
        return Response(status=200, content=body or b"")

    def close(self) -> None:
        pass


@_WIRE_SETTINGS
@given(tree=_TREES)
def test_client_request_round_trip_is_bitwise(tree):
    """`Client.request` itself, to a server that echoes: what it sends decodes to
    what it was given."""
    client = tlx.Client(_Echo.url)  # never contacted: the transport is replaced
    client._transports = [_Echo()]
    out = client.request("apply", _tree_map(lambda leaf: leaf.sent, tree))
    _assert_bitwise_equal(out, _tree_map(lambda leaf: leaf.expected, tree))
