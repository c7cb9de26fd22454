"""The only module that calls JAX's collectives (and ``axis_index``).

``apply(x, transforms)`` runs a reshard plan from ``compiler.planner`` inside
``jax.shard_map``: one collective per collective transform, local slicing/masking for the free
ones. Reductions map to ``psum`` / ``pmax`` / ``pmin``; reduce-scatter is
``psum_scatter(tiled=True)``; gathers and all-to-alls are tiled, so blocks stay contiguous. An
all-gather of a minor dim of a tensor of rank 3 or more runs on that dim moved first
(:func:`_all_gather`), so the compiled HLO's all-gather has that operand (:func:`gathered_first`; the report names it so).
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


def moves_first(rank: int, dim: int) -> bool:
    """Whether :func:`_all_gather` moves ``dim`` first: a minor dim of a tensor of rank 3 or
    more. A matrix is gathered in place: XLA reads a transposed matrix in a dot as it is, and a
    transpose after the gather would be a copy into which XLA duplicates the gathered value's
    element-wise producer, once per reader (an optimizer update gathered for its output)."""
    return dim > 0 and rank >= 3


def gathered_first(shape, dim) -> tuple:
    """The operand of an all-gather of ``dim`` of ``shape`` as :func:`_all_gather` runs it
    (the shape the compiled HLO's all-gather has)."""
    shape = tuple(shape)
    if not moves_first(len(shape), dim):
        return shape
    return (shape[dim],) + shape[:dim] + shape[dim + 1:]


def _all_gather(x, axis, dim, copy):
    """Tiled all-gather of ``dim``, run on that dim moved first. XLA CPU gathers a buffer's
    major dim only: gathering a minor one, it lays the result out with that dim major and
    copies it back for each reader, also where the reader would take that layout as it is (a
    matmul contracting the gathered dim: hidden states ``[T, B, D/n]`` gathered for a
    vocabulary-parallel head got a ``[D, T*B]`` copy for the logits and a ``[T*B, D]`` one for
    the weight's gradient, both made when the gather is, XLA CPU scheduling breadth-first).
    Moved first here, the moves are transposes XLA folds into the readers: the logits matmul
    reads the gathered buffer itself.

    The ``copy``-th re-gather of a value runs on it with ``copy`` leading size-1 dims (a
    bitcast), so XLA, which merges identical collectives (every one of a shard_map program
    has the same channel id), keeps it apart from the earlier gathers."""
    moved = moves_first(x.ndim, dim)
    y = jnp.moveaxis(x, dim, 0) if moved else x
    y = lax.all_gather(y.reshape((1,) * copy + y.shape), axis, axis=copy + (0 if moved else dim), tiled=True)
    y = y.reshape(y.shape[copy:])
    return jnp.moveaxis(y, 0, dim) if moved else y


def apply(x, transforms, axis_sizes, copy: int = 0):
    """Run ``transforms`` on ``x``; ``copy`` > 0 marks a re-gather (``_all_gather``)."""
    for t in transforms:
        if t.kind == "all-reduce":
            x = _ALL_REDUCE[t.op](x, t.axes if len(t.axes) > 1 else t.axes[0])
        elif t.kind == "reduce-scatter":
            if t.pad_to > 0:
                x = _pad_dim(x, t.dim, t.pad_to)
            x = lax.psum_scatter(x, t.axes[0], scatter_dimension=t.dim, tiled=True)
        elif t.kind == "all-gather":
            x = _all_gather(x, t.axes[0], t.dim, copy)
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


# -- windowed ops (halo exchange)
# A dim split over ``axes`` into blocks of ``block`` rows (the last ones padded when the split
# is uneven). A windowed op's device needs the rows ``[first, end)`` *relative to its own
# block's first row*: its own rows and halos from the blocks ``k`` before or after it, one
# collective-permute per such block. Rows beyond the ends of the dim arrive as zeros (a
# device with no source receives zeros) or, with ``fill``, as ``fill``.
def _n_blocks(axes, axis_sizes):
    n = 1
    for a in axes:
        n *= axis_sizes[a]
    return n


def permute_blocks(x, axes, axis_sizes, pairs):
    """``ppermute`` between block indices of a dim split over ``axes`` (major to minor).
    Over several axes jax numbers the devices in mesh order whatever the order of ``axes``
    (``axis_sizes`` is in mesh order): the pairs are translated."""
    if len(axes) == 1:
        return lax.ppermute(x, axes[0], pairs)
    mesh_order = [a for a in axis_sizes if a in axes]

    def rank(b):
        coords = {}
        for a in reversed(axes):
            coords[a] = b % axis_sizes[a]
            b //= axis_sizes[a]
        r = 0
        for a in mesh_order:
            r = r * axis_sizes[a] + coords[a]
        return r
    return lax.ppermute(x, tuple(mesh_order), [(rank(s), rank(t)) for s, t in pairs])


def moved_axes(axes, axis_sizes, pairs):
    """Mesh axes along which some source and its target differ (as the HLO shows them)."""
    sizes = [axis_sizes[a] for a in axes]

    def coords(i):
        out = []
        for n in reversed(sizes):
            out.append(i % n)
            i //= n
        return out[::-1]
    return tuple(a for j, a in enumerate(axes)
                 if any(coords(s)[j] != coords(t)[j] for s, t in pairs))


def window_pieces(axes, axis_sizes, block, first, end):
    """How rows ``[first, end)`` (relative to each block) are assembled, in row order:
    ``(k, start, stop, pairs, moved_axes)`` = rows ``[start, stop)`` of the block ``k``
    after this one (``k < 0``: before); ``pairs`` (source, target) block indices, empty for
    the own block (``k == 0``, no collective) and for blocks past every end (zeros)."""
    n = _n_blocks(axes, axis_sizes)
    out = []
    for k in range(first // block, -(-end // block)):
        start, stop = max(first, k * block) - k * block, min(end, (k + 1) * block) - k * block
        if stop <= start:
            continue
        pairs = () if k == 0 or abs(k) >= n else \
            tuple((s, s - k) for s in range(max(k, 0), n + min(k, 0)))
        out.append((k, start, stop, pairs, moved_axes(axes, axis_sizes, pairs) if pairs else ()))
    return out


def window_rows(x, dim, axes, axis_sizes, first, end, fill=None, size=None):
    """Rows ``[first, end)`` relative to this device's block along ``dim`` (its own rows and
    halos from the blocks around it). With ``fill``, rows outside ``[0, size)`` -- beyond the
    ends, or the padding of an unevenly split dim -- are set to ``fill``.

    >>> # rows 0..7 over a=4 (blocks of 2), first=-1, end=3: device 1 gets rows 1, 2, 3, 4
    """
    block = x.shape[dim]
    pieces = []
    for k, start, stop, pairs, _ in window_pieces(axes, axis_sizes, block, first, end):
        piece = lax.slice_in_dim(x, start, stop, axis=dim)
        if k != 0:
            if pairs:
                piece = permute_blocks(piece, axes, axis_sizes, pairs)
            else:
                piece = jnp.zeros_like(piece)
        pieces.append(piece)
    out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=dim)
    if fill is not None:
        size = _n_blocks(axes, axis_sizes) * block if size is None else size
        shape = [1] * x.ndim
        shape[dim] = out.shape[dim]
        row = block_index(axes, axis_sizes) * block + first + lax.broadcasted_iota(jnp.int32, tuple(shape), dim)
        out = jnp.where((row >= 0) & (row < size), out, jnp.asarray(fill, dtype=x.dtype))
    return out


def window_return(y, dim, axes, axis_sizes, block, first, end):
    """Transpose of :func:`window_rows`: ``y`` holds rows ``[first, end)`` relative to this
    device's block; each row is sent back to the block that owns it and added there."""
    shape = list(y.shape)
    shape[dim] = block
    own = jnp.zeros(shape, y.dtype)
    pos = 0
    for k, start, stop, pairs, _ in window_pieces(axes, axis_sizes, block, first, end):
        piece = lax.slice_in_dim(y, pos, pos + stop - start, axis=dim)
        pos += stop - start
        if k != 0 and not pairs:
            continue
        if pairs:
            piece = permute_blocks(piece, axes, axis_sizes, [(t, s) for s, t in pairs])
        widths = [(0, 0)] * y.ndim
        widths[dim] = (start, block - stop)
        own = own + jnp.pad(piece, widths)
    return own


def dynamic_rows(x, dim, axes, axis_sizes, start, step, rows):
    """Rows ``[start + b * step, ... + rows)`` of ``x`` on the device of block ``b``
    (clamped into ``x``, as ``dynamic_slice`` does)."""
    if step == 0:
        return lax.slice_in_dim(x, start, start + rows, axis=dim)
    offset = start + block_index(axes, axis_sizes) * step
    return lax.dynamic_slice_in_dim(x, offset, rows, axis=dim)


def dynamic_place(y, dim, axes, axis_sizes, start, step, total):
    """Transpose of :func:`dynamic_rows`: ``y`` placed in zeros of ``total`` rows."""
    if step == 0:
        widths = [(0, 0)] * y.ndim
        widths[dim] = (start, total - start - y.shape[dim])
        return jnp.pad(y, widths)
    shape = list(y.shape)
    shape[dim] = total
    offset = start + block_index(axes, axis_sizes) * step
    return lax.dynamic_update_slice_in_dim(jnp.zeros(shape, y.dtype), y, offset, axis=dim)


# -- pipelines (runtime/pipelined_scan.py)
def stage_index(axis):
    """This device's index along the pipeline's stage axis."""
    return lax.axis_index(axis)


def stage_shift(x, axis, stages, reverse=False):
    """One collective-permute: stage ``s`` sends ``x`` to ``s + 1`` (``s - 1`` when
    ``reverse``); the first stage (last, when ``reverse``) receives zeros."""
    pairs = [(s, s - 1) for s in range(1, stages)] if reverse else [(s, s + 1) for s in range(stages - 1)]
    return lax.ppermute(x, axis, pairs)


def stage_broadcast(x, axis, src, stage):
    """Every stage gets stage ``src``'s ``x`` (one all-reduce of ``x`` kept on ``src`` only)."""
    return lax.psum(jnp.where(stage == src, x, jnp.zeros_like(x)), axis)
