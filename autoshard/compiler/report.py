"""``ShardingReport``: what every value's layout is, why, and what each collective costs.

Built only from a ``ShardedProgram`` (the same plan the lowering executes), so the report's
collectives are exactly the ones in the program; a test checks them against the compiled HLO.

>>> rep = pf.report(x, w)                       # doctest: +SKIP
>>> rep.collectives[0].kind, rep.collectives[0].mesh_axes        # doctest: +SKIP
('all-reduce', ('model',))
>>> print(rep.explain("out[0]"))                # doctest: +SKIP
"""
from __future__ import annotations

import html
import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from .cost_model import LinkModel

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CollectiveRecord:
    kind: str
    mesh_axes: tuple
    shape: tuple            # per-device operand shape
    dtype: str
    payload_bytes: int
    wire_bytes: float
    time_s: float           # alpha-beta estimate
    reason: str
    source: str
    value: str


@dataclass(frozen=True)
class EquationRow:
    index: int
    op: str
    source: str
    operands: tuple
    results: tuple
    result_names: tuple


class ShardingReport:
    def __init__(self, program, parallel_function=None):
        self.program = program
        self._pf = parallel_function
        mesh = program.mesh
        self.mesh_axes = mesh.axis_names
        self.mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
        self._names = self._value_names()
        self.collectives = self._collectives()
        self.equations = self._equations()

    # -- naming --------------------------------------------------------------------------
    def _value_names(self) -> dict:
        p = self.program
        names = {}
        for v in p.graph.values:
            names[v] = v.name or repr(v)
        for v, path in zip(p.graph.invars, p.in_paths):
            names[v] = path
        for v, path in zip(p.graph.outvars, p.out_paths):
            if v not in p.graph.invars:
                names[v] = path
        return names

    def name_of(self, v) -> str:
        return self._names.get(v, repr(v))

    def _sbp(self, lay) -> str:
        return lay.to_str(self.mesh_axes)

    # -- contents ------------------------------------------------------------------------
    def _collectives(self) -> list[CollectiveRecord]:
        p = self.program
        sizes = p.axis_sizes
        order = {a: i for i, a in enumerate(self.mesh_axes)}
        out = []
        for r in p.reshards:
            itemsize = np.dtype(r.value.dtype).itemsize
            for t in r.transforms:
                if not t.is_collective:
                    continue
                n = t.group_size(sizes)
                payload = math.prod(t.in_shape) * itemsize
                from .cost_model import wire_bytes
                link = min((p.mesh.link(a) for a in t.axes), key=lambda l: l.bandwidth_bytes_per_s)
                out.append(CollectiveRecord(
                    t.kind, tuple(sorted(t.axes, key=order.get)), tuple(t.in_shape),
                    np.dtype(r.value.dtype).name, payload, wire_bytes(t.kind, n, payload),
                    link.time(t.kind, n, payload), r.reason, r.source, self.name_of(r.value)))
        return out

    def _equations(self) -> list[EquationRow]:
        p = self.program
        rows = []
        for eqn in p.graph.eqns:
            ops = tuple("const" if v.is_const and not v.shape else self._sbp(p.operand_layouts[(eqn.index, i)])
                        for i, v in enumerate(eqn.invars))
            res = tuple(self._sbp(p.produced[o]) for o in eqn.outvars)
            rows.append(EquationRow(eqn.index, eqn.prim.name, eqn.source, ops, res,
                                    tuple(self.name_of(o) for o in eqn.outvars)))
        return rows

    @property
    def total_wire_bytes(self) -> float:
        return float(sum(c.wire_bytes for c in self.collectives))

    @property
    def layouts(self) -> dict[str, str]:
        p = self.program
        out = {}
        for v in p.graph.values:
            if v.is_const:
                continue
            out[self.name_of(v)] = self._sbp(p.final_layout(v))
        for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts):
            out[path] = self._sbp(lay)
        return out

    def wire_bytes_by(self, key: str) -> dict:
        """Total wire bytes grouped by ``kind`` or ``mesh_axes``."""
        out: dict = {}
        for c in self.collectives:
            k = getattr(c, key)
            out[k] = out.get(k, 0.0) + c.wire_bytes
        return out

    def memory(self) -> dict:
        """Per-device bytes: arguments, outputs, and the largest intermediate (estimates)."""
        p, sizes = self.program, self.program.axis_sizes

        def local_bytes(v, lay):
            return math.prod(lay.local_shape(v.shape, sizes)) * np.dtype(v.dtype).itemsize
        args = sum(local_bytes(v, p.layouts[v]) for v in p.graph.invars)
        outs = sum(local_bytes(v, lay) for v, lay in zip(p.graph.outvars, p.out_layouts))
        inter = [local_bytes(o, p.final_layout(o)) for e in p.graph.eqns for o in e.outvars]
        return {"arguments": args, "outputs": outs, "largest_intermediate": max(inter, default=0),
                "intermediates_total": sum(inter)}

    # -- provenance ----------------------------------------------------------------------
    def _lookup(self, name):
        for v, n in self._names.items():
            if n == name:
                return v
        raise KeyError(f"no value named {name!r}; names are input paths (args[0]...), output paths "
                       f"(out...), or jaxpr names listed in report.layouts")

    def _chain(self, v, axis):
        """Shortest provenance path from ``v`` to an annotation whose layout uses ``axis``."""
        p = self.program
        parent = {v: None}
        frontier = [v]
        while frontier:
            nxt = []
            for val in frontier:
                prov = p.provenance.get(val)
                if prov is None:
                    continue
                if prov.kind in ("annotation", "constraint"):
                    path = []
                    while val is not None:
                        path.append(val)
                        val = parent[val]
                    return path[::-1]
                for s in prov.sources:
                    if s not in parent and axis in p.layouts[s].split_axes:
                        parent[s] = val
                        nxt.append(s)
            frontier = nxt
        return None

    def explain(self, name: str) -> str:
        """Where ``name``'s layout came from: per mesh axis it is split over, the chain of
        (op, source line) back to the annotation that decided it."""
        p = self.program
        v = self._lookup(name)
        lay = p.final_layout(v)
        lines = [f"{name}: {self._sbp(lay)}  (shape {v.shape})"]
        prov = p.provenance.get(v)
        if prov is not None and prov.kind != "propagated":
            lines.append(f"  decided by {prov.kind}: {prov.detail}")
        for axis in p.layouts[v].split_axes:
            chain = self._chain(v, axis)
            if not chain or len(chain) == 1:
                continue
            lines.append(f"  split over {axis!r} because:")
            for val in chain[:-1]:
                pr = p.provenance[val]
                lines.append(f"    {self.name_of(val)} {self._sbp(p.layouts[val])} <- {pr.direction} "
                             f"through {pr.detail}")
            end = p.provenance[chain[-1]]
            lines.append(f"    {self.name_of(chain[-1])} {self._sbp(p.layouts[chain[-1]])} <- "
                         f"{end.kind}: {end.detail}")
        if v in p.produced and p.produced[v].partial:
            e = p.graph.eqns[next(e.index for e in p.graph.eqns if v in e.outvars)]
            lines.append(f"  partial over {', '.join(a for a, _ in p.produced[v].partial)}: "
                         f"{e.prim.name} at {e.source} reduces over a split factor (or passes a partial operand)")
        if v in p.post:
            lines.append(f"  resharded where it is made: {self._sbp(p.produced[v])} -> {self._sbp(p.post[v])}")
        if lay.is_replicated() and (prov is None or prov.kind == "default"):
            lines.append("  replicated: no annotation reaches it; annotate it or a neighbour to split it")
        return "\n".join(lines)

    # -- output --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        p = self.program
        return {
            "schema_version": SCHEMA_VERSION,
            "mesh": self.mesh_shape,
            "equations": [asdict(r) for r in self.equations],
            "collectives": [asdict(c) for c in self.collectives],
            "total_wire_bytes": self.total_wire_bytes,
            "wire_bytes_by_kind": self.wire_bytes_by("kind"),
            "wire_bytes_by_axes": {",".join(k): v for k, v in self.wire_bytes_by("mesh_axes").items()},
            "layouts": self.layouts,
            "memory_per_device": self.memory(),
            "pass_seconds": dict(p.pass_seconds),
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=list)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_html(self, path) -> str:
        d = self.to_dict()
        rows = "".join(
            f"<tr><td>{html.escape(c['kind'])}</td><td>{html.escape(','.join(c['mesh_axes']))}</td>"
            f"<td>{c['shape']}</td><td>{c['wire_bytes']:.0f}</td><td>{html.escape(c['source'])}</td>"
            f"<td>{html.escape(c['reason'])}</td></tr>" for c in d["collectives"])
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>autoshard report</title></head><body>"
                f"<h1>autoshard sharding report</h1><p>mesh {html.escape(str(d['mesh']))}, total wire bytes "
                f"{d['total_wire_bytes']:.0f}</p><table border=1><tr><th>kind</th><th>axes</th><th>shape</th>"
                f"<th>wire bytes</th><th>source</th><th>reason</th></tr>{rows}</table></body></html>")
        with open(path, "w") as f:
            f.write(page)
        return page

    def summary(self) -> str:
        by_kind = self.wire_bytes_by("kind")
        kinds = ", ".join(f"{k} {sum(1 for c in self.collectives if c.kind == k)}x {b / 1024:.1f} KiB"
                          for k, b in sorted(by_kind.items())) or "none"
        mem = self.memory()
        return (f"mesh {self.mesh_shape}: {len(self.equations)} equations, {len(self.collectives)} collectives "
                f"({kinds}); {self.total_wire_bytes / 1024:.1f} KiB on the wire per device; "
                f"arguments {mem['arguments'] / 1024:.1f} KiB per device")

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table
        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        eq = Table(title="equations", show_lines=False)
        for col in ("#", "op", "source", "operands", "result"):
            eq.add_column(col)
        for r in self.equations:
            eq.add_row(str(r.index), r.op, r.source, " ".join(r.operands), " ".join(r.results))
        console.print(eq)
        co = Table(title="collectives")
        for col in ("kind", "axes", "shape", "dtype", "wire bytes", "source", "reason"):
            co.add_column(col)
        for c in self.collectives:
            co.add_row(c.kind, ",".join(c.mesh_axes), str(c.shape), c.dtype, f"{c.wire_bytes:.0f}", c.source, c.reason)
        console.print(co)
        mem = Table(title="memory per device (bytes)")
        mem.add_column("what")
        mem.add_column("bytes")
        for k, b in self.memory().items():
            mem.add_row(k, f"{b}")
        console.print(mem)
        console.print(self.summary())
        return buf.getvalue()
