"""`TesseractModule`: a served Tesseract as a differentiable Equinox module."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._batching import nest, STRATEGIES
from ._client import Client
from ._primitive import apply_p, Call
from ._wire.schema import Leaf


def _is_array_like(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | float | int | bool)


def _flatten(tree: Any, prefix: str, groups: frozenset[str], out: dict) -> None:
    if isinstance(tree, dict) and (prefix == "" or prefix in groups):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise TypeError(f"Input keys must be strings, got {key!r}.")
            _flatten(value, f"{prefix}.{key}" if prefix else key, groups, out)
    else:
        out[prefix] = tree


def _list(paths) -> str:
    return ", ".join(f"`{p}`" for p in paths)


def _check_array(leaf: Leaf, x: Any) -> jax.Array:
    """`x` as an array of `leaf`'s dtype and shape, or a clear error."""
    if not _is_array_like(x) or isinstance(x, str):
        raise TypeError(f"`{leaf.path}` must be an array, got {type(x).__name__}.")
    x = jnp.asarray(x)
    if leaf.dtype is not None:
        want = np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(leaf.dtype)))
        if x.dtype.kind == "c" or (x.dtype.kind == "f" and want.kind in "iub"):
            raise TypeError(
                f"`{leaf.path}` must have dtype {leaf.dtype}, got {x.dtype}."
            )
        if x.dtype != want:
            x = x.astype(want)
    if leaf.shape is not None:
        ok = len(leaf.shape) == x.ndim and all(
            d is None or d == s for d, s in zip(leaf.shape, x.shape)
        )
        if not ok:
            want_shape = tuple("*" if d is None else d for d in leaf.shape)
            raise ValueError(
                f"`{leaf.path}` must have shape {want_shape} (`*`: any size), got "
                f"{tuple(x.shape)}."
            )
    return x


def _static(leaf: Leaf, x: Any) -> Any:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"`{leaf.path}` is not an array input of the Tesseract: it must be a "
            "concrete Python value, not a traced one."
        )
    # The schema rules this out: refuse here rather than send a request for a 422.
    if leaf.dtype == "int64" and (
        isinstance(x, bool) or not isinstance(x, int | np.integer)
    ):
        raise TypeError(
            f"`{leaf.path}` must be an int, got {type(x).__name__} ({x!r})."
        )
    if isinstance(x, list):
        x = tuple(x)
    try:
        hash(x)
    except TypeError:
        raise TypeError(
            f"`{leaf.path}` must be a hashable Python value, got {type(x).__name__}."
        ) from None
    return x


class TesseractModule(eqx.Module):
    """A served Tesseract as a JAX function of a dict of inputs.

    **Arguments:**

    - `client`: a `tesseract_lx.Client` (or a `tesseract_core.Tesseract`).
    - `batching`: how a batch of (co)tangents under `jax.vmap` reaches the server:
        `"sequential"`, `"concurrent"`, `"jacobian"`, `"batched"` or `"auto"`
        (the cheapest the server allows, by a cost model; see
        `client.decisions` for what it picked and why).
    - `strict_dtype`: raise (`True`) or warn (`False`) when the server answers in a
        lower precision than asked for.

    Calling it sends `/apply`; `jax.jvp` sends `/jacobian_vector_product`, `jax.vjp`
    and `jax.grad` send `/vector_jacobian_product`. Zero tangents and
    non-differentiable inputs cost nothing. Works under `jax.jit`, `jax.vmap`,
    `jax.jacfwd`, `jax.jacrev` and `jax.linear_transpose`.

    !!! Example

        ```python
        f = tlx.TesseractModule(client)
        out = f({"u": u, "k": 1.0, "f": f0})
        loss = lambda u: jnp.sum(f({"u": u, "k": 1.0, "f": f0})["residual"] ** 2)
        g = jax.grad(loss)(u)
        ```
    """

    client: Client = eqx.field(static=True)
    batching: str = eqx.field(static=True, default="auto")
    strict_dtype: bool = eqx.field(static=True, default=True)

    def __init__(self, client: Any, batching: str = "auto", *, strict_dtype=True):
        self.client = Client.wrap(client)
        self.batching = batching
        self.strict_dtype = strict_dtype

    def __check_init__(self):
        if self.batching not in STRATEGIES:
            raise ValueError(
                f"`batching={self.batching!r}` is not a batching rule; choose one "
                f"of {', '.join(repr(s) for s in STRATEGIES)}."
            )

    @property
    def schema(self):
        return self.client.schema

    def prepare(self, inputs: dict) -> tuple[Call, list[jax.Array]]:
        """Validate `inputs` against the schema: the call's static part and operands.

        Raises before any request for a missing, unknown, misshapen or mistyped input.
        """
        if not isinstance(inputs, dict):
            raise TypeError(
                f"A Tesseract takes a dict of inputs, got {type(inputs).__name__}."
            )
        schema = self.client.schema
        flat: dict[str, Any] = {}
        _flatten(inputs, "", schema.input_groups, flat)
        unknown = [p for p in flat if p not in schema.inputs]
        if unknown:
            raise ValueError(
                f"Unknown input {_list(unknown)}; the Tesseract takes: "
                f"{_list(schema.inputs)}."
            )
        missing = [
            p for p, leaf in schema.inputs.items() if leaf.required and p not in flat
        ]
        if missing:
            raise ValueError(
                f"Missing input {_list(missing)}; the Tesseract takes: "
                f"{_list(schema.inputs)}."
            )
        in_paths, operands, statics, diff_in = [], [], [], []
        # In the schema's order, not the dict's: `jax.jit` hands back dicts with
        # sorted keys, and the call (its cache keys, its jit signature) must not
        # depend on how the caller ordered theirs.
        for path in (p for p in schema.inputs if p in flat):
            leaf, value = schema.inputs[path], flat[path]
            if leaf.is_array:
                if leaf.differentiable:
                    diff_in.append(len(operands))
                in_paths.append(path)
                operands.append(_check_array(leaf, value))
            else:
                statics.append((path, _static(leaf, value)))
        out_paths = tuple(p for p, leaf in schema.outputs.items() if leaf.is_array)
        diff_out = tuple(
            j for j, p in enumerate(out_paths) if schema.outputs[p].differentiable
        )
        call = Call(
            self.client,
            tuple(in_paths),
            tuple(statics),
            out_paths,
            frozenset(diff_in),
            diff_out,
            self.batching,
            self.strict_dtype,
        )
        return call, operands

    def __call__(self, inputs: dict) -> dict:
        """Apply the Tesseract: a (nested) dict of inputs to a dict of outputs."""
        call, operands = self.prepare(inputs)
        outs = apply_p.bind(*operands, call=call, batched=(False,) * len(operands))

        return nest(zip(call.out_paths, outs))
