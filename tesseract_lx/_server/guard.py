"""Refuse `binref` arrays that point outside the server's input folder.

tesseract-core reads a `json+binref` array from the path in its `buffer`, joined to
`TESSERACT_INPUT_PATH` when relative, but absolute paths, `../` and URLs (through
fsspec) are read as given: any file the server can read, or any address it can reach,
could be loaded into a Tesseract's inputs. `BinrefGuard` looks at every request body
that mentions `binref` before the app does, and answers 422 for a buffer whose path is
absolute, a URL, or climbs out with `..`, naming the field. Bodies without `binref` are
passed through untouched (one substring search).
"""

import json
import re
from typing import Any

import orjson
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


_BUFFER = re.compile(r"^(?P<path>.+?)(:\d+(:\d+)?)?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _outside(buffer: str) -> bool:
    match = _BUFFER.match(buffer)
    path = match.group("path") if match else buffer
    return (
        path.startswith(("/", "\\", "~"))
        or _SCHEME.match(path) is not None
        or ".." in re.split(r"[/\\]", path)
    )


def find_escape(tree: Any, where: str = "") -> str | None:
    """The path of the first binref array in `tree` reading outside the input folder."""
    if isinstance(tree, dict):
        data = tree.get("data")
        if isinstance(data, dict) and data.get("encoding") == "binref":
            buffer = data.get("buffer")
            if not isinstance(buffer, str) or _outside(buffer):
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


class BinrefGuard:
    """ASGI middleware: a 422 for a `binref` buffer outside the input folder."""

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
        if b"binref" in body:
            try:
                where = find_escape(orjson.loads(body))
            except orjson.JSONDecodeError:
                where = None  # the app answers a malformed body itself
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
    `/openapi.json` documents it)."""
    msg = (
        "a binref array must name a file inside the server's input folder, by a "
        "relative path without `..`; absolute paths and URLs are refused."
    )
    return [{"type": "value_error", "loc": _loc(where), "msg": msg}]


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
