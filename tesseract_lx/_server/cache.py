"""The server's linearisation cache: no forward pass twice at the same primal point.

Newton asks a Tesseract for `/apply` at a point, then a batch of JVPs, then Krylov
mat-vecs, all at the same primal point; a stock server recomputes the forward pass for
every one of them. This module keeps, for recent primal points, the *linearisation* of
the Tesseract's own `jacobian_vector_product` (resp. `vector_jacobian_product`) in its
tangent (resp. cotangent) argument, so that later requests at a cached point do tangent
work only.

**Why not tesseract-core's pieces alone.** tesseract-core 1.15 caches the backward pass
of its JAX recipe (`tesseract_core.runtime.experimental.set_jax_vjp_cache_size`), but
only for VJPs, only when `/apply` ran first, and bounded in entries only. Its
`LRUCache` (`tesseract_core.runtime.tree_transforms`) has no notion of bytes. So this
module brings:

- `LinearisationCache`: an LRU bounded in entries *and* bytes, keyed by a digest of the
  primal inputs' exact bytes (plus shapes, dtypes and static values) and the
  `(jvp_inputs, jvp_outputs)` / `(vjp_inputs, vjp_outputs)` sets;
- the linearisation itself: `jax.linearize` of the Tesseract's JVP/VJP function with
  respect to the (co)tangent. This works for any Tesseract whose JVP/VJP traces under
  JAX (the JAX recipe does); otherwise the plain function is called and that is
  remembered per signature.

tesseract-core's own VJP cache can be switched on as well (`CacheSettings.
tesseract_vjp_cache`), so that an `/apply` followed by a first VJP at the same point is
cheap too; it is off by default because it slows every `/apply` down (see there).

**The purity assumption.** A cached linearisation is reused for every later request at
the same primal point, and its compiled form at every point of the signature (any
state the Tesseract reads is a constant of the first trace), so the cache assumes the
Tesseract is a *pure function of its inputs*: same inputs, same outputs, whatever
happened in between. A Tesseract with hidden state (a module-level variable its
`apply` changes, a file it reads, a clock) gets stale JVPs and VJPs from it. Such a
Tesseract says so in its `tesseract_api.py`,

```python
TESSERACT_LX = {"pure": False}
```

and the server then runs without the cache; `tesseract-lx serve --no-cache` (or
`create_app(..., cache=False)`, `TESSERACT_LX_CACHE=0`) switches it off for any
Tesseract. `x-tesseract-lx` reports `pure` and `linearisation_cache`.

**Compiled once per signature.** The linearisation is `jax.jit`ted as a function of the
inputs' arrays (the rest of the inputs, their skeleton, is static: `trees.py`), so it
compiles once per signature (paths, shapes, dtypes, non-array values) and every later
primal point runs the compiled forward pass. Its linear map comes back from the jitted
function as a `jax.tree_util.Partial` whose leaves are the residuals and whose
structure (the linear jaxpr) is the same object for every point of a signature: a
jitted `(map, vector) -> map(vector)` then compiles once too. (Jitting the map of an
eager `jax.linearize` would recompile at every point: each has a new jaxpr.) Heavy
example at N=16: a miss 14 ms (eager: 12-25 ms), a hit 0.3 ms (eager: 0.8-1 ms). A
Tesseract whose JVP/VJP traces eagerly but not under `jit` (it reads concrete values,
e.g. to check them) is linearised eagerly at every point, as it always was.
"""

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import trees


logger = logging.getLogger("tesseract_lx.server")
_MiB = 1024 * 1024
# Signatures remembered (untraceable, compiled, eager only); past this, the oldest are
# forgotten (and tried once more when they come back).
_MAX_MEMO = 1024
# Jitted linearisations kept (each holds compiled code).
_MAX_COMPILED = 64


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class CacheSettings:
    """Settings of a `LinearisationCache`.

    **Arguments:**

    - `enabled`: whether JVP/VJP requests go through the cache at all.
    - `max_entries`: most linearisations kept at once.
    - `max_bytes`: most residual bytes kept at once; a single linearisation larger than
        this is used for its own request and not kept.
    - `jit`: compile the linearisation once per signature (`jax.jit`); off, it is
        traced anew at every point (for a Tesseract that misbehaves under `jit`).
    - `tesseract_vjp_cache`: also switch on tesseract-core's own VJP cache
        (`set_jax_vjp_cache_size(max_entries)`), which makes a JAX recipe's `/apply`
        keep its backward pass for a later VJP. Off by default: it runs every `/apply`
        through an eager `jax.vjp`, measured 4x (Bratu, 128x128) to 15x (a
        `fori_loop` forward pass) slower per `/apply`, while this cache already serves
        every VJP at a point after the first.
    """

    enabled: bool = True
    max_entries: int = 8
    max_bytes: int = 1024 * _MiB
    jit: bool = True
    tesseract_vjp_cache: bool = False

    @classmethod
    def from_env(cls, *, enabled: bool | None = None) -> "CacheSettings":
        """Settings from `TESSERACT_LX_CACHE` (`0`/`1`), `TESSERACT_LX_CACHE_ENTRIES`,
        `TESSERACT_LX_CACHE_MB`, `TESSERACT_LX_CACHE_JIT` (`0`/`1`) and
        `TESSERACT_LX_TESSERACT_VJP_CACHE` (`0`/`1`); `enabled`, when given, wins
        over the environment.
        """
        if enabled is None:
            enabled = _flag("TESSERACT_LX_CACHE", True)
        entries = int(os.environ.get("TESSERACT_LX_CACHE_ENTRIES", cls.max_entries))
        mb = float(os.environ.get("TESSERACT_LX_CACHE_MB", cls.max_bytes / _MiB))
        return cls(
            enabled=enabled,
            max_entries=entries,
            max_bytes=int(mb * _MiB),
            jit=_flag("TESSERACT_LX_CACHE_JIT", True),
            tesseract_vjp_cache=_flag("TESSERACT_LX_TESSERACT_VJP_CACHE", False),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "jit": self.jit,
            "tesseract_vjp_cache": self.tesseract_vjp_cache,
        }


def primal_digest(inputs: Any) -> str:
    """A digest of a primal point (a model, or a tree of dicts and lists): exact
    bytes, shapes and dtypes of every array leaf, and the type and `repr` of every
    other leaf.

    Never float equality: `0.0` and `-0.0` differ, a NaN equals itself.
    """
    return _digest(*trees.flatten(inputs))


def _digest(skeleton: Any, arrays: dict) -> str:
    """`primal_digest` of a point already split by `trees.flatten`."""
    h = hashlib.blake2b(repr(trees.key(skeleton)).encode(), digest_size=20)
    for arr in arrays.values():
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _struct(tree: Any) -> tuple:
    """Shapes and dtypes of a (co)tangent dict, as part of a key."""
    return tuple(
        (k, tuple(np.shape(v)), np.asarray(v).dtype.str)
        for k, v in sorted(tree.items())
    )


def _nbytes(tree: Any) -> int:
    import jax  # only JAX Tesseracts get a cache: a NumPy one never imports JAX

    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


class LinearisationCache:
    """An LRU of linear functions, bounded in entries and residual bytes.

    `call(kind, fn, inputs, ins, outs, vec)` is `fn(inputs, ins, outs, vec)` (`fn` a
    Tesseract's `jacobian_vector_product` / `vector_jacobian_product`) through the
    cached linearisation; `call_batch` the same for a stack of vectors (the batched
    endpoints). Counters `hits`, `misses`, `fallbacks`, `evictions` and `compiles`
    are public and reported by the server's `/health`.
    """

    def __init__(self, settings: CacheSettings | None = None):
        self.settings = settings or CacheSettings()
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[_Linear, int]] = OrderedDict()
        self._bytes = 0
        # Signatures whose function did not trace under JAX: called plainly from now
        # (an LRU, as every memo of a long-running server).
        self._untraceable: OrderedDict[Hashable, None] = OrderedDict()
        # Per signature and skeleton: the jitted linearisation, or "does not jit".
        self._jitted: OrderedDict[Hashable, Callable] = OrderedDict()
        self._eager: OrderedDict[Hashable, None] = OrderedDict()
        self.compiles = 0
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0
        self.evictions = 0

    # -- bookkeeping -----------------------------------------------------------------

    def _get(self, key: Hashable) -> "_Linear | None":
        with self._lock:
            item = self._entries.pop(key, None)
            if item is None:
                self.misses += 1
                return None
            self._entries[key] = item
            self.hits += 1
            return item[0]

    def _put(self, key: Hashable, fn: "_Linear", nbytes: int) -> None:
        s = self.settings
        if s.max_entries <= 0 or nbytes > s.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._entries and (
                len(self._entries) >= s.max_entries
                or self._bytes + nbytes > s.max_bytes
            ):
                _, (_, b) = self._entries.popitem(last=False)
                self._bytes -= b
                self.evictions += 1
            self._entries[key] = (fn, nbytes)
            self._bytes += nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.settings.as_dict(),
                "entries": len(self._entries),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
                "fallbacks": self.fallbacks,
                "evictions": self.evictions,
                "untraceable_signatures": len(self._untraceable),
                "compiled_signatures": len(self._jitted),
                "eager_signatures": len(self._eager),
                "compiles": self.compiles,
            }

    # -- linearisation ---------------------------------------------------------------

    def signature(
        self, kind: str, inputs: Any, ins: Iterable[str], outs: Iterable[str], vec: dict
    ):
        """The per-signature part of a key: kind, path sets, (co)tangent structure."""
        return (kind, tuple(sorted(ins)), tuple(sorted(outs)), _struct(vec))

    def is_untraceable(self, signature: Hashable) -> bool:
        with self._lock:
            if signature not in self._untraceable:
                return False
            self._untraceable.move_to_end(signature)
            return True

    def mark_untraceable(self, signature: Hashable) -> None:
        with self._lock:
            remember(self._untraceable, signature)
            self.fallbacks += 1

    def _compiled(
        self, sig, fn, inputs, ins, outs, skeleton, arrays
    ) -> tuple[Any, Callable | None, list]:
        """`(key, linearise, arrays)`: the key of the signature and skeleton, their
        jitted `arrays, vec -> (fn(vec), map)` (`None` when known not to trace under
        `jit`), and this point's arrays for it."""
        paths = list(arrays)
        key = (sig, trees.key(skeleton))
        leaves = [arrays[p] for p in paths]
        if not self.settings.jit:
            return key, None, leaves
        with self._lock:
            if key in self._eager:
                self._eager.move_to_end(key)
                return key, None, leaves
            linearise = self._jitted.get(key)
            if linearise is not None:
                self._jitted.move_to_end(key)
                return key, linearise, leaves
        import jax

        # The jitted function outlives this request: its template keeps the point's
        # structure and non-array values, not its arrays (those come as `leaves`).
        template = trees.rebuild(inputs, (), dict.fromkeys(paths))

        def traced(leaves: list, vec: dict) -> Any:
            self.compiles += 1  # once per trace, not per call
            point = trees.traced(template, skeleton, dict(zip(paths, leaves)))
            return jax.linearize(lambda v: fn(point, set(ins), set(outs), v), vec)

        linearise = jax.jit(traced)
        with self._lock:
            remember(self._jitted, key, linearise, _MAX_COMPILED)
        return key, linearise, leaves

    def _linearise(self, kind, fn, inputs, ins, outs, vec, *, at_vec):
        """`(lin, out)`: the linear map, and `fn(..., vec)` when it was built at `vec`
        (a miss with `at_vec`), else `None`. `(None, None)` if `fn` does not trace.
        """
        ins, outs = set(ins), set(outs)
        sig = self.signature(kind, inputs, ins, outs, vec)
        if self.is_untraceable(sig):
            return None, None
        skeleton, arrays = trees.flatten(inputs)
        key = (sig, _digest(skeleton, arrays))
        lin = self._get(key)
        if lin is not None:
            return lin, None
        if at_vec:
            # Linearising at the request's own vector gives its answer as the primal
            # output, so a miss costs one JVP/VJP, not two.
            point = {k: np.asarray(v) for k, v in vec.items()}
        else:
            point = {
                k: np.zeros(np.shape(v), np.asarray(v).dtype) for k, v in vec.items()
            }
        import jax

        compiled_key, linearise, leaves = self._compiled(
            sig, fn, inputs, ins, outs, skeleton, arrays
        )
        out = None
        if linearise is not None:
            try:
                out, partial = linearise(leaves, point)
                lin = _Linear(partial, jitted=True)
            except Exception as e:
                # Reads concrete values (or raises): eagerly, from now on.
                logger.debug("linearising eagerly: it does not trace under jit: %r", e)
                with self._lock:
                    self._jitted.pop(compiled_key, None)
                    remember(self._eager, compiled_key)
        if lin is None:
            try:
                out, partial = jax.linearize(lambda v: fn(inputs, ins, outs, v), point)
                lin = _Linear(partial, jitted=False)
            except Exception:
                # Not traceable (NumPy code, a callback, ...): a genuine error in the
                # Tesseract shows up again, unmasked, when it is called plainly.
                self.mark_untraceable(sig)
                return None, None
        self._put(key, lin, _nbytes(lin.partial))
        return lin, (out if at_vec else None)

    def call(
        self,
        kind: str,
        fn: Callable,
        inputs: Any,
        ins: Iterable[str],
        outs: Iterable[str],
        vec: dict[str, Any],
    ) -> Any:
        """`fn(inputs, ins, outs, vec)`, through the linearisation when it traces."""
        lin, out = self._linearise(kind, fn, inputs, ins, outs, vec, at_vec=True)
        if lin is None:
            return fn(inputs, ins, outs, vec)
        if out is not None:
            return out
        return lin({k: np.asarray(v) for k, v in vec.items()})

    def linear(
        self,
        kind: str,
        fn: Callable,
        inputs: Any,
        ins: Iterable[str],
        outs: Iterable[str],
        vec: dict[str, Any],
    ) -> "_Linear | None":
        """The linear map `v -> fn(inputs, ins, outs, v)` at this point, cached or
        built (and stored); `vec` gives only the shapes and dtypes. `None` if `fn`
        does not trace under JAX (remembered for the signature)."""
        return self._linearise(kind, fn, inputs, ins, outs, vec, at_vec=False)[0]

    def call_batch(
        self,
        kind: str,
        fn: Callable,
        inputs: Any,
        ins: Iterable[str],
        outs: Iterable[str],
        vecs: dict[str, Any],
    ) -> Any:
        """`fn(inputs, ins, outs, v)` for every `v` stacked along axis 0 of `vecs`, by
        `jax.vmap` of the linearisation; `None` if `fn` does not trace under JAX
        (remembered for the signature: later calls return `None` straight away)."""
        first = {p: v[0] for p, v in vecs.items()}
        lin = self.linear(kind, fn, inputs, ins, outs, first)
        if lin is None:
            return None
        return lin.batch({k: np.asarray(v) for k, v in vecs.items()})


class _Linear:
    """A cached linear map (a `jax.tree_util.Partial` from `jax.linearize`), applied
    by a jitted function when it came from the jitted linearisation (its structure is
    then shared by every point of the signature), else eagerly."""

    def __init__(self, partial: Any, *, jitted: bool):
        self.partial = partial
        self.jitted = jitted

    def __call__(self, vec: dict) -> Any:
        if self.jitted:
            return _appliers()[0](self.partial, vec)
        return self.partial(vec)

    def batch(self, vecs: dict) -> Any:
        if self.jitted:
            return _appliers()[1](self.partial, vecs)
        import jax

        return jax.vmap(self.partial)(vecs)


@functools.cache
def _appliers() -> tuple[Callable, Callable]:
    """Jitted `(map, v) -> map(v)` and its `vmap` over `v` (JAX imported on first use:
    a NumPy Tesseract never imports it)."""
    import jax

    return (
        jax.jit(lambda lin, v: lin(v)),
        jax.jit(jax.vmap(lambda lin, v: lin(v), in_axes=(None, 0))),
    )


def remember(
    memo: OrderedDict, key: Hashable, value: Any = None, limit: int = _MAX_MEMO
) -> None:
    """Put `key` last in the LRU `memo`, forgetting the oldest past `limit`."""
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > limit:
        memo.popitem(last=False)


def enable_tesseract_vjp_cache(size: int) -> None:
    """Switch on tesseract-core's own JAX-recipe VJP cache (`/apply` then VJP)."""
    from tesseract_core.runtime.experimental import set_jax_vjp_cache_size

    set_jax_vjp_cache_size(size)
