"""``dot_general``: batch and free dims are pass-through factors, contracting dims are
``sum`` factors (splitting them leaves the result ``P(sum)``)::

    dot_general x[b,m,k] w[b,k,n] (contract k, batch b)
    factors b:pass m:pass k:sum n:pass;  x (b)(m)(k), w (b)(k)(n) -> result (b)(m)(n)

The op is linear in each operand, so one partial operand gives a partial result.
"""
from __future__ import annotations

from jax import lax

from . import FactorBuilder, register
from ..kinds import FactorKind, PartialMode


@register(lax.dot_general_p, partial=PartialMode.ONE_SUM)
def dot_factors(eqn):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].shape, eqn.invars[1].shape
    fb = FactorBuilder()
    lhs_dims: list = [None] * len(lhs)
    rhs_dims: list = [None] * len(rhs)
    batch = []
    for l, r in zip(lb, rb):
        f = fb.new(lhs[l])
        lhs_dims[l] = rhs_dims[r] = f
        batch.append(f)
    for l, r in zip(lc, rc):
        lhs_dims[l] = rhs_dims[r] = fb.new(lhs[l], FactorKind.SUM)
    lhs_free = []
    for d in range(len(lhs)):
        if lhs_dims[d] is None:
            lhs_dims[d] = fb.new(lhs[d])
            lhs_free.append(lhs_dims[d])
    rhs_free = []
    for d in range(len(rhs)):
        if rhs_dims[d] is None:
            rhs_dims[d] = fb.new(rhs[d])
            rhs_free.append(rhs_dims[d])
    return fb.build([lhs_dims, rhs_dims], [batch + lhs_free + rhs_free])
