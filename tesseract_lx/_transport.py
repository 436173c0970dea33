"""How request bytes reach a server: over HTTP, into an app in this process, or
through a `tesseract_core.Tesseract` object's own methods.

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
import concurrent.futures
import dataclasses
import importlib
import re
import threading
import time
import urllib.parse
import weakref
from typing import Any

import orjson
import pydantic
import requests
import urllib3
from urllib3.exceptions import ReadTimeoutError

from ._errors import TesseractConnectionError, TesseractTimeoutError
from ._wire.encoding import decode_tree, encode_tree
from ._wire.spec import error_body


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    content: bytes
    content_type: str = "application/json"


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds to wait to connect, and for an answer once connected."""

    connect: float = 5.0
    read: float = 120.0


_RETRIES = 3
_BACKOFF = 0.05  # seconds, doubled per retry: 0.35 s in all


def _cause(error: BaseException) -> str:
    """The innermost reason urllib3 gives, e.g. `[Errno 111] Connection refused`,
    without the pool and connection reprs around it."""
    inner = error.args[0] if error.args else error
    inner = getattr(inner, "reason", None) or inner  # MaxRetryError
    if isinstance(inner, urllib3.exceptions.ProtocolError) and len(inner.args) > 1:
        inner = inner.args[1]  # ('Connection aborted.', RemoteDisconnected(...))
    text = str(inner)
    if isinstance(inner, urllib3.exceptions.NewConnectionError):
        return text.rpartition("Failed to establish a new connection: ")[2]
    name = type(inner).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class HTTPTransport:
    """POSTs to one server, one keep-alive session per thread.

    A request is a pure function of its payload, so a connection that fails before
    any answer arrived (refused, reset, a keep-alive connection the server closed, a
    server killed while it computed) is retried a bounded number of times with
    backoff. Anything else is final: an answer (4xx or 5xx), an answer cut off
    before its end, and a timeout (waiting longer than the user said is not a
    retry's business). Credentials in the URL (`http://user:token@host`) go into the
    session's auth, never into `url`, which errors and reprs show.
    """

    def __init__(self, url: str, timeouts: Timeouts, headers: dict[str, str]):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self.auth = None
        if parts.username is not None:
            self.auth = (
                urllib.parse.unquote(parts.username),
                urllib.parse.unquote(parts.password or ""),
            )
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        self.url = parts.geturl()
        self.timeouts = timeouts
        self.headers = headers
        self._local = threading.local()
        # Held strongly by their thread only: a thread that ends takes its session,
        # and its connections, with it; `close` closes those still alive.
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            session.auth = self.auth
            self._local.session = session
            with self._lock:
                self._sessions.add(session)
        return session

    def _drop_session(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            self._local.session = None
            with self._lock:
                self._sessions.discard(session)
            session.close()

    # Takes `binary.MEDIA_TYPE` bodies (`headers` say so per request).
    binary = True

    def send(
        self,
        method: str,
        endpoint: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        url = f"{self.url}/{endpoint}"
        timeout = (self.timeouts.connect, self.timeouts.read)
        delay = _BACKOFF
        error: Exception | None = None
        for attempt in range(_RETRIES + 1):
            try:
                r = self._session().request(
                    method, url, data=body, timeout=timeout, headers=headers
                )
                return Response(
                    r.status_code,
                    r.content,
                    r.headers.get("content-type", "application/json"),
                )
            except requests.ConnectTimeout as e:
                self._drop_session()
                raise TesseractTimeoutError(
                    endpoint,
                    None,
                    f"cannot connect to {self.url} within the connect timeout of "
                    f"{self.timeouts.connect} s",
                    self.url,
                ) from e
            except requests.Timeout as e:
                self._drop_session()
                raise self._read_timeout(endpoint) from e
            except requests.ConnectionError as e:
                self._drop_session()
                # requests reports a read timeout in the body as a connection error.
                if isinstance(e.args[0] if e.args else None, ReadTimeoutError):
                    raise self._read_timeout(endpoint) from e
                error = e
            except requests.RequestException as e:
                # An answer began and broke off (truncated body, bad chunking).
                self._drop_session()
                raise TesseractConnectionError(
                    endpoint,
                    None,
                    f"the answer from {self.url} broke off before its end "
                    f"({_cause(e)})",
                    self.url,
                ) from e
            if attempt < _RETRIES:
                time.sleep(delay)
                delay *= 2
        assert error is not None
        raise TesseractConnectionError(
            endpoint,
            None,
            f"cannot connect to {self.url} ({_cause(error)}; tried {_RETRIES + 1} "
            "times)",
            self.url,
        ) from error

    def _read_timeout(self, endpoint: str) -> TesseractTimeoutError:
        return TesseractTimeoutError(
            endpoint,
            None,
            f"no answer within the read timeout of {self.timeouts.read} s",
            self.url,
        )

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
            self._sessions.clear()
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

    binary = True

    async def _call(
        self, method: str, endpoint: str, body: bytes, extra: dict[str, str]
    ) -> Response:
        replaced = {k.lower().encode() for k in extra}
        headers = [
            *(h for h in self.headers if h[0] not in replaced),
            *((k.lower().encode(), v.encode()) for k, v in extra.items()),
            (b"content-length", str(len(body)).encode()),
        ]
        path, _, query = f"/{endpoint}".partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
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
        content_type = "application/json"
        chunks: list[bytes] = []

        async def send(message: dict) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key.lower() == b"content-type":
                        content_type = value.decode("latin-1")
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
        return Response(status, b"".join(chunks), content_type)

    def send(
        self,
        method: str,
        endpoint: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return self._loop().run_until_complete(
            self._call(method, endpoint, body or b"", headers or {})
        )

    def close(self) -> None:
        with self._lock:
            loops, self._loops = self._loops, []
        for loop in loops:
            if not loop.is_running():
                loop.close()


_REMOTE_ERROR = re.compile(r"^Error (\d{3}) from Tesseract: (.*)$", re.DOTALL)


class TesseractTransport:
    """Calls a `tesseract_core.Tesseract`'s own methods (`apply`, `jacobian`, ...), so
    that a user's subclass, wrapper or instrumentation of it sees every call.

    Payloads are decoded to NumPy before the call and the answer encoded after it:
    the client above sees the same bytes as from a server. Exceptions become the
    answer a server would give: the remote status and body for a served Tesseract, a
    422 for a validation error, a 500 naming the exception for one raised in process.
    Every call has the client's read timeout (the Tesseract object has none of its
    own by default); a call that times out keeps running in its thread.
    """

    def __init__(self, tesseract: Any, timeout: float):
        self.tesseract = tesseract
        inner = getattr(tesseract, "_client", None)
        url = getattr(inner, "url", None)
        self.url = url if isinstance(url, str) else f"tesseract:{type(inner).__name__}"
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="tesseract_lx-object"
        )

    def _call(self, endpoint: str, payload: dict) -> Any:
        t = self.tesseract
        if endpoint == "apply":
            return t.apply(payload["inputs"])
        if endpoint == "abstract_eval":
            return t.abstract_eval(payload["inputs"])
        if endpoint == "jacobian":
            return t.jacobian(
                payload["inputs"], payload["jac_inputs"], payload["jac_outputs"]
            )
        if endpoint == "jacobian_vector_product":
            return t.jacobian_vector_product(
                payload["inputs"],
                payload["jvp_inputs"],
                payload["jvp_outputs"],
                payload["tangent_vector"],
            )
        if endpoint == "vector_jacobian_product":
            return t.vector_jacobian_product(
                payload["inputs"],
                payload["vjp_inputs"],
                payload["vjp_outputs"],
                payload["cotangent_vector"],
            )
        # The batched endpoints have no method: through the object's own client.
        return t._client.run_tesseract(endpoint, payload)

    def _answer(self, method: str, endpoint: str, body: bytes | None) -> Response:
        if endpoint == "openapi.json":
            return Response(200, orjson.dumps(self.tesseract.openapi_schema))
        if endpoint == "health":
            return Response(200, orjson.dumps(self.tesseract.health()))
        payload = decode_tree(orjson.loads(body or b"{}"))
        result = self._call(endpoint, payload)
        return Response(
            200, orjson.dumps(encode_tree(result), option=orjson.OPT_SERIALIZE_NUMPY)
        )

    # JSON only: payloads are decoded here for the object's own methods.
    binary = False

    def send(
        self,
        method: str,
        endpoint: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        future = self._pool.submit(self._answer, method, endpoint, body)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise TesseractTimeoutError(
                endpoint, None, f"no answer within {self.timeout} s", self.url
            ) from None
        except pydantic.ValidationError as e:
            return Response(422, orjson.dumps({"detail": str(e)}))
        except requests.ConnectionError as e:
            raise TesseractConnectionError(
                endpoint, None, f"cannot connect to {self.url}: {e}", self.url
            ) from e
        except NotImplementedError as e:
            return Response(404, orjson.dumps({"detail": str(e)}))
        except Exception as e:
            remote = (
                _REMOTE_ERROR.match(str(e)) if isinstance(e, RuntimeError) else None
            )
            if remote is not None:
                return Response(int(remote.group(1)), remote.group(2).encode())
            error = error_body(endpoint, type(e).__name__, str(e), None)
            return Response(500, orjson.dumps(error))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
