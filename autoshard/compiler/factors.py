"""Factor-level propagation step for one equation (Shardy's projection, merge, project back).

1. *Project* each known tensor layout onto the op's factors: a dim made of factors (6)(4)
   split over ``[x, y]`` gives ``x`` to the major factor and ``y`` to the minor one only once
   the major factor is fully split.
2. *Merge* per factor into candidate assignments: the longest of prefix-compatible lists, the
   list of the highest-priority tensor (user annotations first) on conflict, each tensor's own
   projection, and "nothing split". A mesh axis may serve one factor only: conflicts become
   variants, one per factor that could keep the axis.
3. *Cost* every candidate with the alpha-beta model: reshards of operands into the layouts
   the candidate needs, reshards of results from the layouts it produces into the layouts
   already chosen for them (partials priced as their reduction), plus per-device compute as a
   tie-breaker that prefers splitting work.
4. *Project back* the cheapest assignment onto every tensor.

>>> # x[8,16] @ w[16,32] with x S(0) on data and w S(1) on model:
>>> # factors m:8 k:16(sum) n:32 -> assignment m=(data,) k=() n=(model,)
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from .cost_model import assignment_points
from .kinds import REDUCTION_KINDS, FactorKind
from .layout import Layout
from .planner import reshard_time

# Seconds per unit of per-device work, a tie-breaker only: comm cost dominates any real choice.
COMPUTE_SECONDS_PER_POINT = 1e-13

Assignment = tuple  # tuple[tuple[str, ...], ...], one entry per factor


@dataclass
class Tensor:
    """One operand or result of the equation, as the chooser sees it."""
    dims: tuple                   # per dim: factor ids (major -> minor)
    shape: tuple
    itemsize: int
    layout: Layout | None         # current layout, None if not decided yet
    priority: int = 1             # 0 = user annotation (closed), 1 = propagated
    is_result: bool = False
    accumulator: bool = False     # scatter-add operand: must carry the result's partial
    keep_partial: tuple = ()      # (axis, op) pairs this operand passes through to the results
    # Times its reshard runs per run of the equation: below 1 for a loop-invariant operand
    # of an equation in a loop body (a weight the loop reads: its reshard is hoisted out of
    # the loop and runs once, the equation's every trip; ``ir.hoisted_runs``).
    weight: float = 1.0
    # Propagation only: an open result's layout is not final yet. A candidate that makes it
    # more split than it is now costs no reshard of it (propagation refines it to that), as
    # for a result without a layout; only settled layouts are targets to reshard into. Every
    # candidate is charged the bytes it leaves the result held in, as for an undecided one.
    refinable: bool = False


def project(dims, layout: Layout, sizes, axis_sizes) -> dict[int, tuple[str, ...]]:
    out: dict[int, list] = {}
    for fids, axes in zip(dims, layout.dims):
        if not axes or not fids:
            continue
        if len(fids) == 1:          # a dim of one factor takes every axis, even unevenly
            out[fids[0]] = tuple(axes)
            continue
        k, rem = 0, sizes[fids[0]]
        for a in axes:
            n = axis_sizes[a]
            while rem == 1 and k + 1 < len(fids):
                k += 1
                rem = sizes[fids[k]]
            if rem % n != 0:
                break
            out.setdefault(fids[k], []).append(a)
            rem //= n
    return {f: tuple(v) for f, v in out.items()}


def project_back(assignment: Assignment, dims, sizes, axis_sizes) -> tuple | None:
    """Layout dims of one tensor under ``assignment``; None when a minor factor is split
    while a more major factor of the same dim is not fully split (not expressible)."""
    return _project_back(assignment, dims, sizes, tuple(axis_sizes.items()))


@functools.lru_cache(maxsize=1 << 16)
def _project_back(assignment, dims, sizes, axis_size_items):
    axis_sizes = dict(axis_size_items)
    out = []
    for fids in dims:
        axes: tuple = ()
        for i, f in enumerate(fids):
            fa = assignment[f]
            if fa and i > 0:
                prev = fids[i - 1]
                if math.prod(axis_sizes[a] for a in assignment[prev]) != sizes[prev]:
                    return None
            axes += fa
        out.append(axes)
    return tuple(out)


def _prefix_compatible(a, b):
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _merge(lists_with_priority):
    """Longest list if all are prefix-compatible; else the best-priority list (common prefix
    of the tied best ones)."""
    lists = [l for l, _ in lists_with_priority]
    longest = max(lists, key=len)
    if all(_prefix_compatible(l, longest) for l in lists):
        return longest
    best = min(p for _, p in lists_with_priority)
    top = [l for l, p in lists_with_priority if p == best]
    common = top[0]
    for l in top[1:]:
        n = 0
        while n < min(len(common), len(l)) and common[n] == l[n]:
            n += 1
        common = common[:n]
    return common


def _tensor_factor_sets(rule) -> list[frozenset]:
    """The factors each tensor carries: a mesh axis may serve only one factor *of a tensor*
    (factors that never meet in one tensor, like a loop's input and output, may share it)."""
    return [frozenset(f for d in dims for f in d)
            for dims in (*rule.operands, *rule.results, *(d for _, d in rule.linked)) if dims]


def axis_conflicts(assignment, rule) -> list[tuple[str, list[int]]]:
    conflicts = {}
    # A reduction factor's axis combines the devices along it, so every other factor must
    # hold the same block on all of them: no other factor of the op may use that axis (a
    # vocab-parallel lookup cannot also split the batch over the vocabulary's axis).
    every = frozenset(range(len(assignment)))
    reducing = [f for f in every if rule.kinds[f] in REDUCTION_KINDS and assignment[f]]
    for fs in _tensor_factor_sets(rule) + ([every] if reducing else []):
        owners: dict[str, list[int]] = {}
        for f in sorted(fs):
            for a in assignment[f]:
                owners.setdefault(a, []).append(f)
        for a, claim in owners.items():
            if len(claim) > 1:
                conflicts.setdefault(a, set()).update(claim)
    return [(a, sorted(fs)) for a, fs in conflicts.items()]


def compound_factors(rule) -> frozenset:
    """Factors that share a dim with another factor (reshape): these must split evenly.
    Factors alone in their dims may split unevenly (padded, masked where it matters)."""
    return frozenset(f for dims in (*rule.operands, *rule.results, *(d for _, d in rule.linked))
                     for d in dims if len(d) > 1 for f in d)


def legalize(assignment, rule, axis_sizes, reserved) -> list[Assignment]:
    """Drop axes on replicate factors and reserved axes, truncate compound factors at
    non-dividing axes, and split axis conflicts into variants (each claimant keeps the
    axis once)."""
    sizes, kinds = rule.sizes, rule.kinds
    compound = compound_factors(rule)
    clean = []
    for f, axes in enumerate(assignment):
        if kinds[f] == FactorKind.REPLICATE:
            clean.append(())
            continue
        kept, rem = [], sizes[f]
        for a in axes:
            if a in reserved or (f in compound and rem % axis_sizes[a] != 0):
                break
            kept.append(a)
            rem //= axis_sizes[a]
        clean.append(tuple(kept))
    conflicts = axis_conflicts(clean, rule)
    if not conflicts:
        return [tuple(clean)]
    variants = []
    for choice in itertools.product(*[fs for _, fs in conflicts]):
        v = list(clean)
        for (a, fs), keep in zip(conflicts, choice):
            for f in fs:
                if f != keep and a in v[f]:
                    v[f] = v[f][:v[f].index(a)]
        if not axis_conflicts(v, rule):
            variants.append(tuple(v))
    return variants


def merged_assignment(rule, tensors, axis_sizes) -> tuple[Assignment, bool]:
    """Per factor, the merge of every known tensor's projection, and whether the tensors
    agree (all lists prefix-compatible and no mesh axis claimed by two factors)."""
    n = len(rule.sizes)
    projections = [(project(t.dims, t.layout, rule.sizes, axis_sizes), t.priority)
                   for t in tensors if t.layout is not None]
    merged, agree = [], True
    for f in range(n):
        lists = [(p[f], prio) for p, prio in projections if f in p]
        m = _merge(lists) if lists else ()
        agree &= all(_prefix_compatible(l, m) for l, _ in lists)
        merged.append(m)
    agree &= not axis_conflicts(merged, rule)
    return tuple(merged), agree, projections


def candidate_assignments(rule, tensors, axis_sizes, reserved=()) -> list[Assignment]:
    n = len(rule.sizes)
    merged, _, projections = merged_assignment(rule, tensors, axis_sizes)
    raw = [merged]
    for p, _ in projections:
        taken = {a for ax in p.values() for a in ax}
        raw.append(tuple(p.get(f, merged[f] if not taken & set(merged[f]) else ()) for f in range(n)))
        # Where this tensor splits a summed factor (a weight split over the contracted dim):
        # its factors, the others' from another tensor less the axes it takes. The batch,
        # split over (data, model), then keeps model where the weight's data split wins,
        # instead of losing both (merged lists conflict and are cut at data). Not for pass
        # factors: a batch moved onto model alone there spreads (model; data on channels)
        # layouts that later all-gather over model to meet (data, model) ones.
        for q, _ in projections:
            if q is not p and any(rule.kinds[f] in REDUCTION_KINDS and p[f] for f in p):
                raw.append(tuple(p[f] if f in p else tuple(a for a in q.get(f, ()) if a not in taken)
                                 for f in range(n)))
    raw.append(((),) * n)
    if not rule.user:
        raw += [v for r in raw for v in relocated(r, rule, axis_sizes)]
    out, seen = [], set()
    for r in raw:
        for v in legalize(r, rule, axis_sizes, set(reserved)):
            if v not in seen:
                seen.add(v)
                out.append(v)
    return out


def with_spare_axes(candidates, rule, tensors, axis_sizes, reserved=(), allowed=None) -> list[Assignment]:
    """``candidates`` and, after them, each with one *spare* mesh axis (one that no tensor of the
    equation carries, split or partial, nor the candidate) added to one factor it divides. Along
    a spare axis every device holds the operands whole and repeats the op's work: splitting a
    factor there slices the operands locally (no bytes), divides the work, and leaves the result
    split (or partial) over it, to be gathered (or reduced) into its layout. The cost model
    prices that collective against the work saved: the gradient of a weight that a tensor-
    parallel axis leaves replicated (a language model head under fsdp+tp) runs split over it
    and is gathered on its reduce-scattered shard, a quarter of the work for the same bytes."""
    if rule.user:                       # a user's op is split only where its operands are
        return candidates
    held = {a for t in tensors if t.layout is not None
            for a in (*t.layout.split_axes, *(x for x, _ in t.layout.partial))}
    spare = [a for a in axis_sizes if a not in held and a not in reserved and axis_sizes[a] > 1
             and (allowed is None or a in allowed)]
    if not spare:
        return candidates
    out, seen = list(candidates), set(candidates)
    compound = compound_factors(rule)
    for cand in candidates:
        taken = {a for ax in cand for a in ax}
        for a in spare:
            if a in taken:
                continue
            for f, axes in enumerate(cand):
                if rule.kinds[f] == FactorKind.REPLICATE:
                    continue
                v = tuple(ax + (a,) if g == f else ax for g, ax in enumerate(cand))
                if (rule.sizes[f] % math.prod(axis_sizes[x] for x in v[f]) or v in seen
                        or axis_conflicts(v, rule)):
                    continue
                if f in compound and any(project_back(v, dims, rule.sizes, axis_sizes) is None
                                         for dims in (*rule.operands, *rule.results)):
                    continue
                seen.add(v)
                out.append(v)
    return out


def relocated(assignment, rule, axis_sizes) -> list[Assignment]:
    """Variants of ``assignment`` that move the axes of a ``replicate`` factor onto another
    unsplit ``pass`` factor of a tensor holding both, where they divide it. Dropping them gathers the
    tensor whole and repeats the op's work on every device; moving them is one all-to-all
    (an eighth of the all-gather's bytes on 8 devices), and the work and the memory its values
    hold stay split. The cost model prices both."""
    kinds, sizes = rule.kinds, rule.sizes
    out = []
    for f, axes in enumerate(assignment):
        if kinds[f] != FactorKind.REPLICATE or not axes:
            continue
        # Nearest first (ties: the minor side): the choice is by cost, and
        # among equal costs the first wins; a nearby dim keeps the other dims' splits as they are.
        targets = {}
        for dims in (*rule.operands, *rule.results):
            home = [i for i, d in enumerate(dims) if f in d]
            if not home:
                continue
            for i, d in enumerate(dims):
                for g in d:
                    if kinds[g] == FactorKind.PASS and not assignment[g]:
                        rank = (abs(i - home[0]), i < home[0])
                        targets[g] = min(targets.get(g, rank), rank)
        for g in sorted(targets, key=lambda g: (targets[g], g)):
            if sizes[g] % math.prod(axis_sizes[a] for a in axes) == 0:
                out.append(_moved(assignment, f, g))
    # A dim of several factors split only on a minor one is not expressible (the reshape of
    # a [n, s] pair back into one dim): the more major factor takes the axes instead where
    # they divide it, else the minor factor drops them (gathered, as before the split).
    for dims in (*rule.operands, *rule.results):
        for fids in dims:
            for i, f in enumerate(fids[:-1]):
                if math.prod(axis_sizes[a] for a in assignment[f]) == sizes[f]:
                    continue
                for g in fids[i + 1:]:
                    axes = assignment[g]
                    if not axes:
                        continue
                    if (kinds[f] == FactorKind.PASS
                            and sizes[f] % math.prod(axis_sizes[a] for a in assignment[f] + axes) == 0):
                        out.append(_moved(assignment, g, f))
                    out.append(tuple(() if h == g else a for h, a in enumerate(assignment)))
                break
    return out


def _moved(assignment, f, g) -> Assignment:
    v = list(assignment)
    v[f], v[g] = (), tuple(v[g]) + tuple(v[f])
    return tuple(v)


def required_layout(t: Tensor, assignment, rule, axis_sizes, result_partial) -> Layout | None:
    dims = project_back(assignment, t.dims, rule.sizes, axis_sizes)
    if dims is None:
        return None
    partial = set(t.keep_partial)
    if t.accumulator:
        partial |= set(result_partial)
    return Layout(dims, tuple(sorted(partial)))


def result_partial(assignment, rule) -> tuple:
    return _result_partial(assignment, rule.kinds)


@functools.lru_cache(maxsize=1 << 16)
def _result_partial(assignment, kinds) -> tuple:
    # str(): a layout's partial op is a plain string ("sum"), whatever spells the kind.
    return tuple(sorted((a, str(kinds[f])) for f, axes in enumerate(assignment)
                        if kinds[f] in REDUCTION_KINDS for a in axes))


# An undecided result takes the layout this choice gives it, and its consumers take it as is
# or move it: its per-device bytes are charged at this weight (of moving them once over the
# slowest link), so that of candidates whose reshards cost about the same, the one leaving a
# smaller, more split result wins. (A CNN head's input gradient left split over channels
# rather than the batch, to spare gathering a 640-byte weight, carried that split through the
# last block's backward activations: 100 KiB of all-to-alls.)
UNDECIDED_RESULT_WEIGHT = 0.5


def _undecided_result_time(want: Layout, t: Tensor, axis_sizes, links) -> float:
    local = math.prod(Layout(want.dims).local_shape(t.shape, axis_sizes)) * t.itemsize
    return UNDECIDED_RESULT_WEIGHT * local / min(link.bandwidth_bytes_per_s for link in links.values())


def assignment_cost(assignment, rule, tensors, axis_sizes, links, passed_partial=()):
    """Alpha-beta time of the reshards this assignment implies, plus compute; None if the
    assignment cannot be expressed on some tensor."""
    reduced = result_partial(assignment, rule)
    cost = 0.0
    for t in tensors:
        want = required_layout(t, assignment, rule, axis_sizes, reduced)
        if want is None:
            return None
        if t.is_result:
            produced = want.with_partial(set(reduced) | set(passed_partial))
            refined = t.layout is None or (t.refinable and Layout(want.dims).refines(t.layout))
            target = Layout(want.dims) if refined else t.layout
            cost += t.weight * reshard_time(produced, target, t.shape, t.itemsize, axis_sizes, links)
            if (t.layout is None or t.refinable) and links:
                # the bytes it will be held in: as made where it can take that layout, else
                # the layout it keeps (a candidate is not cheaper for leaving it whole)
                cost += _undecided_result_time(target, t, axis_sizes, links)
        elif t.layout is not None:
            cost += t.weight * reshard_time(t.layout, want, t.shape, t.itemsize, axis_sizes, links)
    return cost + assignment_points(rule.sizes, assignment, axis_sizes) * COMPUTE_SECONDS_PER_POINT


@dataclass(frozen=True)
class Choice:
    assignment: Assignment
    cost: float
    by_cost: bool          # the known layouts conflicted and the cost model decided
    candidates: int = 1


_CHOICES: dict = {}
_CHOICES_LIMIT = 1 << 18


def clear_caches() -> None:
    """Forget every memoized projection and choice (as DTensor's ``clear_sharding_prop_cache``):
    for timing the passes from cold, or after changing a rule at run time."""
    _CHOICES.clear()
    _project_back.cache_clear()
    _result_partial.cache_clear()


def choose(rule, tensors, axis_sizes, links, reserved=(), passed_partial=(), extra=None, spare=frozenset()) -> Choice:
    """:func:`choose_uncached`, memoized on everything it reads: repeated layers present the
    same rule and layouts again and again, and propagation revisits equations. With ``extra``
    (an op whose own lowering runs collectives that depend on params the rule does not show,
    as the offsets of a slice) it is not memoized."""
    if extra is not None:
        return choose_uncached(rule, tensors, axis_sizes, links, reserved, passed_partial, extra, spare)
    key = (rule.sizes, rule.kinds, rule.operands, rule.results, rule.accumulators, rule.user,
           tuple(d for _, d in rule.linked),
           tuple((t.dims, t.shape, t.itemsize, t.layout, t.priority, t.is_result, t.accumulator,
                  t.keep_partial, t.weight, t.refinable) for t in tensors),
           tuple(axis_sizes.items()), tuple(links.items()), frozenset(reserved), tuple(passed_partial), spare)
    hit = _CHOICES.get(key)
    if hit is None:
        if len(_CHOICES) >= _CHOICES_LIMIT:
            _CHOICES.clear()
        hit = _CHOICES[key] = choose_uncached(rule, tensors, axis_sizes, links, reserved, passed_partial,
                                              spare=spare)
    return hit


def choose_uncached(rule, tensors, axis_sizes, links, reserved=(), passed_partial=(), extra=None,
                    spare=frozenset()) -> Choice:
    """The assignment for one equation.

    Where the known tensors agree, their merge is taken as is (as Shardy's propagation
    does: annotations flow, and a weight split on a contracting dim stays split, leaving a
    partial result). Only where they conflict, or the merge is not legal here, are the
    candidates priced and the cheapest taken. ``extra(assignment)``: seconds of the op's own
    collectives under an assignment (``OpRule.priced``); with it, candidates are always priced
    (moving the rows a slice keeps can cost more than gathering its operand). ``spare``: every
    tensor's layout is final (insert_collectives): mesh axes (annotated ones; an axis no annotation
    names stays idle, ``parallelize(idle_axes=...)``) that the priced candidates may also split
    where no tensor carries them (:func:`with_spare_axes`).
    """
    def cost(a):
        c = assignment_cost(a, rule, tensors, axis_sizes, links, passed_partial)
        return c if c is None or extra is None else c + extra(a)
    merged, agree, _ = merged_assignment(rule, tensors, axis_sizes)
    if agree and extra is None:
        legal = legalize(merged, rule, axis_sizes, set(reserved))
        if legal == [merged]:
            c = assignment_cost(merged, rule, tensors, axis_sizes, links, passed_partial)
            if c is not None:
                return Choice(merged, c, False)
    best, best_cost = None, math.inf
    candidates = candidate_assignments(rule, tensors, axis_sizes, reserved)
    if spare:
        candidates = with_spare_axes(candidates, rule, tensors, axis_sizes, reserved, spare)
    for cand in candidates:
        c = cost(cand)
        if c is not None and c < best_cost - 1e-18:
            best, best_cost = cand, c
    if best is None:
        best = ((),) * len(rule.sizes)
        best_cost = cost(best)
    return Choice(best, best_cost, not agree, len(candidates))
