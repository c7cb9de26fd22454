"""Indexing: ``gather`` and ``scatter``/``scatter-add``.

Embedding lookup ``table[V,D], ids[B,T,1] -> out[B,T,D]`` (offset_dims=(2,),
collapsed_slice_dims=(0,), start_index_map=(0,))::

    factors b:pass t:pass v:replicate d:pass
    table (v)(d)   ids (b)(t)()   ->   out (b)(t)(d)

Indexed operand dims (``v``) stay unsplit here; the vocabulary-parallel masked lookup is
issue #3. The embedding gradient, ``scatter-add`` of ``updates[B,T,D]`` into ``zeros[V,D]``,
makes the update batch dims ``sum`` factors: with the batch split each device scatters its
own rows, giving ``P(sum)``, and the operand it accumulates into must carry the same partial
(a replicated operand becomes partial by zeroing it on all but one device).
"""
from __future__ import annotations

from jax import lax

from . import FactorBuilder, register


def _localize_gather(eqn, ctx):
    op_shape = eqn.invars[0].shape
    sizes = tuple(ctx.in_shapes[0][d] if s == op_shape[d] else s
                  for d, s in enumerate(eqn.params["slice_sizes"]))
    return {**eqn.params, "slice_sizes": sizes}


@register(lax.gather_p, partial="unary_any", localize=_localize_gather)
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
    for k, d in enumerate(window):
        rd = dn.offset_dims[k]
        if slice_sizes[d] == op_shape[d] and d not in dn.start_index_map:
            op_dims[d] = res_dims[rd] = fb.new(op_shape[d])
        else:
            op_dims[d] = fb.new(op_shape[d], "replicate")
            res_dims[rd] = fb.new(res_shape[rd], "replicate")
    op_dims = [fb.new(s, "replicate") if f is None else f for f, s in zip(op_dims, op_shape)]
    return fb.build([op_dims, idx_dims], [res_dims])


def _scatter_factors(eqn, reduction_kind):
    dn = eqn.params["dimension_numbers"]
    op_shape, idx_shape, upd_shape = (v.shape for v in eqn.invars[:3])
    fb = FactorBuilder()
    op_dims: list = [None] * len(op_shape)
    idx_dims: list = [()] * len(idx_shape)
    upd_dims: list = [None] * len(upd_shape)
    window = [d for d in range(len(op_shape))
              if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    for k, d in enumerate(window):
        ud = dn.update_window_dims[k]
        if upd_shape[ud] == op_shape[d] and d not in dn.scatter_dims_to_operand_dims:
            op_dims[d] = upd_dims[ud] = fb.new(op_shape[d])
        else:
            op_dims[d] = fb.new(op_shape[d], "replicate")
            upd_dims[ud] = fb.new(upd_shape[ud], "replicate")
    scatter_upd = [d for d in range(len(upd_shape)) if d not in dn.update_window_dims]
    for k, ud in enumerate(scatter_upd):
        idx_d = k  # jax puts the index vector last, so indices dims line up with update scatter dims
        if idx_d in dn.scatter_indices_batching_dims:
            od = dn.operand_batching_dims[list(dn.scatter_indices_batching_dims).index(idx_d)]
            op_dims[od] = upd_dims[ud] = idx_dims[idx_d] = fb.new(upd_shape[ud])
        else:
            upd_dims[ud] = idx_dims[idx_d] = fb.new(upd_shape[ud], reduction_kind)
    op_dims = [fb.new(s, "replicate") if f is None else f for f, s in zip(op_dims, op_shape)]
    accumulators = (0,) if reduction_kind != "replicate" else ()
    return fb.build([op_dims, idx_dims, upd_dims], [op_dims], accumulators)


@register("scatter-add", "scatter_add")
def scatter_add_factors(eqn):
    return _scatter_factors(eqn, "sum")


@register("scatter", "scatter-mul", "scatter_mul", "scatter-min", "scatter_min", "scatter-max", "scatter_max")
def scatter_factors(eqn):
    return _scatter_factors(eqn, "replicate")
