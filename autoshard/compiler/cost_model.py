"""Cost of collectives: bytes on the wire (ring model) and time (alpha-beta per mesh axis);
cost of per-device work (points of an equation's factor space).

One formula per collective kind, and one time for a collective over any group of mesh axes
(:func:`collective_time` on :func:`group_link`); the report, the propagation pass's
cost-based choices, the layout search and the benchmarks all use these, so they cannot
disagree.

Per device, for a collective over ``n`` devices whose per-device operand is ``S`` bytes:

=================== ===================
kind                 wire bytes
=================== ===================
all-reduce           2(n-1)/n * S
all-gather           (n-1) * S
reduce-scatter       (n-1)/n * S
all-to-all           (n-1)/n * S
collective-permute   S
=================== ===================

>>> wire_bytes("all-reduce", 4, 1024)
1536.0

Time: ``steps * latency + wire bytes / bandwidth``, with ``2(n-1)`` steps for all-reduce,
one for collective-permute and ``n-1`` for the others. A collective over several mesh axes
runs over all their links at once; each ring step waits for the slowest, so it is priced on
the worst latency and the worst bandwidth among them:

>>> links = {"data": LinkModel(25e-6, 12.5e9), "model": LinkModel(5e-6, 100e9)}
>>> group_link(links, ("data", "model"))
LinkModel(latency_s=2.5e-05, bandwidth_bytes_per_s=12500000000.0)
>>> # 14 steps x 25 us + 2 * 7/8 MiB at 12.5 GB/s:
>>> round(collective_time("all-reduce", 8, 1 << 20, group_link(links, ("data", "model"))) * 1e6, 1)
496.8
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def wire_bytes(kind: str, n: int, payload_bytes: float) -> float:
    """Bytes each device sends for one collective of ``kind`` over ``n`` devices."""
    if n <= 1:
        return 0.0
    s = float(payload_bytes)
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * s
    if kind == "all-gather":
        return (n - 1) * s
    if kind in ("reduce-scatter", "all-to-all"):
        return (n - 1) / n * s
    if kind == "collective-permute":
        return s
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta model of one mesh axis: ``time = steps * latency + bytes / bandwidth``.

    Defaults describe a fast intra-node link (NVLink-class: 5 us latency per step,
    100 GB/s per direction). Override per axis for slower inter-node axes.
    """
    latency_s: float = 5e-6
    bandwidth_bytes_per_s: float = 100e9

    def time(self, kind: str, n: int, payload_bytes: float) -> float:
        """:func:`collective_time` of one collective on this link."""
        return collective_time(kind, n, payload_bytes, self)


def collective_steps(kind: str, n: int) -> int:
    """Latency steps of one collective of ``kind`` over ``n`` devices (ring algorithms)."""
    if n <= 1:
        return 0
    return 2 * (n - 1) if kind == "all-reduce" else (1 if kind == "collective-permute" else n - 1)


def group_link(links: Mapping[str, LinkModel], axes) -> LinkModel:
    """The link a collective over the mesh axes ``axes`` runs at: the worst latency and the
    worst bandwidth among their links (an axis without a model has the default link)."""
    models = [links.get(a, LinkModel()) for a in axes] or [LinkModel()]
    if len(models) == 1:
        return models[0]
    return LinkModel(max(m.latency_s for m in models), min(m.bandwidth_bytes_per_s for m in models))


def collective_time(kind: str, n: int, payload_bytes: float, link: LinkModel,
                    latency_weight: float = 1.0) -> float:
    """Seconds of one collective of ``kind`` over ``n`` devices on ``link`` (for a group of
    mesh axes, ``group_link(links, axes)``). ``latency_weight`` scales the latency term: the
    propagation passes choose by bytes and let latency only break ties (see
    ``planner.LATENCY_WEIGHT_IN_CHOICES``)."""
    if n <= 1:
        return 0.0
    latency = collective_steps(kind, n) * link.latency_s
    return latency_weight * latency + wire_bytes(kind, n, payload_bytes) / link.bandwidth_bytes_per_s


#: Per-device work rate of the layout search's and the report's step estimate, in points per
#: second: a point is one iteration of an equation's factor space (a multiply-add of a matmul,
#: an element of an elementwise op). Without a compute term, replicating everything would
#: always look cheapest.
DEFAULT_POINTS_PER_SECOND = 1e12


def assignment_points(sizes, assignment, axis_sizes) -> float:
    """Per-device points of an equation whose factors of ``sizes`` are split over the mesh axes
    of ``assignment`` (a factor not divided evenly costs its padded block).

    >>> assignment_points((8, 16, 32), (("data",), (), ("model",)), {"data": 2, "model": 4})
    512.0
    """
    return math.prod(float(-(-size // math.prod(axis_sizes[a] for a in axes)))
                     for size, axes in zip(sizes, assignment))
