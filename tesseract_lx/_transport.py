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
import base64
import concurrent.futures
import dataclasses
import http.client
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
# Failures of a connection before any answer arrived: worth another try.
_NOT_ANSWERED = (
    ConnectionError,
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
)


def _cause(error: BaseException) -> str:
    """The reason in words, e.g. `[Errno 111] Connection refused`."""
    if isinstance(error, OSError) and error.errno is not None:
        return str(error)
    if isinstance(error, http.client.IncompleteRead):
        return repr(error)
    text, name = str(error), type(error).__name__
    return f"{name}: {text}" if text else name


class HTTPTransport:
    """Requests to one server over `http.client`, one keep-alive connection per thread.

    **Why not `requests`.** It costs ~1 ms of Python per request (preparing, merging
    environment settings, urllib3's pool; `benchmarks/PROFILE.md`), a fifth of a JVP
    request on loopback; a solver sends thousands. `http.client` (which `requests`
    runs on) does the same job here: keep-alive, `TCP_NODELAY`, chunked answers.

    A request is a pure function of its payload, so a connection that fails before
    any answer arrived (refused, reset, a keep-alive connection the server closed, a
    server killed while it computed) is retried a bounded number of times with
    backoff. Anything else is final: an answer (4xx or 5xx), an answer cut off
    before its end, and a timeout (waiting longer than the user said is not a
    retry's business). Credentials in the URL (`http://user:token@host`) become an
    `Authorization` header, never part of `url`, which errors and reprs show.
    """

    # Takes `binary.MEDIA_TYPE` bodies (`headers` say so per request).
    binary = True

    def __init__(self, url: str, timeouts: Timeouts, headers: dict[str, str]):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"`{url}` is not an http:// or https:// URL.")
        self.headers = dict(headers)
        # `(user, password)` from the URL, if any (the client hides them in errors).
        self.auth: tuple[str, str] | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self.auth = (user, password)
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        self.url = parts.geturl()
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port
        self._path = parts.path
        self.timeouts = timeouts
        self._local = threading.local()
        # Held strongly by their thread only: a thread that ends takes its
        # connection with it; `close` closes those still alive.
        self._connections: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._https
                else http.client.HTTPConnection
            )
            conn = cls(self._host, self._port, timeout=self.timeouts.connect)
            self._local.conn = conn
            with self._lock:
                self._connections.add(conn)
        if conn.sock is None:
            try:
                conn.connect()
            except TimeoutError:
                self._drop()
                raise
            assert conn.sock is not None
            conn.sock.settimeout(self.timeouts.read)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def send(
        self,
        method: str,
        endpoint: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        path = f"{self._path}/{endpoint}"
        all_headers = {**self.headers, **(headers or {})}
        delay = _BACKOFF
        error: Exception | None = None
        for attempt in range(_RETRIES + 1):
            try:
                conn = self._connection()
            except TimeoutError as e:
                raise TesseractTimeoutError(
                    endpoint,
                    None,
                    f"cannot connect to {self.url} within the connect timeout of "
                    f"{self.timeouts.connect} s",
                    self.url,
                ) from e
            except OSError as e:  # refused, unreachable: not connected yet
                self._drop()
                error = e
            else:
                try:
                    conn.request(method, path, body=body, headers=all_headers)
                    answer = conn.getresponse()
                except TimeoutError as e:
                    self._drop()
                    raise self._read_timeout(endpoint) from e
                except (*_NOT_ANSWERED, OSError) as e:
                    self._drop()
                    error = e
                else:
                    return self._read(endpoint, answer)
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

    def _read(self, endpoint: str, answer: http.client.HTTPResponse) -> Response:
        """The whole answer; an answer that stalls or breaks off is final."""
        try:
            content = answer.read()
        except TimeoutError as e:
            self._drop()
            raise self._read_timeout(endpoint) from e
        except (http.client.HTTPException, OSError) as e:
            self._drop()
            raise TesseractConnectionError(
                endpoint,
                None,
                f"the answer from {self.url} broke off before its end ({_cause(e)})",
                self.url,
            ) from e
        if answer.will_close:
            self._drop()
        return Response(
            answer.status,
            content,
            answer.getheader("content-type") or "application/json",
        )

    def _read_timeout(self, endpoint: str) -> TesseractTimeoutError:
        return TesseractTimeoutError(
            endpoint,
            None,
            f"no answer within the read timeout of {self.timeouts.read} s",
            self.url,
        )

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            conn.close()


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
