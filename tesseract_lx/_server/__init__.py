"""The server side: `tesseract-lx serve`, tesseract-core's app plus batched endpoints.

Deployed next to the Tesseract (in its container). Shares only `.._wire` (pure data)
with the client side; nothing on the client side imports this package. The launcher,
`.._serve`, imports it on demand to build `create_app`'s app in process, for
`tlx.Client.from_api`.

Modules: `app` (`create_app`), `routes` (route wrapper, errors), `endpoints`
(tesseract-core's endpoints through the cache), `batched` (batched JVP/VJP),
`batched_apply`, `solve` (`/linear_solve`), `nonlinear` (`/nonlinear_solve`, solved
by `optimistix_solve`), `lean` (binary bodies), `cache` (the linearisation cache),
`declare` (declarations, capabilities, precision), `limits`, `guard` (binref inputs
confined to the input folder), `upstream` (every private name of tesseract-core used
here; `upstream_lineax` and `upstream_optimistix` likewise for lineax and
optimistix), `asgi` and `cli` (`tesseract-lx serve`).
"""

from .app import create_app as create_app
from .cache import CacheSettings as CacheSettings
from .declare import DeclarationError as DeclarationError
