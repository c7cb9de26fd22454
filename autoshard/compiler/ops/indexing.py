"""Indexing: ``gather`` and ``scatter``/``scatter-add``.

Embedding lookup ``table[V,D], ids[B,T,1] -> out[B,T,D]`` (offset_dims=(2,),
collapsed_slice_dims=(0,), start_index_map=(0,))::

    factors b:pass t:pass v:replicate d:pass
    table (v)(d)   ids (b)(t)()   ->   out (b)(t)(d)

A table indexed along one dim (an embedding lookup) may be split along it: ``v`` is then a
``sum`` factor, like a contracting dim. Each device looks up the ids that fall in its block of
rows and writes zeros for the others, so the result is ``P(sum)`` (Megatron's
vocabulary-parallel embedding); out-of-range ids keep the single-device behaviour of the
gather's mode. Other indexed dims stay unsplit (``replicate``). The same holds with batching
dims: ``take_along_axis(logits[B,T,V], labels[B,T,1], -1)`` (a cross-entropy's label lookup)
keeps ``logits`` vocab-split and gives a ``P(sum)`` result rather than gathering whole logits.

The embedding gradient, ``scatter-add`` of ``updates[B,T,D]`` into ``zeros[V,D]``, makes the
update batch dims ``sum`` factors: with the batch split each device scatters its own rows,
giving ``P(sum)``, and the operand it accumulates into must carry the same partial (a
replicated operand becomes partial by zeroing it on all but one device). Its ``v`` dim may be
split too: each device scatters only the ids in its block.
"""
from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.lax import GatherScatterMode

from . import FactorBuilder, register
from .. import collectives
from ..kinds import FactorKind, PartialMode


def _one_indexed_dim(dims_of_index, index_shape):
    """The operand dim a single-id lookup indexes, or None if the op is not of that form.
    Batching dims (``take_along_axis``: ``logits[B,T,V]`` at ``labels[B,T,1]``) pair an operand
    dim with an ids dim; each stays a ``pass`` factor, so the lookup is a per-row embedding
    lookup and the indexed dim may be split the same way. The callers check that one row is
    taken (a collapsed dim, or a window of one kept as a size-1 dim)."""
    if len(dims_of_index) != 1 or index_shape[-1] != 1:
        return None
    return dims_of_index[0]


def _block_offset(layout, dim, local, axis_sizes):
    return collectives.block_index(layout.dims[dim], axis_sizes) * local


def _default_fill(dtype):
    dtype = np.dtype(dtype)
    if jax.dtypes.issubdtype(dtype, np.inexact):
        return np.nan
    if dtype == np.bool_:
        return True
    info = np.iinfo(dtype)
    return info.min if jax.dtypes.issubdtype(dtype, np.signedinteger) else info.max


def _localize_gather(eqn, ctx):
    op_shape = eqn.invars[0].shape
    sizes = tuple(ctx.in_shapes[0][d] if s == op_shape[d] else s
                  for d, s in enumerate(eqn.params["slice_sizes"]))
    return {**eqn.params, "slice_sizes": sizes}


def gather_factors(eqn):
    dn = eqn.params["dimension_numbers"]
    slice_sizes = eqn.params["slice_sizes"]
    op_shape, idx_shape = eqn.invars[0].shape, eqn.invars[1].shape
    res_shape = eqn.outvars[0].shape
    fb = FactorBuilder()
    op_dims: list = [None] * len(op_shape)
    idx_dims: list = [()] * len(idx_shape)
    res_dims: list = [None] * len(res_shape)
    batch_res = [d for d in range(len(res_shape)) if d not in dn.offset_dims]
    for k, d in enumerate(range(len(idx_shape) - 1)):
        f = fb.new(idx_shape[d])
        idx_dims[d] = res_dims[batch_res[k]] = f
        if d in dn.start_indices_batching_dims:
            op_dims[dn.operand_batching_dims[list(dn.start_indices_batching_dims).index(d)]] = f
    window = [d for d in range(len(op_shape))
              if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    vocab = _gather_vocab_dim(eqn)
    for k, d in enumerate(window):
        rd = dn.offset_dims[k]
        if d == vocab:          # a window of one row, kept as a size-1 dim of the result
            op_dims[d] = fb.new(op_shape[d], FactorKind.SUM)
            res_dims[rd] = fb.new(res_shape[rd], FactorKind.REPLICATE)
        elif slice_sizes[d] == op_shape[d] and d not in dn.start_index_map:
            op_dims[d] = res_dims[rd] = fb.new(op_shape[d])
        else:
            op_dims[d] = fb.new(op_shape[d], FactorKind.REPLICATE)
            res_dims[rd] = fb.new(res_shape[rd], FactorKind.REPLICATE)
    op_dims = [fb.new(s, FactorKind.SUM if d == vocab else FactorKind.REPLICATE) if f is None else f
               for d, (f, s) in enumerate(zip(op_dims, op_shape))]
    return fb.build([op_dims, idx_dims], [res_dims])


def _gather_vocab_dim(eqn):
    dn = eqn.params["dimension_numbers"]
    d = _one_indexed_dim(dn.start_index_map, eqn.invars[1].shape)
    return d if d is not None and eqn.params["slice_sizes"][d] == 1 else None


def _lower_gather(eqn, ctx, args):
    """Vocabulary-parallel lookup: ids outside this device's rows give zeros (P(sum))."""
    import jax.numpy as jnp
    table, ids = args
    params = _localize_gather(eqn, ctx)
    d = _gather_vocab_dim(eqn)
    if d is None or not ctx.in_layouts[0].dims[d]:
        return [eqn.prim.bind(table, ids, **params)]
    dn, mode = params["dimension_numbers"], params["mode"]
    size, rows = eqn.invars[0].shape[d], ctx.in_shapes[0][d]
    if mode != GatherScatterMode.FILL_OR_DROP:          # CLIP / PROMISE_IN_BOUNDS clamp globally
        ids = jnp.clip(ids, 0, size - 1)
    local = ids - _block_offset(ctx.in_layouts[0], d, rows, ctx.axis_sizes).astype(ids.dtype)
    mine = (local >= 0) & (local < rows) & (ids >= 0) & (ids < size)
    out = eqn.prim.bind(table, jnp.clip(local, 0, rows - 1), **{**params, "mode": GatherScatterMode.CLIP})
    # Batch dims of the ids are the result's non-offset dims; add the offset dims as size 1.
    mask = mine[..., 0]
    for od in sorted(dn.offset_dims):
        mask = jnp.expand_dims(mask, od)
    out = jnp.where(mask, out, jnp.zeros((), out.dtype))
    if mode == GatherScatterMode.FILL_OR_DROP:
        # An id outside the whole table reads the fill value on one device (zeros elsewhere).
        outside = ((ids < 0) | (ids >= size))[..., 0]
        for od in sorted(dn.offset_dims):
            outside = jnp.expand_dims(outside, od)
        fill = params.get("fill_value")
        fill = _default_fill(out.dtype) if fill is None else fill
        first = collectives.block_index(ctx.in_layouts[0].dims[d], ctx.axis_sizes) == 0
        out = jnp.where(outside & first, jnp.asarray(fill, out.dtype), out)
    return [out]


def _gather_partial(eqn):
    """Gathering from a partial table gives a partial result of the same kind, except that in
    FILL_OR_DROP mode every device writes the fill value for out-of-bounds ids: a P(sum)
    table would sum it once per device (fill 1.0 read as 8.0 on 8 devices; the int default
    fill, the most negative value, wraps). Only a zero or NaN fill sums to itself; maxima of
    equal fills are always right."""
    if eqn.params["mode"] != GatherScatterMode.FILL_OR_DROP:
        return PartialMode.UNARY_ANY
    fill = eqn.params.get("fill_value")
    inexact = jax.dtypes.issubdtype(np.dtype(eqn.outvars[0].dtype), np.inexact)
    if (fill is None and inexact) or (fill is not None and (fill == 0 or np.isnan(fill))):
        return PartialMode.UNARY_ANY
    return PartialMode.UNARY_MAX


register(lax.gather_p, partial=_gather_partial, localize=_localize_gather, lower=_lower_gather)(gather_factors)


def _scatter_factors(eqn, reduction_kind):
    dn = eqn.params["dimension_numbers"]
    op_shape, idx_shape, upd_shape = (v.shape for v in eqn.invars[:3])
    fb = FactorBuilder()
    op_dims: list = [None] * len(op_shape)
    idx_dims: list = [()] * len(idx_shape)
    upd_dims: list = [None] * len(upd_shape)
    window = [d for d in range(len(op_shape))
              if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    vocab = _scatter_vocab_dim(eqn) if reduction_kind == FactorKind.SUM else None
    for k, d in enumerate(window):
        ud = dn.update_window_dims[k]
        if d == vocab:          # a window of one row: each device adds the ids in its rows
            op_dims[d] = fb.new(op_shape[d], FactorKind.PASS)
            upd_dims[ud] = fb.new(upd_shape[ud], FactorKind.REPLICATE)
        elif upd_shape[ud] == op_shape[d] and d not in dn.scatter_dims_to_operand_dims:
            op_dims[d] = upd_dims[ud] = fb.new(op_shape[d])
        else:
            op_dims[d] = fb.new(op_shape[d], FactorKind.REPLICATE)
            upd_dims[ud] = fb.new(upd_shape[ud], FactorKind.REPLICATE)
    scatter_upd = [d for d in range(len(upd_shape)) if d not in dn.update_window_dims]
    for k, ud in enumerate(scatter_upd):
        idx_d = k  # jax puts the index vector last, so indices dims line up with update scatter dims
        if idx_d in dn.scatter_indices_batching_dims:
            od = dn.operand_batching_dims[list(dn.scatter_indices_batching_dims).index(idx_d)]
            op_dims[od] = upd_dims[ud] = idx_dims[idx_d] = fb.new(upd_shape[ud])
        else:
            upd_dims[ud] = idx_dims[idx_d] = fb.new(upd_shape[ud], reduction_kind)
    op_dims = [fb.new(s, FactorKind.PASS if d == vocab else FactorKind.REPLICATE) if f is None else f
               for d, (f, s) in enumerate(zip(op_dims, op_shape))]
    accumulators = (0,) if reduction_kind != FactorKind.REPLICATE else ()
    return fb.build([op_dims, idx_dims, upd_dims], [op_dims], accumulators)


def _scatter_vocab_dim(eqn):
    dn = eqn.params["dimension_numbers"]
    d = _one_indexed_dim(dn.scatter_dims_to_operand_dims, eqn.invars[1].shape)
    if d is None or d in dn.inserted_window_dims:
        return d
    window = [e for e in range(len(eqn.invars[0].shape))
              if e not in dn.inserted_window_dims and e not in dn.operand_batching_dims]
    one = d in window and eqn.invars[2].shape[dn.update_window_dims[window.index(d)]] == 1
    return d if one else None


def _lower_scatter_add(eqn, ctx, args):
    """Rows split over devices: each device adds the updates whose ids fall in its rows."""
    import jax.numpy as jnp
    operand, ids, updates = args
    d = _scatter_vocab_dim(eqn)
    if d is None or not ctx.in_layouts[0].dims[d]:
        return [eqn.prim.bind(operand, ids, updates, **eqn.params)]
    size, rows = eqn.invars[0].shape[d], ctx.in_shapes[0][d]
    if eqn.params["mode"] != GatherScatterMode.FILL_OR_DROP:
        ids = jnp.clip(ids, 0, size - 1)
    local = ids - _block_offset(ctx.in_layouts[0], d, rows, ctx.axis_sizes).astype(ids.dtype)
    # Ids outside the whole table are dropped as on one device; so are other devices' ids.
    local = jnp.where((ids >= 0) & (ids < size), local, -1)
    return [eqn.prim.bind(operand, local, updates, **{**eqn.params, "mode": GatherScatterMode.FILL_OR_DROP})]


@register("scatter-add", "scatter_add", lower=_lower_scatter_add)
def scatter_add_factors(eqn):
    return _scatter_factors(eqn, FactorKind.SUM)


@register("scatter", "scatter-mul", "scatter_mul", "scatter-min", "scatter_min", "scatter-max", "scatter_max",
          "scatter-sub")
def scatter_factors(eqn):
    return _scatter_factors(eqn, FactorKind.REPLICATE)
