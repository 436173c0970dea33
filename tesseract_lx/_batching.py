"""Batching rules: how K (co)tangents at one point, or K points, reach the server.

Rules are Equinox modules, chosen by the user as lineax's solvers are:

| rule | requests for K tangents | for K points |
|---|---|---|
| `Sequential()` | K | K |
| `Concurrent(max_in_flight=)` | K, in flight together | K, in flight |
| `Jacobian()` | 1 `/jacobian`, contracted locally | K, in flight |
| `Batched(max_batch=)` | 1 batched request per `max_batch` | 1 `/batched_apply` |
| `Auto()` | the cheapest, by `estimate_costs` | `Batched`, if served |

Shorthands: `"sequential"`, `"concurrent"`, `"jacobian"`, `"batched"`, `"auto"`.

A rule the server cannot serve (`Batched` on a stock server, `Jacobian` without a
`/jacobian`) gives way to the cheapest one it can, and says so in `client.decisions`.
Batches of points are never sent as one stacked request unless the server says it
takes a batch (`/batched_apply`): an `Array[..., dtype]` schema says "any rank", not
"maps over a leading axis".
"""

import dataclasses
import logging
import math

import equinox as eqx

from ._fallback import fall_back, first_time
from ._wire.spec import APPLY, BATCHED_APPLY, JACOBIAN


logger = logging.getLogger("tesseract_lx")

# Cost model defaults until the client has measured its own latencies.
_ROUND_TRIP = 3e-3  # seconds per request on loopback
_BYTES_PER_SECOND = 150e6  # base64 + JSON, both ways
# A vectorised (co)tangent costs this fraction of a lone request's compute.
_PER_ITEM = 0.25


class AbstractBatching(eqx.Module):
    """How a batch under `jax.vmap` reaches the server: K (co)tangents at one point,
    or K primal points.

    Pass a rule as `TesseractModule(client, batching=...)`. The rules are
    [`tlx.Sequential`][tesseract_lx.Sequential],
    [`tlx.Concurrent`][tesseract_lx.Concurrent],
    [`tlx.Jacobian`][tesseract_lx.Jacobian], [`tlx.Batched`][tesseract_lx.Batched]
    and [`tlx.Auto`][tesseract_lx.Auto]; each has a shorthand string (`"sequential"`,
    `"concurrent"`, `"jacobian"`, `"batched"`, `"auto"`). A rule the server cannot
    serve gives way to the cheapest one it can, and says so in `client.decisions`.
    """


class Sequential(AbstractBatching):
    """One request per (co)tangent or point, one after another: JAX's own rule for
    callbacks, and the one that works everywhere. K items cost K requests.
    """


class Concurrent(AbstractBatching):
    """One request per item, several in flight at once, spread over the client's
    replicas (`Client([url1, url2, ...])`). K items cost K requests, in about
    `K / max_in_flight` round trips. Worth it against a server with several workers
    or a pool of servers; against one single-worker server it is `Sequential`.

    **Arguments:**

    - `max_in_flight`: the most requests in flight at once. Default: the server's
      workers (as it states them, else 1) times the client's replicas.
    """

    max_in_flight: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(
                f"`max_in_flight` must be at least 1, got {self.max_in_flight}."
            )


class Jacobian(AbstractBatching):
    """K (co)tangents from one `/jacobian` request, contracted locally: best when K
    is close to the smaller side of the Jacobian. The standard basis (what
    `jax.jacfwd`, `jax.jacrev` and `as_matrix` send) is recognised and never
    uploaded or contracted: the Jacobian is the answer. Batches of points, which a
    Jacobian cannot serve, go the cheapest way the server allows (as under `Auto`).
    """


class Batched(AbstractBatching):
    """One request to the server's batched endpoints
    (`/batched_jacobian_vector_product`, `/batched_vector_jacobian_product`,
    `/batched_apply`, served by `tesseract-lx serve`) per `max_batch` items; chunks go
    to the replicas at the same time. On a server without them (a stock
    `tesseract-runtime serve`), the cheapest rule it allows instead.

    **Arguments:**

    - `max_batch`: the most items in one request. Default: the server's own limit
      (`max_batch` in its `x-tesseract-lx`).
    """

    max_batch: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"`max_batch` must be at least 1, got {self.max_batch}.")


class Auto(AbstractBatching):
    """The cheapest rule the server allows, from a cost model fed by measured
    latencies ([`tlx.estimate_costs`][tesseract_lx.estimate_costs]). Every choice
    it makes for a batch is recorded, with its estimates, in `client.decisions` (a
    list of [`tlx.Decision`][tesseract_lx.Decision]; a lone item sent as it is has no
    choice to record); `TesseractModule.explain` gives it before anything is sent.
    The default rule.

    The standard basis (`jax.jacfwd`, `jax.jacrev`, `as_matrix`) goes as one
    `/jacobian`; one tangent goes to the plain endpoint; a batch of points goes as
    one `/batched_apply` only where the server says it takes one.

    **Arguments:**

    - `jacobian`: whether the Jacobian may be fetched whole. `False` never sends
      `/jacobian` for a batch, whatever K: for a Jacobian too large to fetch.
    """

    jacobian: bool = eqx.field(static=True, default=True)


_SHORTHANDS = {
    "sequential": Sequential,
    "concurrent": Concurrent,
    "jacobian": Jacobian,
    "batched": Batched,
    "auto": Auto,
}


def as_rule(batching: "AbstractBatching | str") -> AbstractBatching:
    """A rule object from a rule or its shorthand string."""
    if isinstance(batching, AbstractBatching):
        return batching
    if isinstance(batching, str) and batching in _SHORTHANDS:
        return _SHORTHANDS[batching]()
    raise ValueError(
        f"`batching={batching!r}` is not a batching rule; pass one of "
        "`tlx.Sequential()`, `tlx.Concurrent()`, `tlx.Jacobian()`, `tlx.Batched()`, "
        f"`tlx.Auto()`, or a shorthand: {', '.join(repr(s) for s in _SHORTHANDS)}."
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A rule resolved for one batch: what to send, how many at once, in what chunks."""

    rule: str  # "sequential" | "concurrent" | "jacobian" | "batched"
    max_in_flight: int = 1
    max_batch: int | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """Why a batch went (or would go) the way it did (also logged at DEBUG level):
    the entries of `client.decisions`, and what `TesseractModule.explain` returns.

    **Attributes:**

    - `kind`: the endpoint asked for (`"jacobian_vector_product"`,
        `"vector_jacobian_product"`, `"apply"` for a batch of points, or
        `"linear_solve"` for a solve `tlx.OnServer` ran locally).
    - `k`: how many items.
    - `chosen`: the rule (`"sequential"`, `"concurrent"`, `"jacobian"`, `"batched"`;
        `"local"` for an `OnServer` solve run here).
    - `estimates`: seconds each rule the server allows is expected to take (empty
        when there was nothing to estimate: a rule followed as asked, the standard
        basis sent as one `/jacobian`).
    - `reason`: the same, in words.
    """

    kind: str
    k: int
    chosen: str
    estimates: dict[str, float]
    reason: str


def available(client, kind: str) -> list[str]:
    """The rules the server allows for a batch of this kind."""
    schema = client.schema
    if kind == APPLY:
        rules = ["batched"] if schema.has(BATCHED_APPLY) else []
        return rules + ["concurrent", "sequential"]
    rules = []
    if schema.has(f"batched_{kind}"):
        rules.append("batched")
    if schema.has(JACOBIAN):
        rules.append("jacobian")
    if schema.has(kind):
        rules += ["concurrent", "sequential"]
    return rules


def estimate_costs(
    client, kind: str, k: int, n_in: int, n_out: int, size: int = 0
) -> dict[str, float]:
    """Seconds each rule the server allows is expected to take for K items.

    **Arguments:**

    - `client`: the [`tlx.Client`][tesseract_lx.Client].
    - `kind`: `"jacobian_vector_product"`, `"vector_jacobian_product"` or `"apply"`.
    - `k`: how many (co)tangents or points.
    - `n_in`, `n_out`: sizes of the differentiated inputs and outputs.
    - `size`: elements of the point, which keys the client's measured latencies.

    **Returns:**

    A dict from rule name (`"sequential"`, `"concurrent"`, `"jacobian"`,
    `"batched"`) to its expected seconds, for the rules the server allows.

    Measured latencies (`client.latency`, per endpoint and size) are used where the
    client has them; otherwise defaults for loopback. A single request costs `one`;
    `sequential` K of them; `concurrent` as many waves as K needs over the workers;
    `batched` one request whose extra cost per item is measured (or guessed as a
    quarter of a lone request's compute); `jacobian` one request carrying
    `n_in * n_out` numbers, then a local contraction. `concurrent` is left out when
    only one request can be computed at once (`client.parallelism == 1`).
    """
    lat = client.latency
    batched_name = BATCHED_APPLY if kind == APPLY else f"batched_{kind}"
    one = lat.get(kind, size)
    if one is None:
        one = lat.get(batched_name, size, 1) or _ROUND_TRIP
    compute = max(one - _ROUND_TRIP, 0.1 * one)
    transfer = 8 * k * (n_in + n_out) / _BYTES_PER_SECOND
    costs = {}
    for rule in available(client, kind):
        if rule == "sequential":
            costs[rule] = k * one
        elif rule == "concurrent" and client.parallelism_for(kind) > 1:
            costs[rule] = math.ceil(k / client.parallelism_for(kind)) * one
        elif rule == "jacobian":
            fetch = lat.get(JACOBIAN, size)
            if fetch is None:
                rows = min(n_in, n_out)
                fetch = one + _PER_ITEM * compute * (rows - 1)
                fetch += 8 * n_in * n_out / _BYTES_PER_SECOND
            costs[rule] = fetch + 2e-9 * k * n_in * n_out
        elif rule == "batched":
            measured = lat.get(batched_name, size, k)
            if measured is None:
                measured = one + _PER_ITEM * compute * (k - 1) + transfer
            costs[rule] = measured
    return costs


def decide(
    client,
    rule: AbstractBatching,
    kind: str,
    k: int,
    n_in: int,
    n_out: int,
    size: int,
    basis: bool = False,
) -> Decision:
    """The decision for K items under `rule`, without recording it.

    `basis`: the K vectors are the standard basis (`jax.jacfwd`, `as_matrix`): `Auto`
    then asks for the Jacobian itself (one `/jacobian`, nothing uploaded).
    """
    allowed = available(client, kind)
    named = _name(rule)
    if named is not None and named in allowed:
        return Decision(kind, k, named, {}, f"K={k}: `{named}`, as asked")
    if basis and isinstance(rule, Auto) and rule.jacobian and "jacobian" in allowed:
        return Decision(
            kind,
            k,
            "jacobian",
            {},
            f"K={k}: the vectors are the standard basis, so the Jacobian itself: one "
            "`/jacobian`, no basis uploaded",
        )
    costs = estimate_costs(client, kind, k, n_in, n_out, size)
    if isinstance(rule, Auto) and not rule.jacobian and len(costs) > 1:
        costs.pop("jacobian", None)
    if kind == APPLY:
        # Points: one batched request beats any number of round trips; a stock
        # server gets them in flight at once when it has the workers. Chosen by
        # what the server serves, never by timings: the same requests on every run.
        costs = {r: c for r, c in costs.items() if r != "jacobian"}
        chosen = next(r for r in ("batched", "concurrent", "sequential") if r in costs)
        return Decision(
            kind,
            k,
            chosen,
            costs,
            (f"`{named}` is not served here; " if named else "")
            + f"K={k} points: `{chosen}`, the fewest round trips the server allows",
        )
    if k == 1 and client.schema.has(kind):
        # One tangent: the plain endpoint. Only on a stock server, whose single
        # requests can be slow for reasons of its own (several workers without
        # `TCP_NODELAY`: ~40 ms each), may the whole Jacobian replace it, and only
        # when measured to be cheaper by far than a measured JVP: a flip on timing
        # noise would surprise, and a Krylov solve would fetch it every iteration.
        costs = {r: c for r, c in costs.items() if r in ("sequential", "jacobian")}
        measured = client.latency.get(kind, size) is not None
        if (
            not client.capabilities.is_stock
            or not measured
            or costs.get("jacobian", math.inf) > 0.5 * costs["sequential"]
        ):
            costs.pop("jacobian", None)
    if not costs:
        costs = {"sequential": math.inf}
    chosen = min(costs, key=costs.__getitem__)
    ranked = ", ".join(f"{r}={c * 1e3:.2f} ms" for r, c in sorted(costs.items()))
    sizes = f"{size} numbers each" if kind == APPLY else f"n_in={n_in}, n_out={n_out}"
    reason = f"K={k}, {sizes}: estimated {ranked}"
    if named is not None:
        reason = f"`{named}` is not served here; {reason}"
    return Decision(kind, k, chosen, costs, reason)


def plan(
    client,
    rule: AbstractBatching,
    kind: str,
    k: int,
    n_in: int,
    n_out: int,
    size: int,
    basis: bool = False,
) -> Plan:
    """Resolve `rule` for one batch of K items, and record the decision: where there
    was one to make (not for a lone item sent as it is, nor for a rule followed as
    asked), so that `client.decisions` is not flooded by a local Krylov loop."""
    decision = decide(client, rule, kind, k, n_in, n_out, size, basis)
    named = _name(rule)
    if kind == APPLY and named == "jacobian":
        named = None  # `Jacobian` sends points as `Auto` does: its documented rule
    if named is not None and named != decision.chosen:
        # A rule asked for by name that the server cannot serve: warned once per
        # client, kind and rule (the plan is made per call until it is traced).
        if first_time(client, (kind, rule, decision.chosen)):
            fall_back(client, decision, stacklevel=2)
        else:
            client.decisions.append(decision)
    elif named is None and not (k == 1 and decision.chosen == "sequential"):
        client.decisions.append(decision)
        logger.debug(
            "auto picked %s for %s: %s", decision.chosen, kind, decision.reason
        )
    in_flight = 1
    if decision.chosen in ("concurrent", "batched"):
        batched = BATCHED_APPLY if kind == APPLY else f"batched_{kind}"
        in_flight = client.parallelism_for(
            kind if decision.chosen == "concurrent" else batched
        )
        if isinstance(rule, Concurrent) and rule.max_in_flight is not None:
            in_flight = rule.max_in_flight
    max_batch = client.capabilities.max_batch
    if isinstance(rule, Batched) and rule.max_batch is not None:
        max_batch = min(rule.max_batch, max_batch or rule.max_batch)
    return Plan(decision.chosen, in_flight, max_batch)


def _name(rule: AbstractBatching) -> str | None:
    """The built-in rule `rule` is (a subclass of one is that rule); `None` for
    `Auto` and for a rule of the user's own."""
    if isinstance(rule, Auto):
        return None
    for name, cls in _SHORTHANDS.items():
        if isinstance(rule, cls):
            return name
    return None
