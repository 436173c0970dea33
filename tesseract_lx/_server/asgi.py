"""The app uvicorn builds in each worker process, from the environment.

uvicorn needs an import string to run more than one worker; each worker calls
`create_app_from_env` (`tesseract_lx._server.asgi:create_app_from_env`, a factory) and
builds its own app, and its own linearisation cache, from:

- `TESSERACT_API_PATH`: the `tesseract_api.py` to serve (required);
- `TESSERACT_LX_CACHE`: `1` (default) or `0`, the linearisation cache, and
    `TESSERACT_LX_CACHE_ENTRIES`, `TESSERACT_LX_CACHE_MB`: its bounds;
- `TESSERACT_LX_RUN_FOLDERS`: `1` for a `run_<id>/` folder per request (default `0`);
- `TESSERACT_LX_MAX_BATCH`, `TESSERACT_LX_MAX_BODY_BYTES`: the limits;
- `TESSERACT_LX_WORKERS`: the number of workers, as reported;
- `TESSERACT_DEBUG`, `TESSERACT_OUTPUT_PATH` and the other `TESSERACT_*` variables of
    tesseract-runtime.

A Tesseract that cannot be served (a malformed `TESSERACT_LX`, an import error) stops
the worker with uvicorn's startup-failure status, so that uvicorn does not restart it.
"""

import os
import sys
import traceback
from typing import NoReturn

from fastapi import FastAPI
from tesseract_core.runtime.core import load_module_from_path
from uvicorn.config import STARTUP_FAILURE

from .app import create_app
from .cache import _flag, CacheSettings
from .limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}.") from None


def create_app_from_env() -> FastAPI:
    """`create_app`, its settings from the environment (see the module docstring)."""
    path = os.environ.get("TESSERACT_API_PATH")
    if not path:
        _fail(
            "`TESSERACT_API_PATH` is not set; run `tesseract-lx serve "
            "PATH/tesseract_api.py`."
        )
    try:
        # tesseract-runtime's loader, as it is: in a server process, the Tesseract's
        # folder goes into `PYTHONPATH` for its subprocesses.
        module = load_module_from_path(path)
        return create_app(
            module,
            cache=CacheSettings.from_env(),
            run_folders=_flag("TESSERACT_LX_RUN_FOLDERS", False),
            debug=_flag("TESSERACT_DEBUG", False),
            max_batch=_int("TESSERACT_LX_MAX_BATCH", DEFAULT_MAX_BATCH),
            max_body_bytes=_int("TESSERACT_LX_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            workers=_int("TESSERACT_LX_WORKERS", 1),
        )
    except ValueError as e:  # a `DeclarationError`, a bad setting: the message says it
        _fail(str(e))
    except Exception as e:
        traceback.print_exc()
        _fail(f"cannot serve `{path}`: {type(e).__name__}: {e}")


def _fail(message: str) -> NoReturn:
    print(f"tesseract-lx: {message}", file=sys.stderr, flush=True)
    sys.exit(STARTUP_FAILURE)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn tesseract_lx._server.asgi:app` still works.
    if name == "app":
        return create_app_from_env()
    raise AttributeError(name)
