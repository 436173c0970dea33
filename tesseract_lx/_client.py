"""`Client`: the connection to one Tesseract (or identical replicas of it), and its
schema.

The client encodes payloads (tesseract-core's `json+base64` arrays), sends them
through a transport (`_transport.py`: HTTP, an app in this process, or a
`tesseract_core.Tesseract`'s own methods) to the replica whose turn it is, and turns
failures into `TesseractError`s that carry the server's words. What the requests cost
and what was decided about them (`stats`, `latency`, `decisions`, ...) is its
`Telemetry` (`_telemetry.py`), shown as the client's own attributes. One client is
safe to share between threads.

An answer is data, never code: arrays are decoded from base64 or JSON lists only (a
`binref` array, which names a file, is refused: a server must not make the client read
its files), and nothing is unpickled or evaluated. Credentials (headers such as
`Authorization`, a password in the URL) are sent, but never shown: not in `repr`, and
not in an error, even when the server echoes them back.
"""

import base64
import collections
import concurrent.futures
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import orjson

from ._errors import from_response, TesseractError, TesseractServerError
from ._latency import Latencies
from ._progress import Activity
from ._replicas import merge
from ._telemetry import LRU, Telemetry
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


class Client:
    """A connection to one Tesseract (or several identical replicas of it).

    **Arguments:**

    - `url`: the server's address, e.g. `"http://127.0.0.1:8000"`, or a list of
        addresses of replicas of one Tesseract: concurrent requests and batch chunks
        are spread over them. The replicas may be different servers (a
        `tesseract-lx serve` and a stock one): each is asked what it serves, and a
        request goes only to those that serve its endpoint.
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
    can do) is read from `/openapi.json` once, on first use (of every replica).

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
    - `structures`: the output structure learnt per call signature (shapes and
        dtypes), so that tracing sends nothing twice.
    - `telemetry`: all of the above, with the methods that change them.
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
        self.telemetry = Telemetry()
        # The merged interface, and each replica's own, read once on first use.
        self._schema: Schema | None = None
        self._schemas: tuple[Schema, ...] | None = None
        self._schema_lock = threading.Lock()
        # Endpoint -> the replicas that serve it (indices), for a pool.
        self._routes: dict[str, tuple[int, ...]] = {}
        self._lock = threading.RLock()
        # Whose turn it is, per endpoint: each endpoint's requests go round its
        # own replicas, whatever other endpoints are asked in between.
        self._turns: collections.Counter[str] = collections.Counter()
        # The threads of `request_many`: as many as its calls in progress ask for.
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._demand = 0

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
        # The launcher knows the server side; imported only when asked for, so that
        # a client of a remote Tesseract never loads it.
        from ._serve import in_process_app

        name = getattr(api, "__file__", None) or str(api)
        transport = ASGITransport(
            in_process_app(api, cache=cache),
            f"in-process:{name}",
            {**_HEADERS, **(headers or {})},
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

    # The telemetry's parts, as the client's own attributes.

    @property
    def stats(self) -> collections.Counter[str]:
        """Requests sent, by endpoint (`telemetry.stats`)."""
        return self.telemetry.stats

    @property
    def latency(self) -> Latencies:
        """Measured seconds per request (`telemetry.latency`)."""
        return self.telemetry.latency

    @property
    def decisions(self) -> collections.deque:
        """The last 100 `tlx.Decision`s (`telemetry.decisions`)."""
        return self.telemetry.decisions

    @property
    def activity(self) -> Activity:
        """Requests in flight and done (`telemetry.activity`)."""
        return self.telemetry.activity

    @activity.setter
    def activity(self, value: Activity) -> None:
        # An instrumented `Activity` (as the tests' gates) may take its place.
        self.telemetry.activity = value

    @property
    def last_error(self) -> TesseractError | None:
        """The last `tlx.TesseractError` (`telemetry.last_error`)."""
        return self.telemetry.last_error

    @last_error.setter
    def last_error(self, value: TesseractError | None) -> None:
        self.telemetry.last_error = value

    @property
    def structures(self) -> LRU:
        """Output structures per call signature (`telemetry.structures`)."""
        return self.telemetry.structures

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
        """The Tesseract's interface, read from `/openapi.json` once, on first use.

        For a pool, every replica is asked (once each): they must serve the same
        Tesseract (the same inputs and outputs; else a `ValueError` naming them).
        `schema.endpoints` are those some replica serves (`schema.has(E)`), and
        requests for an endpoint go only to the replicas that serve it;
        `schema.capabilities` is as [`capabilities`][tesseract_lx.Client.capabilities]
        merges them.
        """
        if self._schema is None:
            self._replica_schemas()
        assert self._schema is not None
        return self._schema

    def _replica_schemas(self) -> tuple[Schema, ...]:
        """Each replica's own interface, fetched once (concurrently for a pool)."""
        if self._schemas is None:
            with self._schema_lock:
                if self._schemas is None:
                    n = len(self._transports)
                    if n == 1:
                        schemas = (self._fetch_schema(0),)
                    else:
                        with concurrent.futures.ThreadPoolExecutor(
                            min(n, 16), thread_name_prefix="tesseract_lx-schema"
                        ) as pool:
                            futures = [
                                pool.submit(self._fetch_schema, i) for i in range(n)
                            ]
                        schemas = tuple(f.result() for f in futures)
                    merged, disagreements = merge(schemas, self.urls)
                    self._schema, self._schemas = merged, schemas
                    if disagreements:
                        warnings.warn(
                            "The replicas of this `tlx.Client` disagree on "
                            + "; and on ".join(disagreements)
                            + ". Give it replicas started with the same settings.",
                            stacklevel=3,
                        )
        return self._schemas

    def _fetch_schema(self, index: int) -> Schema:
        transport = self._transports[index]
        response = transport.send("GET", "openapi.json")
        # A ValueError of `parse_openapi` says what it cannot read.
        return self._decode(
            "openapi.json",
            response,
            transport.url,
            parse_openapi,
            (orjson.JSONDecodeError, KeyError, TypeError, AttributeError),
        )

    @property
    def capabilities(self) -> Capabilities:
        """What the server says it can do (`x-tesseract-lx`); a stock one: nothing.

        For a pool, merged: the batched endpoints and their modes of every replica
        that serves them (requests go there only), and where the replicas must
        agree, the most restrictive of what they say: the lowest `precision`, the
        smallest `max_batch` and `max_body_bytes`, the fewest `workers`, the
        `linear_solve_options` all take; `pure` only if all are. A pool whose
        replicas state different `precision` or `max_batch` is warned about once.
        `is_stock` only if every replica is.
        """
        return self.schema.capabilities

    @property
    def workers(self) -> int:
        """How many requests each server computes at once: as given to the client,
        else as the server states it (`--workers`; for a pool, the fewest any
        replica states), else 1."""
        if self._workers is not None:
            return self._workers
        return self.capabilities.workers

    @property
    def parallelism(self) -> int:
        """How many requests can be computed at once over all replicas: the sum of
        their workers."""
        return self._parallelism(range(len(self._transports)))

    def serves(self, endpoint: str) -> bool:
        """Whether some replica serves `endpoint` (e.g. `"linear_solve"`,
        `"batched_jacobian_vector_product"`): requests for it then go to those
        replicas only. The same as `client.schema.has(endpoint)`."""
        return self.schema.has(endpoint)

    def parallelism_for(self, endpoint: str) -> int:
        """How many requests for `endpoint` can be computed at once: the sum of the
        workers of the replicas that serve it (of every replica if none says it
        does: each answers, if only with an error)."""
        return self._parallelism(self._replicas_for(endpoint))

    def _parallelism(self, replicas: Sequence[int]) -> int:
        if self._workers is not None:
            return self._workers * len(replicas)
        schemas = self._replica_schemas()
        return sum(schemas[i].capabilities.workers for i in replicas)

    def _replicas_for(self, endpoint: str) -> tuple[int, ...]:
        """The replicas that serve `endpoint` (all of them if none says it does)."""
        n = len(self._transports)
        if n == 1:
            return (0,)
        found = self._routes.get(endpoint)
        if found is None:
            schemas = self._replica_schemas()
            found = tuple(i for i, s in enumerate(schemas) if s.has(endpoint))
            found = self._routes[endpoint] = found or tuple(range(n))
        return found

    def health(self) -> dict:
        """`GET /health`: the server's status (on `tesseract-lx serve`, with the
        linearisation cache's counters under `tesseract_lx`); of the first replica
        of a pool."""
        response = self._transports[0].send("GET", "health")
        return self._decode("health", response, self.urls[0], lambda doc: doc)

    def _turn(self, endpoint: str, n: int = 1) -> int:
        """The first of `n` turns of `endpoint` in the round of its replicas."""
        with self._lock:
            first = self._turns[endpoint]
            self._turns[endpoint] += n
        return first

    def _binary(self, index: int) -> bool:
        """Whether replica `index` said it takes binary bodies (`x-tesseract-lx`).

        Each replica's own word, as a pool may mix servers; never fetched here (a
        single server's schema may be unknown yet: JSON until then, which every
        server takes).
        """
        if not self._transports[index].binary or self._schemas is None:
            return False
        return self._schemas[index].capabilities.binary == binary.MEDIA_TYPE

    def request(
        self, endpoint: str, payload: Any, *, size: int = 0, k: int = 1, replica=None
    ) -> Any:
        """Send one request (to the next replica in turn that serves `endpoint`);
        return the decoded answer.

        `size` (elements of the point) and `k` (items in the request) key the
        measured latency that `Auto` estimates from.
        """
        if replica is None:
            replica = self._turn(endpoint)
        serving = self._replicas_for(endpoint)
        index = serving[replica % len(serving)]
        transport = self._transports[index]
        headers = None
        if endpoint in COMPUTATIONAL and self._binary(index):
            body = binary.encode(payload)
            headers = _BINARY_HEADERS
        else:
            body = orjson.dumps(encode_tree(payload), option=orjson.OPT_SERIALIZE_NUMPY)
        start = self.telemetry.sent(endpoint, len(body))
        received = 0
        answered = False
        try:
            response = transport.send("POST", endpoint, body, headers)
            received = len(response.content)
            result = self._decode(endpoint, response, transport.url, decode_tree)
            answered = True
        except TesseractError as e:
            self.telemetry.record_error(e)
            raise
        finally:
            # A failure is no latency sample.
            self.telemetry.answered(
                endpoint, start, received, size=size if answered else None, k=k
            )
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
        (spread over the replicas that serve `endpoint`); answers in order. Every
        request is sent; the first failure (in order) is raised."""
        n = min(max_in_flight, len(payloads))
        if n <= 1:
            return [self.request(endpoint, p, size=size, k=k) for p in payloads]
        start = self._turn(endpoint, len(payloads))
        results: list[Any] = [None] * len(payloads)
        errors: dict[int, BaseException] = {}
        items = iter(range(len(payloads)))
        items_lock = threading.Lock()

        def work() -> None:
            # `n` of these take the requests one by one: exactly `n` in flight,
            # and no thread of the pool waits idle for a turn.
            while True:
                with items_lock:
                    i = next(items, None)
                if i is None:
                    return
                try:
                    results[i] = self.request(
                        endpoint, payloads[i], size=size, k=k, replica=start + i
                    )
                except BaseException as e:  # noqa: BLE001 - raised below, in order
                    errors[i] = e

        with self._lock:
            self._demand += n
            if self._pool is None or self._pool_size < self._demand:
                # Enough threads for every call in progress, each with its own
                # `max_in_flight`: a smaller pool would cap them without a word.
                # The old pool finishes what it was given.
                old = self._pool
                self._pool_size = max(self._demand, 2 * self._pool_size, 8)
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._pool_size, thread_name_prefix="tesseract_lx"
                )
                if old is not None:
                    old.shutdown(wait=False)
            futures = [self._pool.submit(work) for _ in range(n)]
        try:
            concurrent.futures.wait(futures)
        finally:
            with self._lock:
                self._demand -= n
        if errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        """Close every connection (those opened by pool threads included)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._pool_size = 0
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
