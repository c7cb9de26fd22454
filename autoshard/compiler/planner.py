"""Reshard planner: turn ``src -> dst`` layouts into per-mesh-axis transforms.

Each transform becomes exactly one collective (or a free local step) in
``compiler/collectives.py``; the report reads the same plan, so it cannot disagree with what
runs. Per mesh axis::

    S(d) -> B      all-gather           P -> B      all-reduce (psum / pmax / pmin)
    S(d) -> S(e)   all-to-all           P -> S(d)   reduce-scatter (psum_scatter)
    B    -> S(d)   local slice (free)   B -> P      keep on one device, zero elsewhere (free)

Order matters when a dim is split over several axes (major to minor): axes are removed from
the minor end first and appended at the minor end, so block indices stay contiguous.

>>> plan(Layout(((), ()), (("model", "sum"),)), Layout((("model",), ())), (8, 4), {"model": 4})
(Transform(kind='reduce-scatter', axes=('model',), dim=0, ...),)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

from .cost_model import LinkModel, collective_time, group_link, wire_bytes
from .layout import Layout

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass(frozen=True)
class Transform:
    kind: str                   # a collective kind, or "slice" / "mask" (local, free)
    axes: tuple[str, ...]       # mesh axes it runs over
    op: str = "sum"             # reduction op of all-reduce / reduce-scatter
    dim: int = -1               # dim gathered / scattered / sliced; all-to-all: concat dim
    split_dim: int = -1         # all-to-all: the dim split over ``axes``
    in_shape: tuple = ()        # per-device operand shape
    src: Layout | None = None
    dst: Layout | None = None
    # Uneven dims (padded per device): pad ``dim`` to ``pad_to`` before slicing or
    # reduce-scattering it; cut it to ``trim`` (its true size) after gathering it whole.
    pad_to: int = -1
    trim: int = -1

    @property
    def is_collective(self) -> bool:
        return self.kind in COLLECTIVE_KINDS

    def group_size(self, axis_sizes) -> int:
        return math.prod(axis_sizes[a] for a in self.axes)

    def __repr__(self):
        return f"Transform(kind={self.kind!r}, axes={self.axes!r}, dim={self.dim}, ...)"


def _next_axis(cur: list, want: tuple):
    """The axis to append next on a dim currently split over ``cur`` to reach ``want``."""
    if len(cur) < len(want) and tuple(want[:len(cur)]) == tuple(cur):
        return want[len(cur)]
    return None


def plan(src: Layout, dst: Layout, shape, axis_sizes: dict) -> tuple[Transform, ...]:
    return _plan(src, dst, tuple(shape), tuple(sorted(axis_sizes.items())))


@lru_cache(maxsize=200_000)
def _plan(src: Layout, dst: Layout, shape, axis_items) -> tuple[Transform, ...]:
    if src == dst:
        return ()
    sizes = dict(axis_items)
    cur = [list(a) for a in src.dims]
    partial = dict(src.partial)
    want_partial = dict(dst.partial)
    local = list(Layout(src.dims).local_shape(shape, sizes))
    steps: list[Transform] = []

    def layout_now():
        return Layout(tuple(tuple(a) for a in cur), tuple(sorted(partial.items())))

    def n_of(axes):
        return math.prod(sizes[a] for a in axes)

    def uneven(d, axes):
        return bool(axes) and shape[d] % n_of(axes) != 0

    # 1. Remove axes beyond the common prefix, minor first: all-to-all when the axis is
    #    wanted next on another dim, else all-gather. An uneven dim keeps nothing unless
    #    it is unchanged: its blocks are padded for the whole axis list, so a prefix of the
    #    list does not describe them; it is gathered whole and cut to its true size.
    #    Pure all-gathers (an axis wanted nowhere in ``dst``) of an even dim that no pending
    #    reduction lands on wait until after step 2: the reduction then runs on the smaller
    #    shard (a weight gradient split over an axis its weight is replicated on is
    #    reduce-scattered, then gathered, not gathered whole and then reduced).
    pending = {a for a, op in partial.items() if want_partial.get(a) != op and op == "sum"}
    wanted = {a for axes in dst.dims for a in axes}
    deferred = [d for d in range(len(cur))
                if pending and not pending & set(dst.dims[d]) and not uneven(d, src.dims[d])
                and not uneven(d, dst.dims[d]) and not set(src.dims[d]) & wanted]

    def remove(d):
        keep = 0
        while keep < min(len(cur[d]), len(dst.dims[d])) and cur[d][keep] == dst.dims[d][keep]:
            keep += 1
        if (uneven(d, src.dims[d]) or uneven(d, dst.dims[d])) and tuple(src.dims[d]) != tuple(dst.dims[d]):
            keep = 0
        while len(cur[d]) > keep:
            a = cur[d][-1]
            n = sizes[a]
            before_shape = tuple(local)
            before = layout_now()
            target = next((e for e in range(len(cur)) if e != d and _next_axis(cur[e], dst.dims[e]) == a
                           and local[e] % n == 0 and not uneven(e, dst.dims[e])
                           and not uneven(e, tuple(cur[e]) + (a,))), None)
            if uneven(d, cur[d]):
                target = None
            cur[d].pop()
            local[d] *= n
            if target is not None and a not in want_partial:
                cur[target].append(a)
                local[target] //= n
                steps.append(Transform("all-to-all", (a,), dim=d, split_dim=target, in_shape=before_shape,
                                       src=before, dst=layout_now()))
            else:
                trim = shape[d] if not cur[d] and local[d] != shape[d] else -1
                if trim >= 0:
                    local[d] = shape[d]
                steps.append(Transform("all-gather", (a,), dim=d, in_shape=before_shape,
                                       src=before, dst=layout_now(), trim=trim))

    for d in range(len(cur)):
        if d not in deferred:
            remove(d)

    # 2. Resolve partial axes: reduce-scatter onto a dim that wants the axis next, else
    #    all-reduce; all-reduces with the same op over several axes run as one collective.
    #    Onto an uneven dim only from unsplit to exactly this one axis (padded first).
    progress = True
    while progress:
        progress = False
        for a, op in list(partial.items()):
            if want_partial.get(a) == op or op != "sum":
                continue
            target = None
            for e in range(len(cur)):
                if _next_axis(cur[e], dst.dims[e]) != a:
                    continue
                new_axes = tuple(cur[e]) + (a,)
                if not uneven(e, new_axes) and local[e] % sizes[a] == 0:
                    target = (e, -1)
                elif not cur[e] and tuple(dst.dims[e]) == (a,):
                    target = (e, -(-shape[e] // sizes[a]) * sizes[a])
                if target:
                    break
            if target is not None:
                e, pad_to = target
                before_shape, before = tuple(local), layout_now()
                del partial[a]
                cur[e].append(a)
                local[e] = (pad_to if pad_to > 0 else local[e]) // sizes[a]
                steps.append(Transform("reduce-scatter", (a,), op="sum", dim=e, in_shape=before_shape,
                                       src=before, dst=layout_now(), pad_to=pad_to))
                progress = True
    by_op: dict[str, list] = {}
    for a, op in partial.items():
        if want_partial.get(a) != op:
            by_op.setdefault(op, []).append(a)
    for op, axes in by_op.items():
        before_shape, before = tuple(local), layout_now()
        for a in axes:
            del partial[a]
        steps.append(Transform("all-reduce", tuple(axes), op=op, in_shape=before_shape,
                               src=before, dst=layout_now()))

    for d in deferred:
        remove(d)

    # 3. Append wanted axes by slicing locally (free). An uneven dim is padded once, to a
    #    multiple of all the axes it will be split over, before its first slice.
    for d in range(len(cur)):
        while (a := _next_axis(cur[d], dst.dims[d])) is not None:
            before_shape, before = tuple(local), layout_now()
            pad_to = -1
            if not cur[d] and uneven(d, dst.dims[d]):
                pad_to = -(-shape[d] // n_of(dst.dims[d])) * n_of(dst.dims[d])
                local[d] = pad_to
            cur[d].append(a)
            local[d] //= sizes[a]
            steps.append(Transform("slice", (a,), dim=d, in_shape=before_shape, src=before,
                                   dst=layout_now(), pad_to=pad_to))

    # 4. Wanted partial axes the value is not partial over: keep it on one device (free).
    for a, op in want_partial.items():
        if a not in partial:
            before_shape, before = tuple(local), layout_now()
            partial[a] = op
            steps.append(Transform("mask", (a,), op=op, in_shape=before_shape, src=before, dst=layout_now()))

    assert layout_now() == dst, f"planner could not reach {dst} from {src}: got {layout_now()}"
    return tuple(steps)


def transform_bytes(t: Transform, itemsize: int, axis_sizes) -> float:
    """Wire bytes per device of transform ``t`` on a value of ``itemsize``-byte elements."""
    if not t.is_collective:
        return 0.0
    return wire_bytes(t.kind, t.group_size(axis_sizes), math.prod(t.in_shape) * itemsize)


def transform_time(t: Transform, itemsize: int, axis_sizes, links: Mapping[str, LinkModel],
                   latency_weight: float = 1.0) -> float:
    """Seconds of transform ``t`` (0 for the free local ones): ``cost_model.collective_time``
    over the group of its mesh axes. Every estimate of a planned collective goes through here
    (the report, the layout search, the propagation passes' choices)."""
    if not t.is_collective:
        return 0.0
    return collective_time(t.kind, t.group_size(axis_sizes), math.prod(t.in_shape) * itemsize,
                           group_link(links, t.axes), latency_weight)


# Choices are made for the bytes, which grow with the model; latency only breaks ties. (Test
# models are tiny: with full latency an all-gather of a whole activation would "beat" an
# all-reduce of a scalar, a choice that is wrong at any real size.)
LATENCY_WEIGHT_IN_CHOICES = 1e-6   # one latency step ~ a few bytes


def reshard_time(src: Layout, dst: Layout, shape, itemsize: int, axis_sizes, links,
                 latency_weight: float = LATENCY_WEIGHT_IN_CHOICES) -> float:
    """Cost the propagation passes minimise for one reshard (seconds, latency down-weighted;
    the layout search weighs it fully, as the report's time estimate does)."""
    total = 0.0
    if src != dst:
        for t in plan(src, dst, shape, axis_sizes):     # in plan order, as it always added up
            total += transform_time(t, itemsize, axis_sizes, links, latency_weight)
    return total
