"""A lineax operator given by both its directions, for `/linear_solve`.

lineax's `FunctionLinearOperator` gets its transpose from `jax.linear_transpose` of
the map. A map that calls back to the host (a Tesseract's own `jacobian_vector_product`
in NumPy, or a JAX one built on `pure_callback`, as tesseract-core's
`jvp_from_jacobian` is) has no transpose rule; its transpose is the Tesseract's
`vector_jacobian_product`, and this operator says so: `mv` is one function, `.T.mv`
the other. LSMR, `Normal` and transposed solves then run on such Tesseracts too.

What the two functions read of a request (in `/linear_solve`, the handle of its primal
point) is `args`, an operand of the operator rather than a closure: lineax binds its
solve as a primitive, which sees an operator's arrays only in its fields; a static
function closing over a traced value leaks the tracer into the primitive's parameters,
and the solve does not compile.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx


class TwoWay(lx.AbstractLinearOperator):
    """`mv(v)` is `fn(args, v)`, `transpose().mv(w)` is `fn_t(args, w)`; structures
    as given; tags unchecked."""

    fn: Callable = eqx.field(static=True)
    fn_t: Callable = eqx.field(static=True)
    args: Any
    ins: Any = eqx.field(static=True)
    outs: Any = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def mv(self, vector):
        return self.fn(self.args, vector)

    def as_matrix(self):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.ins)
        flat, unravel = jfu.ravel_pytree(zeros)
        columns = jax.vmap(lambda e: jfu.ravel_pytree(self.mv(unravel(e)))[0])
        return columns(jnp.eye(flat.size, dtype=flat.dtype)).T

    def transpose(self):
        if lx.symmetric_tag in self.tags:
            return self
        return TwoWay(self.fn_t, self.fn, self.args, self.outs, self.ins, self.tags)

    def in_structure(self):
        return self.ins

    def out_structure(self):
        return self.outs


@lx.linearise.register(TwoWay)
def _(operator):
    return operator


@lx.materialise.register(TwoWay)
def _(operator):
    return operator


@lx.diagonal.register(TwoWay)
def _(operator):
    return jnp.diag(operator.as_matrix())


@lx.tridiagonal.register(TwoWay)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diag(matrix, -1), jnp.diag(matrix), jnp.diag(matrix, 1)


for _check, _tag in (
    (lx.is_symmetric, lx.symmetric_tag),
    (lx.is_diagonal, lx.diagonal_tag),
    (lx.is_tridiagonal, lx.tridiagonal_tag),
    (lx.has_unit_diagonal, lx.unit_diagonal_tag),
    (lx.is_lower_triangular, lx.lower_triangular_tag),
    (lx.is_upper_triangular, lx.upper_triangular_tag),
    (lx.is_positive_semidefinite, lx.positive_semidefinite_tag),
    (lx.is_negative_semidefinite, lx.negative_semidefinite_tag),
):
    _check.register(TwoWay)(lambda operator, _tag=_tag: _tag in operator.tags)


@lx.conj.register(TwoWay)
def _(operator):
    return operator  # real maps
