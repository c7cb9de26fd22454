"""The report's warnings: problems in a plan, each with the change that removes it.

Five kinds (``WARNING_KINDS``): a large value left replicated, an all-gather of a parameter,
a reshard between two annotations that disagree, a dim split unevenly (from the notes the
passes leave in ``ShardedProgram.notes``), and a primitive without a rule computed on
replicated operands (``ShardedProgram.fallbacks``). Thresholds: ``DEFAULT_THRESHOLDS``.

``x @ w`` with ``w`` f32[4096, 1024] left unannotated on mesh data=2, model=4:

>>> for w in rep.warnings: print(w.kind, "|", w.message, "|", w.fix)     # doctest: +SKIP
replicated-value | args[0] (float32[4096, 1024], 16.0 MiB) is replicated on all 8 devices (no
annotation reaches it) | split it: in_specs args[0] = P('model') (4.0 MiB per device instead of
16.0 MiB; propagation then splits what it feeds)
"""
from __future__ import annotations

import math

import jax
import numpy as np

from .. import compat
from ..compiler.layout import Layout
from .explain import chain
from .fmt import fmt_bytes, spec_text
from .records import ReportWarning

MiB = 1 << 20

#: Warning thresholds (override with ``pf.report(...).with_options(thresholds={...})``).
DEFAULT_THRESHOLDS = {
    # A fully replicated input (or a value no annotation reaches) warns when its per-device
    # size is at least ``replicated_bytes`` ...
    "replicated_bytes": 16 * MiB,
    # ... or at least this fraction of all per-device argument bytes, if it is also at least
    # ``replicated_min_bytes`` (so tiny programs stay quiet).
    "replicated_fraction": 0.10,
    "replicated_min_bytes": 1 * MiB,
    # An all-gather of a parameter (or optimizer state) warns when its gathered per-device
    # result is at least this large.
    "gather_bytes": 1 * MiB,
}

#: Warning kinds. ``uneven-padding`` comes from the notes the passes leave in
#: ``ShardedProgram.notes`` (a dim split over axes that do not divide it is padded per device).
WARNING_KINDS = ("replicated-value", "implicit-all-gather", "conflicting-annotations", "uneven-padding",
                 "no-rule-replicated")

# Ops through which a parameter is still "the parameter" (for implicit-all-gather warnings).
_PASS_THROUGH = {"convert_element_type", "transpose", "reshape", "copy", "copy_p", "squeeze",
                 "expand_dims", "broadcast_in_dim"}


def find_warnings(ctx, collectives, thresholds: dict, argument_bytes: int) -> list[ReportWarning]:
    """Every warning of the plan; ``argument_bytes``: per-device bytes of all arguments."""
    p, th = ctx.program, thresholds
    n_devices = math.prod(ctx.mesh_shape.values())
    out: list[ReportWarning] = []
    if n_devices < 2:
        return out
    limit = min(th["replicated_bytes"], max(th["replicated_min_bytes"], th["replicated_fraction"] * argument_bytes))

    # 1. Large values left fully replicated: inputs, and values no annotation reaches.
    candidates = [(v, path, True) for v, path in zip(p.graph.invars, p.in_paths)]
    candidates += [(o, ctx.name_of(o), False) for e in ctx.eqns for o in e.outvars
                   if getattr(p.provenance.get(o), "kind", "") == "default"]
    for v, name, is_input in candidates:
        lay = p.layouts[v] if is_input else p.final_layout(v)
        b = ctx.local_bytes(v, lay)
        if not lay.is_replicated() or b < limit:
            continue
        prov = p.provenance.get(v)
        why = (f"annotated {prov.detail}" if prov is not None and prov.kind in ("annotation", "constraint")
               else "no annotation reaches it")
        sugg = suggest_split(ctx, v, lay)
        dtype = compat.dtype_name(v.dtype)
        msg = (f"{name} ({dtype}{list(v.shape)}, {fmt_bytes(b)}) is replicated on all {n_devices} "
               f"devices ({why})")
        if sugg is None:
            fix = "no dim divides by a mesh axis: resize it or shard the mesh differently"
        else:
            where = (f"in_specs {name} = {spec_text(sugg)}" if is_input else
                     f"ash.constrain({name}, {spec_text(sugg)}) at {ctx.made_at(v)}")
            fix = (f"split it: {where} ({fmt_bytes(ctx.local_bytes(v, sugg))} per device instead of "
                   f"{fmt_bytes(b)}; "
                   f"propagation then splits what it feeds)")
        src = ctx.made_at(v) if not is_input else ""
        out.append(ReportWarning("replicated-value", msg, fix, name, b, src))

    # 2. All-gathers of parameters / optimizer state, and 3. reshards between annotations.
    for r in p.reshards:
        coll = [t for t in r.transforms if t.is_collective]
        if not coll:
            continue
        wire = sum(c.wire_bytes for c in collectives
                   if c.value == ctx.name_of(r.value) and c.consumer == r.consumer and c.source == r.source)
        base = parameter_of(ctx, r.value)
        if base is not None and any(t.kind == "all-gather" for t in coll):
            gathered = ctx.local_bytes(r.value, r.dst)
            if gathered >= th["gather_bytes"]:
                bv, bpath = base
                axes = ",".join(a for t in coll if t.kind == "all-gather" for a in t.axes)
                msg = (f"parameter {bpath} is all-gathered over {axes} for {r.consumer} "
                       f"({fmt_bytes(gathered)} per device after the gather, {fmt_bytes(wire)} on the wire "
                       f"per step): its annotation splits it but this op needs it as {ctx.sbp(r.dst)}")
                want = r.dst if bv is r.value else None
                fix = (f"if this is not FSDP by design, annotate in_specs {bpath} = {spec_text(want)} "
                       f"(the layout {r.consumer} uses, so nothing moves)" if want is not None else
                       f"if this is not FSDP by design, annotate {bpath} with the layout {r.consumer} needs "
                       f"({ctx.sbp(r.dst)} on {ctx.name_of(r.value)}), so nothing moves")
                fix += (f", or change the annotations of the op's other operands so that it can use "
                        f"{bpath} as {ctx.sbp(r.src)} and run on the shards")
                out.append(ReportWarning("implicit-all-gather", msg, fix, bpath, gathered, r.source))
                continue                 # one warning per reshard: this one is the more specific
        found = conflict(ctx, r)
        if found is not None:
            src_ann, dst_ann, on_value = found
            name = ctx.name_of(r.value)
            kinds = "+".join(t.kind for t in coll)
            msg = (f"{name} is resharded {ctx.sbp(r.src)} -> {ctx.sbp(r.dst)} ({kinds}, "
                   f"{fmt_bytes(wire)} on the wire) because two annotations disagree: {src_ann} "
                   f"vs {dst_ann}")
            if on_value:
                fix = (f"make them agree: change {dst_ann} to {spec_text(r.src)}, or change {src_ann} so "
                       f"that {name} is made as {spec_text(r.dst)}")
            else:
                fix = (f"make them agree: change {src_ann} so that {name} arrives at {r.consumer} as "
                       f"{spec_text(r.dst)}, or change {dst_ann} so that {r.consumer} can use {name} as "
                       f"{spec_text(r.src)}")
            out.append(ReportWarning("conflicting-annotations", msg, fix, name,
                                     ctx.local_bytes(r.value, r.src), r.source))
    # 4. Notes the passes left for the report: ``("padding", message, fix)`` for a dim split
    #    unevenly (padded per device) becomes an "uneven-padding" warning.
    for note in getattr(p, "notes", ()):
        kind, message, fix = (tuple(note) + ("", "", ""))[:3]
        kind = {"padding": "uneven-padding"}.get(kind, kind)
        name = message.split(":", 1)[0] if ":" in message else ""
        v = ctx.find(name)
        b = ctx.local_bytes(v, p.final_layout(v)) if v is not None else 0
        src = ctx.made_at(v) if v is not None and ctx.producer_of(v) is not None else ""
        out.append(ReportWarning(kind, message, fix, name, b, src))
    # 5. Primitives without a rule, computed on replicated operands: the bytes are what
    #    replicating their operands costs on the wire per device each time they run.
    for fb in getattr(p, "fallbacks", ()):
        eqn = ctx.eqn_at(fb.eqn)
        name = ctx.name_of(eqn.outvars[0]) if eqn is not None and eqn.outvars else ""
        out.append(ReportWarning("no-rule-replicated", str(fb), fb.fix, name, int(fb.wire_bytes), fb.source))
    return out


def suggest_split(ctx, v, lay: Layout):
    """A spec splitting ``v`` over one more mesh axis: the largest free axis on the largest
    dim it divides (ties: the later dim / axis), or None."""
    sizes = ctx.program.axis_sizes
    used = set(lay.split_axes)
    best = None
    for a in ctx.mesh_axes:
        if a in used or sizes[a] < 2:
            continue
        for d, s in enumerate(v.shape):
            cur = math.prod(sizes[x] for x in lay.dims[d])
            if s % (cur * sizes[a]) == 0:
                key = (sizes[a], s // cur, d, ctx.mesh_axes.index(a))
                if best is None or key >= best[0]:
                    best = (key, d, a)
    if best is None:
        return None
    _, d, a = best
    dims = list(lay.dims)
    dims[d] = tuple(dims[d]) + (a,)
    return Layout(tuple(dims))


def parameter_of(ctx, v):
    """(input value, path) if ``v`` is a parameter/optimizer-state input, or made from one by
    layout-preserving unary ops only."""
    p = ctx.program
    inputs = dict(zip(p.graph.invars, p.in_paths))
    for _ in range(8):
        if v in inputs:
            path = inputs[v]
            return (v, path) if ctx.role_of(path) in ("parameters", "optimizer state", "inputs") \
                and jax.dtypes.issubdtype(v.dtype, np.floating) else None
        e = ctx.producer_of(v)
        live = [x for x in e.invars if not x.is_const] if e is not None else []
        if e is None or e.prim.name not in _PASS_THROUGH or len(live) != 1:
            return None
        v = live[0]
    return None


def annotation_of(ctx, v, axes) -> str | None:
    """The annotation that decided ``v``'s split over one of ``axes`` (or its own)."""
    p = ctx.program
    prov = p.provenance.get(v)
    if prov is not None and prov.kind in ("annotation", "constraint"):
        return prov.detail
    for a in axes:
        found = chain(p, v, a)
        if found:
            return p.provenance[found[-1]].detail
    return None


def conflict(ctx, r):
    """``(source annotation, destination annotation, destination is on r.value)`` when reshard
    ``r`` moves split axes only because two user annotations disagree, else None."""
    p = ctx.program
    if Layout(r.src.dims) == Layout(r.dst.dims):
        return None                      # a pending reduction, not a conflict
    if p.search is not None:
        return None                      # auto: the search chose every reshard, none is a conflict
    moved = (set(r.src.split_axes) ^ set(r.dst.split_axes)) | {
        a for d in range(r.src.rank) for a in set(r.src.dims[d]) ^ set(r.dst.dims[d])}
    v = r.value
    # Destination pinned by a constraint on v, an out_spec, or a closed operand of the consumer.
    dst_ann, on_value = None, True
    if v in p.post and p.post[v] == r.dst and v in p.closed:
        dst_ann = p.provenance[v].detail
    elif r.consumer.startswith("output "):
        k = p.out_paths.index(r.consumer[len("output "):]) if r.consumer[len("output "):] in p.out_paths else None
        if k is not None and p.out_specs[k] is not None:
            dst_ann = f"out_specs {p.out_paths[k]}"
    else:
        i = ctx.consumer_index(r)
        if i is not None:
            e = ctx.eqn_at(i)
            for w in (*e.invars, *e.outvars):
                if w is not v and w in p.closed and set(p.layouts[w].split_axes) & moved:
                    dst_ann, on_value = p.provenance[w].detail, False
                    break
    if dst_ann is None:
        return None
    if v in p.post and p.post[v] == r.dst and v in p.closed:
        e = ctx.producer_of(v)
        src_ann = None
        for w in (e.invars if e is not None else ()):
            if not w.is_const and set(p.layouts[w].split_axes) & moved:
                src_ann = annotation_of(ctx, w, moved)
                if src_ann:
                    break
    else:
        src_ann = annotation_of(ctx, v, moved & set(r.src.split_axes) or moved)
    if src_ann is None or src_ann == dst_ann:
        return None
    return src_ann, dst_ann, on_value
