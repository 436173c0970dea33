"""How a tesseract-lx route runs an endpoint, and what it answers when it raises.

**The route wrapper.** tesseract-core's `create_rest_api` wraps `apply`, `jacobian`,
`jacobian_vector_product` and `vector_jacobian_product` so that every request gets a
`run_<id>/` folder under `TESSERACT_OUTPUT_PATH` and the process's stdout/stderr
redirected into it (`tesseract_core.runtime.mpa.start_run`): files written, and
descriptors swapped under a process-wide lock, for every JVP a Krylov solver asks for.
`computational_route` is that wrapper without the run folder, unless asked for
(`run_folders=True`): it keeps tesseract-core's `negotiate_encoding` (the `Accept`
header: `json`, `json+base64`, `json+binref`, compression, GPU transport), its
`create_response`, the hidden `run_id` query and `exports-done` header, so clients of
tesseract-core see no difference. Without run folders, a Tesseract that logs metrics
or parameters (`tesseract_core.runtime.mpa.log_metric`, ...) logs into `_NullBackend`,
which keeps nothing.

The computation runs in a worker thread, so the event loop keeps answering `/health`
meanwhile, and one computation at a time per app (`Runner`), as on
`tesseract-runtime serve`: requests computed at once are the server's `workers`.

**Errors.** An exception raised by the Tesseract's code becomes a `TesseractFailure`,
answered by `add_error_handlers`' handler with a 500 whose body carries the exception's
type and message (`.._wire.spec.error_body`), and its traceback when the server runs
in debug mode. Request validation keeps FastAPI's 422; `HTTPException`s keep their
status.
"""

import contextlib
import functools
import inspect
import logging
import math
import re
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from tesseract_core.runtime import mpa
from tesseract_core.runtime.config import get_config
from tesseract_core.runtime.cuda.serving import EXPORTS_DONE_HEADER, ResponseExports
from tesseract_core.runtime.file_interactions import join_paths
from tesseract_core.runtime.profiler import Profiler
from tesseract_core.runtime.schema_types import ShapeDType
from tesseract_core.runtime.serve import create_response, negotiate_encoding

from .._wire.spec import error_body
from .upstream import current_backend


logger = logging.getLogger("tesseract_lx.server")
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class TesseractFailure(Exception):
    """An exception raised by the Tesseract's code while computing `endpoint`."""

    def __init__(self, endpoint: str, error: BaseException):
        super().__init__(f"{endpoint}: {type(error).__name__}: {error}")
        self.endpoint = endpoint
        self.error = error

    def log(self) -> None:
        logger.error(
            "%s raised %s: %s",
            self.endpoint,
            type(self.error).__name__,
            self.error,
            exc_info=self.error,
        )

    def body(self, debug: bool) -> dict[str, Any]:
        tb = None
        if debug:
            tb = "".join(traceback.format_exception(self.error))
        return error_body(self.endpoint, type(self.error).__name__, str(self.error), tb)


def add_error_handlers(app: FastAPI, debug: bool) -> None:
    """500s that carry the Tesseract's own words, as `.._wire.spec.error_body`."""

    async def failure(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TesseractFailure)
        exc.log()
        return JSONResponse(status_code=500, content=exc.body(debug))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything else (a bug of ours, a failed encoding): the same body. Starlette
        # re-raises it after this answer, so uvicorn logs it.
        endpoint = request.url.path.strip("/") or "/"
        return JSONResponse(
            status_code=500, content=TesseractFailure(endpoint, exc).body(debug)
        )

    app.add_exception_handler(TesseractFailure, failure)
    app.add_exception_handler(Exception, unexpected)


class _NullBackend(mpa.BaseBackend):
    """An MPA backend that keeps nothing: `log_metric` and friends are no-ops."""

    def __init__(self) -> None:  # no `logs/` folder, unlike every other backend
        self.log_dir = None

    def log_parameter(self, key: str, value: Any) -> None:
        pass

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str) -> None:
        pass

    def start_run(self) -> None:
        pass

    def end_run(self) -> None:
        pass


@contextmanager
def _null_run() -> Iterator[None]:
    token = current_backend.set(_NullBackend())
    try:
        yield
    finally:
        current_backend.reset(token)


class Runner:
    """Runs the Tesseract's code: one call at a time, in a run folder or not.

    **Arguments:**

    - `run_folders`: give every computational request a `run_<id>/` folder with its
        logs and stdout/stderr, as tesseract-runtime does.
    - `x64`: JAX's float64 setting the Tesseract's code runs with, in the running
        thread only (`jax.enable_x64`); `None`: the process's. Set for a Tesseract
        loaded in a caller's process that switched it at import (`app._load` put the
        process's setting back).
    """

    def __init__(self, *, run_folders: bool, x64: bool | None = None):
        self.run_folders = run_folders
        self.x64 = x64
        self._lock = threading.Lock()

    def scope(self) -> contextlib.AbstractContextManager:
        """The Tesseract's own settings, in this thread, while in the block."""
        if self.x64 is None:
            return contextlib.nullcontext()
        import jax

        return jax.enable_x64(self.x64)

    def scoped(self, fn: Callable) -> Callable:
        """`fn`, run within `scope()`."""
        if self.x64 is None:
            return fn

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.scope():
                return fn(*args, **kwargs)

        return run

    def call(
        self, endpoint: str, fn: Callable[[], Any], *, rundir: str | None = None
    ) -> Any:
        """`fn()`, a Tesseract exception raised as a `TesseractFailure`; in the run
        folder `rundir` when run folders are on."""
        with self._lock:
            try:
                # As tesseract-core: a no-op unless `TESSERACT_PROFILING` is on.
                profiler = Profiler()
                if self.run_folders and rundir is not None:
                    run = mpa.start_run(base_dir=rundir)
                else:
                    run = _null_run()
                with run, self.scope():
                    with profiler:
                        result = fn()
                    # Inside the run: the stats go to its log, as on tesseract-core.
                    profiler.print_stats()
                return result
            except HTTPException:
                raise
            except Exception as e:
                raise TesseractFailure(endpoint, e) from e


def computational_route(
    endpoint: Callable, runner: Runner, check: Callable[[Any], None] | None = None
) -> Callable:
    """The async route of a computational endpoint (`fn(payload) -> pydantic model`).

    Its OpenAPI entry is tesseract-core's: the payload and result models of `endpoint`,
    an optional `accept` header, hidden `run_id` and `exports-done` parameters.
    `check(payload)`, called first, may refuse the request.
    """
    name = endpoint.__name__
    Payload = endpoint.__annotations__["payload"]
    Result = endpoint.__annotations__["return"]

    async def route(
        payload: Any,
        accept: Annotated[str | None, Header()] = None,
        run_id: Annotated[str | None, Query(include_in_schema=False)] = None,
        exports_done: Annotated[
            str | None, Header(alias=EXPORTS_DONE_HEADER, include_in_schema=False)
        ] = None,
    ) -> Any:
        config = get_config()
        encoding = negotiate_encoding(accept)
        exports = None
        if config.gpu_transport != "none":
            exports = ResponseExports(
                encoding.gpu_transport, acknowledged=exports_done is not None
            )
        output_path = config.output_path
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            # It names a folder under the output path: no `/`, no `..`.
            raise HTTPException(
                422, "`run_id` must be 1-128 letters, digits, `-` or `_`."
            )
        rundir_name = f"run_{run_id or uuid.uuid4()}"
        rundir = join_paths(output_path, rundir_name)

        def compute_and_encode() -> Any:
            if check is not None:
                with runner.scope():
                    check(payload)
            result = runner.call(name, lambda: endpoint(payload), rundir=rundir)

            def make_response(device_exports: Any = None) -> Any:
                return create_response(
                    result,
                    encoding,
                    base_dir=output_path,
                    binref_dir=rundir_name,
                    device_exports=device_exports,
                )

            if exports is None:
                return make_response()
            return exports.respond(make_response)

        return await run_in_threadpool(compute_and_encode)

    # Real annotations for FastAPI: the payload model validates the body, the result
    # model documents the answer (the route returns a ready `Response`).
    signature = inspect.signature(route)
    params = list(signature.parameters.values())
    params[0] = params[0].replace(annotation=Payload)
    route.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=Result
    )
    route.__annotations__ = {**route.__annotations__, "payload": Payload}
    route.__annotations__["return"] = Result
    route.__name__ = route.__qualname__ = name
    route.__doc__ = endpoint.__doc__
    return route


def check_abstract_shapes(payload: Any) -> None:
    """A 422 for a `ShapeDType` no NumPy array can have: a size < 0, or more than
    `intp`'s maximum of bytes.

    tesseract-core's `ShapeDType` takes any ints, and checks only the rank and the
    fixed sizes: `/abstract_eval` would hand `(-1,)` to the Tesseract, and answer
    500 for what it raises.
    """
    limit = np.iinfo(np.intp).max
    errors = []

    def walk(x: Any, loc: tuple) -> None:
        if isinstance(x, ShapeDType):
            shape = tuple(x.shape)
            nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize
            if any(not 0 <= d <= limit for d in shape) or nbytes > limit:
                errors.append(
                    {
                        "type": "value_error",
                        "loc": (*loc, "shape"),
                        "msg": f"Value error, no {x.dtype} array has shape {shape}: "
                        f"sizes must be >= 0, and its bytes at most {limit}.",
                        "input": list(shape),
                    }
                )
        elif isinstance(x, BaseModel):
            for k in type(x).model_fields:
                walk(getattr(x, k), (*loc, k))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, (*loc, k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, (*loc, i))

    walk(payload, ("body",))
    if errors:
        raise RequestValidationError(errors)


def plain_route(
    endpoint: Callable, runner: Runner, check: Callable[..., None] | None = None
) -> Callable:
    """A synchronous route (FastAPI runs it in its thread pool) for an endpoint that
    tesseract-core does not wrap (`abstract_eval`): no run folder, same errors.
    `check`, called first with the endpoint's arguments, may refuse the request."""
    name = endpoint.__name__

    def route(*args: Any, **kwargs: Any) -> Any:
        if check is not None:
            with runner.scope():
                check(*args, **kwargs)
        return runner.call(name, lambda: endpoint(*args, **kwargs))

    route.__signature__ = inspect.signature(endpoint)  # type: ignore[attr-defined]
    route.__annotations__ = dict(endpoint.__annotations__)
    route.__name__ = route.__qualname__ = name
    route.__doc__ = endpoint.__doc__
    return route
