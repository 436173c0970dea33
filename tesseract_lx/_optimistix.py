"""A Tesseract as a function `fn(y, args)` for optimistix."""

from typing import Any

import equinox as eqx
from jaxtyping import PyTree

from ._module import TesseractModule
from ._operator import as_paths
from ._wire import paths
from ._wire.schema import ArrayNode, differentiable_patterns, node_at


class ResidualFn(eqx.Module):
    """`fn(y, args)`: the Tesseract's output(s) `of` as a function of input(s) `wrt`.

    Built by [`tesseract_lx.residual_fn`][], which checks the paths against the
    schema; an `eqx.Module`, so jit caches on it.

    **Arguments:**

    - `module`: the `TesseractModule`.
    - `wrt`: the input paths `y` stands for (one path: `y` is that input; several:
        a dict keyed by path).
    - `of`: the output paths `fn` returns, likewise.
    """

    module: TesseractModule
    wrt: tuple[str, ...] = eqx.field(static=True)
    of: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, y: PyTree, args: Any) -> PyTree:
        inputs = args if args is not None else {}
        if len(self.wrt) == 1:
            inputs = paths.replace(inputs, self.wrt[0], y)
        else:
            if not isinstance(y, dict) or set(y) != set(self.wrt):
                got = f" with keys {sorted(y)}" if isinstance(y, dict) else ""
                raise ValueError(
                    f"`y` must be a dict keyed by {list(self.wrt)}, got "
                    f"{type(y).__name__}{got}."
                )
            for path in self.wrt:
                inputs = paths.replace(inputs, path, y[path])
        out = self.module(inputs)
        if len(self.of) == 1:
            return paths.get(out, self.of[0])
        return {path: paths.get(out, path) for path in self.of}


def residual_fn(
    f: TesseractModule, wrt: str | tuple[str, ...], of: str | tuple[str, ...]
) -> ResidualFn:
    """Wrap a Tesseract as `fn(y, args)` in optimistix's calling convention.

    **Arguments:**

    - `f`: a `TesseractModule`.
    - `wrt`: the input(s) that `y` stands for: a path in tesseract-core's syntax
        (`"u"`, `"params.a"`, `"xs.[1]"`, `"fields.{a}"`), or a tuple of them (then
        `y` is a dict keyed by path).
    - `of`: the output(s) `fn` returns, likewise (several for least squares; a
        scalar output for minimisation).

    **Returns:**

    `fn(y, args)`, where `args` is the Tesseract's other inputs, nested as the
    Tesseract takes them (values may be traced).

    !!! Example

        ```python
        fn = tlx.residual_fn(f, wrt="u", of="residual")
        solver = optx.Newton(rtol=1e-8, atol=1e-8)
        sol = optx.root_find(fn, solver, u0, {"k": k, "f": f0})
        ```

    With `optx.Newton` and its default LU solver a step costs 2 requests: one
    `/apply` and one materialising request (`/jacobian`; a batched JVP of the
    identity for a Tesseract without one). With `linear_solver=lx.GMRES(...)`, one
    JVP per Krylov iteration; with `linear_solver=tlx.OnServer(lx.GMRES(...))`, one
    `/linear_solve` per step. A gradient of the solution through the default
    `optx.ImplicitAdjoint()` costs one `/jacobian` at the root for the transposed
    solve and one VJP for the parameters (one `/linear_solve` and one VJP with
    `ImplicitAdjoint(linear_solver=tlx.OnServer(...))`).
    """
    if not isinstance(f, TesseractModule):
        raise TypeError(f"`f` must be a `TesseractModule`, got {type(f).__name__}.")
    wrt_paths, of_paths = as_paths("wrt", wrt), as_paths("of", of)
    schema = f.client.schema
    for name, wanted, model in (
        ("wrt", wrt_paths, schema.inputs),
        ("of", of_paths, schema.outputs),
    ):
        for path in wanted:
            node = node_at(model, path)
            if not (isinstance(node, ArrayNode) and node.differentiable):
                what = "input" if name == "wrt" else "output"
                raise ValueError(
                    f"`{name}='{path}'` is not a differentiable {what}; differentiable "
                    f"{what}s are: {paths.describe(differentiable_patterns(model))} "
                    "(`[]`: any list item, `{}`: any dict key)."
                )
    return ResidualFn(f, wrt_paths, of_paths)
