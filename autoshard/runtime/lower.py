"""Lower a ``ShardedProgram`` to one per-device program inside ``jax.shard_map`` (all mesh
axes manual), wrapped in ``jax.jit``.

The per-device program interprets the flat IR: each operand is fetched in the layout its
equation consumes (running the planned reshard once per (value, layout), so consumers share
it), the primitive is bound with localised params (``OpRule.localize``) or lowered by the
rule's own ``lower`` (iota offsets, constraints), and results are resharded right away where
the program says so (``post``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ..compiler.kinds import REDUCTION_KINDS
from ..compiler.layout import Layout
from ..compiler.ops import get_rule, local_context, reduction_identity
from ..compiler.ops.control_flow import lower_region
from ..compiler import collectives
from ..compiler.planner import plan
from ..compiler.mesh import refined_mesh
from .pipelined_scan import lower_pipelined_scan, microbatch_view


def local_function(program):
    graph, sizes = program.graph, program.axis_sizes
    run_graph = interpreter(program)

    def local(*args):
        args = [collectives.apply(x, plan(program.in_boundary[v], program.layouts[v], v.shape, sizes), sizes)
                if v in program.in_boundary else x for v, x in zip(graph.invars, args)]
        return tuple(run_graph(graph, args, program.out_layouts))

    return local


def interpreter(program):
    """``run_graph(graph, args, out_layouts=None)``: run one graph of ``program`` (the program or
    a loop/branch body) per device."""
    sizes = program.axis_sizes

    def fetch(env, cache, v, want: Layout, copy: int = 0):
        if v.is_const:
            have = Layout.replicated(len(v.shape))
            if want == have:
                return v.const
            x = jnp.asarray(v.const)
        else:
            have, x = program.final_layout(v), env[v]
        if have == want:
            return x
        if copy:        # a re-gather: its own collectives, from the value as made
            if (v, want, copy) not in cache:
                cache[(v, want, copy)] = collectives.apply(x, plan(have, want, v.shape, sizes), sizes, copy)
            return cache[(v, want, copy)]
        if (v, want) in cache:
            return cache[(v, want)]
        # Resume from the furthest layout of this plan already made for another consumer
        # (insert_collectives records only the remaining steps, so the report agrees).
        steps = plan(have, want, v.shape, sizes)
        start = max((k + 1 for k, t in enumerate(steps) if (v, t.dst) in cache), default=0)
        if start:
            x = cache[(v, steps[start - 1].dst)]
        for t in steps[start:]:
            x = collectives.apply(x, (t,), sizes)
            cache[(v, t.dst)] = x
        return x

    def run_graph(g, args, out_layouts=None):
        """Interpret one graph (the program or a loop/branch body) per device."""
        env = dict(zip(g.invars, args))
        cache: dict = {}
        for eqn in g.eqns:
            in_lays = tuple(program.operand_layouts[(eqn.index, i)] for i in range(len(eqn.invars)))
            ins = [fetch(env, cache, v, lay, program.copies.get((eqn.index, i), 0))
                   for i, (v, lay) in enumerate(zip(eqn.invars, in_lays))]
            if eqn.index in program.pipelines:
                pipe = program.pipelines[eqn.index]
                out_shapes = [program.produced[o].local_shape(o.shape, sizes) for o in eqn.outvars]
                outs = lower_pipelined_scan(eqn, pipe, ins, interpreter(microbatch_view(program, pipe)),
                                            out_shapes)
            elif eqn.subgraphs:
                outs = lower_region(eqn, ins, run_graph)
            else:
                ins = mask_uneven_reductions(program, eqn, ins)
                out_lays = tuple(program.produced[o] for o in eqn.outvars)
                ctx = local_context(eqn, in_lays, out_lays, sizes)
                rule = get_rule(eqn)
                if rule.lower is not None:
                    outs = rule.lower(eqn, ctx, ins)
                else:
                    outs = eqn.prim.bind(*ins, **rule.local_params(eqn, ctx))
                    if not eqn.prim.multiple_results:
                        outs = [outs]
            for o, x in zip(eqn.outvars, outs):
                if o in program.post:
                    x = collectives.apply(x, plan(program.produced[o], program.post[o], o.shape, sizes), sizes)
                env[o] = x
        if out_layouts is None:
            out_layouts = program.region_outputs[id(g)]
        return [fetch(env, cache, v, lay) for v, lay in zip(g.outvars, out_layouts)]

    return run_graph


def mask_uneven_reductions(program, eqn, ins):
    """Padding rows of an unevenly split dim hold arbitrary values; where the equation
    reduces over that dim (a split sum/max/min factor) they are set to the reduction's
    identity first, so the result is exact."""
    fr = program.rules[eqn.index]
    assignment = program.assignments[eqn.index]
    sizes = program.axis_sizes
    for f, axes in enumerate(assignment):
        kind = fr.kinds[f]
        if kind not in REDUCTION_KINDS or not axes or fr.sizes[f] % math.prod(sizes[a] for a in axes) == 0:
            continue
        for i, dims in enumerate(fr.operands):
            for d, fids in enumerate(dims):
                if fids == (f,) and not eqn.invars[i].is_const:
                    x = jnp.asarray(ins[i])
                    ins[i] = collectives.mask_padding(x, d, axes, sizes, fr.sizes[f],
                                                      reduction_identity(kind, x.dtype))
    return ins


def lower_to_jit(program, mesh, donate_argnums=()):
    """``jax.jit`` of the shard_map program; takes and returns flat lists of global arrays."""
    in_specs = tuple(lay.spec() for lay in program.in_layouts())
    out_specs = tuple(lay.spec() for lay in program.out_layouts)
    local_mesh = refined_mesh(mesh, program.mesh)
    body = jax.shard_map(local_function(program), mesh=local_mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)
    if local_mesh is not mesh:
        body = _under_mesh(body, local_mesh)
    # On a refined mesh (passes/refine_mesh.py) the shardings name its sub-axes: the same
    # devices in the same order, so arrays placed on the user's mesh pass as they are.
    in_shardings = tuple(NamedSharding(local_mesh, s) for s in in_specs)
    out_shardings = tuple(NamedSharding(local_mesh, s) for s in out_specs)
    return jax.jit(body, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums), in_shardings, out_shardings


def user_sharding(mesh, info, sharding):
    """``sharding`` (on the plan's mesh) on the user's ``mesh`` where it can be written there
    (each refined axis split whole, sub-axes in order): the same devices hold the same blocks.
    Otherwise ``sharding`` itself."""
    if not info.parents or not isinstance(sharding, NamedSharding):
        return sharding
    entries = []
    for e in sharding.spec:
        axes = () if e is None else ((e,) if isinstance(e, str) else tuple(e))
        coarse = info.coarsen(axes)
        if coarse is None:
            return sharding
        entries.append(None if not coarse else coarse[0] if len(coarse) == 1 else coarse)
    return NamedSharding(mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind)


def _under_mesh(body, local_mesh):
    """``body`` traced with the refined mesh as the context mesh (a caller's ``jax.set_mesh``
    of the user's mesh would not match the shard_map's)."""
    abstract = getattr(local_mesh, "abstract_mesh", local_mesh)

    @functools.wraps(body)
    def run(*args):
        with jax.sharding.use_abstract_mesh(abstract):
            return body(*args)
    return run


class AbstractLowered(jax.stages.Lowered):
    """A ``jax.stages.Lowered`` made for an ``AbstractMesh``: its StableHLO text is the
    program every device of the mesh would run (collectives with the mesh's replica groups,
    ``mhlo.num_partitions`` = its size); compiling needs the devices themselves."""
    __slots__ = ()
    mesh_shape: dict = {}

    def compile(self, compiler_options=None, *, device_assignment=None):
        if device_assignment is None:
            from ..errors import PlanningOnlyError
            n = math.prod(self.mesh_shape.values()) if self.mesh_shape else "its"
            raise PlanningOnlyError(
                f"this program was lowered for the abstract mesh {self.mesh_shape} and XLA compiles only "
                f"for concrete devices ({n}); as_text() gives its StableHLO, pf.report(...) its memory and "
                f"communication per device, or compile(device_assignment=<that many devices>) where they exist")
        return super().compile(compiler_options, device_assignment=device_assignment)


def lower_abstract(program, mesh, args_avals, donate_argnums=(), lowering_platforms=None):
    """Lower the shard_map program for an ``AbstractMesh`` (no devices): JAX needs the target
    platforms named (``("cpu",)``, ``("cuda",)``, ``("tpu",)``; default: this process's
    backend). Returns an :class:`AbstractLowered`."""
    import jax.extend.backend
    jitted, in_shardings, _ = lower_to_jit(program, mesh, donate_argnums)
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(args_avals, in_shardings)]
    platforms = tuple(lowering_platforms or (jax.extend.backend.get_backend().platform,))
    lowered = jitted.trace(*avals).lower(lowering_platforms=platforms)
    # Lowered keeps its state in __slots__: a subclass without new slots can take over the
    # instance (its compile() explains instead of JAX's "device_assignment cannot be None").
    lowered.__class__ = _abstract_lowered_class(tuple(mesh.shape.items()))
    return lowered


@functools.lru_cache(maxsize=None)
def _abstract_lowered_class(mesh_items):
    return type("AbstractLowered", (AbstractLowered,), {"__slots__": (), "mesh_shape": dict(mesh_items)})
