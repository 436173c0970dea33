"""Errors raised when a Tesseract refuses or fails a request."""


class TesseractError(RuntimeError):
    """A request to a Tesseract failed.

    **Attributes:**

    - `endpoint`: the endpoint the request went to, e.g. `"jacobian_vector_product"`.
    - `status`: the HTTP status (422 for a payload the server's schema rejected,
        500 for a failure inside the Tesseract), or `None` if no answer came back.
    - `message`: the server's own text.
    """

    def __init__(self, endpoint: str, status: int | None, message: str, url: str = ""):
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.url = url
        where = f" at {url}" if url else ""
        code = f" ({status})" if status is not None else ""
        super().__init__(f"`/{endpoint}`{where} failed{code}: {message}")


class TesseractValidationError(TesseractError, ValueError):
    """The Tesseract rejected the payload (HTTP 422); `message` names the field."""


class TesseractServerError(TesseractError):
    """The Tesseract failed while computing (HTTP 5xx)."""


class TesseractConnectionError(TesseractError, ConnectionError):
    """No answer: the server could not be reached or did not answer in time."""


class TesseractDtypeError(TypeError):
    """The server answered in a lower precision than was asked for."""
