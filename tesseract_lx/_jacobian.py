"""The Jacobian at each point, fetched by a request that takes only the point, and
contracted with the (co)tangents in the graph.

`fetch` is the host side: one `/jacobian` per point, or, for a Tesseract without
one, the products of the other direction with the basis (the JVPs of the input
basis, or the VJPs of the output basis: whichever is fewer). Its callback takes the
point alone, so XLA hoists it out of a loop whose point does not change (a Krylov
solve) and merges duplicates.

`contract` is the graph side: `J v` or `v^T J` for every item at every point. The
standard basis (what `jax.jacfwd` and `jax.jacrev` send) is recognised at run time
and answered by a gather rather than a product.

The Jacobian is laid out `(P?, m, n)`: rows the outputs `of`, columns the inputs
`wrt`, each the concatenation of its leaves, flattened.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact

from ._answers import array_at, check_finite, size
from ._batching import Plan
from ._call import Call
from ._linear import run_linear
from ._points import point
from ._wire.spec import JACOBIAN, JVP, VJP


def dtype_of(leaves) -> np.dtype:
    return np.result_type(*(np.dtype(leaf.dtype) for leaf in leaves))


def by_products(call: Call, wrt, of) -> str | None:
    """The direction whose products with the basis give the Jacobian, for a
    Tesseract without `/jacobian` (the fewer products of the two it serves); `None`
    where it serves `/jacobian`."""
    schema = call.client.schema
    if schema.has(JACOBIAN):
        return None
    n_in = sum(math.prod(call.inputs[i].shape) for i in wrt)
    n_out = sum(math.prod(call.outputs[j].shape) for j in of)
    served = {
        kind: schema.has(f"batched_{kind}") or schema.has(kind) for kind in (JVP, VJP)
    }
    if not (served[JVP] or served[VJP]):
        raise NotImplementedError(
            "The Tesseract cannot give a Jacobian: it serves none of `/jacobian`, "
            "`/jacobian_vector_product` and `/vector_jacobian_product`."
        )
    return JVP if served[JVP] and (n_in <= n_out or not served[VJP]) else VJP


def fetch(
    call: Call,
    wrt: tuple[int, ...],
    of: tuple[int, ...],
    points: tuple[bool, ...],
    products: Plan | None,
    forward: bool,
    *primals,
) -> Inexact[np.ndarray, "*points src dst"]:
    """The Jacobian of outputs `of` with respect to inputs `wrt` (indices of leaves)
    at the point, or at each of the P points flagged, laid out for the contraction:
    `(P?, src, dst)`, its rows the vectors' side (the inputs for a JVP: `J^T`; the
    outputs for a VJP: `J`), so that answers are `vectors @ matrix`. `products`:
    how the basis products go, for a Tesseract without `/jacobian`."""
    primals = [np.asarray(a) for a in primals]
    client = call.client
    ins = [call.inputs[i] for i in wrt]
    outs = [call.outputs[j] for j in of]
    count = next((a.shape[0] for a, f in zip(primals, points) if f), None)
    n_in, n_out = _total(ins), _total(outs)
    shape = (n_in, n_out) if forward else (n_out, n_in)
    matrix = np.empty((count or 1, *shape), dtype_of([*ins, *outs]))
    if client.schema.has(JACOBIAN):
        in_flight = client.parallelism_for(JACOBIAN)
        each = size(point(primals, points, 0))
        # As many points at once as requests in flight, each answer written into
        # place and dropped: never all the answers and the matrix at once.
        for start in range(0, count or 1, in_flight):
            at = range(start, min(start + in_flight, count or 1))
            payloads = [
                {
                    "inputs": call.payload(point(primals, points, p)),
                    "jac_inputs": [leaf.path for leaf in ins],
                    "jac_outputs": [leaf.path for leaf in outs],
                }
                for p in at
            ]
            answers = client.request_many(
                JACOBIAN, payloads, max_in_flight=in_flight, size=each
            )
            for p, answer in zip(at, answers):
                _assemble(call, answer, ins, outs, matrix[p], forward)
    else:
        assert products is not None
        kind = by_products(call, wrt, of)
        _by_products(call, kind, products, ins, outs, points, primals, matrix, forward)
    return matrix if count is not None else matrix[0]


def _total(leaves) -> int:
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _assemble(call: Call, answer, ins, outs, into: np.ndarray, forward: bool):
    """A `/jacobian` answer's blocks, checked, written into `into`."""
    row = 0
    for o in outs:
        block = answer.get(o.path) if isinstance(answer, dict) else None
        if not isinstance(block, dict):
            block = {}
        height, col = math.prod(o.shape), 0
        for i in ins:
            value = array_at(call, block, i.path, JACOBIAN, (*o.shape, *i.shape))
            check_finite(call, JACOBIAN, o.path, value, wrt=i.path)
            width = math.prod(i.shape)
            value = value.reshape(height, width)
            if forward:
                into[col : col + width, row : row + height] = value.T
            else:
                into[row : row + height, col : col + width] = value
            col += width
        row += height


def _by_products(
    call: Call, kind, plan, ins, outs, points, primals, into, forward: bool
) -> None:
    """The Jacobian from the products of the basis with the direction `kind`,
    written into `into` (`(P, src, dst)` as `fetch` lays it out)."""
    along = kind == JVP  # the products' own direction
    src, dst = (ins, outs) if along else (outs, ins)
    total = _total(src)
    basis, start = [], 0
    for leaf in src:
        block = np.zeros((total, math.prod(leaf.shape)), np.dtype(leaf.dtype))
        block[start : start + block.shape[1]] = np.eye(block.shape[1])
        basis.append(block.reshape((total, *leaf.shape)))
        start += block.shape[1]
    n = len(call.inputs)
    results = run_linear(
        call,
        kind,
        plan,
        tuple(leaf.path for leaf in src),
        tuple(leaf.path for leaf in dst),
        tuple(dst),
        tuple(points) + (False,) * len(src),
        (True,) * len(src),
        *primals[:n],
        *basis,
    )
    count = into.shape[0]
    for p in range(count):
        # Row j: the product with basis vector j: `J e_j` (JVPs), `e_j^T J` (VJPs).
        cols = [(r[p] if any(points) else r).reshape(total, -1) for r in results]
        stacked = np.concatenate(cols, axis=1)
        # `stacked` has the products' side as rows; `into` the vectors' side.
        into[p] = stacked if along == forward else stacked.T


def check_contracted(call: Call, dst, dst_leaves, *outs) -> list[np.ndarray]:
    """The contracted answers, refused if they hold NaN or Inf (`check_finite`)."""
    outs = [np.asarray(o) for o in outs]
    for d, leaf, o in zip(dst, dst_leaves, outs):
        flat = o.reshape((-1, *leaf.shape)) if math.prod(leaf.shape) else o
        check_finite(call, JACOBIAN, d, flat, len(flat))
    return outs


def contract(
    matrix: Inexact[Array, "*points src dst"],
    lin: list,
    src_shapes: list[tuple[int, ...]],
    dst_leaves: list,
    lin_points: tuple[bool, ...],
    lin_items: tuple[bool, ...],
) -> list[Inexact[Array, "..."]]:
    """`vectors @ matrix` for the (co)tangents `lin`, laid out `(P?, K?, *shape)` as
    flagged, with the matrix laid out as `fetch` does: the answers,
    `(P?, K?, *shape)` per destination leaf."""
    count = matrix.shape[0] if matrix.ndim == 3 else None
    for v, p in zip(lin, lin_points):
        if p:
            count = v.shape[0]
    k = next(
        (v.shape[1 if p else 0] for v, p, i in zip(lin, lin_points, lin_items) if i),
        None,
    )
    shared = not any(lin_points)
    rows, items = (1 if shared else count), (k or 1)
    flat = []
    for v, shape, p, i in zip(lin, src_shapes, lin_points, lin_items):
        width = math.prod(shape)
        v = jnp.asarray(v, matrix.dtype).reshape(
            rows if p else 1, items if i else 1, width
        )
        flat.append(jnp.broadcast_to(v, (rows, items, width)))
    vectors = jnp.concatenate(flat, axis=-1)
    stacked = matrix if matrix.ndim == 3 else matrix[None]
    result = _product(stacked, vectors, basis=shared and k is not None)
    if count is None:
        result = result[0]
    if k is None:
        result = result[..., 0, :]
    lead = result.shape[:-1]
    outs, start = [], 0
    for leaf in dst_leaves:
        width = math.prod(leaf.shape)
        part = result[..., start : start + width]
        outs.append(part.reshape((*lead, *leaf.shape)).astype(leaf.dtype))
        start += width
    return outs


def _product(matrix, vectors, basis: bool):
    """`vectors` `(P or 1, K, src)` times `matrix` `(P, src, dst)` -> `(P, K, dst)`.
    Where the vectors may be the standard basis (`basis`: shared by every point,
    as many as the matrix has rows), that is checked at run time: in order, the
    answer is the matrix itself; in another order, a gather of its rows."""

    def product(matrix, vectors):
        return jnp.matmul(vectors, matrix)

    if not basis or vectors.shape[1] != matrix.shape[1]:
        return product(matrix, vectors)
    t = vectors[0]
    permutation = (
        jnp.all((t == 0) | (t == 1))
        & jnp.all(jnp.sum(t, axis=0) == 1)
        & jnp.all(jnp.sum(t, axis=1) == 1)
    )
    where = jnp.argmax(t, axis=1)
    identity = permutation & jnp.all(where == jnp.arange(t.shape[0]))
    branch = jnp.where(identity, 0, jnp.where(permutation, 1, 2))
    return jax.lax.switch(
        branch,
        [
            lambda matrix, vectors: matrix,
            lambda matrix, vectors: matrix[:, where, :],
            product,
        ],
        matrix,
        vectors,
    )
