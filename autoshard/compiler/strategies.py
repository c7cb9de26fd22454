"""Strategies of one equation for the layout search (``passes/auto_search``): which mesh axes
go to which of its factors, and which operands it reads still partial.

A strategy is an assignment (one tuple of mesh axes per factor of the equation's factor rule,
as ``factors`` uses) or a ``PassPartial`` wrapping one. The search adds one mesh axis at a
time: for ``x[8,16] @ w[16,32]`` (factors m:8, k:16 sum, n:32) and axis ``model`` of size 4,

>>> from autoshard.compiler.ops import FactorBuilder
>>> fb = FactorBuilder(); m, k, n = fb.new(8), fb.new(16, "sum"), fb.new(32)
>>> fr = fb.build([[m, k], [k, n]], [[m, n]])
>>> axis_strategies(fr, {"model": 4}, ((), (), ()), "model")
[((), (), ()), (('model',), (), ()), ((), ('model',), ()), ((), (), ('model',))]
>>> result_layout(fr, ((), ("model",), ()), 0, {"model": 4})       # k split: partial result
Layout(dims=((), ()), partial=(('model', 'sum'),))

Each strategy implies a layout of every operand and result (``operand_layout``,
``result_layout``); equations with one live operand and no reduction ``follow`` their
operand's layout instead of being searched.
"""
from __future__ import annotations

import dataclasses
import math


from .. import compat
from .factors import axis_conflicts, compound_factors, legalize, project, project_back, result_partial
from .kinds import REDUCTION_KINDS, FactorKind, PartialMode
from .layout import Layout
from .ops import get_rule


@dataclasses.dataclass(frozen=True)
class PassPartial:
    """A strategy of an equation linear in some operands (add, sub, mul, dot_general,
    reduce_sum) that reads ``operands`` still partial over ``axes`` and leaves its result
    partial over them: the reduction happens once, further on (the gradients of q, k and v
    summed before one all-reduce, as in Megatron's backward pass)."""
    assignment: tuple
    axes: tuple
    operands: tuple


def assignment_of(strategy) -> tuple:
    return strategy.assignment if isinstance(strategy, PassPartial) else strategy


def passed_partials(strategy, operand=None) -> tuple:
    """The ``(axis, "sum")`` pairs a strategy passes on (to ``operand``, or to its result)."""
    if not isinstance(strategy, PassPartial) or (operand is not None and operand not in strategy.operands):
        return ()
    return tuple((a, "sum") for a in strategy.axes)


def axis_strategies(fr, axis_sizes, base, axis: str, passing=()) -> list:
    """``base`` (the strategy chosen for the axes searched before) with ``axis`` added to no
    factor or to one (the even, legal ones; the replicated-on-``axis`` choice first), and, where
    the equation passes partials (``passing``: the operand sets it is linear in), each of those
    with the operands read partial over ``axis``."""
    held, reads = (base.axes, base.operands) if isinstance(base, PassPartial) else ((), None)
    plain = [assignment_of(base)]
    compound = compound_factors(fr)
    for f in range(len(fr.sizes)):
        if fr.kinds[f] == FactorKind.REPLICATE:
            continue
        s = tuple(ax + (axis,) if g == f else ax for g, ax in enumerate(plain[0]))
        if fr.sizes[f] % math.prod(axis_sizes[a] for a in s[f]) or axis_conflicts(s, fr):
            continue
        if f in compound and not all(project_back(s, dims, fr.sizes, axis_sizes) is not None
                                     for dims in (*fr.operands, *fr.results)):
            continue
        plain.append(s)
    out = [PassPartial(s, held, reads) if held else s for s in plain]
    for s in plain:
        if axis not in {a for ax in s for a in ax}:
            out.extend(PassPartial(s, held + (axis,), ops) for ops in ([reads] if held else passing))
    return out


def partial_operand_sets(e, fr) -> list[tuple]:
    """The operand sets ``e`` may read partial and pass on, as insert_collectives does: all
    operands of a sum (none constant), one operand of a product, and only where the result is
    no larger than a partial operand (a reduction is never made bigger)."""
    live = [i for i, v in enumerate(e.invars) if not v.is_const]
    follower = len(live) == 1 and not any(k in REDUCTION_KINDS for k in fr.kinds)
    if e.subgraphs or len(e.outvars) != 1 or fr.accumulators or follower:
        return []       # (a follower reads its operand as its root node makes it)
    mode = get_rule(e).partial_mode(e)
    fits = lambda i: math.prod(e.outvars[0].shape) <= math.prod(e.invars[i].shape)
    if mode is PartialMode.SAME_SUM:
        return [tuple(live)] if len(live) == len(e.invars) > 1 and any(fits(i) for i in live) else []
    if mode is PartialMode.ONE_SUM:
        return [(i,) for i in live if fits(i)]
    if mode in (PartialMode.FIRST_SUM, PartialMode.UNARY_SUM):
        return [(0,)] if 0 in live and fits(0) else []
    return []


def operand_layout(fr, s, i, axis_sizes) -> Layout:
    a = assignment_of(s)
    dims = project_back(a, fr.operands[i], fr.sizes, axis_sizes)
    partial = result_partial(a, fr) if i in fr.accumulators else ()
    return Layout(dims, tuple(sorted({*partial, *passed_partials(s, i)})))


def result_layout(fr, s, j, axis_sizes) -> Layout:
    a = assignment_of(s)
    return Layout(project_back(a, fr.results[j], fr.sizes, axis_sizes),
                  tuple(sorted({*result_partial(a, fr), *passed_partials(s)})))


def input_layouts(v, axis_sizes, base: Layout, axis: str) -> list[Layout]:
    """``base`` with ``axis`` added to no dim or to one it divides evenly."""
    out = [base]
    for d in range(len(v.shape)):
        dims = tuple(ax + (axis,) if k == d else ax for k, ax in enumerate(base.dims))
        if v.shape[d] % math.prod(axis_sizes[a] for a in dims[d]) == 0:
            out.append(Layout(dims))
    return out


def bytes_per_device(v, layout: Layout, axis_sizes) -> float:
    return math.prod(layout.local_shape(v.shape, axis_sizes)) * compat.itemsize(v.dtype)


def follows(e, fr, node_of_value) -> bool:
    """An equation of one non-constant operand and no reduction (a unary elementwise op, a
    reshape, a transpose, a broadcast) follows its operand: its layout is the operand's,
    carried through its factors. Such equations are not nodes of the problem (Alpa merges
    them likewise), which halves it."""
    live = [v for v in e.invars if not v.is_const]
    return (not e.subgraphs and len(e.outvars) == 1 and len(live) == 1 and live[0] in node_of_value
            and not any(k in REDUCTION_KINDS for k in fr.kinds))


def without_axis(strategy, axis):
    """An assignment or input layout with ``axis`` taken out (to search it again)."""
    if isinstance(strategy, PassPartial):
        held = tuple(a for a in strategy.axes if a != axis)
        rest = without_axis(strategy.assignment, axis)
        return PassPartial(rest, held, strategy.operands) if held else rest
    if isinstance(strategy, Layout):
        return Layout(tuple(tuple(a for a in d if a != axis) for d in strategy.dims))
    return tuple(tuple(a for a in ax if a != axis) for ax in strategy)


def stacked(layout: Layout) -> Layout:
    """A scan's stacked operand or result: the body's layout under an unsplit loop dim."""
    return Layout(((),) + layout.dims)


def follower(fr, i, layout_of_operand, axis_sizes):
    """``k -> (layout read, layout made)`` of a follower, from its root's strategy ``k``."""
    cache = {}

    def derive(k):
        if k not in cache:
            have = layout_of_operand(k).without_partial()
            got = project(fr.operands[i], have, fr.sizes, axis_sizes)
            assignment = tuple(got.get(f, ()) for f in range(len(fr.sizes)))
            legal = legalize(assignment, fr, axis_sizes, set())
            s = legal[0] if legal else ((),) * len(fr.sizes)
            read = project_back(s, fr.operands[i], fr.sizes, axis_sizes)
            made = project_back(s, fr.results[0], fr.sizes, axis_sizes)
            if read is None or made is None:
                s = ((),) * len(fr.sizes)
                read = project_back(s, fr.operands[i], fr.sizes, axis_sizes)
                made = project_back(s, fr.results[0], fr.sizes, axis_sizes)
            cache[k] = (Layout(read), Layout(made))
        return cache[k]
    return derive


def strategy_text(fr, s) -> str:
    parts = [f"factor {f} ({fr.kinds[f]}, {fr.sizes[f]}) over {','.join(ax)}"
             for f, ax in enumerate(assignment_of(s)) if ax]
    if isinstance(s, PassPartial):
        parts.append(f"operands {','.join(map(str, s.operands))} passed on partial over {','.join(s.axes)}")
    return "; ".join(parts) if parts else "nothing split"
