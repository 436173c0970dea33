"""Refuse `binref` arrays that point outside the server's input folder.

tesseract-core reads a `json+binref` array from the path in its `buffer`, joined to
`TESSERACT_INPUT_PATH` when relative, but absolute paths, `../` and URLs (through
fsspec) are read as given: any file the server can read, or any address it can reach,
could be loaded into a Tesseract's inputs. The server refuses such a buffer with a
422 naming the field (`refusal`), decided on *parsed* values, never on raw bytes
(`"\\u0062inref"` is `"binref"`), at two places:

- **where arrays are decoded** (the decision): `Confine`, the app's outermost
    middleware, marks every request (`upstream.confined()`), and tesseract-core's
    binref loader, wrapped once by `upstream.confine_binrefs`, refuses a buffer
    outside the folder while a request is marked. This holds for every route, JSON or
    binary body, whatever reaches tesseract-core's array validation. (Our own array
    decoder, `.._wire.encoding.decode_array`, reads no binref at all.)
- **before the app parses the body** (an early answer, the same 422): `BinrefGuard`
    parses a JSON body with the parser FastAPI then uses (`json.loads`: the same
    bytes give the same tree) whenever the body could spell `binref`, and refuses by
    `find_escape`. Only a `\\uXXXX` escape spells a letter in JSON, so a UTF-8 body
    without `binref` and without `\\u` holds no string equal to `"binref"`; a body in
    UTF-16 or UTF-32 (`json.loads` takes those too) is always parsed. A body it cannot
    parse is left to the app, which cannot parse it either. The binary route
    (`lean.py`) checks its decoded tree by `find_escape` likewise.
"""

import json
import re
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .upstream import confined, outside, REFUSAL, REFUSED


def find_escape(tree: Any, where: str = "") -> str | None:
    """The path of the first binref array in `tree` reading outside the input folder."""
    if isinstance(tree, dict):
        data = tree.get("data")
        if isinstance(data, dict) and data.get("encoding") == "binref":
            if outside(data.get("buffer")):
                return where or "body"
        for key, value in tree.items():
            found = find_escape(value, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found = find_escape(value, f"{where}.[{i}]")
            if found is not None:
                return found
    return None


def may_spell_binref(body: bytes) -> bool:
    """Whether `json.loads(body)` could hold the string `"binref"` (see the module
    docstring): `False` only when it provably cannot."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return True
    # In UTF-8, ASCII bytes never occur inside a multi-byte character.
    return b"binref" in body or b"\\u" in body


class Confine:
    """ASGI middleware: every request is validated with binrefs confined to the input
    folder (`upstream.confined`); outermost, so every route is."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with confined():
            await self.app(scope, receive, send)


class BinrefGuard:
    """ASGI middleware: an early 422 for a `binref` buffer outside the input folder."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        try:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
        except HTTPException as e:  # a body over the limit (`limits.BodyLimit`)
            await _respond(send, e.status_code, str(e.detail))
            return
        body = b"".join(chunks)
        if may_spell_binref(body):
            try:
                where = find_escape(json.loads(body))
            except (ValueError, RecursionError):
                # Malformed (the app says so), or too deep to walk here: the
                # decoder's guard decides.
                where = None
            if where is not None:
                await _respond(send, 422, refusal(where))
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def refusal(where: str) -> list[dict]:
    """The 422 `detail` for `find_escape`'s finding, as FastAPI answers a 422 (and
    `/openapi.json` documents it), and as the decoder's guard words it."""
    return [{"type": REFUSED, "loc": _loc(where), "msg": REFUSAL}]


def _loc(where: str) -> list:
    """`find_escape`'s path as a FastAPI `loc`: `inputs.[0].x` -> body, inputs, 0, x."""
    if where == "body":
        return ["body"]
    index = re.compile(r"^\[(\d+)\]$")
    return [
        "body",
        *(int(m[1]) if (m := index.match(p)) else p for p in where.split(".")),
    ]


async def _respond(send: Send, status: int, detail: str | list) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
