"""``ParallelFunction``: trace once per (abstract inputs, static args), compile the sharding
plan, lower, and cache.

>>> pf = parallelize(f, mesh=mesh, in_specs=(P("data", None), None))     # doctest: +SKIP
>>> pf(x, w)            # runs on the mesh                               # doctest: +SKIP
>>> print(pf.report(x, w))                                               # doctest: +SKIP

The compiled-program cache is keyed by the mesh, the annotations (in/out specs), the donated
and static argument numbers, the input tree structure, every leaf's shape and dtype, and the
static argument values (as ``jax.jit``, one cache per ``ParallelFunction``; ``trace_count``
counts its traces). Inputs with other shapes or dtypes trace a new program (the reason is
kept in ``pf.last_retrace_reason``; a ``RetraceWarning`` past ``RETRACE_WARN_AT`` traces).

At call time each input leaf is placed in the layout the program expects: a ``jax.Array``
already there (equal or equivalent sharding) is passed as is, never copied; one on another
mesh or other devices is copied over with a ``ReshardWarning``; host values (NumPy, scalars)
are put on the devices. In a multi-process run (``autoshard.runtime.distributed``) host
values and process-local arrays are taken to be the same on every process, and each
process fills only its own shards.
"""
from __future__ import annotations

import functools
import hashlib
import time
import warnings
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from .. import compat
from ..compiler import ir
from ..compiler.hardware import costs_for
from ..compiler.mesh import MeshInfo, refined_mesh
from ..compiler.ops import REFUSED, get_rule
from ..compiler.ops.control_flow import drop_dead_loop_inputs
from ..compiler.program import register_rule_hint
from ..errors import (PlanningOnlyError, ReshardWarning, RetraceWarning, ShardingError, SpecError,
                      UnsupportedPrimitiveError, UnsupportedPrimitiveWarning)
from ..passes import pipeline
from ..report import ShardingReport
from .lower import lower_abstract, lower_to_jit, user_sharding

#: Warn (``RetraceWarning``) when one ParallelFunction has traced more than this many programs.
RETRACE_WARN_AT = 8


def _is_spec_leaf(x):
    return x is None or isinstance(x, PartitionSpec)


def flatten_specs(specs, tree, root: str, what: str):
    """Broadcast a spec prefix tree over ``tree``; return ``(specs, paths)`` per leaf of ``tree``."""
    spec_leaves, spec_def = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec_leaf)
    try:
        subtrees = spec_def.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise SpecError(f"{what} does not match the structure of the value it annotates "
                        f"(it must be a pytree prefix of it): {e}",
                        path=root, spec=repr(specs),
                        fix=f"give {what} the same nesting as the value, or one P(...)/None for all of it") from None
    out_specs, out_paths = [], []
    for (spath, spec), sub in zip(spec_leaves, subtrees):
        for lpath, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
            out_specs.append(spec)
            out_paths.append(root + jax.tree_util.keystr(spath) + jax.tree_util.keystr(lpath))
    return out_specs, out_paths


def _aval(x):
    """Shape and canonical dtype (float64 NumPy data is float32 unless jax_enable_x64 is on:
    it is what ``device_put`` makes of it, so both spellings share one program). Typed PRNG
    keys (``jax.random.key``, extended dtypes) keep their dtype."""
    if isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(x.shape, compat.canonicalize_dtype(x.dtype))
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, compat.canonicalize_dtype(arr.dtype))


def _spec_key(specs):
    """A hashable fingerprint of an in_specs/out_specs pytree."""
    leaves, tree = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec_leaf)
    return tree, tuple(leaves)


def _signature_diff(old_key, new_key, paths) -> str:
    """Why a call traced again: the first input whose structure, shape or dtype changed."""
    (old_tree, old_avals, old_static), (new_tree, new_avals, new_static) = old_key[-3:], new_key[-3:]
    if old_tree != new_tree:
        return f"the inputs' pytree structure changed: {old_tree} -> {new_tree}"
    for path, a, b in zip(paths, old_avals, new_avals):
        if a != b:
            return f"{path} changed from {a[1]}{list(a[0])} to {b[1]}{list(b[0])}"
    if old_static != new_static:
        return f"static arguments changed: {old_static!r} -> {new_static!r}"
    return "new mesh or annotations"


def _mesh_context(mesh):
    if isinstance(mesh, AbstractMesh):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(mesh)


@dataclass
class Compiled:
    program: object
    in_tree: object
    out_tree: object
    jitted: object
    in_shardings: tuple
    out_shardings: tuple
    avals: list
    trace_seconds: float
    paths: list = field(default_factory=list)
    key: tuple = ()


class ParallelFunction:
    def __init__(self, fun, *, mesh, in_specs=None, out_specs=None, static_argnums=(),
                 donate_argnums=(), auto=False, memory_budget=None, search_time_limit=10.0, strict=False,
                 costs=None, microbatches=None, idle_axes=True):
        self.fun = fun
        # idle_axes=True: mesh axes no annotation names split the batch too where the cost
        # model says it pays (passes/idle_axes.py); False keeps them unused.
        self.idle_axes = bool(idle_axes)
        # strict=True: a primitive without a sharding rule is an error, not a replicated fallback.
        self.strict = bool(strict)
        self.microbatches = microbatches
        self.mesh = mesh
        # Link and compute rates: ``costs`` (a Calibration or HardwareModel), else the table
        # entry of the mesh's device kind (compiler/hardware.py; "cpu" keeps the old defaults).
        self.costs = costs_for(mesh, costs)
        self.mesh_info = MeshInfo.of(mesh, self.costs.links_for(mesh), self.costs.source)
        self.in_specs = in_specs
        self.out_specs = out_specs
        self.static_argnums = tuple(static_argnums) if not isinstance(static_argnums, int) else (static_argnums,)
        self.donate_argnums = tuple(donate_argnums) if not isinstance(donate_argnums, int) else (donate_argnums,)
        if memory_budget is not None and not auto:
            raise ValueError("memory_budget constrains the layout search: pass auto=True with it")
        # auto=True: every layout not annotated is chosen by the MILP search (passes/auto_search).
        # ``auto`` may also be a dict of the search's options (``compute_rate``, ...).
        self.auto = ({"memory_budget": memory_budget, "time_limit": float(search_time_limit),
                      "compute_rate": self.costs.compute_rate,
                      **(auto if isinstance(auto, dict) else {})} if auto else None)
        self._cache: dict = {}
        self.trace_count = 0
        self.last_retrace_reason: str | None = None
        self.last_call_copies = 0          # input leaves copied/placed by the latest call
        self._last_key = None
        self._verified: set = set()        # cache keys whose signature all processes agreed on
        # Constant parts of the cache key: the mesh and every annotation.
        self._static_key = (mesh, _spec_key(in_specs), _spec_key(out_specs), self.static_argnums,
                            self.donate_argnums, repr(self.auto), self.idle_axes)
        self.__wrapped__ = fun
        self.__name__ = getattr(fun, "__name__", "parallel_function")

    # -- compilation ---------------------------------------------------------------------
    def _split_args(self, args):
        dyn = [a for i, a in enumerate(args) if i not in self.static_argnums]
        static = tuple(a for i, a in enumerate(args) if i in self.static_argnums)
        return dyn, static

    def _arg_specs(self, n_args, n_dyn):
        specs = self.in_specs
        if specs is None:
            return [None] * n_dyn
        if not isinstance(specs, (tuple, list)):
            raise SpecError("in_specs must be a tuple with one entry per positional argument",
                            path="in_specs", spec=repr(specs), mesh_axes=self.mesh_info.axis_names,
                            fix="write in_specs=(P('data', None), None) for f(x, w)")
        if len(specs) == n_args:
            return [s for i, s in enumerate(specs) if i not in self.static_argnums]
        if len(specs) == n_dyn:
            return list(specs)
        raise SpecError(f"in_specs has {len(specs)} entries but the function was called with {n_args} "
                        f"positional arguments", path="in_specs", spec=repr(specs),
                        mesh_axes=self.mesh_info.axis_names,
                        fix="give one entry (a P(...), None, or a pytree of them) per positional argument")

    def _compile(self, args) -> Compiled:
        dyn, static = self._split_args(args)
        leaves, in_tree = jax.tree.flatten(dyn)
        avals = [_aval(x) for x in leaves]
        key = self._static_key + (in_tree, tuple((tuple(a.shape), str(a.dtype)) for a in avals), static)
        hit = self._cache.get(key)
        if hit is not None:
            self._last_key = key
            return hit
        if self._last_key is not None:
            prev = self._cache.get(self._last_key)
            self.last_retrace_reason = _signature_diff(self._last_key, key, prev.paths if prev else [])
        self.trace_count += 1
        if self.trace_count > RETRACE_WARN_AT:
            warnings.warn(RetraceWarning(
                f"{self.__name__} traced {self.trace_count} programs; the latest because "
                f"{self.last_retrace_reason}. Call it with fixed shapes and dtypes (pad batches), or mark "
                f"arguments that change as static_argnums"), stacklevel=4)
        t0 = time.perf_counter()
        arg_specs = self._arg_specs(len(args), len(dyn))
        flat_specs, flat_paths = [], []
        dyn_index = [i for i in range(len(args)) if i not in self.static_argnums]
        for i, (spec, arg) in enumerate(zip(arg_specs, jax.tree.unflatten(in_tree, avals))):
            s, p = flatten_specs(spec, arg, f"args[{dyn_index[i]}]", f"in_specs[{dyn_index[i]}]")
            flat_specs += s
            flat_paths += p
        out_store = {}

        def flat_fun(*flat):
            call_args = list(jax.tree.unflatten(in_tree, flat))
            full = []
            for i in range(len(args)):
                full.append(static[self.static_argnums.index(i)] if i in self.static_argnums else call_args.pop(0))
            out = self.fun(*full)
            out_leaves, out_store["tree"] = jax.tree.flatten(out)
            out_store["value"] = out
            return out_leaves

        # With the mesh in context, jax.lax.with_sharding_constraint(x, P(...)) traces too.
        with _mesh_context(self.mesh):
            graph = ir.trace(flat_fun, avals)
        if drop_dead_loop_inputs(graph):     # loop operands no body reads (hoisted residuals)
            graph = ir.dce(graph)
        _refuse_primitives_without_rule(graph, self.strict)
        out_tree = out_store["tree"]
        out_avals = jax.tree.unflatten(out_tree, [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in graph.outvars])
        if self.out_specs is None:
            out_specs = [None] * len(graph.outvars)
            out_paths = ["out" + jax.tree_util.keystr(k)
                         for k, _ in jax.tree_util.tree_flatten_with_path(out_avals)[0]]
        else:
            out_specs, out_paths = flatten_specs(self.out_specs, out_avals, "out", "out_specs")
        trace_seconds = time.perf_counter() - t0
        program = pipeline.compile(graph, self.mesh_info, flat_specs, out_specs, flat_paths, out_paths,
                                   auto=self.auto, microbatches=self.microbatches,
                                   idle={"compute_rate": self.costs.compute_rate} if self.idle_axes else None)
        program.pass_seconds["trace"] = trace_seconds
        for fb in program.fallbacks:
            warnings.warn(UnsupportedPrimitiveWarning(f"{self.__name__}: {fb}"), stacklevel=4)
        if isinstance(self.mesh, AbstractMesh):
            jitted, in_sh, out_sh = None, None, None
        else:
            donate = tuple(j for j, leaf_arg in enumerate(self._leaf_arg_index(args, in_tree))
                           if leaf_arg in self.donate_argnums)
            jitted, in_sh, out_sh = lower_to_jit(program, self.mesh, donate)
        entry = Compiled(program, in_tree, out_tree, jitted, in_sh, out_sh, avals, trace_seconds,
                         flat_paths, key)
        self._cache[key] = entry
        self._last_key = key
        return entry

    @property
    def _spans_processes(self) -> bool:
        return not isinstance(self.mesh, AbstractMesh) and jax.process_count() > 1 \
            and any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)

    def _check_same_signature_everywhere(self, entry):
        """Every process must run the same program: before a program's first run, compare a
        digest of its call signature across processes, so a mismatch is an error naming this
        process's inputs instead of a hang in the first collective. Only a program's first run
        communicates (``report``/``lower``/``input_shardings`` stay local), so a process that
        diverges later while another hits its cache still hangs: a per-call check would cost a
        host synchronisation every step."""
        from jax.experimental import multihost_utils
        avals = entry.avals
        # Paths and avals only: reprs of static arguments or pytree node data may hold addresses.
        text = repr([(p, tuple(a.shape), str(a.dtype)) for p, a in zip(entry.paths, avals)])
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint32)
        everyone = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
        differ = [i for i in range(len(everyone)) if not np.array_equal(everyone[i], everyone[0])]
        if differ:
            mine = ", ".join(f"{a.dtype}{list(a.shape)}" for a in avals)
            raise ShardingError(
                f"{self.__name__}: processes {differ} called it with other input shapes, dtypes or structure "
                f"than process 0 (this is process {jax.process_index()}: {mine}); every process "
                f"must call a parallelized function with the same global values' shapes (turn process-local data "
                f"into global arrays with autoshard.runtime.distributed.global_array)")

    def _leaf_arg_index(self, args, in_tree):
        """For each flat leaf, the positional argument it came from."""
        out = []
        for i, a in enumerate(args):
            if i in self.static_argnums:
                continue
            out += [i] * len(jax.tree.leaves(a))
        return out

    # -- public --------------------------------------------------------------------------
    def __call__(self, *args):
        if isinstance(self.mesh, AbstractMesh):
            raise PlanningOnlyError(
                f"{self.__name__} was parallelized on an abstract mesh {dict(self.mesh.shape)}: it is for "
                f"planning (report/lower) only; build the mesh with autoshard.make_mesh to run it")
        entry = self._compile(args)
        if entry.key not in self._verified and self._spans_processes:
            self._check_same_signature_everywhere(entry)
        self._verified.add(entry.key)
        dyn, _ = self._split_args(args)
        leaves = jax.tree.leaves(dyn)
        copies = 0
        placed = []
        for j, (x, s) in enumerate(zip(leaves, entry.in_shardings)):
            y = self._place(x, s, entry, j)
            copies += y is not x and not _same_buffers(x, y)
            placed.append(y)
        self.last_call_copies = copies
        out = list(entry.jitted(*placed))
        if entry.program.mesh.parents:      # planned on a refined mesh: hand back on the user's
            out = [_relabel(y, user_sharding(self.mesh, entry.program.mesh, y.sharding)) for y in out]
        return jax.tree.unflatten(entry.out_tree, out)

    def _place(self, x, sharding, entry, j):
        """``x`` in the layout ``sharding``; ``x`` itself when it is already there."""
        path = entry.paths[j] if j < len(entry.paths) else f"input leaf {j}"
        if isinstance(x, jax.Array):
            if x.is_deleted():
                raise ValueError(f"{self.__name__}: input {path} has been deleted (donated to an earlier call "
                                 f"through donate_argnums?); pass the array the earlier call returned instead")
            have = x.sharding
            if have == sharding:
                return x
            if have.is_equivalent_to(sharding, x.ndim):
                # On the plan's refined mesh (passes/refine_mesh.py) the array is relabelled only.
                return _relabel(x, sharding)
            if self._foreign(have):
                warnings.warn(ReshardWarning(
                    f"{self.__name__}: input {path} {x.dtype}{list(x.shape)} lives on {_where(have)}, not on this "
                    f"function's mesh {dict(self.mesh.shape)}; copying it to {sharding.spec} on every call. Place it "
                    f"once with jax.device_put(x, pf.input_shardings(...)...) (or restore the checkpoint onto this "
                    f"mesh)"), stacklevel=3)
            if not sharding.is_fully_addressable and x.is_fully_addressable:
                # A process-local array in a multi-process run: every process holds the whole value.
                return _from_host(np.asarray(x), sharding)
            return jax.device_put(x, sharding)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return _from_host(np.asarray(x, dtype=entry.avals[j].dtype), sharding)

    def _foreign(self, sharding) -> bool:
        """Does ``sharding`` place data on another mesh (or on devices outside this one)?"""
        devices = sharding.device_set
        if not devices <= self._mesh_devices:
            return True
        return len(devices) > 1 and isinstance(sharding, NamedSharding) and sharding.mesh != self.mesh

    @functools.cached_property
    def _mesh_devices(self):
        return set(self.mesh.devices.flat)

    def report(self, *args):
        """The ``ShardingReport`` of the plan for these inputs. The report imports nothing of
        the runtime: it is handed the compile step, the mesh and this function's file."""
        entry = self._compile(args)
        source = getattr(getattr(self.fun, "__code__", None), "co_filename", None)
        return ShardingReport(entry.program, compile=functools.partial(self._xla_executable, entry),
                              mesh=refined_mesh(self.mesh, entry.program.mesh), source_files=(source,) if source else ())

    @staticmethod
    def _xla_executable(entry):
        """XLA's executable of a cached plan, compiled from its abstract inputs."""
        if entry.jitted is None:
            raise PlanningOnlyError("XLA's memory analysis needs a concrete mesh: parallelize on "
                                    "autoshard.make_mesh(...) rather than abstract_mesh(...)")
        return entry.jitted.lower(*_placed_avals(entry)).compile()

    def lower(self, *args, lowering_platforms=None):
        """``jax.stages.Lowered`` of the per-device program (``.as_text()``: StableHLO,
        ``.compile()``). On an abstract mesh it is lowered for ``lowering_platforms`` (default:
        this process's backend) without devices; its ``compile()`` raises ``PlanningOnlyError``
        unless given a ``device_assignment`` of the mesh's size."""
        entry = self._compile(args)
        if entry.jitted is None:
            donate = tuple(j for j, leaf_arg in enumerate(self._leaf_arg_index(args, entry.in_tree))
                           if leaf_arg in self.donate_argnums)
            return lower_abstract(entry.program, self.mesh, entry.avals, donate, lowering_platforms)
        avals = _placed_avals(entry)
        if lowering_platforms is not None:
            return entry.jitted.trace(*avals).lower(lowering_platforms=tuple(lowering_platforms))
        return entry.jitted.lower(*avals)

    def program(self, *args):
        """The compiled ``ShardedProgram`` (layouts, reshards, provenance)."""
        return self._compile(args).program

    def input_shardings(self, *args):
        """One entry per non-static positional argument (a tuple, so
        ``jax.device_put(args, pf.input_shardings(*args))`` places them all)."""
        entry = self._compile(args)
        return tuple(jax.tree.unflatten(entry.in_tree, self._user_shardings(entry, entry.in_shardings)))

    def output_shardings(self, *args):
        entry = self._compile(args)
        return jax.tree.unflatten(entry.out_tree, self._user_shardings(entry, entry.out_shardings))

    def _user_shardings(self, entry, shardings) -> list:
        """The plan's shardings on the user's mesh where they can be written there."""
        return [user_sharding(self.mesh, entry.program.mesh, s) for s in shardings]


def _relabel(x, sharding):
    """``x`` with ``sharding``, an equivalent sharding on another mesh of the same devices
    (the user's mesh and the plan's refined one): the same buffers, not a copy."""
    if isinstance(x, jax.core.Tracer) or x.sharding == sharding or not isinstance(x.sharding, NamedSharding) \
            or x.sharding.mesh == sharding.mesh:
        return x
    return jax.make_array_from_single_device_arrays(x.shape, sharding,
                                                    [shard.data for shard in x.addressable_shards])


def _same_buffers(x, y) -> bool:
    """``y`` holds ``x``'s own device buffers (relabelled onto another mesh, not copied)."""
    if not isinstance(x, jax.Array) or not isinstance(y, jax.Array):
        return False
    try:
        return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards] == \
               [s.data.unsafe_buffer_pointer() for s in y.addressable_shards]
    except Exception:       # buffers without a pointer (some backends): count it as a copy
        return False


def _placed_avals(entry) -> list:
    """The abstract inputs of a cached plan, each with the sharding it is placed in."""
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(entry.avals, entry.in_shardings)]


def _refuse_primitives_without_rule(graph, strict: bool):
    """The first equation (in program order) the fallback cannot compute (``ops.REFUSED``), or
    with ``strict=True`` the first whose primitive has no rule."""
    for eqn in graph.all_eqns():
        if eqn.prim.name in REFUSED:
            raise UnsupportedPrimitiveError(
                eqn.prim.name, eqn.source, detail=REFUSED[eqn.prim.name],
                workaround="call the shard_map outside the parallelized function, or write its body "
                           "with jax.numpy ops and let autoshard place it")
        if strict and not eqn.subgraphs and get_rule(eqn).fallback:
            raise UnsupportedPrimitiveError(
                eqn.prim.name, eqn.source,
                detail="strict=True refuses to compute it on replicated operands",
                workaround=(f"{register_rule_hint(eqn.prim.name)}; or drop strict=True to compute it on "
                            f"replicated operands (correct, with a warning and the cost in the report)"))


def _from_host(value, sharding):
    """A global array from a host value every process holds whole (each fills its shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _where(sharding) -> str:
    if isinstance(sharding, NamedSharding):
        return f"mesh {dict(sharding.mesh.shape)} (devices {sorted(d.id for d in sharding.device_set)})"
    return f"devices {sorted(d.id for d in sharding.device_set)}"


def parallelize(fun=None, *, mesh, in_specs=None, out_specs=None, static_argnums=(),
                donate_argnums=(), auto=False, memory_budget=None, search_time_limit=10.0,
                strict=False, costs=None, microbatches=None, idle_axes=True):
    """Compile single-device ``fun`` to the mesh. Decorator or call form.

    ``auto=True`` chooses every layout the annotations leave open by a MILP over the factor
    rules' strategies (``passes/auto_search.py``); ``memory_budget`` (bytes per device of the
    step's inputs, outputs and activations kept for backward) constrains it,
    ``search_time_limit`` bounds the solver (seconds; the best plan found is used).

    A primitive autoshard has no sharding rule for is computed on replicated operands (the
    result is correct; an ``UnsupportedPrimitiveWarning``, a ``UserWarning``, names it and its
    source line, and ``program.fallbacks`` what replicating costs); ``strict=True`` raises
    ``UnsupportedPrimitiveError`` instead.

    ``costs`` prices collectives and work: ``ash.calibrate(mesh)``'s result, a
    ``HardwareModel`` or a device-kind string; default the table entry of the mesh's device
    kind (``compiler/hardware.py``); ``report.cost_model_source`` names it.

    A mesh axis that splits the stacked dim of a ``lax.scan`` over layers makes that loop a
    GPipe pipeline over the axis; ``microbatches`` (default: the stage count) must divide the
    per-device batch (``passes/stages.py``, ``report.pipeline``).

    ``idle_axes`` (default True): mesh axes that no annotation names also split the batch (data
    parallelism over them: the batch inputs are sliced locally, the parameter gradients
    all-reduced over them) where the cost model says the compute saved pays for the reduction
    (``passes/idle_axes.py``, ``report.idle_axes``); False leaves them unused."""
    def wrap(f):
        return ParallelFunction(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                static_argnums=static_argnums, donate_argnums=donate_argnums, auto=auto,
                                memory_budget=memory_budget, search_time_limit=search_time_limit,
                                strict=strict, costs=costs, microbatches=microbatches,
                                idle_axes=idle_axes)
    return wrap if fun is None else wrap(fun)
