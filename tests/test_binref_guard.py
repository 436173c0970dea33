"""The binref guard decides on parsed values, where arrays are decoded.

A `json+binref` array names a file; tesseract-core reads absolute paths, `..` and
URLs as given. `tesseract-lx serve` must refuse any such buffer however the body
spells it: `"\\u0062inref"` is `"binref"` to every JSON parser, keys can be escaped
too, and `json.loads` (FastAPI's parser) also reads UTF-16 and UTF-32 bodies. The
hostile body here names a real file of known bytes; it is spelled at random
(escapes in keys and values, key order, whitespace, the text encoding), put at a
random array of the payload of every computational endpoint, and sent as JSON and
as a binary body (`application/x-tesseract-lx`, its header spelled so too) to:

- a real `tesseract-lx serve` process (the session's bratu server);
- the app in process, where an audit hook also sees every file opened;
- the app in process with the early check (`guard.BinrefGuard`, `lean.py`) switched
    off: tesseract-core's loader, wrapped by `_server/upstream.py`, refuses alone.

Every answer is a 422 naming the field, and the file's bytes are in none. A relative
name inside the input folder is still read, however spelled.
"""

import base64
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
from hypothesis import given, HealthCheck, Phase, settings
from tesseract_core.runtime import array_encoding
from tesseract_core.runtime.config import (
    override_config,
    snapshot_config,
    update_config,
)
from tesseract_lx._server import create_app, guard, lean, upstream
from tesseract_lx._transport import ASGITransport
from tesseract_lx._wire import binary
from tesseract_lx._wire.encoding import decode_tree, encode_tree

from helpers import ALL_CASES
from references import bratu_ref


N = 2
# 32 bytes: one (2, 2) float64 array; the file holds 8 of them.
SECRET = b"<<tesseract-lx secret 4f9c1e>>__"
assert len(SECRET) == N * N * 8
# Its bytes, and those of its values negated (bratu's residual is `... - f`).
_NEGATED = (-np.frombuffer(SECRET, np.float64)).tobytes()
LEAKS = tuple(
    leak
    for raw in (SECRET, _NEGATED)
    for leak in (raw, base64.b64encode(raw), raw.hex().encode())
)
ENDPOINTS = (
    "apply",
    "jacobian",
    "jacobian_vector_product",
    "vector_jacobian_product",
    "batched_apply",
    "batched_jacobian_vector_product",
    "batched_vector_jacobian_product",
    "linear_solve",
)
EXAMPLES = int(os.environ.get("TESSERACT_LX_GUARD_EXAMPLES", "6"))
# No shrinking: each example is a request, and a failing one is printed as it is.
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.bin"
    path.write_bytes(SECRET * 8)
    return path


#
# The payloads, and where an array sits in each
#


def _point(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "u": 0.1 * rng.normal(size=(N, N)),
        "k": np.float64(1.0),
        "f": rng.normal(size=(N, N)),
    }


def _payload(endpoint: str) -> dict:
    point, vec, batch = _point(), np.ones((N, N)), np.ones((1, N, N))
    jvp = {"inputs": point, "jvp_inputs": ["u"], "jvp_outputs": ["residual"]}
    vjp = {"inputs": point, "vjp_inputs": ["u"], "vjp_outputs": ["residual"]}
    return {
        "apply": {"inputs": point},
        "jacobian": {"inputs": point, "jac_inputs": ["u"], "jac_outputs": ["residual"]},
        "jacobian_vector_product": {**jvp, "tangent_vector": {"u": vec}},
        "vector_jacobian_product": {**vjp, "cotangent_vector": {"residual": vec}},
        "batched_apply": {"inputs": [point, _point(1)]},
        "batched_jacobian_vector_product": {**jvp, "tangent_vector": {"u": batch}},
        "batched_vector_jacobian_product": {
            **vjp,
            "cotangent_vector": {"residual": batch},
        },
        "linear_solve": {
            **jvp,
            "rhs": {"residual": batch},
            "y0": {"u": batch},
            "solver": {"name": "GMRES", "rtol": 1e-8, "atol": 1e-8},
        },
    }[endpoint]


def _slots(tree: Any, path: tuple = ()) -> list[tuple]:
    """The paths of every (2, 2) or (1, 2, 2) array in a payload."""
    if isinstance(tree, np.ndarray) and tree.shape[-2:] == (N, N):
        return [path]
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in _slots(v, (*path, k))]
    if isinstance(tree, list):
        return [s for i, v in enumerate(tree) for s in _slots(v, (*path, i))]
    return []


def _replace(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, list):
        return [
            _replace(v, rest, value) if i == head else v for i, v in enumerate(tree)
        ]
    return {k: _replace(v, rest, value) if k == head else v for k, v in tree.items()}


def _at(tree: Any, path: tuple) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def _buffers(secret: Path) -> list[str]:
    """The same file, as absolute path, with an offset, as a URL, climbing by `..`."""
    return [
        str(secret),
        f"{secret}:0",
        secret.as_uri(),
        "../" * 16 + str(secret).lstrip("/"),
    ]


#
# Spelling JSON at random
#


_SPACE = st.sampled_from(["", "", " ", "\n", "\t", " \r\n  "])


@st.composite
def _string(draw, s: str) -> str:
    """`s` as a JSON string literal, each character plain or `\\uXXXX` (either case
    of hex), `/` also as `\\/`."""
    out = []
    for c in s:
        if c in '"\\' or ord(c) < 0x20:
            forms = [f"\\u{ord(c):04x}", f"\\u{ord(c):04X}"]
        else:
            forms = [c, c, f"\\u{ord(c):04x}", f"\\u{ord(c):04X}"]
            if c == "/":
                forms.append("\\/")
        out.append(draw(st.sampled_from(forms)))
    return '"' + "".join(out) + '"'


@st.composite
def spelled(draw, value: Any) -> str:
    """JSON text of `value`: keys in any order, strings spelled by `_string`,
    whitespace anywhere between tokens."""

    def text(x: Any) -> str:
        space = lambda: draw(_SPACE)  # noqa: E731
        if isinstance(x, dict):
            items = draw(st.permutations(list(x.items())))
            members = [
                f"{space()}{draw(_string(k))}{space()}:{space()}{text(v)}{space()}"
                for k, v in items
            ]
            return "{" + ",".join(members) + space() + "}"
        if isinstance(x, list):
            return "[" + ",".join(f"{space()}{text(v)}{space()}" for v in x) + "]"
        if isinstance(x, str):
            return draw(_string(x))
        return json.dumps(x)

    return text(value)


# Every text encoding `json.loads` detects in a body (FastAPI parses so).
_ENCODINGS = (
    "utf-8",
    "utf-8",
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "utf-32-le",
)


def _binary_body(header_text: str) -> bytes:
    """A binary body with no raw arrays: the whole payload in its header, spelled."""
    header = header_text.encode()
    prefix = b"TLX1" + len(header).to_bytes(4, "little") + header
    return prefix + b"\0" * (-len(prefix) % 8)


@st.composite
def hostile(draw, endpoint: str, secret: Path, kind: str) -> tuple[bytes, list]:
    """`(body, loc)`: the endpoint's payload with one array replaced by a binref to
    `secret`, spelled at random, and the `loc` the 422 must name."""
    payload = _payload(endpoint)
    slot = draw(st.sampled_from(_slots(payload)))
    shape = list(_at(payload, slot).shape)
    data = {"buffer": draw(st.sampled_from(_buffers(secret))), "encoding": "binref"}
    array = {"object_type": "array", "shape": shape, "dtype": "float64", "data": data}
    tree = _replace(encode_tree(payload), slot, array)
    loc = ["body", *slot]
    if kind == "binary":
        text = draw(spelled({"tree": tree, "arrays": []}))
        return _binary_body(text), loc
    text = draw(_SPACE) + draw(spelled(tree)) + draw(_SPACE)
    return text.encode(draw(st.sampled_from(_ENCODINGS))), loc


def _headers(kind: str) -> dict[str, str]:
    media = binary.MEDIA_TYPE if kind == "binary" else "application/json"
    return {"Content-Type": media, "Accept": "application/json+base64"}


def _assert_refused(status: int, content: bytes, loc: list, decoder: bool = False):
    """A 422 naming `loc`, the file's bytes nowhere in the answer. The early check
    answers with that one error; the decoder's guard with it among pydantic's (a
    field checked against a refused one fails too)."""
    assert not [leak for leak in LEAKS if leak in content], content
    assert status == 422, content
    errors = json.loads(content)["detail"]
    if not decoder:
        assert errors == [
            {"type": upstream.REFUSED, "loc": loc, "msg": upstream.REFUSAL}
        ], errors
    elif loc[1] in ("rhs", "y0"):
        # `/linear_solve`'s own vectors: its validator reads no binref at all.
        where = ".".join(map(str, loc[1:]))
        assert [e for e in errors if e["loc"] == loc[:2]], errors
        assert f"`{where}` is a binref array" in errors[0]["msg"], errors
    else:
        assert [
            e
            for e in errors
            if (e["type"], e["loc"], e["msg"])
            == (upstream.REFUSED, loc, upstream.REFUSAL)
        ], errors


#
# A real server
#


@pytest.fixture(scope="module")
def bratu_url(served) -> str:
    return served.get(ALL_CASES["bratu"].path, "tlx").urls[0]


@pytest.mark.parametrize("kind", ["json", "binary"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_served_refuses_every_spelling(bratu_url, secret, endpoint, kind):
    @SETTINGS
    @given(case=hostile(endpoint, secret, kind))
    def check(case):
        body, loc = case
        r = requests.post(
            f"{bratu_url}/{endpoint}", data=body, headers=_headers(kind), timeout=60
        )
        _assert_refused(r.status_code, r.content, loc)

    check()
    # Still serving, correctly.
    point = _point()
    r = requests.post(
        f"{bratu_url}/apply",
        json={"inputs": encode_tree(point)},
        headers=_headers("json"),
        timeout=60,
    )
    assert r.status_code == 200, r.text


#
# In process: the app, and every file it opens
#


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # for good (hooks cannot be removed); inert but here


@contextlib.contextmanager
def _watching_opens():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    np.asarray(_point(7)["u"]).tofile(folder / "u.bin")
    return folder


@pytest.fixture(scope="module")
def bratu_app(inputs_dir):
    """The bratu app in process, reading binrefs from `inputs_dir`."""
    with override_config(snapshot_config()):
        update_config(input_path=str(inputs_dir))
        yield create_app(ALL_CASES["bratu"].path)


def _send(app, endpoint: str, body: bytes, kind: str) -> tuple[int, bytes]:
    transport = ASGITransport(app, "in-process", _headers(kind))
    try:
        response = transport.send("POST", endpoint, body)
    finally:
        transport.close()
    return response.status, response.content


@pytest.fixture(params=["both", "decoder"])
def guards(request, monkeypatch):
    """`"both"`: as served; `"decoder"`: the early check never finds anything, so
    tesseract-core's wrapped loader decides alone."""
    if request.param == "decoder":
        monkeypatch.setattr(guard, "find_escape", lambda tree, where="": None)
        monkeypatch.setattr(lean, "find_escape", lambda tree, where="": None)
    return request.param


@pytest.mark.parametrize("kind", ["json", "binary"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_in_process_refuses_every_spelling_and_opens_nothing(
    bratu_app, secret, endpoint, kind, guards
):
    @SETTINGS
    @given(case=hostile(endpoint, secret, kind))
    def check(case):
        body, loc = case
        with _watching_opens() as opened:
            status, content = _send(bratu_app, endpoint, body, kind)
        assert not [p for p in opened if Path(p).name == secret.name], opened
        _assert_refused(status, content, loc, decoder=guards == "decoder")

    check()


@SETTINGS
@given(data=st.data())
def test_relative_names_inside_the_input_folder_are_read(bratu_app, inputs_dir, data):
    """However spelled, a binref inside the input folder is read, as before."""
    name = data.draw(st.sampled_from(["u.bin", "u.bin:0", "./u.bin"]))
    u = {"buffer": name, "encoding": "binref"}
    point = {
        **encode_tree(_point(3)),
        "u": {**encode_tree(np.zeros((N, N))), "data": u},
    }
    kind = data.draw(st.sampled_from(["json", "binary"]))
    if kind == "binary":
        body = _binary_body(
            data.draw(spelled({"tree": {"inputs": point}, "arrays": []}))
        )
    else:
        text = data.draw(spelled({"inputs": point}))
        body = text.encode(data.draw(st.sampled_from(_ENCODINGS)))
    with _watching_opens() as opened:
        status, content = _send(bratu_app, "apply", body, kind)
    assert status == 200, content
    assert str(inputs_dir / "u.bin") in [os.path.normpath(p) for p in opened]
    got = decode_tree(json.loads(content))["residual"]
    want = bratu_ref(jax.tree.map(jnp.asarray, {**_point(3), "u": _point(7)["u"]}))
    np.testing.assert_allclose(got, want["residual"], rtol=1e-12)


#
# The prefilter, and where it decides
#


_TEXT = st.text(alphabet=st.sampled_from('binrefBINREF/:.x \\"é€'), max_size=8)
_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), _TEXT),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(_TEXT, children, max_size=3),
    ),
    max_leaves=8,
)


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [*tree, *(s for v in tree.values() for s in _strings(v))]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


@settings(SETTINGS, max_examples=300)
@given(data=st.data(), tree=_JSONISH)
def test_prefilter_parses_every_body_that_can_hold_binref(data, tree):
    """`may_spell_binref` is `False` only for bodies in which `json.loads` finds no
    string `"binref"` (key or value), in any spelling and text encoding."""
    tree = (
        {"x": tree, "data": {"encoding": "binref"}}
        if data.draw(st.booleans())
        else tree
    )
    body = data.draw(spelled(tree)).encode(data.draw(st.sampled_from(_ENCODINGS)))
    holds = any("binref" in s for s in _strings(json.loads(body)))
    assert guard.may_spell_binref(body) or not holds


def test_the_loader_is_wrapped_and_transparent_outside_requests(secret):
    """tesseract-core's own decoding, outside a request of ours, reads what it read
    before (the guard is for tesseract-lx apps only); within one, it refuses."""
    val: Any = {
        "object_type": "array",
        "shape": [N, N],
        "dtype": "float64",
        "data": {"buffer": str(secret), "encoding": "binref"},
    }
    upstream.confine_binrefs()  # as `create_app` does; once per process
    load = array_encoding.load_binref_arraydict
    assert getattr(load, "__tesseract_lx_guard__", None) is not None
    assert load(val, "/nonexistent").tobytes() == SECRET
    assert not upstream.is_confined()
    with upstream.confined(), pytest.raises(Exception) as info:
        load(val, "/nonexistent")
    assert info.value.type == upstream.REFUSED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "buffer, refused",
    [
        ("data.bin", False),
        ("sub/data.bin:16", False),
        ("sub/data.bin:16:8", False),
        ("/abs/data.bin", True),
        ("\\\\host\\share", True),
        ("~/data.bin", True),
        ("file:///etc/passwd", True),
        ("C:data.bin", True),
        ("sub/x::/etc/passwd", True),
        ("simplecache::file:///etc/passwd", True),
        ("sub/../../x", True),
        ("sub\\..\\x", True),
        ("sub/%2e%2E/x", True),
        ("..", True),
        (3, True),
    ],
)
def test_outside(buffer, refused):
    assert upstream.outside(buffer) is refused


def test_upstream_names_are_where_the_server_expects_them():
    """Fails, naming what moved, on a tesseract-core release that no longer reads
    binrefs through `array_encoding.load_binref_arraydict`; the server then does not
    start (it never serves without its guard)."""
    upstream.check_upstream()


def test_server_does_not_start_without_its_guard(monkeypatch):
    monkeypatch.delattr(array_encoding, "load_binref_arraydict")
    with pytest.raises(RuntimeError) as info:
        upstream.check_upstream()
    assert str(info.value) == (
        "tesseract_lx's server cannot confine binref inputs to the input folder with "
        "this tesseract-core: `tesseract_core.runtime.array_encoding."
        "load_binref_arraydict` is gone. Update `tesseract_lx/_server/upstream.py` "
        "for this release."
    )
    with pytest.raises(RuntimeError, match="cannot confine binref inputs"):
        create_app(ALL_CASES["bratu"].path)
