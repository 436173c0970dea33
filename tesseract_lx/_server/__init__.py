"""The server side: `tesseract-lx serve`, tesseract-core's app plus batched endpoints.

Deployed next to the Tesseract (in its container). Shares only `.._wire.spec` with the
client side; nothing on the client side imports this package, except by name to drive
`create_app`'s ASGI app in process.

Modules: `app` (`create_app`), `routes` (route wrapper, errors), `endpoints`
(tesseract-core's endpoints through the cache), `batched` (batched JVP/VJP),
`batched_apply`, `cache` (the linearisation cache), `declare` (declarations,
capabilities, precision), `limits`, `asgi` and `cli` (`tesseract-lx serve`).
"""

from .app import create_app as create_app
from .cache import CacheSettings as CacheSettings
from .declare import DeclarationError as DeclarationError
