"""How request bytes reach a server: over HTTP, or into an app in this process.

Both transports take and return bytes, so encoding, decoding and error handling are
the client's alone and identical for both.

**Why not `tesseract_core.Tesseract` as the transport.** Its HTTP client has no
timeout by default, re-negotiates encodings per call and keeps one
`requests.Session` that is not safe to share between the threads of the `Concurrent`
rule; its in-process client calls tesseract-core's endpoint functions, not an app, so
it has no batched endpoints and none of the server's error handling. We reuse its
OpenAPI document and wire format.

**In process.** `ASGITransport` drives the very app `tesseract-lx serve` runs,
through the ASGI interface, without a socket. The app factory is loaded by its import
name, as uvicorn loads apps: the client side has no import of the server package.
"""

import asyncio
import dataclasses
import importlib
import threading
import time
from typing import Any

import requests

from ._errors import TesseractConnectionError


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    content: bytes


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds to wait to connect, and for an answer once connected."""

    connect: float = 5.0
    read: float = 120.0


_RETRIES = 3
_BACKOFF = 0.05  # seconds, doubled per retry


class HTTPTransport:
    """POSTs to one server, one keep-alive session per thread.

    A request is a pure function of its payload, so a connection that fails before
    any answer arrived (refused, reset, a keep-alive connection the server closed) is
    retried a bounded number of times with backoff. A timeout or any answer, 4xx or
    5xx, is final.
    """

    def __init__(self, url: str, timeouts: Timeouts, headers: dict[str, str]):
        self.url = url.rstrip("/")
        self.timeouts = timeouts
        self.headers = headers
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _drop_session(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            self._local.session = None
            with self._lock:
                if session in self._sessions:
                    self._sessions.remove(session)
            session.close()

    def send(self, method: str, endpoint: str, body: bytes | None = None) -> Response:
        url = f"{self.url}/{endpoint}"
        timeout = (self.timeouts.connect, self.timeouts.read)
        delay = _BACKOFF
        error: Exception | None = None
        reason = ""
        for attempt in range(_RETRIES + 1):
            try:
                r = self._session().request(method, url, data=body, timeout=timeout)
                return Response(r.status_code, r.content)
            except requests.ConnectTimeout as e:
                error = e
                reason = (
                    f"cannot connect to {self.url} within the connect timeout of "
                    f"{self.timeouts.connect} s"
                )
            except requests.Timeout as e:
                raise TesseractConnectionError(
                    endpoint,
                    None,
                    f"no answer within the read timeout of {self.timeouts.read} s",
                    self.url,
                ) from e
            except requests.ConnectionError as e:
                error = e
                reason = f"cannot connect to {self.url}: {e}"
            self._drop_session()
            if attempt < _RETRIES:
                time.sleep(delay)
                delay *= 2
        raise TesseractConnectionError(
            endpoint, None, f"{reason} (tried {_RETRIES + 1} times)", self.url
        ) from error

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()


class ASGITransport:
    """Calls an ASGI app in this process: the same routes, validation and errors as
    over HTTP, without a socket. One event loop per calling thread."""

    def __init__(self, app: Any, url: str, headers: dict[str, str]):
        self.app = app
        self.url = url
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self._local = threading.local()
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._lock = threading.Lock()

    @classmethod
    def from_api(cls, api: Any, headers: dict[str, str], **settings: Any):
        server = importlib.import_module("tesseract_lx._server")
        app = server.create_app(api, **settings)
        name = getattr(api, "__file__", None) or str(api)
        return cls(app, f"in-process:{name}", headers)

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = self._local.loop = asyncio.new_event_loop()
            with self._lock:
                self._loops.append(loop)
        return loop

    async def _call(self, method: str, endpoint: str, body: bytes) -> Response:
        headers = [*self.headers, (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": f"/{endpoint}",
            "raw_path": f"/{endpoint}".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("in-process", 0),
        }
        sent = False
        disconnected = asyncio.Event()

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        status = 500
        chunks: list[bytes] = []

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    disconnected.set()

        try:
            await self.app(scope, receive, send)
        except Exception:
            # Starlette re-raises a route's exception after it has sent the 500.
            if not chunks:
                raise
        return Response(status, b"".join(chunks))

    def send(self, method: str, endpoint: str, body: bytes | None = None) -> Response:
        return self._loop().run_until_complete(
            self._call(method, endpoint, body or b"")
        )

    def close(self) -> None:
        with self._lock:
            loops, self._loops = self._loops, []
        for loop in loops:
            if not loop.is_running():
                loop.close()
