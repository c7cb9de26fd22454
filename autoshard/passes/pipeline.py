"""``compile()``: the ordered list of passes, one line each (the order is the design)."""
from __future__ import annotations

import time

from ..compiler.program import ShardedProgram
from . import (auto_search, idle_axes, import_annotations, insert_collectives, propagate, refine_mesh, stages,
               verify)


def compile(graph, mesh_info, in_specs, out_specs, in_paths, out_paths, auto=None,
            microbatches=None, idle=None) -> ShardedProgram:
    """``auto``: None, or ``{"memory_budget": bytes | None, "time_limit": seconds}`` to choose
    every open layout by the MILP search before propagation (which then fills loop bodies).
    ``microbatches``: the microbatch count of pipelined layer loops (default: the stage count).
    ``idle``: None, or ``{"compute_rate": points/s}`` to let mesh axes no annotation uses split
    the batch where the cost model says it pays (passes/idle_axes.py; not with ``auto``).

    Where a reshape would gather a dim because a mesh axis does not divide its major factor
    (4 heads over 8 devices), the program is planned again on the mesh with that axis split
    into sub-axes, and the refined plan kept if the cost model says it is cheaper
    (passes/refine_mesh.py)."""
    args = (graph, in_specs, out_specs, in_paths, out_paths, auto, microbatches, idle)
    program = _compile_on(mesh_info, *args)
    if auto is not None or program.pipelines:
        return program
    t0 = time.perf_counter()
    refinements = refine_mesh.candidates(program)
    if not refinements:
        return program
    rate = (idle or {}).get("compute_rate")
    best = refine_mesh.cost(program, rate)
    chosen = program
    for axis, major in refinements:
        alt = _compile_on(mesh_info.refine(axis, major), *args)
        alt_cost = refine_mesh.cost(alt, rate)
        if alt_cost < best * (1 - 1e-9) and not alt.pipelines and refine_mesh.outputs_on_user_mesh(alt):
            subs = dict(alt.mesh.parents)[axis]
            alt.refine_decision = (
                f"{axis} split into {' x '.join(subs)} for a reshape that does not divide by {axis} "
                f"({refine_mesh.where(program, axis, major)}); estimated {alt_cost:.3g} s per step "
                f"against {best:.3g} s on the mesh as given")
            chosen, best = alt, alt_cost
    chosen.pass_seconds[refine_mesh.name] = time.perf_counter() - t0
    return chosen


def _compile_on(mesh_info, graph, in_specs, out_specs, in_paths, out_paths, auto, microbatches, idle):
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
