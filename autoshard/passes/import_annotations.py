"""Seed layouts from in_specs / out_specs and sharding constraints; validate them.

Expects: a ``ShardedProgram`` whose ``graph`` is traced, and ``in_specs``/``out_specs``
flattened to one ``PartitionSpec`` or ``None`` per leaf (with its argument path).
Guarantees: every annotated value has a *closed* layout with provenance ``annotation`` or
``constraint``; every bad spec raised a ``SpecError`` naming path, shape, spec, mesh axes.
Dims that do not divide by their axes are accepted (padded per device) and noted.
"""
from __future__ import annotations

import math

from jax.sharding import PartitionSpec

from ..compiler.layout import Layout
from ..compiler.ops.constraint import constraint_spec
from ..compiler.program import Provenance
from ..errors import SpecError

name = "import_annotations"


def validate_spec(spec, shape, path: str, mesh) -> Layout:
    """Check one spec against its value's shape and the mesh; return its layout (on a refined
    mesh, an axis the spec names splits the dim over its sub-axes)."""
    axes = mesh.user_axis_names
    if not isinstance(spec, PartitionSpec):
        raise SpecError(f"sharding spec must be a jax.sharding.PartitionSpec or None, got {type(spec).__name__}",
                        path=path, shape=shape, spec=repr(spec), mesh_axes=axes,
                        fix="write P('data', None) or leave the entry None to let autoshard infer it")
    if len(spec) > len(shape):
        raise SpecError(f"spec has {len(spec)} entries but the value has rank {len(shape)}",
                        path=path, shape=shape, spec=spec, mesh_axes=axes,
                        fix=f"give at most {len(shape)} entries (one per dim; missing trailing entries mean unsplit)")
    seen = set()
    for entry in spec:
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        for n in names:
            if n not in axes:
                raise SpecError(f"unknown mesh axis {n!r}", path=path, shape=shape, spec=spec,
                                mesh_axes=axes, fix=f"use one of the mesh axes {axes}")
            if n in seen:
                raise SpecError(f"mesh axis {n!r} is used twice in one spec", path=path, shape=shape,
                                spec=spec, mesh_axes=axes,
                                fix="a mesh axis can split only one dim; to split a dim over several axes write P(('data', 'model'))")
            seen.add(n)
    lay = Layout.from_spec(spec, len(shape))
    return Layout(tuple(mesh.expand(d) for d in lay.dims)) if mesh.parents else lay


def note_uneven(program, v, layout, path):
    """Record padding for dims that do not divide by their axes (a report warning)."""
    sizes = program.axis_sizes
    for d in layout.uneven_dims(v.shape, sizes):
        n = math.prod(sizes[a] for a in layout.dims[d])
        program.notes.append(
            ("padding", f"{path}: dim {d} of size {v.shape[d]} is split over {layout.dims[d]} ({n} ways) "
                        f"unevenly: blocks of {-(-v.shape[d] // n)} with {(-v.shape[d]) % n} padding rows, "
                        f"masked where they would change a result; it enters and leaves the program "
                        f"unsplit on that dim (JAX arrays cannot be split unevenly)",
             f"make dim {d} a multiple of {n} to avoid the padding and the boundary reshard"))


def run(program, in_specs, out_specs):
    graph, mesh = program.graph, program.mesh
    for v, spec, path in zip(graph.invars, in_specs, program.in_paths):
        if spec is None:
            continue
        program.layouts[v] = validate_spec(spec, v.shape, path, mesh)
        program.closed.add(v)
        program.provenance[v] = Provenance("annotation", f"in_specs {path} = {spec}")
        note_uneven(program, v, program.layouts[v], path)
    for i, (v, spec, path) in enumerate(zip(graph.outvars, out_specs, program.out_paths)):
        if spec is None:
            program.out_specs.append(None)
            continue
        lay = validate_spec(spec, v.shape, path, mesh)
        note_uneven(program, v, lay, path)
        program.out_specs.append(lay.even_part(v.shape, program.axis_sizes))
        if v not in program.closed and not v.is_const:
            program.layouts.setdefault(v, lay)
            program.provenance.setdefault(v, Provenance("annotation", f"out_specs {path} = {spec}"))
    for eqn in graph.all_eqns():
        spec = constraint_spec(eqn)
        if spec is None:
            continue
        out = eqn.outvars[0]
        program.layouts[out] = validate_spec(spec, out.shape, f"constraint at {eqn.source}", mesh)
        note_uneven(program, out, program.layouts[out], f"constraint at {eqn.source}")
        program.closed.add(out)
        program.provenance[out] = Provenance("constraint", f"{eqn.prim.name}({spec}) at {eqn.source}", eqn.index)
    for v in graph.values:
        if v.is_const:
            program.layouts[v] = Layout.replicated(len(v.shape))
            program.closed.add(v)
            program.provenance[v] = Provenance("constant", "constants are replicated")
    return program
