"""Sorting and selection: ``sort``, ``top_k`` and ``approx_top_k``.

Every dim except the one the op sorts or selects along is a ``pass`` factor shared by all
operands and results; the sorted dim must stay whole on each device (``replicate``): a
per-device sort or top-k of one block would rank only that block, a different answer.
``top_k`` shrinks its dim from ``N`` to ``k``, so operand and results get separate
``replicate`` factors there::

    top_k[axis=2, k=2] probs[G,S,E]   ->   values[G,S,2], ids[G,S,2]
    factors g:pass s:pass e:replicate k:replicate
    probs (g)(s)(e!)  ->  values (g)(s)(k!), ids (g)(s)(k!)

    sort[dimension=1, num_keys=1] keys[8,16], vals[8,16] -> keys', vals'
    factors a:pass b:replicate;  every tensor (a)(b!)

A split along the sorted dim is gathered by the pass before the op (a dedicated lowering,
e.g. local top-k then a top-k of the gathered candidates, is not written). No operand may
stay partial: sorting a partial sum ranks the wrong values.
"""
from __future__ import annotations

from . import FactorBuilder, register
from ..kinds import FactorKind


def _axis(eqn, rank: int) -> int:
    p = eqn.params
    axis = p.get("dimension", p.get("axis", p.get("reduction_dimension", rank - 1)))
    return axis % rank


@register("sort")
def sort_factors(eqn):
    """All operands (keys then carried values) and results share one shape."""
    shape = eqn.invars[0].shape
    axis = _axis(eqn, len(shape))
    fb = FactorBuilder()
    dims = [fb.new(s, FactorKind.REPLICATE if d == axis else FactorKind.PASS) for d, s in enumerate(shape)]
    return fb.build([dims] * len(eqn.invars), [dims] * len(eqn.outvars))


@register("top_k", "approx_top_k")
def top_k_factors(eqn):
    """One operand ``[..., N, ...]``, results ``[..., k, ...]`` (values, indices)."""
    shape = eqn.invars[0].shape
    axis = _axis(eqn, len(shape))
    fb = FactorBuilder()
    operand, result = [], []
    for d, s in enumerate(shape):
        if d == axis:
            operand.append(fb.new(s, FactorKind.REPLICATE))
            result.append(fb.new(eqn.outvars[0].shape[d], FactorKind.REPLICATE))
        else:
            f = fb.new(s)
            operand.append(f)
            result.append(f)
    return fb.build([operand], [result] * len(eqn.outvars))
