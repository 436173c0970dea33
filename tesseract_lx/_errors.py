"""Errors raised when a Tesseract refuses or fails a request.

Every message names the endpoint, the server's URL, the HTTP status and the
Tesseract's own words, in one line that survives `jax.jit`: there, an exception raised
in a host callback reaches the user as `jax.errors.JaxRuntimeError` whose text ends
with this message (the type is lost; `client.last_error` keeps the typed one).
"""

from typing import Any, cast, LiteralString

import orjson
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError


class TesseractError(RuntimeError):
    """A request to a Tesseract failed.

    **Attributes:**

    - `endpoint`: the endpoint the request went to, e.g. `"jacobian_vector_product"`.
    - `status`: the HTTP status (422 for a payload the server's schema rejected,
        500 for a failure inside the Tesseract), or `None` if no answer came back.
    - `message`: the server's own text (for a failure inside the Tesseract, its
        exception's type and message when the server says them).
    - `url`: the server's address.
    - `error_type`: the Tesseract's exception type, when the server says it.
    - `traceback`: the Tesseract's traceback, when the server sends it (debug).
    """

    def __init__(
        self,
        endpoint: str,
        status: int | None,
        message: str,
        url: str = "",
        *,
        error_type: str | None = None,
        traceback: str | None = None,
    ):
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.url = url
        self.error_type = error_type
        self.traceback = traceback
        where = f" at {url}" if url else ""
        code = f" ({status})" if status is not None else ""
        super().__init__(f"`/{endpoint}`{where} failed{code}: {message}")


class TesseractValidationError(TesseractError, ValidationError):
    """The Tesseract rejected the payload (HTTP 422); `message` names the field.

    Also a pydantic `ValidationError` (so a `ValueError`), as tesseract-core's own
    client raises for a 422: `errors()` lists the server's line errors, each with
    its `loc` (without FastAPI's leading `"body"`), `type` and `msg`.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if len(args) > 1 and isinstance(args[1], list):
            # pydantic building the instance (`from_exception_data` calls the class
            # with its title and line errors).
            return ValidationError.__new__(cls, *args, **kwargs)
        given = list(args)
        endpoint, message = given[0], given[2]
        detail = kwargs.get("detail") or ()
        lines = [
            _line(err.get("type"), err.get("msg"), err.get("loc"), err.get("input"))
            for err in detail
            if isinstance(err, dict)
        ] or [_line("value_error", message, (), None)]
        return cls.from_exception_data(f"endpoint {endpoint}", lines)

    def __init__(self, *args: Any, detail: list | None = None, **kwargs: Any):
        # Called as `TesseractError` is, and once more by pydantic inside `__new__`.
        if len(args) > 1 and isinstance(args[1], list):
            return
        self.detail = detail
        super().__init__(*args, **kwargs)

    def __str__(self) -> str:
        # Ours (endpoint, URL, status, the server's words), not pydantic's listing:
        # one line that survives `jax.jit`.
        return str(self.args[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self):
        # pydantic's own would rebuild a plain `ValidationError`, without our fields.
        args = (self.endpoint, self.status, self.message, self.url, self.detail)
        extra = (self.error_type, self.traceback)
        return _rebuild_validation_error, (type(self), args, extra)


def _rebuild_validation_error(cls, args, extra):
    endpoint, status, message, url, detail = args
    error_type, traceback = extra
    return cls(
        endpoint,
        status,
        message,
        url,
        detail=detail,
        error_type=error_type,
        traceback=traceback,
    )


def _line(kind: Any, message: Any, loc: Any, value: Any) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError(
            cast(LiteralString, str(kind or "value_error")),
            "{message}",
            {"message": str(message or "")},
        ),
        loc=tuple(x for x in (loc or ()) if x != "body" and isinstance(x, str | int)),
        input=value,
    )


class TesseractServerError(TesseractError):
    """The Tesseract failed while computing (HTTP 5xx)."""


class TesseractConnectionError(TesseractError, ConnectionError):
    """No answer: the server could not be reached, went away, or did not answer in
    time."""


class TesseractTimeoutError(TesseractConnectionError, TimeoutError):
    """No answer within the client's connect or read timeout; also a `TimeoutError`."""


class TesseractDtypeError(TesseractError, TypeError):
    """The server computes in a lower precision than the schema's dtypes promise
    (as its `/openapi.json` says): refused before any request."""

    def __init__(self, message: str, url: str = ""):
        super().__init__("openapi.json", None, message, url)


_HIDDEN = (
    "the server did not say why: `tesseract-runtime serve` hides the Tesseract's "
    "exception unless started with `TESSERACT_DEBUG=1` (then its traceback comes "
    "back), and `tesseract-lx serve` always returns the exception's type and message"
)


def _format_422(detail: list) -> str:
    parts = []
    for err in detail:
        if not isinstance(err, dict):
            parts.append(str(err))
            continue
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"`{loc}`: {err.get('msg', err)}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def from_response(endpoint: str, status: int, body: bytes, url: str) -> TesseractError:
    """The error for a non-200 answer, with the server's words in the message."""
    text = body.decode(errors="replace").strip()
    error_type = traceback = detail = None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        detail = doc.get("detail")
        error = doc.get("error")
        if not isinstance(error, dict):
            error = {}
        error_type, traceback = error.get("type"), error.get("traceback")
        if isinstance(detail, list):
            text = _format_422(detail)
        elif detail is not None:
            text = str(detail)
    elif status >= 500 and text.startswith("Traceback"):
        # tesseract-runtime with `TESSERACT_DEBUG=1`: a plain-text traceback whose last
        # line is the exception.
        traceback = text
        text = text.splitlines()[-1]
        error_type = text.split(":", 1)[0] if ":" in text else None
    if status >= 500 and text in ("", "Internal Server Error"):
        text = f"{text or 'no message'} ({_HIDDEN})"
    cls = (
        TesseractValidationError
        if status == 422
        else TesseractServerError
        if status >= 500
        else TesseractError
    )
    extra = {}
    if cls is TesseractValidationError:
        extra["detail"] = detail if isinstance(detail, list) else None
    return cls(
        endpoint, status, text, url, error_type=error_type, traceback=traceback, **extra
    )


class TesseractNonFiniteError(TesseractError, FloatingPointError):
    """An answer held NaN or Inf, and the call was made with `check_finite=True`."""


class FallbackWarning(UserWarning):
    """tesseract_lx did the nearest correct thing instead of what was asked: a solve
    `tlx.OnServer` ran locally, a batching rule the server does not serve gave way to
    another. The same numbers, by other requests. Each is also a
    [`tlx.Decision`][tesseract_lx.Decision] in `client.decisions`, with the reason.
    Warned once per compiled call (when it is traced); turn it into an error with
    `warnings.simplefilter("error", tlx.FallbackWarning)`, or pass
    `allow_local=False` to `tlx.OnServer`.
    """
