"""Random numbers: keys, ``random_bits`` and ``threefry2x32``, with the same values as on
one device.

With ``jax_threefry_partitionable`` (the default) the bits of element ``i`` of a
``random_bits[shape]`` are ``threefry2x32(key, hi(i), lo(i))`` of its linear index ``i`` in
the *global* array: a split result is generated per device from the global indices of its
own block, no communication and no replicated work::

    random_bits[shape=(8, 4)] key:[]   ->   factors a:8 b:4;  key (), result (a)(b)

Keys themselves are small: seeds, wraps, splits and fold-ins are elementwise over key batch
dims (the split's new dims and the key-data dim stay unsplit).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ... import compat
from . import FactorBuilder, register
from .elementwise import elementwise_factors
from .. import collectives
from ..kinds import FactorKind

# random_clone copies keys.
for _name in ("random_seed", "random_fold_in", "threefry2x32", "random_clone"):
    register(_name)(elementwise_factors)


@register("random_gamma")
def random_gamma_factors(eqn):
    """``random_gamma key[K...], a[K..., R...]``: each key is split over the trailing ``R``
    dims of ``a`` (by their linear index), so the key dims pass and ``R`` stays whole."""
    key, a = eqn.invars[0].shape, eqn.invars[1].shape
    fb = FactorBuilder()
    lead = [fb.new(s) for s in key]
    dims = lead + [fb.new(s, "replicate") for s in a[len(key):]]
    return fb.build([lead, dims], [dims])


@register("rng_bit_generator")
def stateful_rng_factors(eqn):
    """XLA's own generator (``rbg`` keys, ``lax.rng_bit_generator``): values depend on the whole
    output shape, so results are made whole on every device (``replicate``)."""
    fb = FactorBuilder()
    return fb.build([[fb.new(s, "replicate") for s in v.shape] for v in eqn.invars],
                    [[fb.new(s, "replicate") for s in o.shape] for o in eqn.outvars])


def _bitcast_factors(eqn):
    src, dst = eqn.invars[0].dtype.itemsize, eqn.outvars[0].dtype.itemsize
    if src == dst:
        return elementwise_factors(eqn)
    fb = FactorBuilder()                # width change adds or drops a trailing dim
    shape_in, shape_out = eqn.invars[0].shape, eqn.outvars[0].shape
    common = [fb.new(s) for s in shape_in[:min(len(shape_in), len(shape_out))]]
    op = common + [fb.new(s, FactorKind.REPLICATE) for s in shape_in[len(common):]]
    out = common + [fb.new(s, FactorKind.REPLICATE) for s in shape_out[len(common):]]
    return fb.build([op], [out])


register("bitcast_convert_type")(_bitcast_factors)


@register("random_wrap")
def random_wrap_factors(eqn):
    fb = FactorBuilder()
    shape = eqn.invars[0].shape
    batch = [fb.new(s) for s in shape[:-1]]
    return fb.build([batch + [fb.new(shape[-1], FactorKind.REPLICATE)]], [batch])


@register("random_unwrap")
def random_unwrap_factors(eqn):
    fb = FactorBuilder()
    shape = eqn.outvars[0].shape
    batch = [fb.new(s) for s in shape[:-1]]
    return fb.build([batch], [batch + [fb.new(shape[-1], FactorKind.REPLICATE)]])


@register("random_split")
def random_split_factors(eqn):
    fb = FactorBuilder()
    keys = eqn.invars[0].shape
    batch = [fb.new(s) for s in keys]
    new = [fb.new(s, FactorKind.REPLICATE) for s in eqn.outvars[0].shape[len(keys):]]
    return fb.build([batch], [batch + new])


def _partitionable(eqn) -> bool:
    """A single threefry key and the partitionable scheme: then values depend only on the
    global index (other PRNG implementations keep the result unsplit)."""
    return (len(eqn.invars[0].shape) == 0 and bool(jax.config.jax_threefry_partitionable)
            and str(eqn.invars[0].dtype) == "key<fry>" and math.prod(eqn.params["shape"]) < 2 ** 32
            and len(eqn.outvars) == 1)    # JAX 0.12.1's num_streams > 1: several streams, kept whole


def _lower_random_bits(eqn, ctx, args):
    threefry2x32_p = compat.threefry2x32_p()
    (key,) = args
    shape, bits = eqn.params["shape"], eqn.params["bit_width"]
    layout, local = ctx.out_layouts[0], ctx.out_shapes[0]
    if eqn.invars[0].shape or not any(layout.dims):
        # Batched keys: only their batch dims may be split; each device draws for its keys.
        # (JAX 0.12.1 made random_bits a multiple-results primitive: one result per stream.)
        out = eqn.prim.bind(key, **eqn.params)
        return list(out) if eqn.prim.multiple_results else [out]
    # Linear index, in the global array, of every element of this device's block.
    index = jnp.zeros(local, jnp.uint32)
    for d, size in enumerate(shape):
        offset = jnp.uint32(0)
        if layout.dims[d]:
            offset = (collectives.block_index(layout.dims[d], ctx.axis_sizes) * local[d]).astype(jnp.uint32)
        index = index * jnp.uint32(size) + lax.broadcasted_iota(jnp.uint32, local, d) + offset
    data = jax.random.key_data(key)
    hi, lo = threefry2x32_p.bind(data[0], data[1], jnp.zeros(local, jnp.uint32), index)
    out = hi ^ lo
    if bits == 32:
        return [out]
    if bits == 64:
        return [(hi.astype(jnp.uint64) << 32) | lo.astype(jnp.uint64)]
    return [out.astype({8: jnp.uint8, 16: jnp.uint16}[bits])]


@register("random_bits", lower=_lower_random_bits)
def random_bits_factors(eqn):
    fb = FactorBuilder()
    kind = FactorKind.PASS if _partitionable(eqn) else FactorKind.REPLICATE
    # Batched keys (vmap over a key array): the result is keys.shape + shape, and each key
    # draws independently, so the key batch dims are shared pass factors. (Building the
    # result from ``shape`` alone gave it too few dims and the planner failed.)
    keys = [fb.new(s) for s in eqn.invars[0].shape]
    out = [fb.new(s, kind) for s in eqn.params["shape"]]
    return fb.build([keys], [keys + out] * len(eqn.outvars))
