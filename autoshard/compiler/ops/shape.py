"""Shape and data-movement primitives: broadcast, reshape, transpose, squeeze, iota,
concatenate, slice, split, pad, dynamic_slice, dynamic_update_slice, rev.

``reshape`` factors dims by walking both shapes with common divisors, major first, so a
split of ``[B, T, D]``'s ``D`` over ``model`` reaches the head dim of ``[B, T, H, Dh]``::

    reshape f32[8,32] -> f32[8,4,8]     factors a:8 b:4 c:8
    operand (a)(b,c)   result (a)(b)(c)

The dim a ``slice`` (stride 1), ``split`` or ``concatenate`` moves is one factor shared by
operands and results, split only evenly: a split one stays split and the lowering moves just
the rows that cross device blocks (``compiler/reindex.py``, collective-permutes listed by the
rule's ``internal`` and priced in its choice). Strided and reversed dims are ``replicate``
factors (a split along them needs offsets); ``pad`` lives with the windowed ops in
``conv.py``. ``iota`` along a split dim adds the device's block offset in its local lowering.
"""
from __future__ import annotations

import math

from jax import lax

from . import FactorBuilder, register
from .. import collectives, reindex
from ..kinds import FactorKind, PartialMode


def _structural(name, **kw):
    return register(name, partial=PartialMode.UNARY_ANY, **kw)


# -- broadcast_in_dim ---------------------------------------------------------------------
def _localize_broadcast(eqn, ctx):
    return {**eqn.params, "shape": tuple(ctx.out_shapes[0])}


@_structural(lax.broadcast_in_dim_p, localize=_localize_broadcast)
def broadcast_factors(eqn):
    shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = eqn.invars[0].shape
    fb = FactorBuilder()
    result = [fb.new(s) for s in shape]
    op_dims = [result[int(bd)] if operand[i] == shape[int(bd)] else ()
               for i, bd in enumerate(bdims)]
    return fb.build([op_dims] + [()] * (len(eqn.invars) - 1), [result])


# -- reshape ------------------------------------------------------------------------------
def reshape_factor_dims(in_shape, out_shape, fb: FactorBuilder):
    """Walk both shapes taking common divisors, major first; where no common divisor is
    left, the rest of both shapes becomes ``replicate`` factors."""
    in_dims = [[] for _ in in_shape]
    out_dims = [[] for _ in out_shape]
    i = j = 0
    ra = in_shape[0] if in_shape else 1
    rb = out_shape[0] if out_shape else 1
    while i < len(in_shape) and j < len(out_shape):
        if ra == 1:
            i += 1
            ra = in_shape[i] if i < len(in_shape) else 1
            continue
        if rb == 1:
            j += 1
            rb = out_shape[j] if j < len(out_shape) else 1
            continue
        g = math.gcd(ra, rb)
        if g == 1:
            for k in range(i, len(in_shape)):
                in_dims[k] += fb.new(ra if k == i else in_shape[k], FactorKind.REPLICATE)
            for k in range(j, len(out_shape)):
                out_dims[k] += fb.new(rb if k == j else out_shape[k], FactorKind.REPLICATE)
            break
        f = fb.new(g)
        in_dims[i] += f
        out_dims[j] += f
        ra //= g
        rb //= g
    return [tuple(d) for d in in_dims], [tuple(d) for d in out_dims]


def _localize_reshape(eqn, ctx):
    return {**eqn.params, "new_sizes": tuple(ctx.out_shapes[0])}


@_structural(lax.reshape_p, localize=_localize_reshape)
def reshape_factors(eqn):
    fb = FactorBuilder()
    shape = eqn.invars[0].shape
    # ``dimensions`` (emitted e.g. by jax.grad of prod) transposes the operand before the
    # reshape: walk the permuted shape and map its factors back to the operand's own dims
    # (ignoring it gave silently wrong results for a split operand).
    perm = eqn.params.get("dimensions") or tuple(range(len(shape)))
    permuted, outs = reshape_factor_dims(tuple(shape[d] for d in perm), eqn.outvars[0].shape, fb)
    ins = [()] * len(shape)
    for k, d in enumerate(perm):
        ins[d] = permuted[k]
    return fb.build([ins] + [()] * (len(eqn.invars) - 1), [outs])


# -- transpose / squeeze / rev -------------------------------------------------------------
@_structural(lax.transpose_p)
def transpose_factors(eqn):
    fb = FactorBuilder()
    operand = [fb.new(s) for s in eqn.invars[0].shape]
    return fb.build([operand], [[operand[p] for p in eqn.params["permutation"]]])


@_structural(lax.squeeze_p)
def squeeze_factors(eqn):
    fb = FactorBuilder()
    drop = {d % len(eqn.invars[0].shape) for d in eqn.params["dimensions"]}
    operand = [fb.new(s) for s in eqn.invars[0].shape]
    return fb.build([operand], [[f for d, f in enumerate(operand) if d not in drop]])


@_structural(lax.rev_p)
def rev_factors(eqn):
    fb = FactorBuilder()
    rev = set(eqn.params["dimensions"])
    operand = [fb.new(s, FactorKind.REPLICATE if d in rev else FactorKind.PASS)
               for d, s in enumerate(eqn.invars[0].shape)]
    return fb.build([operand], [operand])


# -- iota ---------------------------------------------------------------------------------
def _lower_iota(eqn, ctx, args):
    p = eqn.params
    local = tuple(ctx.out_shapes[0])
    dim = p["dimension"]
    out = lax.broadcasted_iota(p["dtype"], local, dim)
    axes = ctx.out_layouts[0].dims[dim]
    if axes:
        offset = collectives.block_index(axes, ctx.axis_sizes) * local[dim]
        out = out + offset.astype(p["dtype"])
    return [out]


@register(lax.iota_p, lower=_lower_iota)
def iota_factors(eqn):
    fb = FactorBuilder()
    return fb.build([()] * len(eqn.invars), [[fb.new(s) for s in eqn.outvars[0].shape]])


# -- concatenate / slice / split -----------------------------------------------------------
# The moved dim (stride 1) is one factor shared by operands and results, made compound
# (``FactorBuilder.even``) so that it splits only where every length divides evenly; the
# lowering then moves just the rows that cross device blocks (``compiler/reindex.py``) instead
# of gathering the operand whole. A strided slice's dim stays ``replicate``.
def _moved_dims_factors(eqn, moved: set, n_shared_operands: int, crossing=frozenset()):
    """Dims in ``moved`` are ``replicate`` (a fresh factor per tensor), except those in
    ``crossing``, one even factor of the gcd of every length shared by all; the other dims
    are shared by the first ``n_shared_operands`` operands and every result."""
    fb = FactorBuilder()
    base = eqn.invars[0].shape
    tensors = [v.shape for v in eqn.invars[:n_shared_operands]] + [v.shape for v in eqn.outvars]
    shared = {}
    for d, s in enumerate(base):
        if d not in moved:
            shared[d] = fb.new(s)
        elif d in crossing and all(t[d] > 0 for t in tensors):
            shared[d] = fb.even(math.gcd(*(t[d] for t in tensors)))

    def dims_of(shape):
        return [shared[d] if d in shared else fb.new(s, FactorKind.REPLICATE) for d, s in enumerate(shape)]
    operands = [dims_of(v.shape) if k < n_shared_operands else [()] * len(v.shape)
                for k, v in enumerate(eqn.invars)]
    return fb.build(operands, [dims_of(v.shape) for v in eqn.outvars])


def _crossing(eqn, dim, segments, ctx, args, what):
    """Lower (``args``) or list the permutes of (``args is None``) a re-indexing along
    ``dim``; None when the dim is not split (the op runs locally)."""
    axes = ctx.in_layouts[0].dims[dim]
    if not axes:
        return None
    n = math.prod(ctx.axis_sizes[a] for a in axes)
    ins = tuple(v.shape[dim] for v in eqn.invars)
    outs = tuple(o.shape[dim] for o in eqn.outvars)
    p = reindex.plan(ins, outs, segments, n)
    if args is None:
        return reindex.transforms(p, dim, axes, ctx.axis_sizes, ctx.in_shapes[0], what)
    return reindex.apply(args, dim, axes, ctx.axis_sizes, p)


def _concat_segments(eqn):
    return reindex.concat_segments([v.shape[eqn.params["dimension"]] for v in eqn.invars])


def _lower_concatenate(eqn, ctx, args):
    outs = _crossing(eqn, eqn.params["dimension"], _concat_segments(eqn), ctx, list(args), "")
    return outs if outs is not None else [eqn.prim.bind(*args, **eqn.params)]


def _concatenate_internal(eqn, ctx):
    return [(0, t, r) for t, r in _crossing(eqn, eqn.params["dimension"], _concat_segments(eqn), ctx,
                                            None, "concatenate") or []]


@register(lax.concatenate_p, partial=PartialMode.SAME_SUM, lower=_lower_concatenate,
          internal=_concatenate_internal, priced=True)
def concatenate_factors(eqn):
    dim = eqn.params["dimension"]
    return _moved_dims_factors(eqn, {dim}, len(eqn.invars), {dim})


def _sliced_dims(eqn):
    p, shape = eqn.params, eqn.invars[0].shape
    strides = p["strides"] or (1,) * len(shape)
    return {d for d in range(len(shape))
            if p["start_indices"][d] != 0 or p["limit_indices"][d] != shape[d] or strides[d] != 1}


def _unit_stride_dims(eqn):
    strides = eqn.params["strides"] or (1,) * len(eqn.invars[0].shape)
    return {d for d in _sliced_dims(eqn) if strides[d] == 1}


def _slice_steps(eqn, ctx):
    """The local slice (split dims kept whole) and the split sliced dims, re-indexed after."""
    p = eqn.params
    crossing = [d for d in sorted(_unit_stride_dims(eqn)) if ctx.in_layouts[0].dims[d]]
    start = tuple(0 if d in crossing else s for d, s in enumerate(p["start_indices"]))
    limit = tuple(ctx.in_shapes[0][d] if d in crossing or d not in _sliced_dims(eqn) else lim
                  for d, lim in enumerate(p["limit_indices"]))
    return start, limit, crossing


def _slice_plans(eqn, ctx, start, limit, crossing):
    strides = eqn.params["strides"] or (1,) * len(start)
    shape = [-(-(lim - s) // st) for s, lim, st in zip(start, limit, strides)]
    for d in crossing:
        axes = ctx.in_layouts[0].dims[d]
        n = math.prod(ctx.axis_sizes[a] for a in axes)
        a, b = eqn.params["start_indices"][d], eqn.params["limit_indices"][d]
        p = reindex.plan((eqn.invars[0].shape[d],), (b - a,), reindex.slice_segments(a, b), n)
        yield d, axes, p, tuple(shape)
        shape[d] = (b - a) // n


def _lower_slice(eqn, ctx, args):
    start, limit, crossing = _slice_steps(eqn, ctx)
    x = lax.slice(args[0], start, limit, eqn.params["strides"])
    for d, axes, p, _ in _slice_plans(eqn, ctx, start, limit, crossing):
        (x,) = reindex.apply([x], d, axes, ctx.axis_sizes, p)
    return [x]


def _slice_internal(eqn, ctx):
    start, limit, crossing = _slice_steps(eqn, ctx)
    return [(0, t, r) for d, axes, p, shape in _slice_plans(eqn, ctx, start, limit, crossing)
            for t, r in reindex.transforms(p, d, axes, ctx.axis_sizes, shape, "slice")]


@_structural(lax.slice_p, lower=_lower_slice, internal=_slice_internal, priced=True)
def slice_factors(eqn):
    return _moved_dims_factors(eqn, _sliced_dims(eqn), 1, _unit_stride_dims(eqn))


def _split_segments(eqn):
    return reindex.split_segments(eqn.params["sizes"])


def _lower_split(eqn, ctx, args):
    outs = _crossing(eqn, eqn.params["axis"], _split_segments(eqn), ctx, list(args), "")
    return outs if outs is not None else eqn.prim.bind(*args, **eqn.params)


def _split_internal(eqn, ctx):
    return [(0, t, r) for t, r in _crossing(eqn, eqn.params["axis"], _split_segments(eqn), ctx,
                                            None, "split") or []]


@_structural(lax.split_p, lower=_lower_split, internal=_split_internal, priced=True)
def split_factors(eqn):
    axis = eqn.params["axis"]
    return _moved_dims_factors(eqn, {axis}, 1, {axis})


# -- dynamic_slice / dynamic_update_slice -------------------------------------------------
def _localize_dynamic_slice(eqn, ctx):
    return {**eqn.params, "slice_sizes": tuple(ctx.out_shapes[0])}


@_structural(lax.dynamic_slice_p, localize=_localize_dynamic_slice)
def dynamic_slice_factors(eqn):
    shape = eqn.invars[0].shape
    moved = {d for d, s in enumerate(eqn.params["slice_sizes"]) if s != shape[d]}
    return _moved_dims_factors(eqn, moved, 1)


@register(lax.dynamic_update_slice_p)
def dynamic_update_slice_factors(eqn):
    operand, update = eqn.invars[0].shape, eqn.invars[1].shape
    moved = {d for d in range(len(operand)) if update[d] != operand[d]}
    fb = FactorBuilder()
    shared = [None if d in moved else fb.new(s) for d, s in enumerate(operand)]
    op_dims = [fb.new(s, FactorKind.REPLICATE) if shared[d] is None else shared[d] for d, s in enumerate(operand)]
    up_dims = [fb.new(s, FactorKind.REPLICATE) if shared[d] is None else shared[d] for d, s in enumerate(update)]
    return fb.build([op_dims, up_dims] + [()] * (len(eqn.invars) - 2), [op_dims])


# -- empty2 -------------------------------------------------------------------------------
# ``jax.grad`` of ``lax.cond`` emits ``empty2`` (a rank-0 placeholder that is then broadcast)
# for residuals a branch does not produce: no operands, nothing to split. Without a rule the
# gradient of any cond raised UnsupportedPrimitiveError.
@register("empty2")
def empty_factors(eqn):
    return FactorBuilder().build([], [[] for _ in eqn.outvars])


# -- stack / unstack / tile -----------------------------------------------------------------
# ``jnp.stack`` binds ``stack`` since jax 0.10.1, and jax 0.12 unpacks arrays (``list(x)``,
# ``jax.random.split`` of typed keys) with ``unstack``. The stacked dim is made whole from
# (or cut into) separate tensors: a ``replicate`` factor; every other dim passes through.
@register("stack", partial="same_sum")
def stack_factors(eqn):
    axis = eqn.params["axis"]
    fb = FactorBuilder()
    dims = [fb.new(s) for s in eqn.invars[0].shape]
    result = dims[:axis] + [fb.new(eqn.outvars[0].shape[axis], "replicate")] + dims[axis:]
    return fb.build([dims] * len(eqn.invars), [result])


@_structural("unstack")
def unstack_factors(eqn):
    axis = eqn.params["axis"]
    fb = FactorBuilder()
    dims = [fb.new(s) for s in eqn.outvars[0].shape]
    operand = dims[:axis] + [fb.new(eqn.invars[0].shape[axis], "replicate")] + dims[axis:]
    return fb.build([operand], [dims] * len(eqn.outvars))


@_structural("tile")
def tile_factors(eqn):
    """``jnp.tile``: a dim repeated ``reps[d] > 1`` times is copied whole (``replicate``)."""
    fb = FactorBuilder()
    operand, result = [], []
    for size, reps in zip(eqn.invars[0].shape, eqn.params["reps"]):
        if reps == 1:
            f = fb.new(size)
            operand.append(f)
            result.append(f)
        else:
            operand.append(fb.new(size, "replicate"))
            result.append(fb.new(size * reps, "replicate"))
    return fb.build([operand], [result])
