"""Shared test helpers: meshes, single-device references, HLO collective checks."""
from __future__ import annotations

from collections import Counter

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import autoshard as ash
from autoshard.compiler.mesh import refined_mesh
from autoshard.report.hlo import parse_collectives, summarize


def mesh(shape: str):
    return ash.make_mesh(shape)


def hlo_collectives(pf, *args):
    """The compiled HLO's collectives, on the mesh the plan ran on (with the sub-axes of a
    refined mesh, passes/refine_mesh.py)."""
    return parse_collectives(pf.lower(*args).compile().as_text(),
                             refined_mesh(pf.mesh, pf.program(*args).mesh))


def assert_report_matches_hlo(pf, *args):
    """The report's collectives (kind, mesh axes, per-device shape) equal the compiled HLO's."""
    report = pf.report(*args)
    hlo = hlo_collectives(pf, *args)
    planned, compiled = _a2a_by_size(summarize(report.collectives)), _a2a_by_size(summarize(hlo))
    assert planned == compiled, (f"report and HLO disagree\nonly in report: {planned - compiled}\n"
                                 f"only in HLO: {compiled - planned}")
    assert abs(report.total_wire_bytes - sum(c.wire_bytes for c in hlo)) < 1e-6
    return report, hlo


def _a2a_by_size(summary: Counter) -> Counter:
    """All-to-alls keyed by element count: XLA CPU emits them as one piece per peer, and when
    it fuses the slicing into producers the parser cannot see the operand's shape (only its
    size, so bytes still compare exactly)."""
    out = Counter()
    for (kind, axes, shape), n in summary.items():
        out[(kind, axes, (int(np.prod(shape)),) if kind == "all-to-all" else shape)] += n
    return out


def count(collectives, kind=None, axes=None) -> int:
    return sum(1 for c in collectives if (kind is None or c.kind == kind)
               and (axes is None or tuple(c.mesh_axes) == tuple(axes)))


def assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
    for path, g, w in zip(paths, got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=path)


def kinds(collectives) -> Counter:
    return Counter((c.kind, tuple(c.mesh_axes)) for c in collectives)


def flops_memory_wire(compiled, mesh):
    """``flops_and_memory`` and the wire bytes each device sends (the compiled HLO's collectives
    on ``mesh``, ring model)."""
    wire = sum(c.wire_bytes for c in parse_collectives(compiled.as_text(), mesh, strict=False))
    return (*flops_and_memory(compiled), wire)


def against_jit(pf, fn, mesh, specs, *args):
    """``flops_memory_wire`` of autoshard's compiled ``pf`` and of ``jax.jit(fn)`` given the same
    annotations (``specs``, a pytree of PartitionSpecs for ``args``) as ``NamedSharding``s."""
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda s: isinstance(s, PartitionSpec))
    with jax.set_mesh(mesh):
        theirs = jax.jit(fn, in_shardings=named).lower(*args).compile()
    return flops_memory_wire(pf.lower(*args).compile(), mesh), flops_memory_wire(theirs, mesh)


def flops_and_memory(compiled):
    """Per device: XLA's flops (``cost_analysis()``) and memory (``memory_analysis()``:
    arguments + outputs + temporaries - aliased)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return cost["flops"], (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
