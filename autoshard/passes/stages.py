"""Plan pipelines: a ``scan`` whose stacked (scanned) dim is split over a mesh axis runs as a
GPipe pipeline over that axis.

Expects: complete ``layouts`` from ``propagate`` (the scan rule's stacked dim is one ``pass``
factor shared by every xs and ys, so a split of the stacked parameters reaches them all).
Guarantees: ``program.pipelines[eqn.index]`` holds a ``PipelinePlan`` for each such scan:
stage axis and count, microbatch count, the batch dim of every loop operand and how every
stacked output combines over microbatches (``compiler/microbatch.py``). Raises
``ShardingError`` for a bad ``microbatches``, a body not separable over the batch, a stacked
dim split over several axes or not divisible by the stage count.

Example: ``P("stage", None, "model")`` on ``w[8, D, F]`` over ``stage=4`` with
``microbatches=4``: each device runs 2 layers per tick, 7 ticks, bubble 3/7.
"""
from __future__ import annotations

import math

from ..compiler.microbatch import analyse_scan
from ..compiler.program import PipelinePlan
from ..errors import ShardingError

name = "stages"
mark_name = "mark_stages"


def mark(program):
    """Before propagation: mark the top-level scans that read a stacked input whose annotation
    (in_specs or a sharding constraint) splits its stacked dim; only their stacked factor may
    be split (``Eqn.pipelined``), so layouts chosen by the layout search or propagated from
    elsewhere never turn a loop into a pipeline."""
    for eqn in program.graph.eqns:
        if eqn.prim.name != "scan":
            continue
        p = eqn.params
        for v in eqn.invars[p["num_consts"] + p["num_carry"]:]:
            prov = program.provenance.get(v)
            if (v in program.closed and prov is not None and prov.kind in ("annotation", "constraint")
                    and program.layouts[v].dims and program.layouts[v].dims[0]):
                eqn.pipelined = True
    return program


def _stacked_axes(program, eqn):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    seen = set()
    for v in list(eqn.invars[nc + nk:]) + list(eqn.outvars[nk:]):
        lay = program.layouts.get(v)
        if lay is not None and lay.dims and lay.dims[0]:
            seen.add(tuple(lay.dims[0]))
    return seen


def run(program, microbatches=None):
    if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(microbatches, int)
                                     or microbatches < 1):
        raise ShardingError(f"microbatches={microbatches!r} must be a positive int (the number of "
                            f"microbatches a pipelined layer loop cuts the batch into)")
    sizes = program.axis_sizes
    top = {id(e) for e in program.graph.eqns}
    for eqn in program.graph.all_eqns():
        if eqn.prim.name != "scan" or not eqn.pipelined:
            continue
        split = _stacked_axes(program, eqn)
        if not split:
            continue
        if id(eqn) not in top:
            raise ShardingError(f"the stacked dim of the scan at {eqn.source} is split over {sorted(split)}, "
                                f"but it is nested in another loop or branch; only a top-level layer loop "
                                f"can be pipelined.\n  fix: leave that scan's stacked inputs unsplit")
        if len(split) > 1 or len(next(iter(split))) > 1:
            raise ShardingError(f"the stacked dim of the scan at {eqn.source} is split over {sorted(split)}; a "
                                f"pipeline runs over one mesh axis.\n  fix: split the stacked dim of every "
                                f"input of that loop over the same single axis (e.g. P('stage', ...))")
        (axis,) = next(iter(split))
        if program.search is not None or program.auto_assignments:
            # The layout search prices the loop as one whole-layer loop per device; its chosen
            # layouts inside the body do not hold per microbatch (wrong gradients were seen).
            raise ShardingError(f"auto=True does not plan pipelined layer loops yet (the scan at {eqn.source} "
                                f"has its stacked dim split over {axis!r}).\n  fix: annotate the inputs "
                                f"(e.g. presets 'pp') and drop auto=True, or leave the stacked dim unsplit")
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        stages, length = sizes[axis], p["length"]
        if nk == 0:
            continue                      # no carry: the layers are independent, each device runs its own
        if length % stages:
            raise ShardingError(f"the layer loop (scan at {eqn.source}) has {length} layers, which mesh axis "
                                f"{axis!r} of size {stages} cannot cut into equal stages.\n  fix: use a stage "
                                f"count that divides {length}")
        (body,) = eqn.subgraphs
        carry0 = body.invars[nc]
        lay0 = program.layouts[carry0]
        if any(axis in axes for axes in lay0.dims):
            raise ShardingError(f"the carry of the pipelined layer loop at {eqn.source} is split over the stage "
                                f"axis {axis!r}.\n  fix: do not split activations over {axis!r}")
        # The batch: the carry dim split over a data-like axis, else its leading dim.
        carry0_dim = next((d for d, axes in enumerate(lay0.dims) if axes), 0)
        analysis = analyse_scan(eqn, program.rules, carry0_dim)
        d0 = analysis.carry_dims[0]
        local_batch = lay0.local_shape(carry0.shape, sizes)[d0]
        m = stages if microbatches is None else microbatches
        if local_batch % m:
            raise ShardingError(
                f"microbatches={m} does not divide the batch of the pipelined layer loop at {eqn.source}: "
                f"its carry {tuple(carry0.shape)} has batch dim {d0} of {carry0.shape[d0]}, "
                f"{local_batch} per device after the other mesh axes' splits.\n  fix: pass "
                f"microbatches= a divisor of {local_batch} (default: the stage count, {stages})")
        per_tick = 0
        for k in range(nk):
            v = body.invars[nc + k]
            shape = list(program.layouts[v].local_shape(v.shape, sizes))
            shape[analysis.carry_dims[k]] //= m
            per_tick += math.prod(shape) * v.dtype.itemsize
        program.pipelines[eqn.index] = PipelinePlan(
            eqn.index, eqn.source, axis, stages, m, length, bool(p["reverse"]), analysis.const_dims,
            analysis.carry_dims, analysis.xs_dims, analysis.ys_kinds, analysis.ys_dims, local_batch,
            per_tick, analysis.batch_dims)
    return program
