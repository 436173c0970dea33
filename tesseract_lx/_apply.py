"""`apply_tesseract`: tesseract-jax's public function, on tesseract_lx's machinery.

Code written for `tesseract_jax.apply_tesseract` runs unchanged with
`from tesseract_lx import apply_tesseract`: same arguments, same outputs, same errors
(pydantic's `ValidationError` for inputs the schema refuses, at trace time before any
request, and for a payload the Tesseract refuses; a `TypeError` for a Python list
where an array is expected; under `jax.jit`, a `JaxRuntimeError` carrying the
Tesseract's words), and `tesseract_core.Tesseract` is a pytree with no leaves, as
tesseract-jax makes it. What changes is how requests go: no `/abstract_eval` before
an eager call, (co)tangent batches by `Auto` (the batched endpoints of a tesseract-lx
server, `/jacobian`, or in flight at once), transposable JVPs and VJPs (lineax
`jac="bwd"`, optimistix's `lin_to_grad`), and derivatives from whichever endpoints
the Tesseract serves. docs/migration.md lists every difference.
"""

import importlib
import os
from importlib import metadata
from typing import Any

import jax

from ._batching import Auto, Jacobian
from ._module import TesseractModule, VMAP_METHODS


# tesseract-jax's switch for `check_static_outputs=None`, read per call, on unless set
# to a false value.
CHECK_STATIC_OUTPUTS_ENV_VAR = "TESSERACT_JAX_CHECK_STATIC_OUTPUTS"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _register_tesseract_pytree() -> None:
    """`tesseract_core.Tesseract` as a pytree with no leaves (the object is its own
    static data), as tesseract-jax registers it, so that a Tesseract can be an
    argument of a jitted function; only where it is not one already. Done when this
    module is imported (`from tesseract_lx import apply_tesseract`, as code written
    for tesseract-jax imports its function), as tesseract-jax does when imported.

    Where tesseract-jax is installed, its own import registers it: importing it here
    first keeps `import tesseract_jax` working after `import tesseract_lx` (JAX
    refuses a second registration of a type).
    """
    try:
        from tesseract_core import Tesseract
    except ImportError:  # pragma: no cover - tesseract-core is a dependency
        return
    try:
        metadata.distribution("tesseract-jax")
    except metadata.PackageNotFoundError:
        pass
    else:
        try:
            importlib.import_module("tesseract_jax")
        except Exception:
            pass  # a broken install: registered below instead
    try:
        jax.tree_util.register_pytree_node(Tesseract, lambda x: ((), x), lambda x, _: x)
    except ValueError as e:
        if "Duplicate" not in str(e):
            raise


_register_tesseract_pytree()


def _check_static_default() -> bool:
    raw = os.environ.get(CHECK_STATIC_OUTPUTS_ENV_VAR)
    if raw is None:
        return True
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{CHECK_STATIC_OUTPUTS_ENV_VAR} is set to {raw!r}, which is not a boolean: "
        "use one of 1/0, true/false, yes/no, on/off."
    )


def apply_tesseract(
    tesseract_client: Any,
    inputs: Any,
    *,
    vmap_method: str | None = None,
    materialize_jacobian: bool | None = None,
    check_static_outputs: bool | None = None,
) -> Any:
    """Apply a Tesseract to `inputs`; traceable by every JAX transformation.

    **Arguments:**

    - `tesseract_client`: a `tesseract_core.Tesseract` (served by URL, or loaded in
        process with `from_tesseract_api`), whose own methods every request goes
        through; or a `tesseract_lx.Client`.
    - `inputs`: the inputs, plain containers shaped as the schema says. Python
        scalars and objects with `__array__` are converted where the schema expects
        arrays; a Python list there is a `TypeError`. Inputs the schema refuses
        (a shape, a missing or unknown field) raise pydantic's `ValidationError`
        before any request, also under `jax.jit`.
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
    - `check_static_outputs`: under a transformation (`jax.jit`, ...), the non-array
        outputs (strings, `None`) are fixed when the call is traced; `True` compares
        them with what each `/apply` answers and warns (`UserWarning`, naming the
        output and both values) where they differ. The caller holds the traced
        value either way. `None` (the default) reads
        `TESSERACT_JAX_CHECK_STATIC_OUTPUTS` (on unless set to a false value), as
        tesseract-jax does. Eager calls return `/apply`'s values as they are.

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
    if check_static_outputs is None:
        check_static_outputs = _check_static_default()
    f = TesseractModule(
        tesseract_client,
        batching,
        vmap_method=vmap_method,
        check_static_outputs=check_static_outputs,
    )
    return f(inputs)
