"""The plan as a strategy: the step-time estimate the layout search minimises, applied to any
placed program, and each layer's strategy in words.

>>> estimated_step_seconds(mlp.program(*args))       # the README's MLP   # doctest: +SKIP
{'compute_s': 1.4e-09, 'comm_s': 3.0003840000000005e-05, 'total_s': 3.0005240000000005e-05}
>>> describe_layers(gpt_step.program(*args))["blocks.0.mlp"]     # GPT under dp_tp # doctest: +SKIP
'Megatron tensor parallel over model (column up; row down); batch over data'
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import jax
import numpy as np

from .. import compat
from ..compiler.cost_model import DEFAULT_POINTS_PER_SECOND, assignment_points
from ..compiler.ir import trip_counts
from ..compiler.kinds import FactorKind
from ..compiler.layout import Layout
from ..compiler.naming import layer_of, module_path
from ..compiler.planner import transform_time


def estimated_step_seconds(program, compute_rate=DEFAULT_POINTS_PER_SECOND) -> dict:
    """The search's cost model applied to any placed program (auto or annotated): per-device
    compute (``points / compute_rate``) plus the alpha-beta time of every planned collective
    (latency in full). Compares plans on one scale: ``{"compute_s", "comm_s", "total_s"}``."""
    sizes = program.axis_sizes
    trips = trip_counts(program.graph)
    compute = sum(trips.get(e, 1) * assignment_points(program.rules[e.index].sizes,
                                                      program.assignments[e.index], sizes)
                  for e in program.graph.all_eqns() if e.index in program.assignments
                  and not e.subgraphs)
    links = program.mesh.link_models
    comm = 0.0
    for r in program.reshards:
        for t in r.transforms:
            if t.is_collective:
                comm += trips.get(r.value, 1) * transform_time(t, compat.itemsize(r.value.dtype), sizes, links)
    return {"compute_s": compute / compute_rate, "comm_s": comm, "total_s": compute / compute_rate + comm}


def describe_layers(program) -> dict[str, str]:
    """The chosen strategy per layer in words, read off the matmuls that use parameters:
    ``{"blocks.0.attn": "Megatron tensor parallel over model (column q,k,v; row out); batch
    over data"}``. A parameter is a program input with a module path (``params['blocks']...``);
    inside a scan over layers, the body input its stacked slice arrives as."""
    graph = program.graph
    param = {v: module_path(p) for v, p in zip(graph.invars, program.in_paths)
             if module_path(p) and jax.dtypes.issubdtype(v.dtype, np.floating)
             and not re.search(r"\.(mu|nu|count)\b|\[\d+\]\.", p)}
    stored_as = {v: program.layouts[v] for v in param}
    for e in graph.all_eqns():
        if e.prim.name == "scan":
            (body,) = e.subgraphs
            first_xs = e.params["num_consts"] + e.params["num_carry"]
            for i, (outer, inner) in enumerate(zip(e.invars, body.invars)):
                if outer in param:
                    param[inner] = param[outer]
                    lay = stored_as[outer]
                    stored_as[inner] = Layout(lay.dims[1:]) if i >= first_xs else lay
    phrases: dict = defaultdict(list)
    seen = set()
    for e in graph.all_eqns():
        if e.prim.name != "dot_general" or e.index not in program.assignments:
            continue
        fr, s = program.rules[e.index], program.assignments[e.index]
        for i, v in enumerate(e.invars):
            if v not in param or param[v] in seen:
                continue
            seen.add(param[v])          # its first use: the forward pass
            mp = param[v]
            phrases.setdefault(layer_of(mp), [])
            name = mp.rsplit(".", 1)[-1]
            mine = {f for d in fr.operands[i] for f in d}
            other = {f for d in fr.operands[1 - i] for f in d}
            for f, axes in enumerate(s):
                for a in axes:
                    if fr.kinds[f] == FactorKind.SUM:
                        phrases[layer_of(mp)].append(("row", a, name))
                    elif f in mine and f in other:     # a batch dim of the weight: experts
                        phrases[layer_of(mp)].append(("expert", a, name))
                    elif f in mine:
                        phrases[layer_of(mp)].append(("column", a, name))
                    elif f in other:
                        phrases[layer_of(mp)].append(("batch", a, name))
            stored = stored_as[v]
            read = program.operand_layouts.get((e.index, i))
            for a in {a for d in stored.dims for a in d} - {a for d in (read.dims if read else ()) for a in d}:
                phrases[layer_of(mp)].append(("stored", a, name))
    out = {}
    for layer, items in phrases.items():
        words = []
        by = lambda kind: sorted({(a, n) for k, a, n in items if k == kind})
        cols, rows = by("column"), by("row")
        for a in sorted({a for a, _ in cols} & {a for a, _ in rows}):
            words.append(f"Megatron tensor parallel over {a} (column {','.join(n for b, n in cols if b == a)}; "
                         f"row {','.join(n for b, n in rows if b == a)})")
        for a in sorted({a for a, _ in cols} - {a for a, _ in rows}):
            words.append(f"column-parallel over {a} ({','.join(n for b, n in cols if b == a)})")
        for a in sorted({a for a, _ in rows} - {a for a, _ in cols}):
            words.append(f"row-parallel over {a} ({','.join(n for b, n in rows if b == a)})")
        for a in sorted({a for a, _ in by("expert")}):
            words.append(f"expert parallel over {a} ({','.join(n for b, n in by('expert') if b == a)} "
                         f"split on their expert dim)")
        for a in sorted({a for a, _ in by("batch")}):
            words.append(f"batch over {a}")
        for a in sorted({a for a, _ in by("stored")}):
            words.append(f"parameters stored split over {a}, gathered for use (ZeRO-3)")
        out[layer] = "; ".join(words) if words else "replicated: every device computes the whole layer"
    return out


def replication_note(program) -> str | None:
    """Why the search left every layer replicated, in the search's own numbers (``None`` when
    some layer is split, or no search ran): the step's compute at ``compute_rate``, the most
    that splitting all of it over the mesh could save, and how many of the cheapest all-reduces
    that would pay for (a split train step needs at least one per gradient it reduces)."""
    if getattr(program, "search", None) is None:
        return None
    words = describe_layers(program)
    if not words or any(not w.startswith("replicated") for w in words.values()):
        return None
    sizes = {a: n for a, n in program.axis_sizes.items() if n > 1}
    if not sizes:
        return None
    rate = program.search_compute_rate or DEFAULT_POINTS_PER_SECOND
    est = estimated_step_seconds(program, rate)
    devices = math.prod(sizes.values())
    saving = est["compute_s"] * (1 - 1 / devices)
    latency, axis = min((program.mesh.link(a).time("all-reduce", n, 0.0), a) for a, n in sizes.items())
    return (f"why replicated: compute {est['compute_s'] * 1e3:.4g} ms at {rate:.3g} points/s per device; "
            f"splitting all of it over the {devices} devices would save at most {saving * 1e3:.4g} ms, which "
            f"pays for {int(saving // latency)} all-reduce(s) of the cheapest kind (over {axis}: "
            f"{latency * 1e3:.4g} ms of latency each); collectives here cost {est['comm_s'] * 1e3:.4g} ms")
