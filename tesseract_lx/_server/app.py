"""The tesseract-lx server app: tesseract-core's REST app, plus batched endpoints.

`create_app` builds `tesseract_core.runtime.serve.create_rest_api` on a wrapped copy of
the `tesseract_api` module (JVP/VJP through the linearisation cache, see
`endpoints.py`), so every stock route behaves exactly as on `tesseract-runtime serve`.
It then adds `POST /batched_jacobian_vector_product` and
`POST /batched_vector_jacobian_product`.

tesseract-core's route wrapper (Accept-header negotiation, `run_<id>/` folders under
`TESSERACT_OUTPUT_PATH`, response encoding) is a closure inside `create_rest_api` and
applies only to its four computational endpoints by name, so it cannot be handed new
endpoints. The batched routes get the same treatment from tesseract-core's public
pieces (`negotiate_encoding`, `start_run`, `create_response`); GPU transport is not
offered on them.

`/openapi.json` carries a top-level `x-tesseract-lx` block (`LxState.info`), and
`GET /health` returns the same under `tesseract_lx`.
"""

import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from tesseract_core.runtime.config import get_config
from tesseract_core.runtime.core import load_module_from_path
from tesseract_core.runtime.file_interactions import join_paths
from tesseract_core.runtime.mpa import start_run
from tesseract_core.runtime.profiler import Profiler
from tesseract_core.runtime.serve import (
    create_response,
    create_rest_api,
    negotiate_encoding,
)

from .endpoints import LxState, prepare
from .cache import CacheSettings


def _route(endpoint: Callable) -> Callable:
    """An async route for a batched endpoint, as tesseract-core wraps its own."""
    Payload = endpoint.__annotations__["payload"]
    Result = endpoint.__annotations__["return"]

    async def route(
        payload: Payload,  # type: ignore[valid-type]
        accept: Annotated[str | None, Header()] = None,
        run_id: Annotated[str | None, Query(include_in_schema=False)] = None,
    ) -> Result:  # type: ignore[valid-type]
        encoding = negotiate_encoding(accept)
        config = get_config()
        rundir_name = f"run_{run_id or uuid.uuid4()}"
        profiler = Profiler()
        # Serial within a worker, like tesseract-core's routes: `start_run`
        # redirects the process's stdout/stderr into the run folder.
        with start_run(base_dir=join_paths(config.output_path, rundir_name)):
            with profiler:
                result = endpoint(payload)
            profiler.print_stats()
        return create_response(
            result, encoding, base_dir=config.output_path, binref_dir=rundir_name
        )

    route.__name__ = endpoint.__name__
    route.__doc__ = endpoint.__doc__
    return route


def _load(api_path_or_module: str | Path | ModuleType) -> ModuleType:
    if isinstance(api_path_or_module, ModuleType):
        return api_path_or_module
    return load_module_from_path(api_path_or_module)


def create_app(
    api_path_or_module: str | Path | ModuleType,
    *,
    cache: bool | CacheSettings = True,
) -> FastAPI:
    """The FastAPI app of a tesseract-lx server.

    **Arguments:**

    - `api_path_or_module`: path of a `tesseract_api.py`, or the loaded module.
    - `cache`: the linearisation cache: `True` (settings from `TESSERACT_LX_CACHE_*`),
        `False`, or explicit `CacheSettings`.

    **Returns:** a `fastapi.FastAPI` with tesseract-core's routes, `POST
    /batched_jacobian_vector_product` and `POST /batched_vector_jacobian_product` (when
    the Tesseract has a JVP resp. VJP), `x-tesseract-lx` in `/openapi.json`, and
    `tesseract_lx` in `GET /health`. Run folders go under `TESSERACT_OUTPUT_PATH`.
    """
    api_module = _load(api_path_or_module)
    wrapped, batched, state = prepare(api_module, cache=cache)
    app = create_rest_api(wrapped)

    for endpoint in batched:
        app.add_api_route(f"/{endpoint.__name__}", _route(endpoint), methods=["POST"])
    _replace_health(app, state)

    stock_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = stock_openapi()
        # Refreshed on every call: modes can fall back to "loop", counters move.
        schema["x-tesseract-lx"] = state.info()
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.tesseract_lx = state
    return app


def _replace_health(app: FastAPI, state: LxState) -> None:
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) != "/health"
    ]

    def health() -> dict[str, Any]:
        """Health status of the Tesseract, with what tesseract-lx adds."""
        return {"status": "ok", "tesseract_lx": state.info()}

    app.add_api_route("/health", health, methods=["GET"])
