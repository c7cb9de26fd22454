"""The only module that calls JAX's collectives (and ``axis_index``).

``apply(x, transforms)`` runs a reshard plan from ``compiler.planner`` inside
``jax.shard_map``: one collective per collective transform, local slicing/masking for the free
ones. Reductions map to ``psum`` / ``pmax`` / ``pmin``; reduce-scatter is
``psum_scatter(tiled=True)``; gathers and all-to-alls are tiled, so blocks stay contiguous.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_ALL_REDUCE = {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin}


def block_index(axes, axis_sizes):
    """Index of this device's block along a dim split over ``axes`` (major to minor)."""
    idx = jnp.int32(0)
    for a in axes:
        idx = idx * axis_sizes[a] + lax.axis_index(a)
    return idx


def _pad_dim(x, dim, size):
    if x.shape[dim] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, size - x.shape[dim])
    return jnp.pad(x, widths)


def mask_padding(x, dim, axes, axis_sizes, true_size, fill):
    """Set the padding rows of an unevenly split dim (global index >= ``true_size``) to
    ``fill``, the identity of the reduction about to run over them."""
    block = x.shape[dim]
    start = block_index(axes, axis_sizes) * block
    shape = [1] * x.ndim
    shape[dim] = block
    index = start + lax.broadcasted_iota(jnp.int32, tuple(shape), dim)
    return jnp.where(index < true_size, x, jnp.asarray(fill, dtype=x.dtype))


def apply(x, transforms, axis_sizes):
    for t in transforms:
        if t.kind == "all-reduce":
            x = _ALL_REDUCE[t.op](x, t.axes if len(t.axes) > 1 else t.axes[0])
        elif t.kind == "reduce-scatter":
            if t.pad_to > 0:
                x = _pad_dim(x, t.dim, t.pad_to)
            x = lax.psum_scatter(x, t.axes[0], scatter_dimension=t.dim, tiled=True)
        elif t.kind == "all-gather":
            x = lax.all_gather(x, t.axes[0], axis=t.dim, tiled=True)
            if t.trim >= 0:
                x = lax.slice_in_dim(x, 0, t.trim, axis=t.dim)
        elif t.kind == "all-to-all":
            x = lax.all_to_all(x, t.axes[0], split_axis=t.split_dim, concat_axis=t.dim, tiled=True)
        elif t.kind == "slice":
            if t.pad_to > 0:
                x = _pad_dim(x, t.dim, t.pad_to)
            n = axis_sizes[t.axes[0]]
            chunk = x.shape[t.dim] // n
            x = lax.dynamic_slice_in_dim(x, lax.axis_index(t.axes[0]) * chunk, chunk, axis=t.dim)
        elif t.kind == "mask":
            # A replicated value becomes partial by keeping it on one device only.
            assert t.op == "sum", f"mask for P({t.op}) is not needed by any rule"
            x = jnp.where(lax.axis_index(t.axes[0]) == 0, x, jnp.zeros_like(x))
        else:
            raise AssertionError(f"unknown transform {t.kind}")
    return x
