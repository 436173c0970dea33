"""`create_app`: the tesseract-lx server's FastAPI app.

Built as tesseract-core's `create_rest_api` builds its own, from the same pieces, so the
stock routes answer exactly as on `tesseract-runtime serve` and `/openapi.json`
describes them identically:

- tesseract-core's endpoint functions (`tesseract_core.runtime.core.create_endpoints`),
    on a copy of the module whose JVP/VJP go through the linearisation cache;
- its route wrapper's behaviour (`routes.py`), without a `run_<id>/` folder per
    request unless `run_folders=True`;
- its app settings (title, version, description from the runtime config, `/docs`)
    and its `x-supported-*` extensions of `/openapi.json`.

It then adds `POST /batched_apply` (always), `POST /batched_jacobian_vector_product`
and `POST /batched_vector_jacobian_product` (when the Tesseract has a JVP resp. VJP),
`x-tesseract-lx` in `/openapi.json` and `tesseract_lx` in `GET /health` (see
`.._wire.spec.Capabilities`), error bodies that carry the Tesseract's own words, and
the `max_batch` / `max_body_bytes` limits.
"""

import dataclasses
import os
import types
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from tesseract_core.runtime.config import get_config
from tesseract_core.runtime.core import load_module_from_path
from tesseract_core.runtime.cuda.serving import add_gpu_transport_handling
from tesseract_core.runtime.file_interactions import (
    available_compressions,
    available_formats,
    available_gpu_transports,
)

from .._wire.spec import (
    BATCHED_APPLY,
    BATCHED_JVP,
    BATCHED_VJP,
    EXTENSION,
    LINEAR_SOLVE,
    NONLINEAR_SOLVE,
    VJP,
)
from .batched import batched_gradient_endpoint, gradient_mode
from .batched_apply import apply_mode, batched_apply_endpoint
from .cache import CacheSettings, enable_tesseract_vjp_cache, LinearisationCache
from .declare import compute_precision, read_declaration, ServerState, uses_jax
from .endpoints import cotangent_check, output_shapes_fn, stock_endpoints
from .guard import BinrefGuard, Confine
from .lean import BinaryRoutes, LeanRoute
from .limits import BodyLimit, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES
from .nonlinear import (
    nonlinear_solve_endpoint,
    serves_nonlinear,
    SOLVERS as NONLINEAR_SOLVERS,
    STEP_SOLVERS as NONLINEAR_STEP_SOLVERS,
)
from .routes import (
    add_error_handlers,
    check_abstract_shapes,
    computational_route,
    plain_route,
    Runner,
)
from .solve import linear_solve_endpoint, OPTIONS as SOLVE_OPTIONS, solve_mode
from .upstream import confine_binrefs


# tesseract-core's `create_rest_api` wraps these (run folder, Accept negotiation).
_COMPUTATIONAL = (
    "apply",
    "jacobian",
    "jacobian_vector_product",
    "vector_jacobian_product",
)


def _load(
    api_path_or_module: str | Path | types.ModuleType,
) -> tuple[types.ModuleType, bool | None]:
    """`(module, x64)`: the loaded `tesseract_api`, and JAX's float64 setting it
    switched to when imported (`None`: it left it alone).

    Loading by path may happen in the caller's process (`tlx.Client.from_api`), whose
    global state is not ours to change: what the import changed there is put back,
    and the Tesseract's own x64 setting is applied to its code only (`Runner`).
    tesseract-core's loader also copies `sys.path` into `PYTHONPATH` (for a server's
    subprocesses: `asgi.py` loads it so, and keeps that); the Tesseract's folder stays
    on `sys.path`, which its own imports, late ones too, need.
    """
    if isinstance(api_path_or_module, types.ModuleType):
        return api_path_or_module, None
    import jax

    environ = os.environ.get("PYTHONPATH")
    x64 = bool(jax.config.values["jax_enable_x64"])
    try:
        module = load_module_from_path(api_path_or_module)
    finally:
        if environ is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = environ
        own = bool(jax.config.values["jax_enable_x64"])
        if own != x64:
            jax.config.update("jax_enable_x64", x64)
    return module, (own if own != x64 else None)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def create_app(
    api_path_or_module: str | Path | types.ModuleType,
    *,
    cache: bool | CacheSettings = True,
    run_folders: bool = False,
    debug: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int = 1,
) -> FastAPI:
    """The FastAPI app of a tesseract-lx server.

    **Arguments:**

    - `api_path_or_module`: path of a `tesseract_api.py`, or the loaded module.
    - `cache`: the linearisation cache: `True` (bounds from `TESSERACT_LX_CACHE_*`),
        `False`, or explicit `CacheSettings`. Off anyway for a Tesseract declaring
        `TESSERACT_LX = {"pure": False}`.
    - `run_folders`: give every computational request a `run_<id>/` folder under
        `TESSERACT_OUTPUT_PATH`, with its stdout/stderr and MPA logs, as
        tesseract-runtime does. Off: nothing is written (but `json+binref` outputs).
    - `debug`: error bodies carry the traceback, and `/test` is served
        (also on when tesseract-core's `TESSERACT_DEBUG` is).
    - `max_batch`: the most items (tangents, points) one batched request may carry.
    - `max_body_bytes`: the largest request body accepted.
    - `workers`: the number of server processes, as reported in `x-tesseract-lx`.

    **Returns:** a `fastapi.FastAPI` with tesseract-core's routes and the batched ones.
    It can be served by any ASGI server, or called in process, also from several
    threads at once (the Tesseract computes one request at a time).

    A malformed `TESSERACT_LX` declaration raises a `ValueError` naming the key.
    """
    # Before anything is served: the server does not run without its binref guard.
    confine_binrefs()
    max_batch = _positive("max_batch", max_batch)
    max_body_bytes = _positive("max_body_bytes", max_body_bytes)
    workers = _positive("workers", workers)
    config = get_config()
    debug = bool(debug or config.debug)

    api_module, x64 = _load(api_path_or_module)
    runner = Runner(run_folders=run_folders, x64=x64)
    declaration = read_declaration(api_module)
    jaxy = uses_jax(api_module)

    if isinstance(cache, CacheSettings):
        settings = cache
    else:
        settings = CacheSettings.from_env(enabled=bool(cache))
    cache_off = None
    if not settings.enabled:
        cache_off = "switched off (--no-cache)"
    elif not declaration.pure:
        cache_off = "the Tesseract declares TESSERACT_LX['pure'] = False"
        settings = dataclasses.replace(settings, enabled=False)
    elif not jaxy:
        cache_off = "the Tesseract is not JAX code: nothing to linearise"
    lin_cache = LinearisationCache(settings) if cache_off is None else None
    if lin_cache is not None and settings.tesseract_vjp_cache:
        enable_tesseract_vjp_cache(max(settings.max_entries, 1))

    cached_module, stock = stock_endpoints(api_module, lin_cache)
    modes = {BATCHED_APPLY: apply_mode(api_module, declaration, jaxy)}
    for kind, name in (("jvp", BATCHED_JVP), ("vjp", BATCHED_VJP)):
        mode = gradient_mode(api_module, kind, jaxy)
        if mode is not None:
            modes[name] = mode
    state = ServerState(
        declaration=declaration,
        modes=modes,
        cache=lin_cache,
        settings=settings,
        cache_off=cache_off,
        precision=runner.scoped(compute_precision)(api_module, declaration),
        workers=workers,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        # Binary bodies skip the run folder: not offered when run folders are asked.
        binary=not run_folders,
    )

    app = FastAPI(
        title=config.name,
        version=config.version,
        description=config.description.replace("\\n", "\n"),
        docs_url=None,
        redoc_url="/docs",
        debug=debug,
    )
    add_error_handlers(app, debug)
    # The computational routes, for the lean path too (`lean.py`).
    lean: dict[str, LeanRoute] = {}

    # Also called while FastAPI validates a payload (the batched VJP's shapes).
    output_shapes = runner.scoped(output_shapes_fn(api_module))
    for name, fn in stock.items():
        if name == "test" and not debug:
            continue
        if name == "health":
            app.add_api_route("/health", _health(state), methods=["GET"])
        elif name in _COMPUTATIONAL:
            check = cotangent_check(output_shapes) if name == VJP else None
            route = computational_route(fn, runner, check=check)
            app.add_api_route(f"/{name}", route, methods=["POST"])
            lean[name] = LeanRoute(fn, fn.__annotations__["payload"], check)
        elif name == "abstract_eval":
            route = plain_route(fn, runner, check=check_abstract_shapes)
            app.add_api_route(f"/{name}", route, methods=["POST"])
        else:
            app.add_api_route(f"/{name}", fn, methods=["POST"])

    batched = [batched_apply_endpoint(api_module, stock, state)]
    for kind, name in (("jvp", BATCHED_JVP), ("vjp", BATCHED_VJP)):
        if name in modes:
            batched.append(
                batched_gradient_endpoint(
                    kind, api_module, stock, cached_module, state, output_shapes
                )
            )
    for fn in batched:
        app.add_api_route(
            f"/{fn.__name__}", computational_route(fn, runner), methods=["POST"]
        )
        lean[fn.__name__] = LeanRoute(fn, fn.__annotations__["payload"])
    solve_mode_ = solve_mode(api_module, state)
    if solve_mode_ is not None:
        modes[LINEAR_SOLVE] = solve_mode_
        state.solve_options = SOLVE_OPTIONS
        fn, check = linear_solve_endpoint(api_module, stock, state, output_shapes, jaxy)
        route = computational_route(fn, runner, check=check)
        app.add_api_route(f"/{LINEAR_SOLVE}", route, methods=["POST"])
        lean[LINEAR_SOLVE] = LeanRoute(fn, fn.__annotations__["payload"], check)
    if serves_nonlinear(api_module):
        state.nonlinear_solvers = NONLINEAR_SOLVERS
        state.nonlinear_step_solvers = NONLINEAR_STEP_SOLVERS
        state.nonlinear_batch = True
        fn, check = nonlinear_solve_endpoint(
            api_module, cached_module, stock, state, output_shapes, jaxy
        )
        route = computational_route(fn, runner, check=check)
        app.add_api_route(f"/{NONLINEAR_SOLVE}", route, methods=["POST"])
        lean[NONLINEAR_SOLVE] = LeanRoute(fn, fn.__annotations__["payload"], check)

    # Innermost first: each reads bodies already bounded by `BodyLimit`.
    app.add_middleware(BinrefGuard)
    if state.binary:
        app.add_middleware(BinaryRoutes, routes=lean, runner=runner, debug=debug)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)

    if config.gpu_transport != "none":
        add_gpu_transport_handling(app)
    # Outermost: every route validates its arrays with binrefs confined (`guard.py`).
    app.add_middleware(Confine)

    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate_openapi()
        # As tesseract-core's `create_rest_api`: what the Accept header can negotiate.
        schema["x-supported-output-formats"] = list(available_formats())
        schema["x-supported-gpu-transports"] = list(available_gpu_transports())
        schema["x-supported-compressions"] = list(available_compressions())
        # Refreshed on every call: modes can fall back to "loop", counters move.
        schema[EXTENSION] = state.info()
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.tesseract_lx = state
    app.state.api_module = api_module
    return app


def _health(state: ServerState):
    def health() -> dict[str, Any]:
        """Get health status of the Tesseract instance."""
        return {"status": "ok", "tesseract_lx": state.info()}

    return health
