"""`TesseractModule`: a served Tesseract as a differentiable Equinox module."""

import math
from typing import Any, Literal

import equinox as eqx

from ._batching import AbstractBatching, as_rule, Batch, decide, Decision, server_of
from ._call import Call, flatten, make_call
from ._client import Client
from ._primitive import apply_p
from ._wire.spec import APPLY, JVP, VJP


# "auto" is ours; the others are tesseract-jax's `vmap_method`s, with its meaning.
VmapMethod = (
    Literal["auto", "sequential", "expand_dims", "broadcast_all", "auto_experimental"]
    | None
)
VMAP_METHODS: tuple[VmapMethod, ...] = (
    "auto",
    None,
    "sequential",
    "expand_dims",
    "broadcast_all",
    "auto_experimental",
)


class TesseractModule(eqx.Module):
    """A served Tesseract as a JAX function of its inputs.

    **Arguments:**

    - `client`: a `tesseract_lx.Client` (or a `tesseract_core.Tesseract`).
    - `batching`: how a batch under `jax.vmap` reaches the server: `tlx.Auto()` (the
        default), `tlx.Sequential()`, `tlx.Concurrent(max_in_flight=...)`,
        `tlx.Jacobian()`, `tlx.Batched(max_batch=...)`, or the shorthand strings
        `"auto"`, `"sequential"`, `"concurrent"`, `"jacobian"`, `"batched"`.
    - `strict_dtype`: when the server says it computes in a lower precision than its
        schema declares, refuse before any request (`True`) or warn (`False`).
    - `vmap_method`: how `jax.vmap` over primal points goes. `"auto"` (the default):
        one `/batched_apply` where the server says it takes a batch of points, else
        one request per point (by `batching`). tesseract-jax's methods mean what they
        mean there: `None` refuses `vmap` over points; `"expand_dims"` /
        `"broadcast_all"` send the points stacked in one `/apply`, trusting the
        Tesseract to map over a leading axis; `"auto_experimental"` does so when every
        batched differentiable input is `Array[..., dtype]`. `"sequential"` and
        `"auto_experimental"` still send one `/batched_apply` where the server says
        it takes a batch of points (the same numbers, one request), else one request
        per point. Batches of (co)tangents go by `batching` whatever this says.
    - `check_finite`: refuse an answer (of `/apply`, a JVP, a VJP, `/jacobian` or
        their batched forms) that holds NaN or Inf, with a
        `tesseract_lx.TesseractError` (also a `FloatingPointError`) naming the
        endpoint and the path of the output (for a VJP, of the input) that holds
        them; under `jax.jit` its text ends the `JaxRuntimeError`'s and
        `client.last_error` keeps it. Off by default: NaN and Inf pass through
        unchanged, both ways.
    - `check_static_outputs`: the non-array outputs (strings, `None`) of a traced
        call are fixed when it is traced (from an eager answer at the same shapes, or
        `/abstract_eval`); on by default, each `/apply` of the compiled call compares
        its own with them and warns (`UserWarning`, naming the output and both
        values) where they differ. The caller holds the traced values either way.

    Inputs and outputs are plain containers shaped as the Tesseract's schema says:
    models as dicts, `list[...]` as lists, `dict[str, ...]` as dicts, optionals as a
    value or `None`; arrays (and Python scalars where a scalar array is expected)
    are differentiable where the schema says so, at any depth; strings, ints and
    `Literal`s are static. Numeric outputs come back as JAX arrays, strings as `str`.

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
    batching: AbstractBatching = eqx.field(static=True)
    strict_dtype: bool = eqx.field(static=True)
    vmap_method: VmapMethod = eqx.field(static=True)
    check_finite: bool = eqx.field(static=True)
    check_static_outputs: bool = eqx.field(static=True)

    def __init__(
        self,
        client: Any,
        batching: AbstractBatching | str = "auto",
        *,
        strict_dtype: bool = True,
        vmap_method: VmapMethod = "auto",
        check_finite: bool = False,
        check_static_outputs: bool = True,
    ):
        if vmap_method not in VMAP_METHODS:
            raise ValueError(
                f"`vmap_method={vmap_method!r}` is not a vmap method; choose one of "
                f"{', '.join(map(repr, VMAP_METHODS))}."
            )
        self.client = Client.wrap(client)
        self.batching = as_rule(batching)
        self.strict_dtype = strict_dtype
        self.vmap_method = vmap_method
        if not isinstance(check_finite, bool):
            raise TypeError(
                f"`check_finite` must be True or False, got {check_finite!r}."
            )
        self.check_finite = check_finite
        if not isinstance(check_static_outputs, bool):
            raise TypeError(
                "`check_static_outputs` must be True or False, got "
                f"{check_static_outputs!r}."
            )
        self.check_static_outputs = check_static_outputs

    @property
    def schema(self):
        """The Tesseract's interface as the client read it from `/openapi.json`."""
        return self.client.schema

    def with_batching(self, batching: AbstractBatching | str) -> "TesseractModule":
        """The same module, every other setting kept, with another batching rule."""
        return TesseractModule(
            self.client,
            batching,
            strict_dtype=self.strict_dtype,
            vmap_method=self.vmap_method,
            check_finite=self.check_finite,
            check_static_outputs=self.check_static_outputs,
        )

    def prepare(self, inputs: Any) -> tuple[Call, list]:
        """Check `inputs` against the schema: the call's static part, and operands.

        Raises before any request for a missing, unknown, misshapen or mistyped input.
        """
        template, leaves, values = flatten(self.client, inputs)
        call = make_call(
            self.client,
            template,
            leaves,
            self.batching,
            self.strict_dtype,
            self.vmap_method,
            self.check_finite,
            self.check_static_outputs,
        )
        return call, values

    def __call__(self, inputs: Any) -> Any:
        """Apply the Tesseract: inputs to outputs, both trees of plain containers."""
        call, values = self.prepare(inputs)
        outs = apply_p.bind(*values, call=call, points=(False,) * len(values))
        # After the bind: an eager call has just taught the output structure.
        return call.unflatten(outs)

    def explain(
        self,
        inputs: Any,
        *,
        kind: str = "jvp",
        k: int = 1,
        points: int = 1,
        wrt: str | tuple[str, ...] | None = None,
        of: str | tuple[str, ...] | None = None,
    ) -> Decision:
        """The plan a batch would get at `inputs`, and why: the same decision a
        traced call makes (and records), made here without recording it.

        **Arguments:**

        - `inputs`: the point, as for calling the module.
        - `kind`: `"jvp"` (K tangents), `"vjp"` (K cotangents) or `"apply"` (points).
        - `k`: how many (co)tangents at each point (`kind="apply"`: how many points).
        - `points`: how many points the (co)tangents are at (a `jax.vmap` over points
            of a `jax.jacfwd`).
        - `wrt`, `of`: the differentiated input and output path, or a tuple of them
            (default: all differentiable ones).

        **Returns:** a `tlx.Decision`, with the estimated cost of each plan `Auto`
        weighed (none for a rule followed as asked). No request is sent (except,
        once, the `/abstract_eval` a traced call at these shapes would send too).
        """
        endpoint = {"jvp": JVP, "vjp": VJP, "apply": APPLY}.get(kind)
        if endpoint is None:
            raise ValueError(f"`kind` must be 'jvp', 'vjp' or 'apply', got {kind!r}.")
        wrt = (wrt,) if isinstance(wrt, str) else wrt
        of = (of,) if isinstance(of, str) else of
        call, _ = self.prepare(inputs)
        ins = [leaf for leaf in call.inputs if leaf.differentiable]
        outs = [leaf for leaf in call.outputs if leaf.differentiable]
        if wrt is not None:
            ins = _select("wrt", wrt, call.inputs)
        if of is not None:
            outs = _select("of", of, call.outputs)
        n_in = sum(math.prod(leaf.shape) for leaf in ins)
        n_out = sum(math.prod(leaf.shape) for leaf in outs)
        size = sum(math.prod(leaf.shape) for leaf in call.inputs)
        if endpoint == APPLY:
            batch = Batch(APPLY, k, 1, size, _total(call.outputs), size)
        else:
            batch = Batch(endpoint, points, k, n_in, n_out, size)
        return decide(self.batching, batch, server_of(self.client, endpoint))[0]


def _total(leaves) -> int:
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _select(name: str, wanted: tuple[str, ...], leaves) -> list:
    known = {leaf.path: leaf for leaf in leaves}
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise ValueError(
            f"`{name}`: no array at {', '.join(map(repr, unknown))}; there are: "
            f"{', '.join(map(repr, known))}."
        )
    return [known[p] for p in wanted]
