"""``ShardedProgram``: the flat IR plus everything the passes decided about it.

Filled in pipeline order: ``import_annotations`` seeds ``layouts``/``closed``/``provenance``;
``propagate`` completes ``layouts``; ``insert_collectives`` fills ``assignments``,
``operand_layouts``, ``produced``, ``post``, ``out_layouts`` and ``reshards``. The report
and the lowering read only this object, so they agree by construction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .ir import Eqn, Graph, Value, hoisted_runs
from .layout import Layout
from .mesh import MeshInfo
from .planner import Transform


@dataclass(frozen=True)
class Provenance:
    """What decided a value's layout.

    kind: ``annotation`` (in_specs/out_specs), ``constraint`` (constrain /
    with_sharding_constraint), ``propagated`` (through ``eqn`` from ``sources``), ``constant``
    or ``default`` (reached by no annotation: replicated).
    """
    kind: str
    detail: str = ""
    eqn: int | None = None
    sources: tuple = ()
    direction: str = ""


@dataclass
class Reshard:
    """One planned layout change of one value, executed as ``transforms``."""
    value: Value
    src: Layout
    dst: Layout
    transforms: tuple[Transform, ...]
    reason: str
    source: str
    consumer: str
    internal: bool = False      # run by the op's own lowering (halo exchange, ...), not a reshard
    trips: int = 0              # times it runs per step when not its value's loop trips (pipeline ticks)


def register_rule_hint(primitive: str) -> str:
    """The fix for a primitive without a rule, shared by the fallback warning and ``strict``."""
    return (f"teach autoshard the primitive with ash.register_rule('{primitive}', "
            f"'<factor string, e.g. \"i j, j k -> i k\">')")


@dataclass(frozen=True)
class Fallback:
    """One equation of a primitive autoshard has no rule for, computed on replicated operands.

    ``reshards`` are the layout changes inserted to replicate its operands (gathers of split
    operands, all-reduces of partial ones); ``wire_bytes`` is their per-device cost on the
    wire (ring model, ``cost_model.wire_bytes``) each time the equation runs, and
    ``replicated_bytes`` the per-device bytes of its operands once whole. Printing one gives
    the warning ``parallelize`` emits.
    """
    primitive: str
    source: str                 # user source line, "file.py:LINE (function)"
    eqn: int                    # Eqn.index
    reshards: tuple = ()        # tuple[Reshard, ...]
    wire_bytes: float = 0.0
    replicated_bytes: int = 0

    @property
    def fix(self) -> str:
        return (f"{register_rule_hint(self.primitive)} so it runs on the shards, or compute the value "
                f"outside the parallelized function")

    def __str__(self) -> str:
        cost = (f"{self.wire_bytes:,.0f} bytes on the wire per device to replicate its operands"
                if self.reshards else "its operands were already replicated")
        return (f"autoshard has no sharding rule for primitive '{self.primitive}' used at {self.source}: "
                f"computed on replicated operands ({cost}); {self.fix}")


@dataclass
class PipelinePlan:
    """A ``scan`` over layers whose stacked dim is split over mesh axis ``axis``: run as a GPipe
    pipeline of ``stages`` stages and ``microbatches`` microbatches (``passes/stages.py``).

    Each device runs its ``layers // stages`` layers on the microbatch it holds, then shifts
    the activations (the carries) to the next stage with one collective-permute per carry;
    ``reverse`` (the transposed scan of a gradient) runs the stages last to first. Dims are
    those of the loop body (per iteration); ``ys_kinds``: ``concat`` (split on the batch,
    written at the microbatch's offset), ``sum`` (accumulated: parameter gradients),
    ``once`` (batch-free).
    """
    eqn: int
    source: str
    axis: str
    stages: int
    microbatches: int
    layers: int
    reverse: bool
    const_dims: tuple
    carry_dims: tuple
    xs_dims: tuple
    ys_kinds: tuple
    ys_dims: tuple
    local_batch: int                              # per-device batch (other axes' shards)
    bytes_per_tick: int = 0                       # per device, the activations one shift moves
    batch_dims: dict = field(default_factory=dict, repr=False)   # body Value -> batch dim
    schedule: str = "gpipe"

    @property
    def ticks(self) -> int:
        return self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Idle share of a stage's ticks: (S-1)/(M+S-1)."""
        return (self.stages - 1) / self.ticks


@dataclass
class ShardedProgram:
    graph: Graph
    mesh: MeshInfo
    in_paths: list[str]
    out_paths: list[str]
    out_specs: list                                   # Layout or None per output
    layouts: dict[Value, Layout] = field(default_factory=dict)
    closed: set = field(default_factory=set)
    provenance: dict[Value, Provenance] = field(default_factory=dict)
    rules: dict[int, object] = field(default_factory=dict)
    assignments: dict[int, tuple] = field(default_factory=dict)
    operand_layouts: dict[tuple[int, int], Layout] = field(default_factory=dict)
    produced: dict[Value, Layout] = field(default_factory=dict)
    post: dict[Value, Layout] = field(default_factory=dict)
    out_layouts: list[Layout] = field(default_factory=list)
    region_outputs: dict[int, list] = field(default_factory=dict)   # id(body graph) -> its output layouts
    # Inputs whose layout is uneven arrive in its even part (see Layout.even_part) and are
    # sliced locally into their layout when the program starts.
    in_boundary: dict[Value, Layout] = field(default_factory=dict)
    notes: list = field(default_factory=list)                       # (kind, message, fix) for the report
    reshards: list[Reshard] = field(default_factory=list)
    # (Eqn.index, operand) -> k: that operand is gathered afresh, as its k-th copy, instead of
    # reusing the copy gathered for an earlier consumer (insert_collectives.REGATHER_GAP).
    copies: dict[tuple[int, int], int] = field(default_factory=dict)
    # Equations of primitives without a rule, computed on replicated operands (in program order).
    fallbacks: list[Fallback] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)
    # Pipelined layer loops: scan Eqn.index -> PipelinePlan (passes/stages.py).
    pipelines: dict[int, PipelinePlan] = field(default_factory=dict)
    # auto=True: the strategy the layout search chose per equation, and its statistics.
    auto_assignments: dict[int, tuple] = field(default_factory=dict)
    search: object = None
    search_compute_rate: float | None = None
    # Batch inputs split over idle mesh axes while propagating (passes/idle_axes.py):
    # value -> (annotated layout, its provenance); ``idle_decision``: why (or why not).
    idle_batch: dict = field(default_factory=dict)
    idle_decision: str = ""
    # Planned on a refined mesh (passes/refine_mesh.py): which axis became which sub-axes, why.
    refine_decision: str = ""

    @functools.cached_property
    def loop_runs(self) -> dict:
        """Times per step each loop-body value is made, loop invariants hoisted
        (``ir.hoisted_runs``); the graph is fixed once traced."""
        return hoisted_runs(self.graph)

    @functools.cached_property
    def wanted_outputs(self) -> frozenset:
        """Outputs given an out_spec: they must end in it, so their layout is a target from the
        start (``import_annotations`` seeds it; they stay open to propagation)."""
        return frozenset(v for v, lay in zip(self.graph.outvars, self.out_specs) if lay is not None)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return self.mesh.size

    def in_layouts(self) -> list[Layout]:
        """Layouts the inputs arrive in (even parts of their program layouts)."""
        return [self.in_boundary.get(v, self.layouts[v]) for v in self.graph.invars]

    def final_layout(self, v: Value) -> Layout:
        """The layout a value has once produced (after any reshard right at its producer)."""
        if v in self.post:
            return self.post[v]
        if v in self.produced:
            return self.produced[v]
        return self.layouts.get(v, Layout.replicated(len(v.shape)))

    def eqn_of(self, index: int) -> Eqn:
        return next(e for e in self.graph.all_eqns() if e.index == index)
