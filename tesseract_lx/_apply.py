"""`apply_tesseract`: tesseract-jax's public function, on tesseract_lx's machinery.

Code written for `tesseract_jax.apply_tesseract` runs unchanged with
`from tesseract_lx import apply_tesseract`: same arguments, same outputs, same errors
for bad arguments. What changes is how requests go: no `/abstract_eval` before an
eager call, (co)tangent batches by `Auto` (the batched endpoints of a tesseract-lx
server, `/jacobian`, or in flight at once), transposable JVPs and VJPs (lineax
`jac="bwd"`, optimistix's `lin_to_grad`), and the Tesseract's own error text.
"""

from typing import Any

from ._batching import Auto, Jacobian
from ._module import TesseractModule, VMAP_METHODS


def apply_tesseract(
    tesseract_client: Any,
    inputs: Any,
    *,
    vmap_method: str | None = None,
    materialize_jacobian: bool | None = None,
) -> Any:
    """Apply a Tesseract to `inputs`; traceable by every JAX transformation.

    **Arguments:**

    - `tesseract_client`: a `tesseract_core.Tesseract` (served by URL, or loaded in
        process with `from_tesseract_api`), whose own methods every request goes
        through; or a `tesseract_lx.Client`.
    - `inputs`: the inputs, plain containers shaped as the schema says. Python
        scalars and objects with `__array__` are converted where the schema expects
        arrays; a Python list there is a `TypeError`.
    - `vmap_method`: how `jax.vmap` over the inputs goes, as in tesseract-jax:
        `None` refuses it (`NotImplementedError`); `"sequential"`, one request per
        point; `"expand_dims"` and `"broadcast_all"`, the points stacked in one
        `/apply` (unbatched arrays given a leading axis of 1, resp. broadcast), for
        a Tesseract that maps over a leading axis; `"auto_experimental"`, stacked
        when every batched input is a differentiable `Array[..., dtype]`, else
        sequential. Where the server says it takes a batch of points
        (`/batched_apply` of `tesseract-lx serve`), `"sequential"` and
        `"auto_experimental"` send one request: the same numbers.
    - `materialize_jacobian`: how a batch of (co)tangents at one point goes
        (`jax.jacfwd`, `jax.jacrev`, a vmapped JVP or VJP): `True`, one
        `/jacobian`, contracted locally; `False`, never the whole Jacobian (batched
        requests where the server has them, else one per vector, in flight at once
        where it has the workers); `None`, the cheapest (`tesseract_lx.Auto`).

    **Returns:** the outputs, every one the schema declares: arrays as JAX arrays,
    other values as Python values.
    """
    if vmap_method not in VMAP_METHODS or vmap_method == "auto":
        choices = tuple(m for m in VMAP_METHODS if m != "auto")
        raise ValueError(
            f"Unknown vmap_method: {vmap_method!r}. Must be one of {choices}."
        )
    if materialize_jacobian is None:
        batching = Auto()
    elif materialize_jacobian is True:
        batching = Jacobian()
    elif materialize_jacobian is False:
        batching = Auto(jacobian=False)
    else:
        raise TypeError(
            "`materialize_jacobian` must be True, False or None, got "
            f"{materialize_jacobian!r}."
        )
    f = TesseractModule(tesseract_client, batching, vmap_method=vmap_method)
    return f(inputs)
