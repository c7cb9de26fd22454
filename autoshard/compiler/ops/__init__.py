"""Registry of per-primitive sharding rules, one file per op family.

A rule maps every tensor dim of an equation to *factors* (as OpenXLA Shardy does): a factor
is one loop of the op's iteration space, shared by every tensor dim it indexes. Example,
``dot_general`` of ``x[m,k] @ w[k,n]``::

    factors  m:pass  k:sum  n:pass
    operands x: (m)(k)   w: (k)(n)
    result      (m)(n)

Splitting ``k`` over mesh axis ``a`` makes the result ``P(sum)`` over ``a``. Factor kinds
(``kinds.FactorKind``):

- ``pass``: may be split; operands and results carrying it are split alike;
- ``sum`` / ``max`` / ``min``: reduction factors; splitting makes the result partial;
- ``replicate``: must not be split (sort axis, sliced or padded dims, ...).

A dim listing several factors (reshape ``[6,4] -> [24]`` gives ``(f6, f4)``) is their
product, major first; a dim of size 1 lists none and is never split.

Each ``OpRule`` also says which operands may stay partial (``partial``, a
``kinds.PartialMode``, see ``partial_passes``) and how to localise params for the per-device
program.

A primitive with no rule gets ``FALLBACK``: every dim of every operand and result is a
``replicate`` factor, so its operands are gathered (partials reduced) to ``B``, it runs on
whole values with its own params on every device, and its results are ``B``: always correct,
at the price of the collectives that replicate its operands (``ShardedProgram.fallbacks``
lists them; ``parallelize(strict=True)`` refuses instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from ...errors import UnsupportedPrimitiveError
from ..kinds import FactorKind, PartialMode


@dataclass(frozen=True)
class FactorRule:
    sizes: tuple[int, ...]
    kinds: tuple[FactorKind, ...]
    operands: tuple[tuple[tuple[int, ...], ...], ...]
    results: tuple[tuple[tuple[int, ...], ...], ...]
    # Operands that accumulate into the result (scatter-add's operand): when a reduction
    # factor is split they must carry the same partial as the result.
    accumulators: tuple[int, ...] = ()
    # Values of nested bodies (control flow) tied to this equation's factors: pairs of
    # (Value, dims). Propagation moves layouts across the region boundary through them.
    linked: tuple = ()
    # A user's rule (register_rule / with_rule): its op is split only where its operands
    # already are; the chooser invents no split of its own for it (factors.candidate_assignments).
    user: bool = False


class FactorBuilder:
    """Collects factors while a rule walks an equation's dims."""

    def __init__(self):
        self.sizes: list[int] = []
        self.kinds: list[FactorKind] = []

    def new(self, size: int, kind: FactorKind = FactorKind.PASS) -> tuple[int, ...]:
        """A fresh factor for one dim; size-1 dims get none (never split)."""
        if size == 1:
            return ()
        return self.add(size, kind)

    def even(self, size: int, kind: FactorKind = FactorKind.PASS) -> tuple[int, ...]:
        """A fresh factor made compound with a size-1 ``replicate`` one, so that it is only
        split evenly (``factors.compound_factors``); size-1 dims get none."""
        f = self.new(size, kind)
        return f + self.add(1, FactorKind.REPLICATE) if f else f

    def add(self, size: int, kind: FactorKind) -> tuple[int, ...]:
        """A fresh factor, even of size 1 (``conv._even`` pairs a factor with a size-1
        ``replicate`` one so that it is compound and splits only evenly)."""
        self.sizes.append(int(size))
        self.kinds.append(FactorKind(kind))
        return (len(self.sizes) - 1,)

    def build(self, operands, results, accumulators=(), linked=()) -> FactorRule:
        return FactorRule(tuple(self.sizes), tuple(self.kinds),
                          tuple(tuple(o) for o in operands), tuple(tuple(r) for r in results),
                          tuple(accumulators), tuple((v, tuple(d)) for v, d in linked))


@dataclass(frozen=True)
class LocalContext:
    """Per-device view of one equation, handed to ``localize`` and ``lower``."""
    in_shapes: tuple          # local operand shapes
    out_shapes: tuple         # local result shapes
    in_layouts: tuple
    out_layouts: tuple
    axis_sizes: dict


@dataclass(frozen=True)
class OpRule:
    factors: Callable                          # (eqn) -> FactorRule
    partial: PartialMode | Callable = PartialMode.NONE   # a mode, or (eqn) -> mode
    localize: Callable | None = None           # (eqn, ctx) -> params for the local bind
    lower: Callable | None = None              # (eqn, ctx, args) -> outs, replaces bind
    # Collectives the rule's own ``lower`` runs (halo exchanges, prefix sums):
    # (eqn, ctx) -> [(operand index, planner.Transform, reason)]. The report lists them with
    # the planned reshards; ``lower`` must run exactly these.
    internal: Callable | None = None
    # Price ``internal`` in the choice of the op's factor assignment (its collectives depend
    # on where the moved rows sit, not only on the layouts: a slice's re-indexing).
    priced: bool = False
    # True only for ``FALLBACK``: no rule is known, the equation runs on replicated operands.
    fallback: bool = False

    def partial_mode(self, eqn) -> PartialMode:
        return PartialMode(self.partial(eqn)) if callable(self.partial) else self.partial

    def local_params(self, eqn, ctx: LocalContext) -> dict:
        params = self.localize(eqn, ctx) if self.localize else dict(eqn.params)
        # Global sharding params (set when a mesh is in context at trace time) mean nothing
        # inside the per-device program.
        for key in ("sharding", "out_sharding"):
            if params.get(key) is not None:
                params[key] = None
        return params


RULES: dict[str, OpRule] = {}


def register(*prims, partial=PartialMode.NONE, localize=None, lower=None, internal=None, priced=False):
    """Decorator: ``@register(lax.add_p, lax.sub_p, partial=PartialMode.SAME_SUM)`` on a factor
    function."""
    if not callable(partial):
        partial = PartialMode(partial)

    def deco(fn):
        for p in prims:
            name = p if isinstance(p, str) else p.name
            RULES[name] = OpRule(fn, partial, localize, lower, internal, priced)
        return fn
    return deco


def local_context(eqn, in_layouts, out_layouts, axis_sizes) -> LocalContext:
    return LocalContext(
        tuple(lay.local_shape(v.shape, axis_sizes) for v, lay in zip(eqn.invars, in_layouts)),
        tuple(lay.local_shape(o.shape, axis_sizes) for o, lay in zip(eqn.outvars, out_layouts)),
        tuple(in_layouts), tuple(out_layouts), axis_sizes)


def replicated_factors(eqn) -> FactorRule:
    """Every dim of every operand and result its own ``replicate`` factor."""
    fb = FactorBuilder()
    return fb.build([[fb.new(s, "replicate") for s in v.shape] for v in eqn.invars],
                    [[fb.new(s, "replicate") for s in o.shape] for o in eqn.outvars])


#: The rule of a primitive autoshard knows nothing about: computed on replicated operands.
FALLBACK = OpRule(replicated_factors, fallback=True)


#: Primitives the fallback cannot compute either: ``parallelize`` raises
#: ``UnsupportedPrimitiveError`` with this detail (strict or not) instead of failing in lowering.
REFUSED: dict[str, str] = {
    "shard_map": ("a jax.shard_map inside a parallelized function is not supported yet (its body is "
                  "per-device code that cannot be re-bound inside autoshard's own shard_map)"),
}


def get_rule(eqn) -> OpRule:
    """The rule for ``eqn``'s primitive; ``FALLBACK`` (``rule.fallback``) when it has none."""
    _load_families()
    return RULES.get(eqn.prim.name, FALLBACK)


def extreme_value(dtype, low: bool):
    """The lowest (``low``) or highest value of ``dtype``: the identity of max (min)."""
    dtype = np.dtype(dtype)
    if jax.dtypes.issubdtype(dtype, np.floating):
        return -np.inf if low else np.inf
    if dtype == np.bool_:
        return not low
    info = np.iinfo(dtype)
    return info.min if low else info.max


def reduction_identity(op: str, dtype):
    """What padding must hold so a reduction with ``op`` ignores it."""
    return 0 if op == FactorKind.SUM else extreme_value(dtype, low=(op == FactorKind.MAX))


def partial_passes(mode: PartialMode, eqn, operand_partials) -> bool:
    """Whether the op maps partial operands to a partial result of the same kind.

    ``operand_partials[i]`` is the tuple of ``(axis, op)`` pairs operand ``i`` is partial over;
    the modes are described in ``kinds.PartialMode``.
    """
    mode = PartialMode(mode)
    partial_idx = [i for i, p in enumerate(operand_partials) if p]
    if not partial_idx or mode is PartialMode.NONE:
        return not partial_idx
    ops = {op for i in partial_idx for _, op in operand_partials[i]}
    if mode is PartialMode.UNARY_ANY:
        return partial_idx == [0]
    if mode.shape == "unary":
        return partial_idx == [0] and ops == {mode.op}
    if mode is PartialMode.SAME_SUM:
        first = operand_partials[0]
        return ops == {"sum"} and all(
            p == first and not v.is_const for p, v in zip(operand_partials, eqn.invars))
    if mode.shape == "same":
        kinds = {operand_partials[i] for i in partial_idx}
        return ops == {mode.op} and len(kinds) == 1
    if mode is PartialMode.ONE_SUM:
        return ops == {"sum"} and len(partial_idx) == 1
    if mode is PartialMode.FIRST_SUM:
        return ops == {"sum"} and partial_idx == [0]
    raise AssertionError(f"unhandled partial mode {mode!r}")


_LOADED = False


def _load_families():
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from . import constraint, control_flow, dot, elementwise, indexing, random, reduction, shape, conv  # noqa: F401
        from . import linalg, sort  # noqa: F401
