"""A Tesseract as a function `fn(y, args)` for optimistix."""

from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ._module import TesseractModule
from ._operator import _paths


def _set(tree: dict, path: str, value: Any) -> dict:
    """A copy of the nested dict `tree` with `path` set to `value`."""
    head, _, rest = path.partition(".")
    new = dict(tree)
    if rest:
        sub = tree.get(head, {})
        if not isinstance(sub, dict):
            raise TypeError(f"`args['{head}']` must be a dict to hold `{path}`.")
        new[head] = _set(sub, rest, value)
    else:
        new[head] = value
    return new


def _get(tree: dict, path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


class ResidualFn(eqx.Module):
    """`fn(y, args)`: the Tesseract's output(s) `of` as a function of input(s) `wrt`.

    Built by [`tesseract_lx.residual_fn`][]; an `eqx.Module`, so jit caches on it.
    """

    module: TesseractModule
    wrt: tuple[str, ...] = eqx.field(static=True)
    of: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, y: PyTree, args: dict | None) -> PyTree:
        inputs = dict(args or {})
        if len(self.wrt) == 1:
            inputs = _set(inputs, self.wrt[0], y)
        else:
            if not isinstance(y, dict) or set(y) != set(self.wrt):
                raise ValueError(
                    f"`y` must be a dict keyed by {list(self.wrt)}, got "
                    f"{type(y).__name__}"
                    + (f" with keys {sorted(y)}" if isinstance(y, dict) else "")
                    + "."
                )
            for path in self.wrt:
                inputs = _set(inputs, path, y[path])
        out = self.module(inputs)
        if len(self.of) == 1:
            return _get(out, self.of[0])
        return {path: _get(out, path) for path in self.of}


def residual_fn(
    f: TesseractModule, wrt: str | tuple[str, ...], of: str | tuple[str, ...]
) -> ResidualFn:
    """Wrap a Tesseract as `fn(y, args)` in optimistix's calling convention.

    **Arguments:**

    - `f`: a `TesseractModule`.
    - `wrt`: the input(s) that `y` stands for: a dotted path, or a tuple of them
        (then `y` is a dict keyed by path).
    - `of`: the output(s) `fn` returns, likewise (several for least squares; a
        scalar output for minimisation).

    **Returns:**

    `fn(y, args)`, where `args` is a dict of the Tesseract's other inputs (nested as
    the Tesseract takes them; values may be traced).

    !!! Example

        ```python
        fn = tlx.residual_fn(f, wrt="u", of="residual")
        solver = optx.Newton(rtol=1e-8, atol=1e-8)
        sol = optx.root_find(fn, solver, u0, {"k": k, "f": f0})
        ```

    With `optx.Newton` and its default LU solver a step costs 2 requests: one
    `/apply` and one materialising request (batched JVP of the identity, or
    `/jacobian`). With `linear_solver=lx.GMRES(...)`, one JVP per Krylov iteration.
    Gradients of the solution through `optx.ImplicitAdjoint` cost VJP requests.
    """
    if not isinstance(f, TesseractModule):
        raise TypeError(f"`f` must be a `TesseractModule`, got {type(f).__name__}.")
    wrt_paths, of_paths = _paths("wrt", wrt), _paths("of", of)
    schema = f.client.schema
    for path in wrt_paths:
        if path not in schema.diff_inputs:
            raise ValueError(
                f"`wrt='{path}'` is not a differentiable input; differentiable inputs "
                f"are: {', '.join(f'`{p}`' for p in schema.diff_inputs)}."
            )
    for path in of_paths:
        if path not in schema.diff_outputs:
            raise ValueError(
                f"`of='{path}'` is not a differentiable output; differentiable "
                f"outputs are: {', '.join(f'`{p}`' for p in schema.diff_outputs)}."
            )
    return ResidualFn(f, wrt_paths, of_paths)
