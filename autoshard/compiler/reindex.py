"""Block re-indexing: slice, split, concatenate and pad along a dim that stays split.

Operands and results of these ops are split over the same mesh axes along the moved dim, in
equal blocks (each length divisible by the number of blocks ``n``). Result block ``b`` covers
result rows ``[b*Bo, (b+1)*Bo)``; each row comes from one row of one operand (or is padding).
Where a run of rows crosses no block boundary it is one *piece*: ``(source block, offset in
it, destination block, offset in it, length)``. Pieces a device holds itself are local copies;
the others move with collective-permutes, greedily packed into *rounds* in which every device
sends at most one piece and receives at most one (of one length, or shorter pieces carried in
a longer slab and masked on arrival, whichever moves fewer rows). Each round is one
``ppermute`` of a ``dynamic_slice`` whose offset the sender reads from a constant table indexed
by its block index; the receiver writes it with ``dynamic_update_slice`` at its own table
offset (devices without a piece in the round write into spare rows past the block). Local
copies are rounds too, without the ``ppermute``.

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


def apply(xs, dim, axes, axis_sizes, p: Plan, fill=None):
    """Run plan ``p`` on this device's blocks ``xs`` (one per operand) of a dim split over
    ``axes``; the result blocks, rows no piece covers set to ``fill`` (0 when None).

    Each result block is built in a buffer with ``m`` spare rows before and after it (``m``
    the longest round): devices without a piece in a round write into them. A slab longer
    than its piece starts at most ``length`` rows before the piece (kept inside the source
    block) and only the piece's rows are kept."""
    n = p.n
    b = collectives.block_index(axes, axis_sizes)
    x0 = xs[0]
    m = max((r.length for r in p.rounds), default=0)
    outs = []
    for size in p.out_sizes:
        shape = list(x0.shape)
        shape[dim] = size // n + 2 * m
        outs.append(jnp.full(shape, 0 if fill is None else fill, x0.dtype))
    for r in p.rounds:
        operands = sorted({q.operand for q in r.pieces})
        start = {q.src: min(q.src_off, p.in_sizes[q.operand] // n - r.length) for q in r.pieces}
        src_off = _table(start.items(), 0, n)[b]
        sent = [lax.dynamic_slice_in_dim(xs[k], src_off, r.length, axis=dim) for k in operands]
        if len(sent) == 1:
            piece = sent[0]
        else:
            which = _table([(q.src, operands.index(q.operand)) for q in r.pieces], 0, n)[b]
            piece = lax.select_n(which, *sent)
        if r.remote:
            piece = collectives.permute_blocks(piece, axes, axis_sizes, p.pairs(r))
        for res in sorted({q.result for q in r.pieces}):
            got = [q for q in r.pieces if q.result == res]
            at = _table([(q.dst, m + q.dst_off - (q.src_off - start[q.src])) for q in got],
                        m + p.out_sizes[res] // n, n)[b]
            placed = lax.dynamic_update_slice_in_dim(outs[res], piece, at, axis=dim)
            if all(q.length == r.length for q in got):
                outs[res] = placed
                continue
            first = _table([(q.dst, m + q.dst_off) for q in got], 0, n)[b]
            stop = first + _table([(q.dst, q.length) for q in got], 0, n)[b]
            shape = [1] * placed.ndim
            shape[dim] = placed.shape[dim]
            row = lax.broadcasted_iota(jnp.int32, tuple(shape), dim)
            outs[res] = jnp.where((row >= first) & (row < stop), placed, outs[res])
    return [lax.slice_in_dim(o, m, m + size // n, axis=dim) for o, size in zip(outs, p.out_sizes)]


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
