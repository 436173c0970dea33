"""lineax operators backed by a Tesseract: `mv` is a JVP (or `/apply`), `.T.mv` a VJP.

The operators sit on a `TesseractModule` and bind its primitives directly, so an
`mv` is one request and no `/apply` goes with it. Materialising is a vmap of `mv` over
the identity under the `jacobian` (else `batched`) rule: one request, never n, and
with `/jacobian` no basis uploaded.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, Inexact, PyTree

from ._batching import Batch, Jacobian, servable, server_of
from ._module import TesseractModule
from ._primitive import apply_p, jvp_p, refuse_complex, vjp_p
from ._wire import paths
from ._wire.schema import ArrayNode, differentiable_patterns, node_at
from ._wire.spec import JVP, VJP


def as_paths(name: str, value: str | tuple[str, ...]) -> tuple[str, ...]:
    """`wrt`/`of` as a tuple of paths (tesseract-core's syntax), checked for syntax."""
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        for v in value:
            paths.segments(v)
        return value
    raise TypeError(
        f"`{name}` must be a path such as 'u', 'mesh.points', 'xs.[1]' or "
        f"'fields.{{a}}', or a tuple of them; got {value!r}."
    )


def pack(paths: tuple[str, ...], leaves: list) -> PyTree:
    """An operator's vector from its leaves: the bare array for one path, else a dict
    keyed by path."""
    return leaves[0] if len(paths) == 1 else dict(zip(paths, leaves))


def unpack(paths: tuple[str, ...], tree: PyTree, structure) -> list:
    """The leaves of an operator's vector, in `structure`'s dtypes; a `ValueError`
    naming the path for a leaf of the wrong shape."""
    leaves = [tree] if len(paths) == 1 else [tree[p] for p in paths]
    for p, x, s in zip(paths, leaves, structure):
        if jnp.shape(x) != s.shape:
            raise ValueError(
                f"The vector for `{p}` must have shape {s.shape}, got {jnp.shape(x)}."
            )
    return [jnp.asarray(x, s.dtype) for x, s in zip(leaves, structure)]


def _index(kind: str, wanted: tuple[str, ...], known: tuple[str, ...], diff) -> tuple:
    out = []
    for p in wanted:
        if p not in known or known.index(p) not in diff:
            what = "input" if kind == "wrt" else "output"
            names = paths.describe([known[i] for i in sorted(diff)])
            raise ValueError(
                f"`{kind}='{p}'` is not a differentiable {what} at this point; "
                f"differentiable {what}s are: {names}."
            )
        out.append(known.index(p))
    return tuple(out)


class AbstractTesseractOperator(lx.AbstractLinearOperator):
    """The shared machinery of `TesseractJacobianOperator` and
    `TesseractLinearOperator`: the derivative of `of` with respect to `wrt`."""

    module: eqx.AbstractVar[TesseractModule]
    inputs: eqx.AbstractVar[dict]
    wrt: eqx.AbstractVar[tuple[str, ...]]
    of: eqx.AbstractVar[tuple[str, ...]]
    tags: eqx.AbstractVar[frozenset]
    transposed: eqx.AbstractVar[bool]
    _structure: eqx.AbstractVar[tuple]

    def _call(self, module: TesseractModule | None = None) -> tuple:
        """`(call, operands, wrt indices, of indices)` at the point, by `module`
        (the operator's own by default)."""
        call, operands = (module or self.module).prepare(self.inputs)
        diff_out = frozenset(call.diff_out)
        wrt = _index("wrt", self.wrt, call.in_paths, call.diff_in)
        of = _index("of", self.of, call.out_paths, diff_out)
        return call, operands, wrt, of

    def in_structure(self):
        """The structure of the vectors `mv` takes (`jax.ShapeDtypeStruct`s: an
        array, or a dict keyed by path); sends nothing."""
        ins, outs = self._structure
        paths, structs = (self.of, outs) if self.transposed else (self.wrt, ins)
        return pack(paths, list(structs))

    def out_structure(self):
        """The structure of what `mv` returns; sends nothing."""
        ins, outs = self._structure
        paths, structs = (self.wrt, ins) if self.transposed else (self.of, outs)
        return pack(paths, list(structs))

    def as_matrix(self) -> Float[Array, "m n"]:
        """The matrix, in one request: `/jacobian` (or, for a Tesseract without one,
        the products of the basis with the direction it serves), whatever the
        module's batching rule; every other setting of the module is kept."""
        module = self.module.with_batching(Jacobian())
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.in_structure())
        flat, unravel = jfu.ravel_pytree(zeros)
        basis = jax.vmap(unravel)(jnp.eye(flat.size, dtype=flat.dtype))
        columns = jax.vmap(lambda v: _derivative(self, module, v))(basis)
        rows = jax.vmap(lambda c: jfu.ravel_pytree(c)[0])(columns)
        return rows.T


def _derivative(operator: AbstractTesseractOperator, module, vector) -> PyTree:
    """`J @ vector` (a JVP), or `J.T @ vector` (a VJP) for a transposed operator,
    through `module`'s primitives."""
    call, operands, wrt, of = operator._call(module)
    ins, outs = operator._structure
    if operator.transposed:
        src, dst, structs, prim = operator.of, operator.wrt, outs, vjp_p
        params = dict(vjp_in=wrt, vjp_out=of)
    else:
        src, dst, structs, prim = operator.wrt, operator.of, ins, jvp_p
        params = dict(jvp_in=wrt, jvp_out=of)
    lin = unpack(src, vector, structs)
    results = prim.bind(
        *operands,
        *lin,
        call=call,
        points=(False,) * (len(operands) + len(lin)),
        items=(False,) * len(lin),
        **params,
    )
    return pack(dst, results)


def _structure(module: TesseractModule, inputs: dict, wrt, of) -> tuple:
    call, _ = module.prepare(inputs)
    wrt_i = _index("wrt", wrt, call.in_paths, call.diff_in)
    outputs = module.client.schema.outputs
    for p in of:
        # Refused from the schema first: the output shapes may cost a request.
        node = node_at(outputs, p)
        if not (isinstance(node, ArrayNode) and node.differentiable):
            raise ValueError(
                f"`of='{p}'` is not a differentiable output; differentiable outputs "
                f"are: {paths.describe(differentiable_patterns(outputs))}."
            )
    of_i = _index("of", of, call.out_paths, frozenset(call.diff_out))
    refuse_complex([call.inputs[i] for i in wrt_i] + [call.outputs[j] for j in of_i])
    struct = lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    ins = tuple(struct(call.inputs[i]) for i in wrt_i)
    outs = tuple(struct(call.outputs[j]) for j in of_i)
    return ins, outs


class TesseractJacobianOperator(AbstractTesseractOperator):
    """The Jacobian `d(of)/d(wrt)` of a Tesseract at the point `inputs`.

    **Arguments:**

    - `f`: a `TesseractModule`.
    - `inputs`: the point, a dict of all the Tesseract's inputs.
    - `wrt`: the input(s) to differentiate with respect to: a path in
        tesseract-core's syntax (`"u"`, `"params.a"`, `"xs.[1]"`, `"fields.{a}"`) or a
        tuple of them (then vectors are dicts keyed by path).
    - `of`: the output(s) to differentiate, likewise.
    - `tags`: lineax tags, e.g. `lx.symmetric_tag` (unchecked).
    - `transposed`: the operator's transpose `d(of)/d(wrt)^T` instead (what `.T`
        gives): `mv` then sends a VJP.

    `mv` sends one `/jacobian_vector_product`; `.T.mv` one
    `/vector_jacobian_product`; `as_matrix` one request; a vmapped `mv` goes through
    the module's batching rule. `in_structure`/`out_structure` send nothing.

    !!! Example

        ```python
        J = tlx.TesseractJacobianOperator(f, {"u": u, "k": k, "f": f0}, "u", "residual")
        du = lx.linear_solve(J, -r, lx.GMRES(rtol=1e-8, atol=1e-8)).value
        ```
    """

    module: TesseractModule
    inputs: dict
    wrt: tuple[str, ...] = eqx.field(static=True)
    of: tuple[str, ...] = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)
    _structure: tuple = eqx.field(static=True)

    def __init__(
        self,
        f: TesseractModule,
        inputs: dict,
        wrt: str | tuple[str, ...],
        of: str | tuple[str, ...],
        *,
        tags: Any = frozenset(),
        transposed: bool = False,
    ):
        fields = _fields(f, inputs, wrt, of, tags, transposed)
        (self.module, self.inputs, self.wrt, self.of, self.tags) = fields[:5]
        self.transposed, self._structure = fields[5:]

    def mv(
        self, vector: PyTree[Inexact[Array, "..."]]
    ) -> PyTree[Inexact[Array, "..."]]:
        """The Jacobian times `vector`: one `/jacobian_vector_product` (one
        `/vector_jacobian_product` for the transpose). Under `jax.vmap`, a batch of
        vectors goes by the module's batching rule."""
        return _derivative(self, self.module, vector)

    def transpose(self) -> "TesseractJacobianOperator":
        """The transpose (also `.T`), built without a request; `mv` says what its
        `mv` sends. A `symmetric_tag`ged operator is its own transpose."""
        if lx.symmetric_tag in self.tags:
            return self
        return TesseractJacobianOperator(
            self.module,
            self.inputs,
            self.wrt,
            self.of,
            tags=lx.transpose_tags(self.tags),
            transposed=not self.transposed,
        )


class TesseractLinearOperator(AbstractTesseractOperator):
    """A Tesseract that is linear in `wrt`, as the operator `wrt -> of`.

    **Arguments:**

    - `f`: a `TesseractModule`.
    - `inputs`: a dict of all the Tesseract's inputs. Its `wrt` entry fixes only
        shapes and dtypes (and, for the transpose, where the VJP is taken: anywhere,
        by linearity).
    - `wrt`: the input(s) the Tesseract is linear in: a path in tesseract-core's
        syntax, or a tuple of them (then vectors are dicts keyed by path).
    - `of`: the output(s), likewise.
    - `tags`: lineax tags, e.g. `lx.positive_semidefinite_tag` (unchecked).
    - `transposed`: the transpose instead (what `.T` gives).

    `mv(x)` sends one `/apply` with `wrt` replaced by `x` (it assumes linearity and
    does not check it); `.T.mv` one `/vector_jacobian_product`; `as_matrix` one
    request; a vmapped `mv` one `/batched_apply` where the server takes a batch of
    points.
    """

    module: TesseractModule
    inputs: dict
    wrt: tuple[str, ...] = eqx.field(static=True)
    of: tuple[str, ...] = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)
    _structure: tuple = eqx.field(static=True)

    def __init__(
        self,
        f: TesseractModule,
        inputs: dict,
        wrt: str | tuple[str, ...],
        of: str | tuple[str, ...],
        *,
        tags: Any = frozenset(),
        transposed: bool = False,
    ):
        fields = _fields(f, inputs, wrt, of, tags, transposed)
        (self.module, self.inputs, self.wrt, self.of, self.tags) = fields[:5]
        self.transposed, self._structure = fields[5:]

    def mv(
        self, vector: PyTree[Inexact[Array, "..."]]
    ) -> PyTree[Inexact[Array, "..."]]:
        """The operator times `vector`: one `/apply` with `wrt` replaced by `vector`
        (one `/vector_jacobian_product` for the transpose)."""
        if self.transposed:
            return _derivative(self, self.module, vector)
        call, operands, wrt, of = self._call()
        ins, _ = self._structure
        for i, x in zip(wrt, unpack(self.wrt, vector, ins)):
            operands[i] = x
        outs = apply_p.bind(*operands, call=call, points=(False,) * len(operands))
        return pack(self.of, [outs[j] for j in of])

    def transpose(self) -> "TesseractLinearOperator":
        """The transpose (also `.T`), built without a request; `mv` says what its
        `mv` sends. A `symmetric_tag`ged operator is its own transpose."""
        if lx.symmetric_tag in self.tags:
            return self
        return TesseractLinearOperator(
            self.module,
            self.inputs,
            self.wrt,
            self.of,
            tags=lx.transpose_tags(self.tags),
            transposed=not self.transposed,
        )


def _fields(f, inputs, wrt, of, tags, transposed) -> tuple:
    """An operator's fields, checked: no request (the output shapes of the schema,
    or learnt once per signature)."""
    if not isinstance(f, TesseractModule):
        raise TypeError(f"`f` must be a `TesseractModule`, got {type(f).__name__}.")
    if not isinstance(transposed, bool):
        raise TypeError(f"`transposed` must be True or False, got {transposed!r}.")
    wrt, of = as_paths("wrt", wrt), as_paths("of", of)
    if not isinstance(tags, frozenset | set | tuple | list):
        tags = (tags,)
    structure = _structure(f, inputs, wrt, of)
    return f, inputs, wrt, of, frozenset(tags), transposed, structure


@lx.linearise.register(AbstractTesseractOperator)
def _(operator):
    # A Krylov solver linearises once, then multiplies many times. Where the
    # module's rule plans a mat-vec as the Jacobian, fetch it here, once: then no
    # loop asks for it again, whether or not XLA would hoist the request.
    kind = VJP if operator.transposed else JVP
    ins, outs = operator._structure
    n_in = sum(math.prod(s.shape) for s in ins)
    n_out = sum(math.prod(s.shape) for s in outs)
    batch = Batch(kind, 1, 1, n_in, n_out, 0)
    server = server_of(operator.module.client, kind)
    plan = operator.module.batching.plan(batch, server)
    if plan.rule == "jacobian" and servable(plan, batch, server):
        return lx.materialise(operator)
    return operator


@lx.materialise.register(AbstractTesseractOperator)
def _(operator):
    return (
        lx.MatrixLinearOperator(operator.as_matrix(), operator.tags)
        if (_is_flat(operator))
        else lx.PyTreeLinearOperator(
            _matrix_pytree(operator), operator.out_structure(), operator.tags
        )
    )


@lx.diagonal.register(AbstractTesseractOperator)
def _(operator):
    return jnp.diag(operator.as_matrix())


@lx.tridiagonal.register(AbstractTesseractOperator)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diag(matrix, -1), jnp.diag(matrix), jnp.diag(matrix, 1)


for _fn, _tags in (
    (lx.is_symmetric, (lx.symmetric_tag, lx.diagonal_tag)),
    (lx.is_diagonal, (lx.diagonal_tag,)),
    (lx.is_tridiagonal, (lx.tridiagonal_tag, lx.diagonal_tag)),
    (lx.has_unit_diagonal, (lx.unit_diagonal_tag,)),
    (lx.is_lower_triangular, (lx.lower_triangular_tag, lx.diagonal_tag)),
    (lx.is_upper_triangular, (lx.upper_triangular_tag, lx.diagonal_tag)),
    (lx.is_positive_semidefinite, (lx.positive_semidefinite_tag,)),
    (lx.is_negative_semidefinite, (lx.negative_semidefinite_tag,)),
):
    _fn.register(AbstractTesseractOperator)(
        lambda operator, _tags=_tags: any(t in operator.tags for t in _tags)
    )


@lx.conj.register(AbstractTesseractOperator)
def _(operator):
    # Real: an operator over complex arrays is refused when it is built.
    return operator


def _is_flat(operator) -> bool:
    return all(
        isinstance(s, jax.ShapeDtypeStruct) and s.ndim == 1
        for s in (operator.in_structure(), operator.out_structure())
    )


def _matrix_pytree(operator):
    """The matrix as lineax's `PyTreeLinearOperator` wants it: per (out, in) leaf,
    a block of shape `out.shape + in.shape`."""
    matrix = operator.as_matrix()
    outs = jax.tree.leaves(operator.out_structure())
    ins = jax.tree.leaves(operator.in_structure())
    out_tree = jax.tree.structure(operator.out_structure())
    in_tree = jax.tree.structure(operator.in_structure())
    o_sizes = np.cumsum([0] + [int(np.prod(s.shape)) for s in outs])
    i_sizes = np.cumsum([0] + [int(np.prod(s.shape)) for s in ins])
    rows = []
    for a, so in enumerate(outs):
        blocks = [
            matrix[o_sizes[a] : o_sizes[a + 1], i_sizes[b] : i_sizes[b + 1]].reshape(
                *so.shape, *si.shape
            )
            for b, si in enumerate(ins)
        ]
        rows.append(jax.tree.unflatten(in_tree, blocks))
    return jax.tree.unflatten(out_tree, rows)
