"""What one request may carry: `max_batch` items, `max_body_bytes` of body.

Both are stated in `x-tesseract-lx`, so a client splits its batches before sending.
A batch over `max_batch` is refused by the payload's validation (422, naming
`max_batch`); a body over `max_body_bytes` by `BodyLimit` (413), from its
`Content-Length` when it has one, and by counting the bytes as they arrive
otherwise (a chunked body, or a `Content-Length` that lies).
"""

import json
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


DEFAULT_MAX_BATCH = 65536
DEFAULT_MAX_BODY_BYTES = 1 << 30


def check_batch(size: int, max_batch: int, field: str) -> None:
    """A `ValueError` (a 422 in a validator) if `field` has over `max_batch` items."""
    if size > max_batch:
        raise ValueError(
            f"`{field}` carries {size} items, over this server's `max_batch` = "
            f"{max_batch} per request: split the batch (see `max_batch` in "
            "`x-tesseract-lx`), or serve with a larger `--max-batch`."
        )


def body_too_large(size: int | None, limit: int) -> str:
    got = "more" if size is None else f"{size} bytes"
    return (
        f"The request body ({got}) is over this server's `max_body_bytes` = {limit} "
        "bytes: send fewer items per request (see `max_body_bytes` in "
        "`x-tesseract-lx`), or serve with a larger `--max-body-mb`."
    )


class BodyLimit:
    """ASGI middleware: a 413 for a request body over `max_body_bytes`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break
                if declared > limit:
                    await _respond_413(send, body_too_large(declared, limit))
                    return
                break

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI reads the body for the route and lets an HTTPException
                    # through to its handler: a 413 with this detail.
                    raise HTTPException(413, body_too_large(None, limit))
            return message

        await self.app(scope, counting_receive, send)


async def _respond_413(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
