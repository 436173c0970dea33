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
through the ASGI interface, without a socket, on an event loop of its own (so it works
inside the caller's running loop: Jupyter, `asyncio.run`). It is handed the app
(`tlx.Client.from_api` has the launcher, `_serve.py`, build it): the client side
imports nothing of the server package.
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import http.client
import re
import select
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
    """Requests to one server over `http.client`, on a pool of keep-alive connections.

    **Why not `requests`.** It costs ~1 ms of Python per request (preparing, merging
    environment settings, urllib3's pool; `benchmarks/PROFILE.md`), a fifth of a JVP
    request on loopback; a solver sends thousands. `http.client` (which `requests`
    runs on) does the same job here: keep-alive, `TCP_NODELAY`, chunked answers.

    **Connections.** Idle keep-alive connections wait in one pool shared by every
    thread: a request takes one (or opens one when none is idle), and gives it back
    once the whole answer is read. So a new connection is opened only when the
    server closed one, or when more requests are in flight at once than connections
    are idle; never per thread. (One connection per thread opened a connection per
    request of an eager lineax solve: JAX runs host callbacks on threads that come
    and go.) A connection the server said it closes (`Connection: close`), or that
    broke, is closed rather than given back; at most `_MAX_IDLE` are kept; `close`
    closes them all, and those lent out when they come back.

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
        self._lock = threading.Lock()
        # Most recently used last: it is the least likely to have been closed.
        self._idle: collections.deque[http.client.HTTPConnection] = collections.deque()
        # Bumped by `close`: a connection lent out before then is closed on return.
        self._generation = 0
        # The idle connections go with the transport, even if nobody calls `close`.
        weakref.finalize(self, _close_all, self._idle)

    def _take(self, fresh: bool) -> tuple[http.client.HTTPConnection, int, bool]:
        """A connection: `(connection, generation, reused)`. An idle one that the
        server has not closed meanwhile, unless `fresh`; else a new one."""
        stale = []
        found = None
        with self._lock:
            generation = self._generation
            while not fresh and self._idle:
                conn = self._idle.pop()
                if _open(conn):
                    found = conn
                    break
                stale.append(conn)
        _close_all(stale)
        if found is not None:
            return found, generation, True
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeouts.connect)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        assert conn.sock is not None
        conn.sock.settimeout(self.timeouts.read)
        return conn, generation, False

    def _give_back(self, conn: http.client.HTTPConnection, generation: int) -> None:
        with self._lock:
            if generation == self._generation and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
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
        fresh = False
        attempt = 0
        while True:
            try:
                conn, generation, reused = self._take(fresh)
            except TimeoutError as e:
                raise TesseractTimeoutError(
                    endpoint,
                    None,
                    f"cannot connect to {self.url} within the connect timeout of "
                    f"{self.timeouts.connect} s",
                    self.url,
                ) from e
            except OSError as e:  # refused, unreachable: not connected yet
                error = e
            else:
                try:
                    conn.request(method, path, body=body, headers=all_headers)
                    answer = conn.getresponse()
                except TimeoutError as e:
                    conn.close()
                    raise self._read_timeout(endpoint) from e
                except (*_NOT_ANSWERED, OSError) as e:
                    conn.close()
                    error = e
                    if reused and not fresh:
                        # A kept-alive connection the server closed as we sent:
                        # once more at once, on a new connection, not a retry.
                        fresh = True
                        continue
                except BaseException:
                    conn.close()
                    raise
                else:
                    return self._read(endpoint, answer, conn, generation)
            if attempt == _RETRIES:
                break
            attempt += 1
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

    def _read(
        self,
        endpoint: str,
        answer: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        generation: int,
    ) -> Response:
        """The whole answer; an answer that stalls or breaks off is final."""
        try:
            content = answer.read()
        except TimeoutError as e:
            conn.close()
            raise self._read_timeout(endpoint) from e
        except (http.client.HTTPException, OSError) as e:
            conn.close()
            raise TesseractConnectionError(
                endpoint,
                None,
                f"the answer from {self.url} broke off before its end ({_cause(e)})",
                self.url,
            ) from e
        except BaseException:
            conn.close()
            raise
        if answer.will_close:
            conn.close()
        else:
            self._give_back(conn, generation)
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
        """Close the idle connections, and those lent out as they come back. The
        transport stays usable: a later request opens a new connection."""
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
            self._generation += 1
        _close_all(idle)


# Idle keep-alive connections kept per server; more in flight at once are closed
# when they come back.
_MAX_IDLE = 64


def _open(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection is still open: nothing to read on it. The server
    closing it (keep-alive timeout, restart) makes it readable (end of file)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _close_all(connections) -> None:
    for conn in list(connections):
        conn.close()


class ASGITransport:
    """Calls an ASGI app in this process: the same routes, validation and errors as
    over HTTP, without a socket.

    The app runs on a private event loop, on a daemon thread of the transport's own
    (started on the first request); callers hand it requests with
    `asyncio.run_coroutine_threadsafe` and wait for the answer. So a call works from
    any thread, whether or not that thread runs an event loop of its own (a Jupyter
    kernel, `asyncio.run`, anyio): the caller's loop and event loop policy are never
    touched (`loop.run_until_complete` in the caller's thread fails inside a running
    loop). Requests from several threads are in flight at once, as over HTTP: the
    app runs the Tesseract's code in its own thread pool. `close` stops the loop; a
    later request starts another.

    **Arguments:**

    - `app`: an ASGI app, e.g. the one `tesseract-lx serve` runs
        (`_serve.in_process_app`).
    - `url`: the name errors and reprs give it, e.g. `"in-process:PATH"`.
    - `headers`: sent with every request.
    """

    # Takes `binary.MEDIA_TYPE` bodies, as the served app does.
    binary = True

    def __init__(self, app: Any, url: str, headers: dict[str, str]):
        self.app = app
        self.url = url
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self._lock = threading.Lock()
        self._runner: _LoopThread | None = None

    def _loop(self) -> "_LoopThread":
        with self._lock:
            if self._runner is None:
                self._runner = _LoopThread(self)
            return self._runner

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
        runner = self._loop()
        try:
            return runner.run(self._call(method, endpoint, body or b"", headers or {}))
        except concurrent.futures.CancelledError:
            raise TesseractConnectionError(
                endpoint, None, "the client was closed while the request ran", self.url
            ) from None

    def close(self) -> None:
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()


class _LoopThread:
    """An event loop running forever on a daemon thread of its own.

    The thread refers to the loop only, not to its owner: an owner that is
    collected without `close` stops the loop (a finalizer), and the thread ends.
    """

    def __init__(self, owner: Any):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=_run_loop, args=(self.loop,), name="tesseract_lx-asgi", daemon=True
        )
        self.thread.start()
        self._finalizer = weakref.finalize(owner, _stop_loop, self.loop)
        # At exit the daemon thread just ends: cleaning up would start threads.
        self._finalizer.atexit = False

    def run(self, coroutine: Any) -> Any:
        """Run `coroutine` on the loop; wait for its result here."""
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError(
                "A request to an in-process Tesseract was made from the thread that "
                "runs it (from inside the Tesseract?): it would wait for itself."
            )
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C), or failed: nothing is left running for it.
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop, cancel what still runs on it, wait for the thread."""
        self._finalizer.detach()
        _stop_loop(self.loop)
        if threading.current_thread() is not self.thread:
            self.thread.join()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The body of a `_LoopThread`: serve until stopped, then clean up and close."""
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                loop.run_until_complete(gathered)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # already closed
        loop.call_soon_threadsafe(loop.stop)


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
