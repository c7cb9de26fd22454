"""Block re-indexing: slice, split, concatenate and pad along a dim that stays split.

Operands and results of these ops are split over the same mesh axes along the moved dim, in
equal blocks (each length divisible by the number of blocks ``n``). Result block ``b`` covers
result rows ``[b*Bo, (b+1)*Bo)``; each row comes from one row of one operand (or is padding).
Where a run of rows crosses no block boundary it is one *piece*: ``(source block, offset in
it, destination block, offset in it, length)``. Pieces a device holds itself are local copies;
the others move with collective-permutes, greedily packed into *rounds* in which every device
sends at most one piece and receives at most one (of one length, or shorter pieces carried in
a longer slab of which the receiver keeps the piece's rows, whichever moves fewer rows). Each
round is one ``ppermute`` of a ``dynamic_slice`` whose offset the sender reads from a constant
table indexed by its block index. Local copies are rounds too, without the ``ppermute``. Each
result block is then read, at per-device row indices from a constant table, out of the
concatenation of the local operand blocks, the received slabs and fill rows: one gather for
the results of a split together, one concatenation of ``dynamic_slice`` runs for a single
result; XLA fuses it into one buffer per result (no padded buffer updated per round).

Fused QKV ``[B,T,3D]`` split 8 ways, cut into q, k, v (blocks of ``D/8``): device ``j`` of q
needs the ``D/8`` rows that start ``j*D/8``, held by block ``floor(j/3)``; the three results'
pieces share rounds (3 of ``D/8`` rows each), where gathering ``x`` whole moves ``7*3D/8``.

>>> p = plan((24,), (8, 8, 8), (((0, 8, 0, 0),), ((0, 8, 0, 8),), ((0, 8, 0, 16),)), 8)
>>> len(p.rounds), sum(r.remote for r in p.rounds)
(4, 3)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import collectives
from .planner import Transform


@dataclass(frozen=True)
class Piece:
    src: int          # source block
    dst: int          # destination block
    operand: int
    result: int
    src_off: int      # first row within the source block
    dst_off: int      # first row within the destination block
    length: int


@dataclass(frozen=True)
class Round:
    """Pieces of one length, each device at most once as sender and once as receiver; a
    ``remote`` round is one collective-permute, a local one a copy on every device."""
    length: int
    remote: bool
    pieces: tuple


@dataclass(frozen=True)
class Plan:
    n: int
    in_sizes: tuple
    out_sizes: tuple
    rounds: tuple

    def pairs(self, r: Round) -> tuple:
        return tuple((p.src, p.dst) for p in r.pieces)


def pieces(in_sizes, out_sizes, segments, n) -> list[Piece]:
    """``segments[r]``: ``(first, stop, operand, operand row of first)`` runs of result ``r``
    (rows outside every run are padding)."""
    out = []
    for r, segs in enumerate(segments):
        bo = out_sizes[r] // n
        for b in range(n):
            lo_b, hi_b = b * bo, (b + 1) * bo
            for first, stop, k, s0 in segs:
                lo, hi = max(first, lo_b), min(stop, hi_b)
                bi = in_sizes[k] // n
                pos = s0 + lo - first
                while lo < hi:
                    src = pos // bi
                    length = min(hi - lo, (src + 1) * bi - pos)
                    out.append(Piece(src, b, k, r, pos - src * bi, lo - lo_b, length))
                    lo += length
                    pos += length
    return out


def _pack(items, n, blocks, exact: bool) -> list[Round]:
    """First fit, longest pieces first, into rounds where each device sends and receives at
    most once. ``exact``: a round holds pieces of its length only; else any shorter piece
    too (its sender sends the round's length, the receiver keeps the piece's rows), from an
    operand whose blocks (``blocks``) hold that many rows."""
    rounds: list[tuple[int, bool, list, set, set]] = []
    for p in sorted(items, key=lambda p: (-p.length, (p.dst - p.src) % n, p.src, p.result)):
        remote = p.src != p.dst
        for length, rem, got, senders, receivers in rounds:
            if ((length == p.length or not exact and length <= blocks[p.operand]) and rem == remote
                    and p.src not in senders and p.dst not in receivers):
                break
        else:
            got, senders, receivers = [], set(), set()
            rounds.append((p.length, remote, got, senders, receivers))
        got.append(p)
        senders.add(p.src)
        receivers.add(p.dst)
    return [Round(length, rem, tuple(got)) for length, rem, got, _, _ in rounds]


def wire_rows(p: "Plan") -> int:
    return sum(r.length for r in p.rounds if r.remote)


@lru_cache(maxsize=4096)
def plan(in_sizes: tuple, out_sizes: tuple, segments: tuple, n: int) -> Plan:
    """The cheaper (rows on the wire, then rounds) of rounds of one piece length and rounds
    that carry shorter pieces in longer slabs."""
    items = pieces(in_sizes, out_sizes, segments, n)
    blocks = [s // n for s in in_sizes]
    plans = [Plan(n, in_sizes, out_sizes, tuple(_pack(items, n, blocks, exact))) for exact in (True, False)]
    return min(plans, key=lambda q: (wire_rows(q), len(q.rounds)))


def divisible(sizes, n) -> bool:
    return all(s % n == 0 for s in sizes)


# ---------------------------------------------------------------------------- segments
def slice_segments(start: int, stop: int) -> tuple:
    return (((0, stop - start, 0, start),),)


def split_segments(sizes) -> tuple:
    out, at = [], 0
    for s in sizes:
        out.append(((0, s, 0, at),))
        at += s
    return tuple(out)


def concat_segments(sizes) -> tuple:
    out, at = [], 0
    for k, s in enumerate(sizes):
        out.append((at, at + s, k, 0))
        at += s
    return (tuple(out),)


def pad_segments(in_size: int, lo: int, hi: int) -> tuple:
    """Result row ``i`` is operand row ``i - lo`` (negative ``lo`` / ``hi`` crop)."""
    first, stop = max(lo, 0), min(lo + in_size, lo + in_size + min(hi, 0))
    return (((first, stop, 0, first - lo),),) if stop > first else ((),)


# ---------------------------------------------------------------------------- lowering
def _moved(p: Plan, r: Round, axes, axis_sizes) -> tuple:
    moved = set(collectives.moved_axes(axes, axis_sizes, p.pairs(r)))
    return tuple(a for a in axis_sizes if a in moved)


def permutes(p: Plan, dim, axes, axis_sizes, in_shape) -> list[tuple]:
    """``(moved mesh axes, per-device shape, round)`` of each collective-permute ``apply``
    runs; ``in_shape`` the local shape of the operands (the moved dim aside)."""
    out = []
    for r in p.rounds:
        if r.remote:
            shape = list(in_shape)
            shape[dim] = r.length
            out.append((_moved(p, r, axes, axis_sizes), tuple(shape), r))
    return out


def _table(values, default, n):
    t = np.full((n,), default, np.int32)
    for i, v in values:
        t[i] = v
    return jnp.asarray(t)


def _concat(parts, dim):
    return parts[0] if len(parts) == 1 else lax.concatenate(parts, dim)


def apply(xs, dim, axes, axis_sizes, p: Plan, fill=None):
    """Run plan ``p`` on this device's blocks ``xs`` (one per operand) of a dim split over
    ``axes``; the result blocks, rows no piece covers set to ``fill`` (0 when None).

    A remote round sends one ``dynamic_slice`` of the (concatenated) operand blocks its
    senders draw from; a slab longer than its piece starts at most ``length`` rows before the
    piece (kept inside the source block). The result blocks are then read out of the
    concatenation of the operand blocks, the received slabs and fill rows, at per-device row
    indices from a constant ``[n, rows]`` table: one gather for all the results of a split
    (their blocks side by side, sliced apart after), one concatenation of ``dynamic_slice``
    runs for a single result. No buffer with spare rows, no per-round update or mask: XLA fuses
    the concatenation into its reader, so each result is the only buffer written."""
    n = p.n
    b = collectives.block_index(axes, axis_sizes)
    blocks = [s // n for s in p.in_sizes]
    got = []                                                # (round, slab start per sender, slab)
    for r in p.rounds:
        if not r.remote:
            continue
        operands = sorted({q.operand for q in r.pieces})
        base = dict(zip(operands, np.cumsum([0] + [blocks[k] for k in operands]).tolist()))
        start = {q.src: min(q.src_off, blocks[q.operand] - r.length) for q in r.pieces}
        off = _table([(q.src, base[q.operand] + start[q.src]) for q in r.pieces], 0, n)[b]
        slab = lax.dynamic_slice_in_dim(_concat([xs[k] for k in operands], dim), off, r.length, axis=dim)
        got.append((r, start, collectives.permute_blocks(slab, axes, axis_sizes, p.pairs(r))))
    # One gather for all the results (their blocks side by side, then sliced apart): a
    # concatenation shared by several gathers would be materialised instead of fused.
    offs = np.cumsum([0] + [s // n for s in p.out_sizes]).tolist()
    index = np.full((n, offs[-1]), -1, np.int64)
    parts, at = [], 0
    local = [q for r in p.rounds if not r.remote for q in r.pieces]
    for k in sorted({q.operand for q in local}):
        for q in local:
            if q.operand == k:
                row = offs[q.result] + q.dst_off
                index[q.dst, row:row + q.length] = at + q.src_off + np.arange(q.length)
        parts.append(xs[k])
        at += blocks[k]
    for r, start, slab in got:
        for q in r.pieces:
            row = offs[q.result] + q.dst_off
            index[q.dst, row:row + q.length] = at + q.src_off - start[q.src] + np.arange(q.length)
        parts.append(slab)
        at += r.length
    if (index < 0).any() or not parts:
        shape = list(xs[0].shape)
        shape[dim] = max(s // n for s in p.out_sizes)
        parts.append(jnp.full(shape, 0 if fill is None else fill, xs[0].dtype))
        for res, lo in enumerate(offs[:-1]):                # fill rows read the fill part in order
            block = index[:, lo:offs[res + 1]]
            rows = np.broadcast_to(at + np.arange(block.shape[1]), block.shape)
            block[block < 0] = rows[block < 0]
    src = _concat(parts, dim)
    if src.shape[dim] == offs[-1] and (index == np.arange(offs[-1])).all():
        out = src
    elif len(p.out_sizes) == 1:
        out = _runs(src, index, dim, b)
    else:
        out = jnp.take(src, jnp.asarray(index.astype(np.int32))[b], axis=dim, mode="clip")
    if len(p.out_sizes) == 1:
        return [out]
    return [lax.slice_in_dim(out, lo, hi, axis=dim) for lo, hi in zip(offs[:-1], offs[1:])]


def _runs(src, index, dim, b):
    """``src`` rows ``index[b]`` along ``dim``, as a concatenation of one ``dynamic_slice`` per
    run of rows that is contiguous in ``src`` on every device (no gather: XLA would transpose
    a gather along a minor dim, and the transposed layout reaches its users)."""
    cut = [0] + [i for i in range(1, index.shape[1]) if (index[:, i] != index[:, i - 1] + 1).any()]
    stops = cut[1:] + [index.shape[1]]
    starts = jnp.asarray(index[:, cut].astype(np.int32))[b]
    return _concat([lax.dynamic_slice_in_dim(src, starts[j], hi - lo, axis=dim)
                    for j, (lo, hi) in enumerate(zip(cut, stops))], dim)


@dataclass(frozen=True)
class ReindexTransform(Transform):
    """One round's collective-permute; ``key`` names the pieces it moves, so only the same
    move of the same value (one collective once XLA's CSE merged them) compares equal."""
    key: tuple = ()


def transforms(p: Plan, dim, axes, axis_sizes, in_shape, what: str) -> list[tuple]:
    """``(Transform, reason)`` per collective-permute :func:`apply` runs."""
    out = []
    for moved, shape, r in permutes(p, dim, axes, axis_sizes, in_shape):
        key = ("reindex", dim, tuple(axes), p.in_sizes, r)
        out.append((ReindexTransform("collective-permute", moved, dim=dim, in_shape=shape, key=key),
                    f"{what}: {len(r.pieces)} pieces of {r.length} rows of dim {dim} cross device blocks"))
    return out
