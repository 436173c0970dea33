"""Clients: HTTP (one keep-alive session per thread and URL) and in-process.

Why not `tesseract_core.Tesseract` as the transport: its HTTP client has no timeout by
default, re-negotiates encodings per call and keeps one `requests.Session` that is not
safe to share between the threads of the `concurrent` strategy; its in-process client
serves only tesseract-core's own endpoints, not the batched ones nor the
linearisation cache. We reuse its wire format (`_encoding.py`), its OpenAPI document
(`_schema.py`) and, in process, its endpoint functions and pydantic validation. A
`tesseract_core.Tesseract` is accepted wherever a `Client` is (`Client.wrap`).
"""

import collections
import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import requests

from ._wire.encoding import ACCEPT, decode_tree, encode_tree
from ._errors import (
    TesseractConnectionError,
    TesseractError,
    TesseractServerError,
    TesseractValidationError,
)
from ._wire.schema import parse_openapi, Schema


def _format_422(body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, list):
        return str(detail if detail is not None else body)
    parts = []
    for err in detail:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"`{loc}`: {err.get('msg', err)}")
    return "; ".join(parts)


def _error(endpoint: str, status: int, text: str, url: str) -> TesseractError:
    if status == 422:
        try:
            text = _format_422(orjson.loads(text))
        except orjson.JSONDecodeError:
            pass
        return TesseractValidationError(endpoint, status, text, url)
    if status >= 500:
        return TesseractServerError(endpoint, status, text, url)
    return TesseractError(endpoint, status, text, url)


class _HTTPTransport:
    """POSTs to one server, one keep-alive session per thread."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str]):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {
            "Content-Type": "application/json",
            "Accept": ACCEPT,
            **headers,
        }
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        return session

    def _send(self, method: str, endpoint: str, data: bytes | None = None):
        url = f"{self.url}/{endpoint}"
        try:
            try:
                return self._session().request(
                    method, url, data=data, timeout=self.timeout
                )
            except requests.ConnectionError:
                # A keep-alive connection the server closed while idle: retry once.
                self._local.session = None
                return self._session().request(
                    method, url, data=data, timeout=self.timeout
                )
        except requests.Timeout as e:
            raise TesseractConnectionError(
                endpoint,
                None,
                f"no answer within the client's timeout of {self.timeout} s",
                self.url,
            ) from e
        except requests.ConnectionError as e:
            raise TesseractConnectionError(
                endpoint, None, f"cannot connect to {self.url}: {e}", self.url
            ) from e

    def openapi(self) -> dict:
        response = self._send("GET", "openapi.json")
        if response.status_code != 200:
            raise _error("openapi.json", response.status_code, response.text, self.url)
        return orjson.loads(response.content)

    def health(self) -> dict:
        response = self._send("GET", "health")
        if response.status_code != 200:
            raise _error("health", response.status_code, response.text, self.url)
        return orjson.loads(response.content)

    def post(self, endpoint: str, payload: dict) -> dict:
        response = self._send("POST", endpoint, orjson.dumps(encode_tree(payload)))
        if response.status_code != 200:
            raise _error(endpoint, response.status_code, response.text, self.url)
        return decode_tree(orjson.loads(response.content))

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()


class _InProcessTransport:
    """Calls the endpoint functions of a `tesseract_api.py` directly.

    The payload goes through the same pydantic models as on the server, so a bad
    payload fails here exactly as it would with a 422 there.
    """

    def __init__(self, api: str | os.PathLike | ModuleType, cache: bool = True):
        import pydantic
        from tesseract_core.runtime.core import load_module_from_path
        from tesseract_core.runtime.serve import create_rest_api

        from ._server.endpoints import create_endpoints, lx_info

        if not isinstance(api, ModuleType):
            path = Path(api).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"No `tesseract_api.py` at {path}.")
            api = load_module_from_path(path)
        self.url = f"in-process:{getattr(api, '__file__', api.__name__)}"
        self._validation_error = pydantic.ValidationError
        endpoints = create_endpoints(api, cache=cache)
        self._endpoints: dict[str, Callable] = {fn.__name__: fn for fn in endpoints}
        self._openapi = create_rest_api(api).openapi()
        self._openapi["x-tesseract-lx"] = lx_info(endpoints)
        paths = self._openapi.setdefault("paths", {})
        for name in self._endpoints:
            paths.setdefault(f"/{name}", {})

    def openapi(self) -> dict:
        return self._openapi

    def health(self) -> dict:
        return {"status": "ok"}

    def post(self, endpoint: str, payload: dict) -> dict:
        fn = self._endpoints.get(endpoint)
        if fn is None:
            raise TesseractError(endpoint, 404, "Not Found", self.url)
        try:
            model = fn.__annotations__["payload"].model_validate(payload)
        except self._validation_error as e:
            parts = [
                f"`{'.'.join(str(x) for x in err['loc'])}`: {err['msg']}"
                for err in e.errors()
            ]
            raise TesseractValidationError(
                endpoint, 422, "; ".join(parts), self.url
            ) from None
        try:
            result = fn(model)
        except Exception as e:  # noqa: BLE001 - the Tesseract's own failure
            raise TesseractServerError(
                endpoint, 500, f"{type(e).__name__}: {e}", self.url
            ) from e
        if hasattr(result, "model_dump"):
            result = result.model_dump()
        return _to_numpy(result)

    def close(self) -> None:
        pass


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_numpy(v) for v in tree)
    if hasattr(tree, "__array__") and not isinstance(tree, str | bytes):
        return np.asarray(tree)
    return tree


class Latencies:
    """Seconds per request, measured by the client, by endpoint and input size.

    A request of K (co)tangents is modelled as `a + b K`: from samples at one K the
    median stands; from several K, a least-squares line. The first sample of each
    (endpoint, size, K) carries the server's compilation: it counts for nothing, and
    is dropped when a second arrives.
    """

    def __init__(self):
        self._samples: dict[tuple[str, int], collections.deque] = {}

    def clear(self) -> None:
        self._samples.clear()

    def __bool__(self) -> bool:
        return bool(self._samples)

    def record(self, endpoint: str, size: int, k: int, seconds: float) -> None:
        samples = self._samples.setdefault(
            (endpoint, size), collections.deque(maxlen=12)
        )
        same = [s for s in samples if s[0] == k]
        if len(same) == 1 and same[0][2]:
            samples.remove(same[0])
        samples.append((k, seconds, not same))

    def get(self, endpoint: str, size: int, k: int = 1) -> float | None:
        """Expected seconds for one request of `k` items, or `None` if unmeasured."""
        samples = [
            (kk, t)
            for kk, t, cold in self._samples.get((endpoint, size), ())
            if not cold
        ]
        if not samples:
            return None
        same = sorted(t for kk, t in samples if kk == k)
        if same:
            return same[len(same) // 2]
        ks = np.array([kk for kk, _ in samples], float)
        ts = np.array([t for _, t in samples], float)
        if len(set(ks)) < 2:
            # One batch size seen: scale its per-item part, keep its fixed part.
            t0, k0 = float(np.median(ts)), ks[0]
            fixed = min(t0, 3e-3)
            return fixed + (t0 - fixed) * k / k0
        b, a = np.polyfit(ks, ts, 1)
        return max(a, 0.0) + max(b, 0.0) * k


class Client:
    """A connection to one Tesseract (or several replicas of it).

    **Arguments:**

    - `url`: the server's address, e.g. `"http://127.0.0.1:8000"`, or a list of
        addresses of identical replicas: concurrent requests are spread over them.
    - `timeout`: seconds to wait for any one answer; a request never hangs.
    - `headers`: extra HTTP headers sent with every request.
    - `workers`: how many requests each server computes at once (its `--workers`);
        used by the `concurrent` strategy and the cost model of `auto`.

    `client.stats` is a `collections.Counter` of the requests sent, keyed by endpoint
    name (`"apply"`, `"jacobian_vector_product"`, ...). The interface (shapes, dtypes,
    differentiable paths, endpoints) is read from `/openapi.json` once, on first use.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = 120.0,
        headers: dict[str, str] | None = None,
        workers: int = 1,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("`url` must name at least one server.")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(
                    f"`url` must be an http(s) address such as "
                    f"'http://127.0.0.1:8000', got {u!r}."
                )
        if timeout <= 0:
            raise ValueError(f"`timeout` must be positive, got {timeout}.")
        self._init([_HTTPTransport(u, timeout, headers or {}) for u in urls], workers)

    def _init(self, transports: list, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"`workers` must be at least 1, got {workers}.")
        self._transports = transports
        self.workers = workers
        self.stats: collections.Counter[str] = collections.Counter()
        self.latency = Latencies()
        # What `batching="auto"` decided lately, and why (`_batching.Decision`).
        self.decisions: collections.deque = collections.deque(maxlen=100)
        self._schema: Schema | None = None
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Output shapes per input signature (shapes, dtypes, static values).
        self.output_shapes: dict[Any, dict[str, tuple[int, ...]]] = {}

    @classmethod
    def from_api(
        cls, api: str | os.PathLike | ModuleType, *, cache: bool = True
    ) -> "Client":
        """A client that runs a `tesseract_api.py` in this process, without HTTP.

        Same validation, same endpoints (the batched ones included), same `stats`:
        for debugging, and for tests that must not depend on a network.
        """
        obj = cls.__new__(cls)
        obj._init([_InProcessTransport(api, cache=cache)], 1)
        return obj

    @classmethod
    def wrap(cls, obj: "Client | Any") -> "Client":
        """`obj` itself if a `Client`; a `Client` for a `tesseract_core.Tesseract`."""
        if isinstance(obj, Client):
            return obj
        inner = getattr(obj, "_client", None)
        url = getattr(inner, "url", None) or getattr(inner, "_url", None)
        if isinstance(url, str) and url.startswith("http"):
            return cls(url, timeout=getattr(inner, "_timeout", None) or 120.0)
        module = getattr(inner, "api_module", None)
        if isinstance(module, ModuleType):
            return cls.from_api(module)
        raise TypeError(
            "Expected a `tesseract_lx.Client` or a `tesseract_core.Tesseract` "
            f"(from_url / from_tesseract_api), got {type(obj).__name__}."
        )

    def __repr__(self) -> str:
        urls = ", ".join(t.url for t in self._transports)
        return f"Client({urls})"

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(t.url for t in self._transports)

    @property
    def parallelism(self) -> int:
        """How many requests can be computed at once over all replicas."""
        return self.workers * len(self._transports)

    @property
    def schema(self) -> Schema:
        """The Tesseract's interface, fetched from `/openapi.json` once."""
        if self._schema is None:
            with self._lock:
                if self._schema is None:
                    self._schema = parse_openapi(self._transports[0].openapi())
        return self._schema

    def health(self) -> dict:
        return self._transports[0].health()

    def request(self, endpoint: str, payload: dict, *, size: int = 0, k: int = 1):
        """Send one request (to the next replica in turn); return decoded arrays.

        `size` (elements of the point) and `k` (items in the request) key the
        measured latency that the `auto` batching rule estimates from.
        """
        transport = self._transports[next(self._next) % len(self._transports)]
        with self._lock:
            self.stats[endpoint] += 1
        start = time.perf_counter()
        result = transport.post(endpoint, payload)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.latency.record(endpoint, size, k, elapsed)
        return result

    def request_many(
        self,
        endpoint: str,
        payloads: Sequence[dict],
        *,
        concurrent: bool = False,
        size: int = 0,
    ) -> list[dict]:
        """Send several requests, in order or all in flight at once."""
        send = lambda p: self.request(endpoint, p, size=size)
        if not concurrent or len(payloads) <= 1:
            return [send(p) for p in payloads]
        with self._lock:
            if self._pool is None:
                self._pool = concurrent_pool(self.parallelism)
        return list(self._pool.map(send, payloads))

    def close(self) -> None:
        for t in self._transports:
            t.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def concurrent_pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=max(n, 1), thread_name_prefix="tesseract_lx"
    )
