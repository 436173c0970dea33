"""The module-level app uvicorn imports by string (`tesseract_lx._server.asgi:app`).

uvicorn needs an import string to run more than one worker; each worker process imports
this module and builds its own app (and its own linearisation cache) from:

- `TESSERACT_API_PATH`: the `tesseract_api.py` to serve (required);
- `TESSERACT_LX_CACHE`: `1` (default) or `0`, the linearisation cache;
- `TESSERACT_LX_CACHE_ENTRIES`, `TESSERACT_LX_CACHE_MB`: its bounds;
- `TESSERACT_OUTPUT_PATH` and the other `TESSERACT_*` variables of tesseract-runtime.
"""

import os

from .cache import CacheSettings
from .app import create_app


def _app():
    path = os.environ.get("TESSERACT_API_PATH")
    if not path:
        raise RuntimeError(
            "`TESSERACT_API_PATH` is not set; "
            "run `tesseract-lx serve PATH/tesseract_api.py`."
        )
    return create_app(path, cache=CacheSettings.from_env())


app = _app()
