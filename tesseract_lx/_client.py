"""`Client`: one Tesseract (or identical replicas of it), its schema, and what it cost.

The client encodes payloads (tesseract-core's `json+base64` arrays), sends them
through a transport (`_transport.py`: HTTP, or the server's app in this process),
turns failures into `TesseractError`s that carry the server's words, and counts
everything: `stats` (requests by endpoint), `latency` (what `Auto` estimates from),
`decisions` (what `Auto` chose and why). One client is safe to share between threads.

An answer is data, never code: arrays are decoded from base64 or JSON lists only (a
`binref` array, which names a file, is refused: a server must not make the client read
its files), and nothing is unpickled or evaluated. Credentials (headers such as
`Authorization`, a password in the URL) are sent, but never shown: not in `repr`, and
not in an error, even when the server echoes them back.
"""

import base64
import collections
import concurrent.futures
import itertools
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import orjson

from ._errors import from_response, TesseractError, TesseractServerError
from ._latency import Latencies
from ._progress import Activity
from ._transport import (
    ASGITransport,
    HTTPTransport,
    Response,
    TesseractTransport,
    Timeouts,
)
from ._wire import binary
from ._wire.encoding import ACCEPT, decode_tree, encode_tree
from ._wire.schema import parse_openapi, Schema
from ._wire.spec import Capabilities, COMPUTATIONAL


class _LRU(collections.OrderedDict):
    """A small bounded mapping for per-signature memos."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def get_fresh(self, key: Any) -> Any:
        value = self.pop(key, None)
        if value is not None:
            self[key] = value
        return value

    def put(self, key: Any, value: Any) -> None:
        self.pop(key, None)
        self[key] = value
        while len(self) > self.maxsize:
            self.popitem(last=False)


class Client:
    """A connection to one Tesseract (or several identical replicas of it).

    **Arguments:**

    - `url`: the server's address, e.g. `"http://127.0.0.1:8000"`, or a list of
        addresses of identical replicas: concurrent requests and batch chunks are
        spread over them.
    - `timeout`: seconds to wait for an answer once connected (the read timeout);
        no request hangs.
    - `connect_timeout`: seconds to wait for a connection: a dead host fails fast.
        A refused or dropped connection is retried 3 times (0.35 s of backoff in
        all); a timeout or an answer is final.
    - `headers`: extra HTTP headers sent with every request (e.g.
        `{"Authorization": "Bearer ..."}`). The values of credential headers (names
        with `auth`, `token`, `key`, `secret`, `cookie`, `password`) never appear in
        errors or reprs.
    - `workers`: how many requests each server computes at once; by default what a
        tesseract-lx server says (`--workers`), else 1. Used by the `Concurrent` rule
        and by `Auto`'s cost model.

    The interface (shapes, dtypes, differentiable paths, endpoints, what the server
    can do) is read from `/openapi.json` once, on first use.

    **Attributes:**

    - `stats`: a `collections.Counter` of the requests sent, keyed by endpoint name
        (`"apply"`, `"jacobian_vector_product"`, `"batched_vector_jacobian_product"`,
        `"linear_solve"`, ...). Counted as each request leaves, so a failed one
        counts too; `client.stats.clear()` starts afresh.
    - `decisions`: the last 100 [`tlx.Decision`][tesseract_lx.Decision]s: how
        `tlx.Auto` (or a rule the server could not serve) sent each batch of tangents
        or points, and why; and each `tlx.OnServer` solve that ran locally.
    - `last_error`: the last [`tlx.TesseractError`][tesseract_lx.TesseractError],
        typed: under `jax.jit` only its text reaches the caller.
    - `activity`: requests in flight and done, by endpoint, with times and bytes:
        what [`tlx.progress`][tesseract_lx.progress] draws.
    - `latency`: measured seconds per request, by endpoint, size and batch: what
        [`tlx.Auto`][tesseract_lx.Auto] estimates from.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        workers: int | None = None,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("`url` must name at least one server.")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(
                    "`url` must be an http(s) address such as "
                    f"'http://127.0.0.1:8000', got {u!r}."
                )
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not value > 0:
                raise ValueError(f"`{name}` must be a positive number of seconds.")
        timeouts = Timeouts(connect=connect_timeout, read=timeout)
        transports = [
            HTTPTransport(u, timeouts, {**_HEADERS, **(headers or {})}) for u in urls
        ]
        auths = [t.auth for t in transports if t.auth is not None]
        self._init(transports, workers, _secrets(headers, auths))

    def _init(
        self, transports: list, workers: int | None, secrets: tuple[bytes, ...] = ()
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"`workers` must be at least 1, got {workers}.")
        self._transports = transports
        self._secrets = secrets
        self._workers = workers
        self.stats: collections.Counter[str] = collections.Counter()
        # Requests in flight, their times and bytes: what `tlx.progress` shows.
        self.activity = Activity()
        self.latency = Latencies()
        # What the `Auto` rule decided lately, and why (`tesseract_lx.Decision`).
        self.decisions: collections.deque = collections.deque(maxlen=100)
        # Output structures per call signature (`_shapes.py`).
        self.structures = _LRU(512)
        # The last failure, typed: under `jax.jit` only its text reaches the caller.
        self.last_error: TesseractError | None = None
        self._schema: Schema | None = None
        self._lock = threading.RLock()
        self._next = itertools.count()
        self._binary_replicas: dict[int, bool] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def from_api(
        cls,
        api: str | os.PathLike | ModuleType,
        *,
        cache: bool = True,
        headers: dict[str, str] | None = None,
    ) -> "Client":
        """A client of a `tesseract_api.py` run in this process, without HTTP.

        It drives the same app as `tesseract-lx serve` (batched endpoints, error
        bodies and validation included) through its ASGI interface: for debugging,
        and for tests that must not depend on a network. Calls have no timeout: the
        work runs in this process.

        **Arguments:**

        - `api`: the path of a `tesseract_api.py`, or the loaded module.
        - `cache`: the server's linearisation cache.
        - `headers`: extra headers, as for HTTP.
        """
        if not isinstance(api, ModuleType) and not os.path.isfile(api):
            raise FileNotFoundError(f"`api`: no `tesseract_api.py` at {api}.")
        transport = ASGITransport.from_api(
            api, {**_HEADERS, **(headers or {})}, cache=cache
        )
        obj = cls.__new__(cls)
        obj._init([transport], 1, _secrets(headers))
        return obj

    @classmethod
    def from_tesseract(cls, tesseract: Any, *, timeout: float = 120.0) -> "Client":
        """A client whose requests go through a `tesseract_core.Tesseract`'s own
        methods (`apply`, `jacobian_vector_product`, ...): served by URL, or loaded in
        process with `Tesseract.from_tesseract_api`. Subclasses, wrappers and
        instrumentation of that object see every call.

        **Arguments:**

        - `tesseract`: the `tesseract_core.Tesseract`.
        - `timeout`: seconds to wait for each call.
        """
        if not hasattr(tesseract, "openapi_schema") or not hasattr(tesseract, "apply"):
            raise TypeError(
                "Expected a `tesseract_core.Tesseract` (from_url / from_image / "
                f"from_tesseract_api), got {type(tesseract).__name__}."
            )
        obj = cls.__new__(cls)
        obj._init([TesseractTransport(tesseract, timeout)], None)
        return obj

    @classmethod
    def wrap(cls, obj: "Client | Any") -> "Client":
        """`obj` itself if a `Client`; for a `tesseract_core.Tesseract`, the one client
        of that object (`from_tesseract`), so its `stats` add up across modules."""
        if isinstance(obj, Client):
            return obj
        with _WRAP_LOCK:
            try:
                client = _WRAPPED.get(obj)
            except TypeError:  # not weakly referenceable, or unhashable
                return cls.from_tesseract(obj)
            if client is None:
                client = _WRAPPED[obj] = cls.from_tesseract(obj)
            return client

    def __repr__(self) -> str:
        return f"Client({', '.join(self.urls)})"

    def _redact(self, text: bytes) -> bytes:
        for secret in self._secrets:
            text = text.replace(secret, b"[redacted]")
        return text

    def _decode(
        self,
        endpoint: str,
        response: Response,
        url: str,
        parse: Callable[[Any], Any],
        malformed: tuple[type[Exception], ...] = (Exception,),
    ) -> Any:
        """`parse` of the JSON of a 200 answer. Any other answer, and one that does
        not parse (garbage, truncated JSON, an array that does not decode), is a
        `TesseractError` with the server's words, never a decoder's traceback."""
        if response.status != 200:
            body = self._redact(response.content)
            raise from_response(endpoint, response.status, body, url)
        try:
            if response.content_type == binary.MEDIA_TYPE:
                return binary.decode(response.content)
            return parse(orjson.loads(response.content))
        except malformed as e:
            why = self._redact(f"{type(e).__name__}: {e}".encode()).decode()
            raise TesseractServerError(
                endpoint,
                response.status,
                f"the answer is not a Tesseract payload ({why}; "
                f"{len(response.content)} bytes)",
                url,
            ) from e

    @property
    def urls(self) -> tuple[str, ...]:
        """The addresses of the replicas."""
        return tuple(t.url for t in self._transports)

    @property
    def schema(self) -> Schema:
        """The Tesseract's interface, fetched from `/openapi.json` once."""
        if self._schema is None:
            with self._lock:
                if self._schema is None:
                    response = self._transports[0].send("GET", "openapi.json")
                    # A ValueError of `parse_openapi` says what it cannot read.
                    self._schema = schema = self._decode(
                        "openapi.json",
                        response,
                        self.urls[0],
                        parse_openapi,
                        (orjson.JSONDecodeError, KeyError, TypeError, AttributeError),
                    )
                    return schema
        return self._schema

    @property
    def capabilities(self) -> Capabilities:
        """What the server says it can do (`x-tesseract-lx`); a stock one: nothing."""
        return self.schema.capabilities

    @property
    def workers(self) -> int:
        """How many requests each server computes at once: as given to the client,
        else as the server states it (`--workers`), else 1."""
        if self._workers is not None:
            return self._workers
        return self.capabilities.workers

    @property
    def parallelism(self) -> int:
        """How many requests can be computed at once over all replicas."""
        return self.workers * len(self._transports)

    def health(self) -> dict:
        """`GET /health`: the server's status (on `tesseract-lx serve`, with the
        linearisation cache's counters under `tesseract_lx`)."""
        response = self._transports[0].send("GET", "health")
        return self._decode("health", response, self.urls[0], lambda doc: doc)

    def _binary(self, index: int) -> bool:
        """Whether replica `index` said it takes binary bodies (`x-tesseract-lx`).

        The first replica's word is its schema's (never fetched here: until the
        schema is known, JSON); every other replica is asked once, for itself, as a
        pool may mix servers. Anything unclear is JSON, which every server takes.
        """
        transport = self._transports[index]
        if not transport.binary or self._schema is None:
            return False
        if index == 0:
            return self._schema.capabilities.binary == binary.MEDIA_TYPE
        known = self._binary_replicas.get(index)
        if known is None:
            try:
                doc = orjson.loads(transport.send("GET", "openapi.json").content)
                known = Capabilities.from_openapi(doc).binary == binary.MEDIA_TYPE
            except Exception:
                known = False
            self._binary_replicas[index] = known
        return known

    def request(
        self, endpoint: str, payload: Any, *, size: int = 0, k: int = 1, replica=None
    ) -> Any:
        """Send one request (to the next replica in turn); return the decoded answer.

        `size` (elements of the point) and `k` (items in the request) key the
        measured latency that `Auto` estimates from.
        """
        if replica is None:
            replica = next(self._next)
        index = replica % len(self._transports)
        transport = self._transports[index]
        headers = None
        if endpoint in COMPUTATIONAL and self._binary(index):
            body = binary.encode(payload)
            headers = _BINARY_HEADERS
        else:
            body = orjson.dumps(encode_tree(payload), option=orjson.OPT_SERIALIZE_NUMPY)
        with self._lock:
            self.stats[endpoint] += 1
        start = self.activity.started(endpoint, len(body))
        received = 0
        try:
            response = transport.send("POST", endpoint, body, headers)
            received = len(response.content)
            result = self._decode(endpoint, response, transport.url, decode_tree)
        except TesseractError as e:
            self.last_error = e
            raise
        finally:
            self.activity.finished(endpoint, start, received)
        self.latency.record(endpoint, size, k, time.perf_counter() - start)
        return result

    def request_many(
        self,
        endpoint: str,
        payloads: Sequence[Any],
        *,
        max_in_flight: int = 1,
        size: int = 0,
        k: int = 1,
    ) -> list[Any]:
        """Send several requests, one after another or up to `max_in_flight` at once
        (spread over the replicas); answers in order."""
        if max_in_flight <= 1 or len(payloads) <= 1:
            return [self.request(endpoint, p, size=size, k=k) for p in payloads]
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(self.parallelism, 8),
                    thread_name_prefix="tesseract_lx",
                )
            pool = self._pool
        semaphore = threading.Semaphore(max_in_flight)
        start = next(self._next)

        def send(i: int, payload: Any) -> Any:
            with semaphore:
                return self.request(
                    endpoint, payload, size=size, k=k, replica=start + i
                )

        futures = [pool.submit(send, i, p) for i, p in enumerate(payloads)]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Close every connection (those opened by pool threads included)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for t in self._transports:
            t.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# One client per `tesseract_core.Tesseract` object, for as long as the object lives.
_WRAPPED: "weakref.WeakKeyDictionary[Any, Client]" = weakref.WeakKeyDictionary()
_WRAP_LOCK = threading.Lock()
_HEADERS = {"Content-Type": "application/json", "Accept": ACCEPT}
# The lean path (`_wire/binary.py`), for a server that offers it.
_BINARY_HEADERS = {"Content-Type": binary.MEDIA_TYPE, "Accept": binary.MEDIA_TYPE}
_SECRET_HEADER = re.compile(r"auth|token|key|secret|cookie|password", re.IGNORECASE)


def _secrets(
    headers: dict[str, str] | None, auths: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, ...]:
    """What to hide from error texts: the value of every credential header and its
    credentials part (`abc` of `Bearer abc`, which a server may echo alone), the
    passwords of URLs and the Basic credentials made of them; longest first, so a
    value is hidden whole. Under 4 characters is not a secret worth hiding (and
    hiding it would garble the text)."""
    found = set()
    for user, password in auths:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        found.update([password, basic])
    for name, value in (headers or {}).items():
        if _SECRET_HEADER.search(name):
            found.update([value, *value.split()[1:]])
    return tuple(
        sorted((s.encode() for s in found if len(s) >= 4), key=len, reverse=True)
    )
