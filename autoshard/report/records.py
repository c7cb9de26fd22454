"""The report's records: one per collective the plan runs, one per equation, one per warning;
and the groupings of collectives the summary prints.

The README's MLP on mesh data=2, model=4 runs one all-reduce of its row-parallel output:

>>> rec = rep.collectives[0]                                                  # doctest: +SKIP
>>> rec.kind, rec.mesh_axes, rec.shape, rec.payload_bytes, rec.wire_bytes     # doctest: +SKIP
('all-reduce', ('model',), (4, 16), 256, 384.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


from .. import compat
from ..compiler import collectives
from ..compiler.naming import layer_of
from ..compiler.planner import transform_bytes, transform_time
from .fmt import parse_source


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective the plan runs (per device)."""
    kind: str
    mesh_axes: tuple
    shape: tuple            # per-device operand shape, as the compiled HLO has it
    dtype: str
    payload_bytes: int
    wire_bytes: float
    time_s: float           # alpha-beta estimate under the mesh axes' link models
    reason: str
    source: str
    value: str
    consumer: str = ""      # the equation (or output) that needed the new layout
    layer: str = ""         # parameter path nearest to the value (e.g. "blocks.0.attn")
    module: str = ""        # flax module class (or function) of ``source``
    group_size: int = 0
    trips: int = 1          # times it runs per step (trip counts of the loops around it)


@dataclass(frozen=True)
class EquationRow:
    index: int
    op: str
    source: str
    operands: tuple
    results: tuple
    result_names: tuple
    module: str = ""
    layer: str = ""


@dataclass(frozen=True)
class ReportWarning:
    """A problem in the plan, with the change that removes it."""
    kind: str               # one of warnings.WARNING_KINDS
    message: str
    fix: str
    value: str
    bytes: int              # per-device bytes concerned
    source: str = ""


def collective_records(ctx) -> list[CollectiveRecord]:
    """Every collective of the program's reshards, priced under its mesh's link models."""
    p = ctx.program
    sizes = p.axis_sizes
    order = {a: i for i, a in enumerate(ctx.mesh_axes)}
    links = ctx.links
    out = []
    for r in p.reshards:
        itemsize = compat.itemsize(r.value.dtype)
        layer = layer_of(ctx.layer_of_value(r.value)) or ctx.layer_of_value(r.value)
        for t in r.transforms:
            if not t.is_collective:
                continue
            out.append(CollectiveRecord(
                t.kind, tuple(sorted(t.axes, key=order.get)), _operand_shape(t, len(r.value.shape)),
                compat.dtype_name(r.value.dtype), math.prod(t.in_shape) * itemsize,
                transform_bytes(t, itemsize, sizes), transform_time(t, itemsize, sizes, links),
                r.reason, r.source, ctx.name_of(r.value), r.consumer, layer,
                parse_source(r.source)["module"], t.group_size(sizes), r.trips or ctx.trips_of(r.value)))
    return out


def _operand_shape(t, rank: int) -> tuple:
    """The per-device operand of transform ``t`` of a value of rank ``rank`` as lowered: an
    all-gather runs on its gathered dim moved first (``collectives._all_gather``), after the
    leading size-1 dims of a re-gather."""
    shape = tuple(t.in_shape)
    if t.kind != "all-gather" or len(shape) < rank:
        return shape
    lead = len(shape) - rank
    return shape[:lead] + collectives.gathered_first(shape[lead:], t.dim)


def equation_rows(ctx) -> list[EquationRow]:
    p = ctx.program
    rows = []
    for eqn in ctx.eqns:
        ops = tuple("const" if v.is_const and not v.shape else
                    ctx.sbp(p.operand_layouts.get((eqn.index, i)) or p.final_layout(v))
                    for i, v in enumerate(eqn.invars))
        res = tuple(ctx.sbp(p.produced.get(o) or p.final_layout(o)) for o in eqn.outvars)
        lab = next((ctx.layer_of_value(o) for o in eqn.outvars if ctx.layer_of_value(o)), "")
        rows.append(EquationRow(eqn.index, eqn.prim.name, eqn.source, ops, res,
                                tuple(ctx.name_of(o) for o in eqn.outvars),
                                parse_source(eqn.source)["module"], layer_of(lab) or lab))
    return rows


def wire_bytes_by(collectives, key: str) -> dict:
    """Total wire bytes grouped by a ``CollectiveRecord`` field."""
    out: dict = {}
    for c in collectives:
        k = getattr(c, key)
        out[k] = out.get(k, 0.0) + c.wire_bytes
    return out


def communication(collectives) -> dict:
    """Per step, per mesh axes a collective runs over: ``{"collectives", "runs",
    "wire_bytes", "time_s"}`` with loop trips counted."""
    out: dict = {}
    for c in collectives:
        row = out.setdefault(",".join(c.mesh_axes), {"collectives": 0, "runs": 0, "wire_bytes": 0.0,
                                                      "time_s": 0.0})
        row["collectives"] += 1
        row["runs"] += c.trips
        row["wire_bytes"] += c.wire_bytes * c.trips
        row["time_s"] += c.time_s * c.trips
    return out


def source_groups(equations, collectives) -> list[dict]:
    """Equations grouped by user source line (ordered by file and line), with the collectives
    each line causes."""
    groups: dict = {}

    def group(source):
        return groups.setdefault(source, {"source": source, **parse_source(source), "layers": [],
                                          "equations": [], "collectives": 0, "wire_bytes": 0.0})
    for r in equations:
        g = group(r.source)
        g["equations"].append(r.index)
        if r.layer and r.layer not in g["layers"]:
            g["layers"].append(r.layer)
    for c in collectives:
        g = group(c.source)
        g["collectives"] += 1
        g["wire_bytes"] += c.wire_bytes
    return sorted(groups.values(), key=lambda g: (g["file"], g["line"], g["source"]))


@dataclass(frozen=True)
class PipelineRecord:
    """One pipelined layer loop (``passes/stages.py``): a GPipe schedule of ``ticks`` =
    microbatches + stages - 1 ticks over mesh axis ``axis``; ``bubble_fraction`` =
    (S-1)/(M+S-1) is the share of a stage's ticks it idles; ``bytes_per_tick`` the activations
    one device sends to the next stage per tick (one collective-permute per carry)."""
    axis: str
    stages: int
    microbatches: int
    schedule: str
    bubble_fraction: float
    ticks: int
    bytes_per_tick: int
    layers: int
    layers_per_stage: int
    direction: str              # "forward", or "backward" for the transposed (gradient) scan
    source: str

    def __str__(self) -> str:
        return (f"{self.direction} pipeline over {self.axis!r} at {self.source}: {self.schedule}, "
                f"{self.stages} stages x {self.layers_per_stage} layers, {self.microbatches} microbatches, "
                f"{self.ticks} ticks, bubble {self.bubble_fraction:.1%}, {self.bytes_per_tick:,} bytes "
                f"per device per tick")


def pipeline_records(program) -> list[PipelineRecord]:
    return [PipelineRecord(p.axis, p.stages, p.microbatches, p.schedule, p.bubble_fraction, p.ticks,
                           p.bytes_per_tick, p.layers, p.layers // p.stages,
                           "backward" if p.reverse else "forward", p.source)
            for _, p in sorted(program.pipelines.items())]
