"""The lean path: the computational endpoints with a binary body, beside FastAPI.

A request to `apply`, `jacobian`, `jacobian_vector_product`,
`vector_jacobian_product` or a batched endpoint whose `Content-Type` is
`.._wire.binary.MEDIA_TYPE` is answered here, by an ASGI middleware in front of the
FastAPI app; every other request goes on to the app unchanged, so tesseract-core's
clients see tesseract-core's server.

What a Krylov solver's thousand requests do not need is left out; what they need is
the same as on the JSON route:

- the body is decoded without JSON parsing or base64 of the arrays (`binary.decode`:
    views of the body's bytes) and checked for `binref` paths outside the input
    folder (`guard.find_escape` on the decoded tree; tesseract-core's loader refuses
    them too, as for any body: `guard.py`);
- it is validated by the endpoint's own payload model, as FastAPI validates it, from
    NumPy arrays instead of base64 text: the same shapes, dtypes and 422s (in
    FastAPI's form, `loc` starting with `"body"`);
- the endpoint runs in a worker thread through the same `Runner` (one computation at
    a time, errors in the Tesseract's words), with no run folder: a server started
    with run folders does not offer this path;
- the answer is the result model's dump, encoded by `binary.encode` when the request
    accepts it (else tesseract-core's `json+base64`); errors are JSON, as everywhere.

Measured with bratu at n=1024 (`benchmarks/PROFILE.md`): see there for the split of a
request's time before and after.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from .._wire import binary
from .._wire.encoding import encode_tree
from .guard import find_escape, refusal
from .routes import Runner, TesseractFailure


@dataclasses.dataclass(frozen=True)
class LeanRoute:
    """An endpoint function (`fn(payload) -> model`), its payload model, and a check
    called with the validated payload before it runs (it may raise a 422)."""

    fn: Callable[[Any], Any]
    payload: type
    check: Callable[[Any], None] | None = None


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _errors(errors: Any) -> list[dict]:
    """Validation errors as FastAPI answers them: under `body`, without the inputs
    (NumPy arrays, not JSON)."""
    out = []
    for e in errors:
        e = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        e["loc"] = ["body", *e.get("loc", ())]
        out.append(e)
    return out


class BinaryRoutes:
    """ASGI middleware: binary requests to `routes` (`{path name: LeanRoute}`)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, LeanRoute],
        runner: Runner,
        debug: bool = False,
    ):
        self.app = app
        self.routes = routes
        self.runner = runner
        self.debug = debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or _header(scope, b"content-type") != binary.MEDIA_TYPE
        ):
            await self.app(scope, receive, send)
            return
        name = scope["path"].strip("/")
        route = self.routes.get(name)
        if route is None:
            detail = (
                f"`/{name}` does not take `{binary.MEDIA_TYPE}` bodies; these do: "
                f"{', '.join(f'`/{n}`' for n in sorted(self.routes))}."
            )
            await _respond(send, 415, orjson.dumps({"detail": detail}), "json")
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        wants_binary = binary.MEDIA_TYPE in _header(scope, b"accept")
        try:
            status, body, kind = await run_in_threadpool(
                self._answer, name, route, b"".join(chunks), wants_binary
            )
        except HTTPException as e:  # `limits.BodyLimit`: a body over the limit
            status, kind = e.status_code, "json"
            body = orjson.dumps({"detail": e.detail})
        await _respond(send, status, body, kind)

    def _answer(
        self, name: str, route: LeanRoute, body: bytes, wants_binary: bool
    ) -> tuple[int, bytes, str]:
        try:
            tree = binary.decode(body)
        except ValueError as e:
            return 400, orjson.dumps({"detail": f"malformed binary body: {e}"}), "json"
        where = find_escape(tree)
        if where is not None:
            return _unprocessable(refusal(where))
        try:
            with self.runner.scope():  # validators may run the Tesseract's code
                payload = route.payload.model_validate(tree)
                if route.check is not None:
                    route.check(payload)
        except ValidationError as e:
            return _unprocessable(_errors(e.errors(include_url=False)))
        except RequestValidationError as e:
            return _unprocessable(list(e.errors()))
        try:
            result = self.runner.call(name, lambda: route.fn(payload))
        except TesseractFailure as e:
            e.log()
            return 500, orjson.dumps(e.body(self.debug)), "json"
        except HTTPException as e:
            return e.status_code, orjson.dumps({"detail": e.detail}), "json"
        dump = result.model_dump()
        if wants_binary:
            return 200, binary.encode(dump), "binary"
        json = orjson.dumps(encode_tree(dump), option=orjson.OPT_SERIALIZE_NUMPY)
        return 200, json, "json"


def _unprocessable(errors: list) -> tuple[int, bytes, str]:
    return 422, orjson.dumps({"detail": errors}, default=str), "json"


async def _respond(send: Send, status: int, body: bytes, kind: str) -> None:
    media = binary.MEDIA_TYPE if kind == "binary" else "application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
