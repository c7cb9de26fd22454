"""``compile()``: the ordered list of passes, one line each (the order is the design)."""
from __future__ import annotations

import time

from ..compiler.program import ShardedProgram
from . import auto_search, idle_axes, import_annotations, insert_collectives, propagate, stages, verify


def compile(graph, mesh_info, in_specs, out_specs, in_paths, out_paths, auto=None,
            microbatches=None, idle=None) -> ShardedProgram:
    """``auto``: None, or ``{"memory_budget": bytes | None, "time_limit": seconds}`` to choose
    every open layout by the MILP search before propagation (which then fills loop bodies).
    ``microbatches``: the microbatch count of pipelined layer loops (default: the stage count).
    ``idle``: None, or ``{"compute_rate": points/s}`` to let mesh axes no annotation uses split
    the batch where the cost model says it pays (passes/idle_axes.py; not with ``auto``)."""
    program = ShardedProgram(graph, mesh_info, list(in_paths), list(out_paths), [])
    steps = [
        # Seed closed layouts from in/out specs and constraints; reject bad specs.
        (import_annotations.name, lambda p: import_annotations.run(p, in_specs, out_specs)),
        # Scans reading stacked inputs with an annotated split of the stacked dim: pipelines.
        (stages.mark_name, stages.mark),
        # auto=True: every open top-level layout from a MILP over factor assignments.
        *([(auto_search.name, lambda p: auto_search.run(p, **auto))] if auto is not None else []),
        # Idle mesh axes (named by no annotation) split the batch too, where it pays.
        *([(idle_axes.name, lambda p: idle_axes.seed(p, **idle))] if idle is not None and auto is None else []),
        # Fixed point of factor-based propagation, forward and backward, cost on conflicts.
        (propagate.name, propagate.run),
        # The batch inputs enter in their annotated layouts (sliced locally over idle axes).
        *([(idle_axes.restore_name, idle_axes.restore)] if idle is not None and auto is None else []),
        # Scans whose stacked dim is split over a mesh axis become GPipe pipelines over it.
        (stages.name, lambda p: stages.run(p, microbatches)),
        # Per equation: final assignment on actual (possibly partial) layouts; plan reshards.
        (insert_collectives.name, insert_collectives.run),
        # Internal consistency checks before lowering.
        (verify.name, verify.run),
    ]
    for name, run in steps:
        t0 = time.perf_counter()
        program = run(program)
        program.pass_seconds[name] = time.perf_counter() - t0
    return program
