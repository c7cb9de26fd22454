"""Cost of collectives: bytes on the wire (ring model) and time (alpha-beta per mesh axis).

One formula per collective kind; the report, the propagation pass's cost-based choices and
the benchmarks all use these, so they cannot disagree.

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
"""
from __future__ import annotations

from dataclasses import dataclass

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
        if n <= 1:
            return 0.0
        steps = 2 * (n - 1) if kind == "all-reduce" else (1 if kind == "collective-permute" else n - 1)
        return steps * self.latency_s + wire_bytes(kind, n, payload_bytes) / self.bandwidth_bytes_per_s
