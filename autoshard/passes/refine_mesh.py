"""Refine a mesh axis into sub-axes where a reshape would otherwise gather (heads that do not
divide the axis).

A reshape ``[B, T, D] -> [B, T, H, Dh]`` gives ``D`` the factors ``(H)(Dh)``. With ``D`` split
over an axis of size n that divides neither into ``H`` nor splits across the two as a whole
(4 heads over 8 devices), the plan gathers ``D``. XLA's partitioner splits the axis instead:
``model=8`` becomes ``model:(1)4`` on ``H`` and ``model:(4)2`` on ``Dh``, over the same devices
in the same order, so each device keeps its block of ``D`` and the scores are partial sums
over the 2-way sub-axis.

``candidates`` reads a finished plan: a reshape operand or result whose dim of factors
``(f0)(f1)...`` carries a mesh axis of size n (in its own layout or as a consumer reads it)
with ``1 < gcd(n, f0) < n`` and ``n / gcd(n, f0)`` dividing ``f1`` proposes that axis refined
``gcd x n/gcd``. Values nobody annotated enter and leave on the user's mesh
(``insert_collectives._on_user_mesh``: a part-axis split is sliced on arrival and gathered at
the output, and the cost counts the gather). The pipeline
plans again on each refined mesh (``MeshInfo.refine``) and keeps a refined plan only where
``cost`` (wire time of every planned collective plus compute, with loop trips) says it is
cheaper, so a program without such a reshape plans exactly as before.
"""
from __future__ import annotations

import math

from ..compiler.cost_model import DEFAULT_POINTS_PER_SECOND, assignment_points
from ..compiler.ir import trip_counts
from ..compiler.planner import LATENCY_WEIGHT_IN_CHOICES, transform_time

name = "refine_mesh"


def candidates(program) -> list[tuple[str, int]]:
    """``(axis, major size)`` refinements the plan's reshapes ask for, in program order."""
    out: list[tuple[str, int]] = []
    for _, axis, g in _asks(program):
        if (axis, g) not in out:
            out.append((axis, g))
    return out


def where(program, axis: str, major: int) -> str:
    """The first reshape asking for ``axis`` refined with a major part of ``major``."""
    for eqn, a, g in _asks(program):
        if (a, g) == (axis, major):
            return (f"{eqn.invars[0].shape} -> {eqn.outvars[0].shape}"
                    + (f" at {eqn.source}" if eqn.source else ""))
    return ""


def _asks(program):
    sizes = program.axis_sizes
    # Where a value is read (equation index, operand number): a reshape's result may keep its
    # producer's layout and be split only as a consumer reads it (a local slice), as when
    # ``[.., kv, groups, d] -> [.., heads, d]`` repeats 2 kv heads for 4 query heads split over
    # model=4: the kv heads stay whole, so what produced them runs on every device of the axis.
    reads: dict = {}
    for eqn in program.graph.all_eqns():
        for i, v in enumerate(eqn.invars):
            reads.setdefault(v, []).append((eqn.index, i))
    for eqn in program.graph.all_eqns():
        fr = program.rules.get(eqn.index)
        if eqn.prim.name != "reshape" or fr is None:
            continue
        tensors = [(fr.operands[0], eqn.invars[0]), (fr.results[0], eqn.outvars[0])]
        for dims, v in tensors:
            layouts = [program.final_layout(v)] + [
                program.operand_layouts[r] for r in reads.get(v, ()) if r in program.operand_layouts]
            for fids, axes in ((f, a) for lay in layouts for f, a in zip(dims, lay.dims)):
                if len(fids) < 2:
                    continue
                f0, f1 = fr.sizes[fids[0]], fr.sizes[fids[1]]
                for axis in axes:
                    n = sizes[axis]
                    g = math.gcd(n, f0)
                    if 1 < g < n and f1 % (n // g) == 0 \
                            and all(axis not in subs for _, subs in program.mesh.parents):
                        yield eqn, axis, g


def cost(program, compute_rate: float | None = None) -> float:
    """Seconds per step the plan is estimated to take: every planned collective (reshards and
    the ops' own, times the loop trips around them; latency weighted as in the choices) plus
    every equation's per-device points at ``compute_rate``."""
    rate = compute_rate or DEFAULT_POINTS_PER_SECOND
    sizes, links = program.axis_sizes, program.mesh.link_models
    trips = trip_counts(program.graph)
    total = 0.0
    for r in program.reshards:
        runs = r.trips or trips.get(r.value, 1)
        for t in r.transforms:
            total += runs * transform_time(t, r.value.dtype.itemsize, sizes, links, LATENCY_WEIGHT_IN_CHOICES)
    for eqn in program.graph.all_eqns():
        fr, assignment = program.rules.get(eqn.index), program.assignments.get(eqn.index)
        if fr is not None and assignment is not None:
            total += trips.get(eqn, 1) * assignment_points(fr.sizes, assignment, sizes) / rate
    return total


def outputs_on_user_mesh(program) -> bool:
    """Whether every output's layout can be written on the mesh the user gave (each refined
    axis split whole, its sub-axes in order): a plan that would hand back an array split over
    part of an axis is not taken, since the caller would get arrays on a mesh they never made.
    (Outputs nobody annotated are gathered to such a layout when placed; this guards the rest.)"""
    return all(program.mesh.coarsen(axes) is not None
               for layout in program.out_layouts for axes in layout.dims)
