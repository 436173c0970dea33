"""Batching rules: how K (co)tangents at each of P points, or P points, reach the
server. Rules are objects, as lineax's solvers are, and own their behaviour:

| rule | requests for K tangents at a point | for P points |
|---|---|---|
| `Sequential()` | K | P |
| `Concurrent(max_in_flight=)` | K, in flight together | P, in flight |
| `Jacobian()` | 1 `/jacobian` per point, contracted in the graph | as `Auto` |
| `Batched(max_batch=)` | 1 request per `max_batch` items | 1 per `max_batch` points |
| `Auto()` | the cheapest, by its cost model | `Batched` where served |

A rule's `plan` is asked when the call is traced (lowered into a compiled program,
or run eagerly): the plan is part of the compiled program, which sends the same
requests on every run. Planning reads the server's capabilities, the batch's sizes
and, for `Auto`, latencies the client measured *before* that moment.

A plan the server cannot serve (`Batched` on a stock server, `Jacobian` without a
way to get one) gives way to the cheapest one it can serve: a `tlx.FallbackWarning`
and a `Decision` say so. Batches of points are never stacked into one request unless
the server says it takes a batch (`/batched_apply`): `Array[..., dtype]` says "any
rank", not "maps over a leading axis".
"""

import abc
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx

from ._fallback import fall_back
from ._wire.spec import APPLY, BATCHED_APPLY, JACOBIAN, JVP, VJP


logger = logging.getLogger("tesseract_lx")

RuleName = Literal["sequential", "concurrent", "jacobian", "batched"]
RULES: tuple[RuleName, ...] = ("sequential", "concurrent", "jacobian", "batched")

# The cost model's defaults, until the client has measured its own latencies.
_ROUND_TRIP = 3e-3  # seconds per request on loopback
# Encoding, sending and decoding, both ways: JSON with base64 arrays (a stock
# server), and the binary bodies of `tesseract-lx serve`.
_BYTES_PER_SECOND = {True: 150e6, False: 600e6}
# A vectorised (co)tangent in a batched request costs this fraction of a lone
# request's compute; a row of a Jacobian (computed by the Tesseract at once), this.
_PER_ITEM = 0.25
_PER_ROW = 0.05
# Seconds per multiply-add of a contraction in the graph.
_FLOP = 1e-10


@dataclasses.dataclass(frozen=True)
class Batch:
    """What a call asks for: `k` (co)tangents at each of `points` points (`k = 1`
    for a batch of points). What a rule's `plan` is given.

    **Attributes:**

    - `kind`: `"apply"`, `"jacobian_vector_product"` or `"vector_jacobian_product"`.
    - `points`: how many primal points (1 for one point).
    - `k`: how many (co)tangents at each point (1 for `apply`).
    - `n_in`, `n_out`: elements of the differentiated inputs and outputs (for
        `apply`: of all inputs and outputs).
    - `size`: elements of one point: what measured latencies are keyed by.
    """

    kind: str
    points: int
    k: int
    n_in: int
    n_out: int
    size: int

    @property
    def items(self) -> int:
        return self.points * self.k


@dataclasses.dataclass(frozen=True)
class Server:
    """What a rule may know of the servers when it plans.

    **Attributes:**

    - `endpoints`: the endpoints some server serves (`serves(endpoint)` asks).
    - `parallelism`: how many requests of the batch's kind they compute at once.
    - `max_batch`: the most items one batched request may carry (`None`: no limit).
    - `stock`: whether every server is a stock `tesseract-runtime serve`.
    - `latency`: `latency(endpoint, size, k)`, the seconds the client measured for a
        request of `k` items at a point of `size` elements so far, or `None`.
    """

    endpoints: frozenset[str]
    parallelism: int
    max_batch: int | None
    stock: bool
    latency: Callable[[str, int, int], float | None]

    def serves(self, endpoint: str) -> bool:
        return endpoint in self.endpoints


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a batch goes: what a rule's `plan` returns.

    **Attributes:**

    - `rule`: `"sequential"` (one request per item), `"concurrent"` (the same, in
        flight together), `"jacobian"` (the Jacobian at each point, contracted in
        the graph) or `"batched"` (the batched endpoints).
    - `max_in_flight`: the most requests in flight at once.
    - `max_batch`: the most items per batched request (`None`: all).
    """

    rule: RuleName
    max_in_flight: int = 1
    max_batch: int | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"`Plan.rule` must be one of {RULES}, got {self.rule!r}.")


@dataclasses.dataclass(frozen=True)
class Decision:
    """How a batch went (or would go), and why: the entries of `client.decisions`,
    and what `TesseractModule.explain` returns. Also logged at DEBUG level.

    **Attributes:**

    - `kind`: the endpoint asked for (`"jacobian_vector_product"`,
        `"vector_jacobian_product"`, `"apply"` for a batch of points, or
        `"linear_solve"` or `"nonlinear_solve"` for a solve `tlx.OnServer` ran
        locally).
    - `k`: how many items (points x (co)tangents).
    - `chosen`: the rule (`"sequential"`, `"concurrent"`, `"jacobian"`, `"batched"`;
        `"local"` for an `OnServer` solve run here).
    - `estimates`: seconds each rule the server serves is expected to take (empty
        when a rule was followed as asked).
    - `reason`: the same, in words.
    - `fallback`: whether this is not what was asked for (a rule the server does
        not serve, a solve `tlx.OnServer` could not send): then it was also warned
        about with a `tlx.FallbackWarning`.
    """

    kind: str
    k: int
    chosen: str
    estimates: dict[str, float]
    reason: str
    fallback: bool = False


class AbstractBatching(eqx.Module):
    """How a batch reaches the server: K (co)tangents at each of P points, or P
    points. Pass a rule as `TesseractModule(client, batching=...)`.

    The built-in rules are [`tlx.Sequential`][tesseract_lx.Sequential],
    [`tlx.Concurrent`][tesseract_lx.Concurrent],
    [`tlx.Jacobian`][tesseract_lx.Jacobian], [`tlx.Batched`][tesseract_lx.Batched]
    and [`tlx.Auto`][tesseract_lx.Auto]; a subclass of one is that rule. A rule of
    your own implements `plan` (and `cost`), and is asked once per traced call:

    !!! Example

        ```python
        class JacobianForMany(tlx.AbstractBatching):
            def plan(self, batch, server):
                if batch.k >= 8 and server.serves("jacobian"):
                    return tlx.Plan("jacobian")
                return tlx.Plan("sequential")

            def cost(self, batch, server):
                return tlx.estimate_cost(self.plan(batch, server), batch, server)
        ```

    A plan the server cannot serve gives way to the cheapest one it can, with a
    `tlx.FallbackWarning`.
    """

    @abc.abstractmethod
    def plan(self, batch: Batch, server: Server) -> Plan:
        """How `batch` goes to `server`: a [`tlx.Plan`][tesseract_lx.Plan].

        **Arguments:**

        - `batch`: a [`tlx.Batch`][tesseract_lx.Batch]: what is asked for.
        - `server`: a [`tlx.Server`][tesseract_lx.Server]: what the server serves.

        **Returns:** a `tlx.Plan`.
        """

    @abc.abstractmethod
    def cost(self, batch: Batch, server: Server) -> float:
        """Seconds this rule's plan for `batch` is expected to take.

        **Arguments:** as for `plan`.

        **Returns:** seconds (`math.inf` where the plan cannot be served).
        """


class Sequential(AbstractBatching):
    """One request per (co)tangent or point, one after another: JAX's own rule for
    callbacks, and the one that works everywhere. K items cost K requests.
    """

    def plan(self, batch: Batch, server: Server) -> Plan:
        return Plan("sequential")

    def cost(self, batch: Batch, server: Server) -> float:
        return estimate_cost(self.plan(batch, server), batch, server)


class Concurrent(AbstractBatching):
    """One request per item, several in flight at once, spread over the client's
    replicas. K items cost K requests, in about `K / max_in_flight` round trips.
    Worth it against a server with several workers or a pool of servers; against
    one single-worker server it is `Sequential`.

    **Arguments:**

    - `max_in_flight`: the most requests in flight at once. Default: how many the
        servers compute at once (their workers, as they state them, else 1).
    """

    max_in_flight: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(
                f"`max_in_flight` must be at least 1, got {self.max_in_flight}."
            )

    def plan(self, batch: Batch, server: Server) -> Plan:
        return Plan("concurrent", self.max_in_flight or server.parallelism)

    def cost(self, batch: Batch, server: Server) -> float:
        return estimate_cost(self.plan(batch, server), batch, server)


class Jacobian(AbstractBatching):
    """The Jacobian at each point, from one `/jacobian` request (or, for a Tesseract
    without one, from the other direction's products of the basis), contracted with
    the (co)tangents in the graph. The request takes only the point, so XLA hoists
    it out of a loop whose point does not change (a Krylov solve) and merges
    duplicates. Best when K is close to the smaller side of the Jacobian, or the
    batch recurs. A batch of points, which a Jacobian cannot serve, goes as under
    `Auto`.
    """

    def plan(self, batch: Batch, server: Server) -> Plan:
        if batch.kind == APPLY:
            return Auto().plan(batch, server)
        return Plan("jacobian")

    def cost(self, batch: Batch, server: Server) -> float:
        return estimate_cost(self.plan(batch, server), batch, server)


class Batched(AbstractBatching):
    """One request to the server's batched endpoints
    (`/batched_jacobian_vector_product`, `/batched_vector_jacobian_product`,
    `/batched_apply`, served by `tesseract-lx serve`) per `max_batch` items; chunks
    and points go to the servers at the same time. On a server without them (a stock
    `tesseract-runtime serve`), the cheapest rule it serves instead, said.

    **Arguments:**

    - `max_batch`: the most items in one request. Default: the server's own limit
        (`max_batch` in its `x-tesseract-lx`).
    """

    max_batch: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"`max_batch` must be at least 1, got {self.max_batch}.")

    def plan(self, batch: Batch, server: Server) -> Plan:
        limit = server.max_batch
        if self.max_batch is not None:
            limit = min(self.max_batch, limit or self.max_batch)
        return Plan("batched", server.parallelism, limit)

    def cost(self, batch: Batch, server: Server) -> float:
        return estimate_cost(self.plan(batch, server), batch, server)


class Auto(AbstractBatching):
    """The cheapest plan the server serves, by a cost model
    ([`tlx.estimate_cost`][tesseract_lx.estimate_cost]) fed by the latencies the
    client measured before the call was traced (defaults for loopback until then).
    The default rule. Each choice is a [`tlx.Decision`][tesseract_lx.Decision] in
    `client.decisions`, recorded once, when the call is traced;
    `TesseractModule.explain` gives it before anything is sent.

    - One (co)tangent goes to the plain endpoint.
    - A batch of points goes as one `/batched_apply` where the server takes one,
        else in flight over its workers; never by timings.
    - K > 1 (co)tangents weigh the batched endpoint, requests in flight, and the
        Jacobian. A batch of (co)tangents at one point is rarely alone: a Krylov
        solve asks for one at every iteration, at the same point, and XLA hoists
        the Jacobian request (which takes only the point) out of such loops. So the
        Jacobian's cost is counted once against `reuse` batches.

    **Arguments:**

    - `jacobian`: whether the Jacobian may be fetched whole. `False` never sends
        `/jacobian` for a batch, whatever K.
    - `max_jacobian_bytes`: the largest Jacobian (all points together) Auto fetches:
        256 MiB by default.
    - `reuse`: how many batches at one point a Jacobian is taken to serve (8). Pass
        1 when your batches do not recur.
    """

    jacobian: bool = eqx.field(static=True, default=True)
    max_jacobian_bytes: int = eqx.field(static=True, default=2**28)
    reuse: int = eqx.field(static=True, default=8)

    def __check_init__(self):
        if self.reuse < 1:
            raise ValueError(f"`reuse` must be at least 1, got {self.reuse}.")

    def plan(self, batch: Batch, server: Server) -> Plan:
        return self._choose(batch, server)[0]

    def cost(self, batch: Batch, server: Server) -> float:
        plan, costs = self._choose(batch, server)
        return costs.get(plan.rule, estimate_cost(plan, batch, server))

    def _choose(self, batch: Batch, server: Server) -> tuple[Plan, dict[str, float]]:
        candidates = {
            "sequential": Sequential(),
            "concurrent": Concurrent(),
            "batched": Batched(),
            "jacobian": Jacobian(),
        }
        if batch.kind == APPLY:
            # The fewest round trips the server allows, by what it serves only.
            for name in ("batched", "concurrent", "sequential"):
                plan = candidates[name].plan(batch, server)
                if servable(plan, batch, server) and (
                    name != "concurrent" or server.parallelism > 1
                ):
                    return plan, {}
        if batch.k == 1 and servable(Plan("sequential"), batch, server):
            return Plan("sequential"), {}
        costs = {}
        plans = {}
        for name, rule in candidates.items():
            plan = rule.plan(batch, server)
            if not servable(plan, batch, server):
                continue
            if name == "concurrent" and server.parallelism == 1:
                continue
            if name == "jacobian" and not self._jacobian_fits(batch):
                continue
            cost = estimate_cost(plan, batch, server)
            if name == "jacobian":
                cost = _jacobian_share(batch, server, self.reuse)
            costs[name], plans[name] = cost, plan
        if not costs:
            # Nothing else: the Jacobian however large, where it is the only way.
            last = Jacobian().plan(batch, server)
            return (last if servable(last, batch, server) else Plan("sequential")), {}
        chosen = min(costs, key=costs.__getitem__)
        return plans[chosen], costs

    def _jacobian_fits(self, batch: Batch) -> bool:
        jacobian = 8 * batch.points * batch.n_in * batch.n_out
        # An answer as large as the Jacobian (`jax.jacfwd`) costs it nothing more.
        side = batch.n_out if batch.kind == JVP else batch.n_in
        answer = 8 * batch.points * batch.k * side
        return self.jacobian and jacobian <= max(self.max_jacobian_bytes, answer)


_SHORTHANDS: dict[str, type[AbstractBatching]] = {
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


#
# What the server serves, and what each plan costs
#


def servable(plan: Plan, batch: Batch, server: Server) -> bool:
    """Whether `server` can serve `plan` for `batch`."""
    kind = batch.kind
    if kind == APPLY:
        return plan.rule != "jacobian" and (
            plan.rule != "batched" or server.serves(BATCHED_APPLY)
        )
    if plan.rule == "batched":
        return server.serves(f"batched_{kind}")
    if plan.rule == "jacobian":
        # From `/jacobian`, else from the products of either direction's basis.
        return any(
            server.serves(e)
            for e in (JACOBIAN, JVP, VJP, f"batched_{JVP}", f"batched_{VJP}")
        )
    return server.serves(kind)


def estimate_cost(plan: Plan, batch: Batch, server: Server) -> float:
    """Seconds `plan` is expected to take for `batch` on `server`.

    **Arguments:**

    - `plan`: a [`tlx.Plan`][tesseract_lx.Plan].
    - `batch`: a [`tlx.Batch`][tesseract_lx.Batch].
    - `server`: a [`tlx.Server`][tesseract_lx.Server].

    **Returns:** seconds; `math.inf` where the server cannot serve the plan.

    A lone request costs `one` (measured for this endpoint and point size where
    the client has measured it, else a loopback round trip); `sequential` is K of
    them per point; `concurrent` as many waves as the items need over the requests
    in flight; `batched` one request per chunk whose extra cost per item is
    measured (or taken as a quarter of a lone request's compute); `jacobian` one
    request per point carrying `n_in * n_out` numbers, each row a twentieth of a
    lone request's compute, then the contraction in the graph (a gather when K is
    the size of the basis: `jax.jacfwd`, `jax.jacrev`).
    """
    if not servable(plan, batch, server):
        return math.inf
    kind, size, points, k = batch.kind, batch.size, batch.points, batch.k
    batched_name = BATCHED_APPLY if kind == APPLY else f"batched_{kind}"
    one = server.latency(kind, size, 1)
    if one is None:
        one = server.latency(batched_name, size, 1) or _ROUND_TRIP
    compute = max(one - _ROUND_TRIP, 0.1 * one)
    per_point = k if kind != APPLY else 1
    items = points * per_point if kind != APPLY else points
    in_flight = max(1, plan.max_in_flight)
    if plan.rule == "sequential":
        return items * one
    if plan.rule == "concurrent":
        return math.ceil(items / in_flight) * one
    if plan.rule == "batched":
        chunk = min(per_point if kind != APPLY else points, plan.max_batch or items)
        chunks = (
            points * math.ceil(per_point / chunk)
            if kind != APPLY
            else (math.ceil(points / chunk))
        )
        measured = server.latency(batched_name, size, chunk)
        rate = _BYTES_PER_SECOND[server.stock]
        transfer = 8 * chunk * (batch.n_in + batch.n_out) / rate
        each = measured
        if each is None:
            each = one + _PER_ITEM * compute * (chunk - 1) + transfer
        return math.ceil(chunks / in_flight) * each
    # jacobian
    return points * _jacobian_fetch(batch, server, one, compute) + _contraction(batch)


def _jacobian_fetch(batch: Batch, server: Server, one: float, compute: float) -> float:
    fetch = server.latency(JACOBIAN, batch.size, 1)
    if fetch is None:
        rows = min(batch.n_in, batch.n_out)
        fetch = one + _PER_ROW * compute * (rows - 1)
        fetch += 8 * batch.n_in * batch.n_out / _BYTES_PER_SECOND[server.stock]
    return fetch


def _contraction(batch: Batch) -> float:
    basis = batch.k == (batch.n_in if batch.kind == JVP else batch.n_out)
    if basis:
        return _FLOP * batch.points * batch.n_in * batch.n_out
    return _FLOP * batch.points * batch.k * batch.n_in * batch.n_out


def _jacobian_share(batch: Batch, server: Server, reuse: int) -> float:
    """A Jacobian's cost for one of `reuse` batches it serves: its fetch shared,
    its contraction paid each time."""
    fetch = estimate_cost(Plan("jacobian"), batch, server) - _contraction(batch)
    return fetch / reuse + _contraction(batch)


#
# Planning a call: the rule's plan, checked against the server, and said
#


def decide(
    rule: AbstractBatching, batch: Batch, server: Server
) -> tuple[Decision, Plan]:
    """The decision for `batch` under `rule` and the plan it makes, without
    recording anything."""
    if isinstance(rule, Auto):
        plan, estimates = rule._choose(batch, server)
    else:
        plan, estimates = rule.plan(batch, server), {}
    named = _name(rule)
    if batch.kind == APPLY and named == "jacobian":
        named = None  # `Jacobian` sends points as `Auto` does: its documented rule
    if servable(plan, batch, server):
        if estimates:
            reason = f"{_describe(batch)}: estimated {_ranked(estimates)}"
        elif isinstance(rule, Auto) or named is None and isinstance(rule, Jacobian):
            reason = f"{_describe(batch)}: `{plan.rule}`, {_why_auto(plan, batch)}"
        else:
            reason = f"{_describe(batch)}: `{plan.rule}`, as asked"
        return Decision(batch.kind, batch.items, plan.rule, estimates, reason), plan
    auto = Auto(jacobian=plan.rule != "jacobian")
    fallback, estimates = auto._choose(batch, server)
    if not servable(fallback, batch, server):
        fallback, estimates = Auto()._choose(batch, server)
    asked = named or type(rule).__name__
    reason = (
        f"`{plan.rule}` (asked by `{asked}`) is not served here; "
        f"{_describe(batch)}: `{fallback.rule}` instead"
        + (f", estimated {_ranked(estimates)}" if estimates else "")
    )
    decision = Decision(
        batch.kind, batch.items, fallback.rule, estimates, reason, fallback=True
    )
    return decision, fallback


def plan_call(client, rule: AbstractBatching, batch: Batch) -> Plan:
    """The plan for `batch` under `rule`, made now (when the call is traced) and
    recorded: a `Decision` in `client.decisions` where there was a choice (not for
    one item sent as it is), and a `FallbackWarning` where the rule was not served."""
    decision, plan = decide(rule, batch, server_of(client, batch.kind))
    if decision.fallback:
        fall_back(client, decision, stacklevel=4)
    elif batch.items > 1 or decision.chosen != "sequential":
        client.telemetry.record_decision(decision)
        logger.debug("%s planned `%s`: %s", batch.kind, plan.rule, decision.reason)
    return plan


def server_of(client, kind: str) -> Server:
    """What `client`'s servers serve, for planning a batch of `kind`."""
    schema = client.schema
    endpoints = frozenset(e for e in schema.endpoints if schema.has(e))
    return Server(
        endpoints=endpoints,
        parallelism=client.parallelism_for(kind),
        max_batch=client.capabilities.max_batch,
        stock=client.capabilities.is_stock,
        latency=client.latency.get,
    )


def _describe(batch: Batch) -> str:
    if batch.kind == APPLY:
        return f"P={batch.points} points of {batch.size} numbers"
    where = f" at each of P={batch.points} points" if batch.points > 1 else ""
    return f"K={batch.k}{where}, n_in={batch.n_in}, n_out={batch.n_out}"


def _ranked(costs: dict[str, float]) -> str:
    return ", ".join(f"{r}={c * 1e3:.2f} ms" for r, c in sorted(costs.items()))


def _why_auto(plan: Plan, batch: Batch) -> str:
    if batch.kind == APPLY:
        return "the fewest round trips the server allows"
    return "one (co)tangent to the plain endpoint"


def _name(rule: AbstractBatching) -> str | None:
    """The built-in rule `rule` is (a subclass of one is that rule); `None` for
    `Auto` and for a rule of the user's own."""
    if isinstance(rule, Auto):
        return None
    for name, cls in _SHORTHANDS.items():
        if isinstance(rule, cls):
            return name
    return None
