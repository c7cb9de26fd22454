"""Provenance chains: why a value has its layout, from the annotation that decided it through
each (op, source line) to the value.

For the README's Megatron MLP (``x`` split over data, ``w1`` over model by columns, the bias
``b1`` left open), on mesh data=2, model=4:

>>> print(rep.explain("args[2]"))              # explain(ctx, ..., "args[2]", SourceLines())  # doctest: +SKIP
args[2]: [B, S(0)]  (float32[32], 32 B per device)
  split over 'model' because:
    annotation: in_specs args[1] = P(None, 'model')  => args[1] [B, S(1)]
    -> forward through dot_general at mlp.py:10 (mlp)   | return jax.nn.gelu(x @ w1 + b1) @ w2 + b2  => f [S(0), S(1)]
    -> backward through add at mlp.py:10 (mlp)   | return jax.nn.gelu(x @ w1 + b1) @ w2 + b2  => g [B, S(1)]
    -> backward through broadcast_in_dim at mlp.py:10 (mlp)   | ...  => args[2] [B, S(0)]
"""
from __future__ import annotations

import linecache
import os
import sys


from .. import compat
from .fmt import fmt_bytes, fmt_time, parse_source


class SourceLines:
    """The text of ``file.py:LINE (fn)`` source strings, when the file can be found: among
    the modules imported so far and ``extra_files`` (the traced function's own file)."""

    def __init__(self, extra_files=()):
        self._extra = [f for f in extra_files if f]
        self._files = None

    def code(self, source: str) -> str:
        info = parse_source(source)
        if not info["line"]:
            return ""
        path = self._find_file(info["file"])
        return linecache.getline(path, info["line"]).strip() if path else ""

    def _find_file(self, base: str):
        if self._files is None:
            files: dict = {}
            for f in [getattr(m, "__file__", None) for m in list(sys.modules.values())] + self._extra:
                if f and f.endswith(".py"):
                    files.setdefault(os.path.basename(f), set()).add(f)
            self._files = files
        found = self._files.get(base, ())
        return next(iter(found)) if len(found) == 1 else None


def chain(program, v, axis):
    """Shortest provenance path from ``v`` to an annotation whose layout uses ``axis``."""
    p = program
    parent = {v: None}
    frontier = [v]
    while frontier:
        nxt = []
        for val in frontier:
            prov = p.provenance.get(val)
            if prov is None:
                continue
            if prov.kind not in ("propagated", "default", "constant"):
                path = []
                while val is not None:
                    path.append(val)
                    val = parent[val]
                return path[::-1]
            for s in prov.sources:
                if s not in parent and s in p.layouts and axis in p.layouts[s].split_axes:
                    parent[s] = val
                    nxt.append(s)
        frontier = nxt
    return None


def step_line(prov, lines: SourceLines) -> str:
    where = prov.detail
    code = lines.code(where.split(" at ", 1)[1]) if " at " in where else ""
    return f"{where}" + (f"   | {code}" if code else "")


def _chain_lines(ctx, chain_, lines: SourceLines, indent: str) -> list[str]:
    """The annotation at the end of a chain, then each step back to its first value."""
    p = ctx.program
    end = p.provenance[chain_[-1]]
    out = [f"{indent}{end.kind}: {end.detail}  => {ctx.name_of(chain_[-1])} {ctx.sbp(p.layouts[chain_[-1]])}"]
    for val in reversed(chain_[:-1]):
        pr = p.provenance[val]
        out.append(f"{indent}-> {pr.direction} through {step_line(pr, lines)}  => "
                   f"{ctx.name_of(val)} {ctx.sbp(p.layouts[val])}")
    return out


def operand_chain(ctx, e, axis, lines: SourceLines) -> list[str]:
    """Why an operand of ``e`` is split over ``axis``: the shortest chain among them."""
    p = ctx.program
    best = None
    for i, w in enumerate(e.invars):
        if w.is_const:
            continue
        lay = p.operand_layouts.get((e.index, i)) or p.final_layout(w)
        if axis not in lay.split_axes and axis not in lay.partial_axes:
            continue
        found = chain(p, w, axis) if axis in p.layouts.get(w, lay).split_axes else None
        if found and (best is None or len(found) < len(best[1])):
            best = (w, found)
    if best is None:
        return []
    w, found = best
    return [f"    because operand {ctx.name_of(w)} is split over {axis!r}:"] + _chain_lines(ctx, found, lines, "      ")


def explain(ctx, collectives, name: str, lines: SourceLines) -> str:
    """Where ``name``'s layout came from: per mesh axis it is split over, the chain from the
    annotation that decided it through each (op, source line) to the value; then how it is
    made partial or resharded, and which collectives move it."""
    p = ctx.program
    v = ctx.lookup(name)
    lay = p.final_layout(v)
    if name in p.out_paths:
        lay = p.out_layouts[p.out_paths.index(name)]
    made = p.final_layout(v)
    shown = ctx.sbp(lay) if made == lay else f"{ctx.sbp(made)} -> {ctx.sbp(lay)}"
    head = f"{name}: {shown}  ({compat.dtype_name(v.dtype)}{list(v.shape)}, " \
           f"{fmt_bytes(ctx.local_bytes(v, lay))} per device)"
    out = [head]
    e = ctx.producer_of(v)
    if e is not None:
        code = lines.code(e.source)
        out.append(f"  made by {e.prim.name} at {e.source}" + (f"   | {code}" if code else ""))
    prov = p.provenance.get(v)
    if prov is not None and prov.kind != "propagated":
        out.append(f"  decided by {prov.kind}: {prov.detail}")
    if v in p.idle_batch:
        out.append(f"  inside the program also split over idle axes: {p.idle_decision}")
    for axis in p.layouts[v].split_axes:
        found = chain(p, v, axis)
        if not found or len(found) == 1:
            continue
        out.append(f"  split over {axis!r} because:")
        out += _chain_lines(ctx, found, lines, "    ")
    if v in p.produced and p.produced[v].partial and e is not None:
        for axis, op in p.produced[v].partial:
            out.append(f"  partial over {axis!r} (P({op})): {e.prim.name} at {e.source} reduces over a dim "
                       f"split over {axis!r} (or passes a partial operand)")
            out += operand_chain(ctx, e, axis, lines)
    if v in p.post:
        out.append(f"  resharded where it is made: {ctx.sbp(p.produced[v])} -> {ctx.sbp(p.post[v])}")
    for c in collectives:
        if c.value == name:
            out.append(f"  collective: {c.kind} over {','.join(c.mesh_axes)} ({fmt_bytes(c.wire_bytes)} "
                       f"on the wire, ~{fmt_time(c.time_s)}): {c.reason}")
    if not v.shape:
        pass                             # scalars are never split
    elif lay.is_replicated() and (prov is None or prov.kind == "default"):
        out.append("  replicated: no annotation reaches it; annotate it or a neighbour to split it")
    elif lay.is_replicated() and prov is not None and prov.kind == "propagated":
        out.append(f"  replicated: propagation through {step_line(prov, lines)} found no split for it "
                   f"(its neighbours {', '.join(ctx.name_of(s) for s in prov.sources[:4]) or 'none'} "
                   f"are replicated or their split does not map onto it)")
    return "\n".join(out)


def provenance_dict(ctx) -> dict:
    """``{value name: {kind, detail, eqn, direction, sources}}`` of every placed value."""
    p = ctx.program
    out = {}
    for v in p.graph.values:
        if v.is_const or v not in p.provenance:
            continue
        pr = p.provenance[v]
        out[ctx.name_of(v)] = {"kind": pr.kind, "detail": pr.detail, "eqn": pr.eqn,
                               "direction": pr.direction,
                               "sources": [ctx.name_of(s) for s in pr.sources]}
    return out
