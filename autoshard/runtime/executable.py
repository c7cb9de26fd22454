"""``ParallelFunction``: trace once per (abstract inputs, static args), compile the sharding
plan, lower, and cache.

>>> pf = parallelize(f, mesh=mesh, in_specs=(P("data", None), None))     # doctest: +SKIP
>>> pf(x, w)            # runs on the mesh                               # doctest: +SKIP
>>> print(pf.report(x, w))                                               # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from ..compiler import ir, pipeline
from ..compiler.mesh import MeshInfo
from ..errors import PlanningOnlyError, SpecError
from .lower import lower_to_jit


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
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    arr = np.asarray(x)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


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


class ParallelFunction:
    def __init__(self, fun, *, mesh, in_specs=None, out_specs=None, static_argnums=(),
                 donate_argnums=(), auto=False):
        self.fun = fun
        self.mesh = mesh
        self.mesh_info = MeshInfo.of(mesh)
        self.in_specs = in_specs
        self.out_specs = out_specs
        self.static_argnums = tuple(static_argnums) if not isinstance(static_argnums, int) else (static_argnums,)
        self.donate_argnums = tuple(donate_argnums) if not isinstance(donate_argnums, int) else (donate_argnums,)
        if auto:
            raise NotImplementedError("auto=True (cost search over layouts) is not implemented yet (issue #6); "
                                      "annotate parameters and batch with in_specs instead")
        self._cache: dict = {}
        self.trace_count = 0
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
        key = (in_tree, tuple((a.shape, str(a.dtype)) for a in avals), static)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.trace_count += 1
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
        out_tree = out_store["tree"]
        out_avals = jax.tree.unflatten(out_tree, [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in graph.outvars])
        if self.out_specs is None:
            out_specs = [None] * len(graph.outvars)
            out_paths = ["out" + jax.tree_util.keystr(k)
                         for k, _ in jax.tree_util.tree_flatten_with_path(out_avals)[0]]
        else:
            out_specs, out_paths = flatten_specs(self.out_specs, out_avals, "out", "out_specs")
        trace_seconds = time.perf_counter() - t0
        program = pipeline.compile(graph, self.mesh_info, flat_specs, out_specs, flat_paths, out_paths)
        program.pass_seconds["trace"] = trace_seconds
        if isinstance(self.mesh, AbstractMesh):
            jitted, in_sh, out_sh = None, None, None
        else:
            donate = tuple(j for j, leaf_arg in enumerate(self._leaf_arg_index(args, in_tree))
                           if leaf_arg in self.donate_argnums)
            jitted, in_sh, out_sh = lower_to_jit(program, self.mesh, donate)
        entry = Compiled(program, in_tree, out_tree, jitted, in_sh, out_sh, avals, trace_seconds)
        self._cache[key] = entry
        return entry

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
        dyn, _ = self._split_args(args)
        leaves = jax.tree.leaves(dyn)
        placed = [x if isinstance(x, jax.Array) and x.sharding == s else jax.device_put(x, s)
                  for x, s in zip(leaves, entry.in_shardings)]
        out = entry.jitted(*placed)
        return jax.tree.unflatten(entry.out_tree, list(out))

    def report(self, *args):
        from ..compiler.report import ShardingReport
        return ShardingReport(self._compile(args).program, self)

    def lower(self, *args):
        entry = self._compile(args)
        if entry.jitted is None:
            raise PlanningOnlyError("lower() on an abstract mesh is not supported yet; use report()")
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                 for a, s in zip(entry.avals, entry.in_shardings)]
        return entry.jitted.lower(*avals)

    def program(self, *args):
        """The compiled ``ShardedProgram`` (layouts, reshards, provenance)."""
        return self._compile(args).program

    def input_shardings(self, *args):
        entry = self._compile(args)
        return jax.tree.unflatten(entry.in_tree, list(entry.in_shardings))

    def output_shardings(self, *args):
        entry = self._compile(args)
        return jax.tree.unflatten(entry.out_tree, list(entry.out_shardings))


def parallelize(fun=None, *, mesh, in_specs=None, out_specs=None, static_argnums=(),
                donate_argnums=(), auto=False):
    """Compile single-device ``fun`` to the mesh. Decorator or call form."""
    def wrap(f):
        return ParallelFunction(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                static_argnums=static_argnums, donate_argnums=donate_argnums, auto=auto)
    return wrap if fun is None else wrap(fun)
