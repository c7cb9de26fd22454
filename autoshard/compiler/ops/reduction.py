"""Reductions and scans over an axis.

``reduce_sum[axes=(1,)] x[8,16]``: factors d0:pass d1:sum; result (d0). Splitting d1 over
``model`` leaves each device with a partial sum: the result is ``P(sum)`` over ``model``.
``reduce_max``/``reduce_min`` give ``P(max)``/``P(min)``. Reductions with no collective
(prod, and, or, xor), arg-reductions and cumulative ops need their axis unsplit
(``replicate`` factors); cumulative ops along a split dim are issue #3. ``sort`` and
``top_k`` are in ``sort.py``.
"""
from __future__ import annotations


from . import FactorBuilder, register
from ..kinds import FactorKind, PartialMode

_REDUCE_KIND = {"reduce_sum": FactorKind.SUM, "reduce_max": FactorKind.MAX, "reduce_min": FactorKind.MIN}
_PARTIAL = {"reduce_sum": PartialMode.UNARY_SUM, "reduce_max": PartialMode.UNARY_MAX,
            "reduce_min": PartialMode.UNARY_MIN}


def _reduce_factors(eqn):
    shape = eqn.invars[0].shape
    axes = set(eqn.params["axes"])
    kind = _REDUCE_KIND.get(eqn.prim.name, FactorKind.REPLICATE)
    fb = FactorBuilder()
    operand, result = [], []
    for d, size in enumerate(shape):
        f = fb.new(size, kind if d in axes else FactorKind.PASS)
        operand.append(f)
        if d not in axes:
            result.append(f)
    return fb.build([operand], [result] * len(eqn.outvars))


for _name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
              "reduce_or", "reduce_xor", "argmax", "argmin"):
    register(_name, partial=_PARTIAL.get(_name, PartialMode.NONE))(_reduce_factors)


def _along_axis_factors(eqn):
    """Same-shape result; the op's axis (``axis`` or ``dimension``) must stay unsplit."""
    shape = eqn.invars[0].shape
    axis = eqn.params.get("axis", eqn.params.get("dimension"))
    axis = axis % len(shape) if shape else 0
    fb = FactorBuilder()
    dims = [fb.new(s, FactorKind.REPLICATE if d == axis else FactorKind.PASS) for d, s in enumerate(shape)]
    return fb.build([dims] * len(eqn.invars), [dims] * len(eqn.outvars))


for _name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
    register(_name)(_along_axis_factors)


@register("reduce")
def generic_reduce_factors(eqn):
    """``lax.reduce`` with a computation of its own (several operands, or a monoid JAX does not
    name): ``reduce[dimensions] x_1..x_n, init_1..init_n``. No collective combines partial
    results of an arbitrary computation, so reduced dims stay whole (``replicate``); the
    others pass through."""
    n = len(eqn.outvars)
    shape = eqn.invars[0].shape
    axes = set(eqn.params["dimensions"])
    fb = FactorBuilder()
    operand = [fb.new(s, "replicate" if d in axes else "pass") for d, s in enumerate(shape)]
    result = [f for d, f in enumerate(operand) if d not in axes]
    return fb.build([operand] * n + [()] * (len(eqn.invars) - n), [result] * n)
