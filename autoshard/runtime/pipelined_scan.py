"""Lower a pipelined layer loop (a ``scan`` with a ``PipelinePlan``) as a GPipe schedule.

Per device, with S stages over mesh axis ``plan.axis`` and M microbatches, the loop runs
M + S - 1 ticks. At tick ``t`` the stage at pipeline position ``r`` (``r = s``; ``S-1-s`` for
the transposed scan, which runs the stages last to first) holds microbatch ``m = t - r``
(valid when ``0 <= m < M``) and::

    input   = microbatch t of the loop's carry          if r == 0
            = what the previous stage shifted to it     otherwise
    output, ys_m = inner scan of the body over this device's L/S layers (its xs slice)
    ys buffers   <- ys_m at microbatch m's offset ("concat"), += ys_m ("sum"), = ys_m ("once")
    finished[m]  <- output                               if r == S-1
    shift output to the next stage (one collective-permute per carry)

Everything is masked by the tick's validity flag, so idle ticks (the bubble) leave the
buffers exact. After the loop, the last stage's finished batch goes to every stage (one
all-reduce over the stage axis): the loop's carry result is replicated over it, as the
program's layouts say. Per-layer outputs stay split over the stage axis.

The body runs on one microbatch: ``microbatch_view`` is the program seen with a virtual mesh
axis of size M splitting every batch dim of the body (``PipelinePlan.batch_dims``), so the
interpreter localises shapes (reshape sizes, broadcast shapes) for a microbatch.
"""
from __future__ import annotations

import copy

import jax.numpy as jnp
from jax import lax

from ..compiler import collectives
from ..compiler.layout import Layout
from ..compiler.mesh import MeshInfo

MICROBATCH_AXIS = "__microbatch"


def _with_mb(lay: Layout, d: int) -> Layout:
    return Layout(tuple(axes + (MICROBATCH_AXIS,) if i == d else axes for i, axes in enumerate(lay.dims)),
                  lay.partial)


def microbatch_view(program, plan):
    """A shallow copy of ``program`` whose body values are laid out per microbatch."""
    bd = plan.batch_dims
    view = copy.copy(program)
    mesh = program.mesh
    links = tuple(mesh.links) + ((mesh.link(mesh.axis_names[0]),) if mesh.links else ())
    view.mesh = MeshInfo(mesh.axis_names + (MICROBATCH_AXIS,), mesh.axis_sizes + (plan.microbatches,),
                         links, mesh.cost_source)

    def aug(table):
        out = dict(table)
        for v, d in bd.items():
            if v in out:
                out[v] = _with_mb(out[v], d)
        return out
    view.layouts, view.produced, view.post = aug(program.layouts), aug(program.produced), aug(program.post)
    eqn = program.eqn_of(plan.eqn)
    ops = dict(program.operand_layouts)
    outs = dict(program.region_outputs)
    for e in eqn.subgraphs[0].all_eqns():
        for i, v in enumerate(e.invars):
            if v in bd and (e.index, i) in ops:
                ops[(e.index, i)] = _with_mb(ops[(e.index, i)], bd[v])
        for sub in e.subgraphs:
            outs[id(sub)] = [_with_mb(l, bd[v]) if v in bd else l for v, l in zip(sub.outvars, outs[id(sub)])]
    body = eqn.subgraphs[0]
    outs[id(body)] = [_with_mb(l, bd[v]) if v in bd else l for v, l in zip(body.outvars, outs[id(body)])]
    view.operand_layouts, view.region_outputs = ops, outs
    return view


def _mb(x, d, m, size):
    return lax.dynamic_slice_in_dim(x, m * size, size, axis=d)


def lower_pipelined_scan(eqn, plan, args, run_graph, out_shapes):
    """Per-device GPipe schedule of ``eqn`` (see the module docstring); ``run_graph`` runs the
    loop body on one microbatch, ``out_shapes`` are the local shapes of the loop's results."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    (body,) = eqn.subgraphs
    consts, init, xs = list(args[:nc]), list(args[nc:nc + nk]), list(args[nc + nk:])
    S, M, axis, reverse = plan.stages, plan.microbatches, plan.axis, plan.reverse
    stage = collectives.stage_index(axis)
    pos = (S - 1 - stage) if reverse else stage
    carry_sz = [x.shape[d] // M for x, d in zip(init, plan.carry_dims)]
    const_sz = [None if d is None else c.shape[d] // M for c, d in zip(consts, plan.const_dims)]
    xs_sz = [None if d is None else x.shape[d + 1] // M for x, d in zip(xs, plan.xs_dims)]
    ys_shapes = out_shapes[nk:]
    ys_sz = [None if d is None else shape[d + 1] // M for shape, d in zip(ys_shapes, plan.ys_dims)]
    dtypes = [v.dtype for v in eqn.outvars]

    def tick(t, st):
        state, finished, ybufs = st
        m = t - pos
        valid = (m >= 0) & (m < M)
        mc = jnp.clip(m, 0, M - 1)
        tc = jnp.clip(t, 0, M - 1)
        inp = [jnp.where(pos == 0, _mb(x, d, tc, n), s)
               for x, d, n, s in zip(init, plan.carry_dims, carry_sz, state)]
        c_m = [c if d is None else _mb(c, d, mc, n) for c, d, n in zip(consts, plan.const_dims, const_sz)]
        x_m = [x if d is None else _mb(x, d + 1, mc, n) for x, d, n in zip(xs, plan.xs_dims, xs_sz)]

        def step(carry, x):
            outs = run_graph(body, c_m + list(carry) + list(x))
            return list(outs[:nk]), list(outs[nk:])
        out, ys = lax.scan(step, inp, x_m, reverse=reverse)
        new_bufs = []
        for buf, y, kind, d, n in zip(ybufs, ys, plan.ys_kinds, plan.ys_dims, ys_sz):
            y = y.astype(buf.dtype)
            if kind == "concat":
                old = _mb(buf, d + 1, mc, n)
                buf = lax.dynamic_update_slice_in_dim(buf, jnp.where(valid, y, old), mc * n, axis=d + 1)
            elif kind == "sum":
                buf = buf + jnp.where(valid, y, jnp.zeros_like(y))
            else:
                buf = jnp.where(valid, y, buf)
            new_bufs.append(buf)
        done = valid & (pos == S - 1)
        finished = [lax.dynamic_update_slice_in_dim(f, jnp.where(done, o, _mb(f, d, mc, n)), mc * n, axis=d)
                    for f, o, d, n in zip(finished, out, plan.carry_dims, carry_sz)]
        state = [collectives.stage_shift(o, axis, S, reverse) for o in out]
        return state, finished, new_bufs

    state0 = [jnp.zeros_like(_mb(x, d, 0, n)) for x, d, n in zip(init, plan.carry_dims, carry_sz)]
    finished0 = [jnp.zeros_like(x) for x in init]
    # Sums over microbatches (parameter gradients) accumulate in float32 at least.
    acc = [jnp.promote_types(dt, jnp.float32) if kind == "sum" and jnp.issubdtype(dt, jnp.floating) else dt
           for dt, kind in zip(dtypes[nk:], plan.ys_kinds)]
    ybufs0 = [jnp.zeros(shape, dt) for shape, dt in zip(ys_shapes, acc)]
    _, finished, ybufs = lax.fori_loop(0, M + S - 1, tick, (state0, finished0, ybufs0))
    ybufs = [b.astype(dt) for b, dt in zip(ybufs, dtypes[nk:])]
    last = 0 if reverse else S - 1
    carry = [collectives.stage_broadcast(f, axis, last, stage) for f in finished]
    return carry + list(ybufs)
