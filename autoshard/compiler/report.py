"""``ShardingReport``: what every value's layout is, why, and what each collective costs.

Built only from a ``ShardedProgram`` (the same plan the lowering executes), so the report's
collectives are exactly the ones in the program; a test checks them against the compiled HLO.

>>> rep = pf.report(params, opt_state, batch)                   # doctest: +SKIP
>>> rep.collectives[0].kind, rep.collectives[0].mesh_axes       # doctest: +SKIP
('all-reduce', ('model',))
>>> print(rep.explain("out[0]"))                                # doctest: +SKIP
>>> for w in rep.warnings: print(w.message, "->", w.fix)        # doctest: +SKIP
>>> rep.with_links({"data": LinkModel(25e-6, 12.5e9)}).total_time_s   # doctest: +SKIP
>>> rep.memory(compiled=True)["xla"]["temp_size_in_bytes"]      # doctest: +SKIP
>>> rep.to_html("report.html"); rep.to_json("report.json")      # doctest: +SKIP

What it holds (the JSON form is documented in ``docs/report.md`` and its schema is
``docs/report_schema.json``):

* ``equations``: one row per equation with its operand and result layouts, user source line,
  module (the flax class in the source string) and layer (the parameter path nearest to it in
  the dataflow graph, e.g. ``blocks.0.attn``); ``sources()`` groups them by source line.
* ``collectives``: every collective the plan runs, with reason, source, payload and wire
  bytes, and the alpha-beta time estimate under the per-mesh-axis link models
  (``MeshInfo.links``; defaults in ``cost_model.LinkModel``; ``with_links`` overrides them).
* ``memory()``: per-device bytes of parameters, optimizer state, batch and activations
  (estimated), with XLA's ``memory_analysis()`` beside them when ``compiled=True``.
* ``warnings``: problems with the change that removes each (thresholds in
  ``DEFAULT_THRESHOLDS``).
* ``explain(name)``: the provenance chain of one value's layout.
"""
from __future__ import annotations

import dataclasses
import io
import json
import linecache
import math
import os
import re
import shutil
import sys
from collections import deque
from dataclasses import asdict, dataclass

import jax
import numpy as np

from . import memory_estimate
from .cost_model import LinkModel
from .ir import trip_counts
from .layout import Layout

SCHEMA_VERSION = 1
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

#: Roles of the function's arguments, for the memory table.
ROLES = ("parameters", "optimizer state", "batch", "inputs")

#: Warning kinds. ``uneven-padding`` comes from the notes the passes leave in
#: ``ShardedProgram.notes`` (a dim split over axes that do not divide it is padded per device).
WARNING_KINDS = ("replicated-value", "implicit-all-gather", "conflicting-annotations", "uneven-padding")

# Ops through which a parameter is still "the parameter" (for implicit-all-gather warnings).
_PASS_THROUGH = {"convert_element_type", "transpose", "reshape", "copy", "copy_p", "squeeze",
                 "expand_dims", "broadcast_in_dim"}
_OPT_KEYS = re.compile(r"(^|[.\['])(mu|nu|count|momentum|trace|opt_state|ema|exp_avg|exp_avg_sq)(\b|')")
_BATCH_KEYS = re.compile(r"\['(tokens|labels|inputs|targets|images|image|label|x|y|batch|ids|input_ids|mask)'\]")
_SOURCE = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?: \((?P<fn>.*)\))?$")
_TOKEN = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(-?\d+)\]|\.([A-Za-z_]\w*)")


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class CollectiveRecord:
    """One collective the plan runs (per device)."""
    kind: str
    mesh_axes: tuple
    shape: tuple            # per-device operand shape
    dtype: str
    payload_bytes: int
    wire_bytes: float
    time_s: float           # alpha-beta estimate under the mesh axes' link models
    reason: str
    source: str
    value: str
    consumer: str = ""      # the equation (or output) that needed the new layout
    layer: str = ""         # parameter path nearest to the value (e.g. "blocks.0.attn")
    module: str = ""        # flax module class (or function) of ``source``
    group_size: int = 0
    trips: int = 1          # times it runs per step (trip counts of the loops around it)


@dataclass(frozen=True)
class EquationRow:
    index: int
    op: str
    source: str
    operands: tuple
    results: tuple
    result_names: tuple
    module: str = ""
    layer: str = ""


@dataclass(frozen=True)
class ReportWarning:
    """A problem in the plan, with the change that removes it."""
    kind: str               # one of WARNING_KINDS
    message: str
    fix: str
    value: str
    bytes: int              # per-device bytes concerned
    source: str = ""


# ----------------------------------------------------------------------------- helpers

def parse_source(source: str) -> dict:
    """``"gpt.py:117 (CausalSelfAttention.__call__)"`` -> file, line, function, module."""
    m = _SOURCE.match(source or "")
    if not m:
        return {"file": source or "<unknown>", "line": 0, "function": "", "module": ""}
    fn = m["fn"] or ""
    head = fn.split(".<locals>.")[0]
    first = head.split(".")[0]
    module = first if first[:1].isupper() else fn.split(".<locals>.")[-1]
    return {"file": m["file"], "line": int(m["line"]), "function": fn, "module": module}


def _tokens(path: str) -> list[tuple[str, str]]:
    """Keys of a pytree path after its root (``args[1]`` / ``out[0]`` / ``out``)."""
    rest = re.sub(r"^(args|out)(\[\d+\])?", "", path)
    out = []
    for m in _TOKEN.finditer(rest):
        if m.group(1) is not None:
            out.append(("key", m.group(1)))
        elif m.group(2) is not None:
            out.append(("index", m.group(2)))
        else:
            out.append(("attr", m.group(3)))
    return out


def module_path(path: str) -> str | None:
    """``args[1][0].mu['blocks']['0']['attn']['q']['kernel']`` -> ``blocks.0.attn.q``: the
    string-keyed part of a leaf path (optimizer containers before it dropped), less the leaf."""
    toks = _tokens(path)
    first = next((i for i, (k, _) in enumerate(toks) if k == "key"), None)
    if first is None:
        return None
    keys = [t for _, t in toks[first:]]
    return ".".join(keys[:-1] if len(keys) > 1 else keys)


def layer_of(mpath: str | None) -> str:
    """``blocks.0.attn.q`` -> ``blocks.0.attn``; ``lm_head`` -> ``lm_head``."""
    if not mpath:
        return ""
    parts = mpath.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 2])
    return parts[0]


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_time(t: float) -> str:
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def _spec_text(lay: Layout) -> str:
    entries = [None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in lay.dims]
    while entries and entries[-1] is None:
        entries.pop()
    return "P(" + ", ".join(repr(e) for e in entries) + ")"


def _as_link(axis, value) -> LinkModel:
    if isinstance(value, LinkModel):
        return value
    if isinstance(value, dict):
        return LinkModel(**value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return LinkModel(float(value[0]), float(value[1]))
    raise TypeError(f"link model for mesh axis {axis!r} must be a LinkModel, a (latency_s, "
                    f"bandwidth_bytes_per_s) pair or a dict of those fields, got {value!r}")


# ----------------------------------------------------------------------------- the report

def memory_rows(mem: dict, with_total: bool = False) -> list[tuple]:
    """(what, estimate, XLA's figure or None) rows of a ``memory()`` dict, for tables."""
    xla = mem.get("xla") or {}
    rows = [("parameters", mem["parameters"], None), ("optimizer state", mem["optimizer_state"], None),
            ("batch", mem["batch"], None), ("other inputs", mem["other_inputs"], None),
            ("arguments", mem["arguments"], xla.get("argument_size_in_bytes")),
            ("outputs", mem["outputs"], xla.get("output_size_in_bytes")),
            ("activations (peak live, estimated)", mem["activations_peak"], xla.get("temp_size_in_bytes")),
            ("largest intermediate", mem["largest_intermediate"], None),
            ("gradients (estimated)", mem["gradients"], None),
            ("activations kept for backward (estimated)", mem["activations_for_backward"], None),
            ("largest temporary (estimated)", mem["largest_temporary"], None),
            ("temporaries peak (estimated, fused)", mem["temporaries_peak"], xla.get("temp_size_in_bytes")),
            ("step total (estimated)", mem["step_total"], xla.get("total_in_bytes"))]
    if with_total:
        rows.append(("intermediates total", mem["intermediates_total"], None))
    return rows


class ShardingReport:
    """The sharding plan of one traced function, for people (``print``, ``to_html``) and
    programs (``to_dict``/``to_json``, schema in ``docs/report_schema.json``).

    ``links``: ``{mesh_axis: LinkModel}`` overriding the program's link models for the time
    estimates (the plan itself is not re-made). ``roles``: ``{arg_index: role}`` with roles
    from ``ROLES``, for the memory table (default: guessed from the argument paths).
    ``thresholds``: overrides of ``DEFAULT_THRESHOLDS``.
    """

    def __init__(self, program, parallel_function=None, *, links=None, roles=None, thresholds=None):
        self._source_program = program
        if links:
            program = dataclasses.replace(program, mesh=self._mesh_with_links(program.mesh, links))
        self.program = program
        self._pf = parallel_function
        self._compiled_box: list = [None]       # shared with reports made by with_options
        self._roles_given = dict(roles or {})
        unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
        if unknown:
            raise ValueError(f"unknown warning thresholds {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}")
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        mesh = program.mesh
        self.mesh_axes = mesh.axis_names
        self.mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
        self._names = self._value_names()
        self._by_name = {}
        for v, n in self._names.items():
            self._by_name.setdefault(n, v)
        for v, path in zip(program.graph.outvars, program.out_paths):
            self._by_name.setdefault(path, v)      # outputs that are inputs answer to both names
        graph = program.graph
        # Every equation, bodies of control flow right after the equation that holds them.
        self._eqns = list(graph.all_eqns())
        self._eqn_by_index = {e.index: e for e in self._eqns}
        self._producer = {o: e for e in self._eqns for o in e.outvars}
        self._trips = self._trip_counts()
        self._roles = self._arg_roles()
        self._labels = self._layer_labels()
        self.collectives = self._collectives()
        self.equations = self._equations()
        self._warnings = None

    # -- options -------------------------------------------------------------------------
    @staticmethod
    def _mesh_with_links(mesh, links):
        unknown = set(links) - set(mesh.axis_names)
        if unknown:
            raise ValueError(f"link models given for {sorted(unknown)}, which are not mesh axes; "
                             f"the mesh axes are {mesh.axis_names}")
        current = [mesh.link(a) for a in mesh.axis_names]
        new = tuple(_as_link(a, links[a]) if a in links else cur for a, cur in zip(mesh.axis_names, current))
        changed = [a for a, cur, nw in zip(mesh.axis_names, current, new) if cur != nw]
        source = mesh.cost_source + (f"; links of {', '.join(changed)} given to the report" if changed else "")
        return dataclasses.replace(mesh, links=new, cost_source=source)

    def with_options(self, *, links=None, roles=None, thresholds=None) -> "ShardingReport":
        """A copy with other link models, argument roles or warning thresholds (the plan is the
        same; times, memory roles and warnings are recomputed)."""
        links = {**{a: self.program.mesh.link(a) for a in self.mesh_axes}, **(links or {})}
        rep = ShardingReport(self._source_program, self._pf, links=links,
                             roles={**self._roles_given, **(roles or {})},
                             thresholds={**self.thresholds, **(thresholds or {})})
        rep._compiled_box = self._compiled_box
        return rep

    def with_links(self, links: dict) -> "ShardingReport":
        """``report.with_links({"data": LinkModel(latency_s=25e-6, bandwidth_bytes_per_s=12.5e9)})``:
        the same report with the time estimates of collectives over ``data`` recomputed."""
        return self.with_options(links=links)

    @property
    def links(self) -> dict[str, LinkModel]:
        return {a: self.program.mesh.link(a) for a in self.mesh_axes}

    @property
    def cost_model_source(self) -> str:
        """What priced the times and the auto search: an entry of ``compiler/hardware.py``'s
        table, an ``ash.calibrate`` measurement, or a fallback (``parallelize(costs=...)``)."""
        return self.program.mesh.cost_source

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

    def _local_bytes(self, v, lay) -> int:
        sizes = self.program.axis_sizes
        shape = [math.ceil(s / math.prod(sizes[a] for a in axes)) for s, axes in zip(v.shape, lay.dims)]
        return int(math.prod(shape)) * np.dtype(v.dtype).itemsize

    def names_at(self, source_substring: str, op: str | None = None) -> list[str]:
        """Names of the results of equations whose source contains ``source_substring``
        (e.g. ``"gpt.py:107"``), optionally only of primitive ``op``."""
        return [self.name_of(o) for e in self._eqns
                if source_substring in e.source and (op is None or e.prim.name == op) for o in e.outvars]

    # -- roles and layers ----------------------------------------------------------------
    def _arg_roles(self) -> dict[int, str]:
        p = self.program
        leaves: dict[int, list] = {}
        for v, path in zip(p.graph.invars, p.in_paths):
            m = re.match(r"^args\[(\d+)\]", path)
            if m:
                leaves.setdefault(int(m.group(1)), []).append((v, path))
        roles = {}
        for i, items in leaves.items():
            if i in self._roles_given:
                role = self._roles_given[i]
                if role not in ROLES:
                    raise ValueError(f"role {role!r} for argument {i} is not one of {ROLES}")
            elif any(_OPT_KEYS.search(path[len(f"args[{i}]"):]) for _, path in items):
                role = "optimizer state"
            elif all(jax.dtypes.issubdtype(v.dtype, np.integer) or np.dtype(v.dtype) == np.bool_ for v, _ in items) \
                    or any(_BATCH_KEYS.search(path) for _, path in items):
                role = "batch"
            elif any(module_path(path) for _, path in items):
                role = "parameters"
            else:
                role = "inputs"
            roles[i] = role
        return roles

    def role_of(self, path: str) -> str:
        m = re.match(r"^args\[(\d+)\]", path)
        return self._roles.get(int(m.group(1)), "inputs") if m else "inputs"

    def _layer_labels(self) -> dict:
        """Each value's nearest parameter (in equation hops, either direction), as a module
        path: the per-layer grouping of the summary. Parameters and optimizer state seed it
        from the inputs, updated parameters from the outputs; only leaves of string-keyed
        pytrees (``params['blocks']['0']['attn']['q']['kernel']``) have a module path, so a
        function of plain arrays has no layers.""" 
        p = self.program
        label, queue = {}, deque()
        for v, path in zip(p.graph.invars, p.in_paths):
            if self.role_of(path) == "batch" or not jax.dtypes.issubdtype(v.dtype, np.floating):
                continue
            mp = module_path(path)
            if mp and v not in label:
                label[v] = mp
                queue.append(v)
        for v, path in zip(p.graph.outvars, p.out_paths):
            mp = module_path(path)
            if mp and v not in label:
                label[v] = mp
                queue.append(v)
        users: dict = {}
        for e in self._eqns:
            for v in e.invars:
                if not v.is_const:
                    users.setdefault(v, []).append(e)
        while queue:
            v = queue.popleft()
            eqns = list(users.get(v, ()))
            if v in self._producer:
                eqns.append(self._producer[v])
            for e in eqns:
                for w in (*e.invars, *e.outvars):
                    if not w.is_const and w not in label:
                        label[w] = label[v]
                        queue.append(w)
        return label

    def layer_of_value(self, v) -> str:
        return self._labels.get(v, "")

    # -- contents ------------------------------------------------------------------------
    def _consumer_index(self, r):
        """Index of the equation that consumes reshard ``r`` (None for outputs and post)."""
        if not hasattr(self, "_consumers"):
            p, found = self.program, {}
            for e in self._eqns:
                where = f"{e.prim.name} at {e.source}"
                for i, v in enumerate(e.invars):
                    found.setdefault((id(v), p.operand_layouts.get((e.index, i)), where), e.index)
            self._consumers = found
        return self._consumers.get((id(r.value), r.dst, r.consumer))

    def _trip_counts(self) -> dict:
        """``ir.trip_counts`` of the program; a ``while`` loop's count is not known from the
        program (taken as 1), and ``unknown_trip_counts`` says how many there are."""
        self.unknown_trip_counts = sum(e.prim.name == "while" for e in self._eqns)
        return trip_counts(self.program.graph)

    def trips_of(self, v) -> int:
        """Times per step the value ``v`` is made (1 outside loops)."""
        return self._trips.get(v, 1)

    def _collectives(self) -> list[CollectiveRecord]:
        from .cost_model import wire_bytes
        p = self.program
        sizes = p.axis_sizes
        order = {a: i for i, a in enumerate(self.mesh_axes)}
        out = []
        for r in p.reshards:
            itemsize = np.dtype(r.value.dtype).itemsize
            layer = layer_of(self.layer_of_value(r.value)) or self.layer_of_value(r.value)
            for t in r.transforms:
                if not t.is_collective:
                    continue
                n = t.group_size(sizes)
                payload = math.prod(t.in_shape) * itemsize
                links = [p.mesh.link(a) for a in t.axes]
                link = LinkModel(max(l.latency_s for l in links), min(l.bandwidth_bytes_per_s for l in links))
                out.append(CollectiveRecord(
                    t.kind, tuple(sorted(t.axes, key=order.get)), tuple(t.in_shape),
                    np.dtype(r.value.dtype).name, payload, wire_bytes(t.kind, n, payload),
                    link.time(t.kind, n, payload), r.reason, r.source, self.name_of(r.value),
                    r.consumer, layer, parse_source(r.source)["module"], n, self.trips_of(r.value)))
        return out

    def _equations(self) -> list[EquationRow]:
        p = self.program
        rows = []
        for eqn in self._eqns:
            ops = tuple("const" if v.is_const and not v.shape else
                        self._sbp(p.operand_layouts.get((eqn.index, i)) or p.final_layout(v))
                        for i, v in enumerate(eqn.invars))
            res = tuple(self._sbp(p.produced.get(o) or p.final_layout(o)) for o in eqn.outvars)
            lab = next((self._labels[o] for o in eqn.outvars if o in self._labels), "")
            rows.append(EquationRow(eqn.index, eqn.prim.name, eqn.source, ops, res,
                                    tuple(self.name_of(o) for o in eqn.outvars),
                                    parse_source(eqn.source)["module"], layer_of(lab) or lab))
        return rows

    @property
    def total_wire_bytes(self) -> float:
        return float(sum(c.wire_bytes for c in self.collectives))

    @property
    def total_time_s(self) -> float:
        """Sum of the collectives' time estimates (no overlap assumed)."""
        return float(sum(c.time_s for c in self.collectives))

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

    @property
    def step_wire_bytes(self) -> float:
        """Wire bytes per device per step: each collective times the trips of the loops
        around it (``total_wire_bytes`` counts each collective of a loop body once, as the
        program text and ``hlo_collectives`` do)."""
        return float(sum(c.wire_bytes * c.trips for c in self.collectives))

    @property
    def step_time_s(self) -> float:
        """Estimated communication time per step (no overlap assumed), loop trips included."""
        return float(sum(c.time_s * c.trips for c in self.collectives))

    def communication(self) -> dict:
        """Per step, per mesh axes a collective runs over (``"data"``, or ``"data,fsdp"`` for
        one over both): ``{"collectives", "runs", "wire_bytes", "time_s"}`` with loop trips
        counted, under the link models of those axes (``with_links`` changes them)."""
        out: dict = {}
        for c in self.collectives:
            row = out.setdefault(",".join(c.mesh_axes), {"collectives": 0, "runs": 0, "wire_bytes": 0.0,
                                                          "time_s": 0.0})
            row["collectives"] += 1
            row["runs"] += c.trips
            row["wire_bytes"] += c.wire_bytes * c.trips
            row["time_s"] += c.time_s * c.trips
        return out

    def wire_bytes_by(self, key: str) -> dict:
        """Total wire bytes grouped by a ``CollectiveRecord`` field: ``kind``, ``mesh_axes``,
        ``layer``, ``module``, ``source`` or ``value``."""
        out: dict = {}
        for c in self.collectives:
            k = getattr(c, key)
            out[k] = out.get(k, 0.0) + c.wire_bytes
        return out

    def sources(self) -> list[dict]:
        """Equations grouped by user source line (ordered by file and line), with the
        collectives each line causes."""
        groups: dict = {}
        for r in self.equations:
            g = groups.setdefault(r.source, {"source": r.source, **parse_source(r.source),
                                             "layers": [], "equations": [], "collectives": 0,
                                             "wire_bytes": 0.0})
            g["equations"].append(r.index)
            if r.layer and r.layer not in g["layers"]:
                g["layers"].append(r.layer)
        for c in self.collectives:
            g = groups.get(c.source)
            if g is None:
                g = groups.setdefault(c.source, {"source": c.source, **parse_source(c.source), "layers": [],
                                                 "equations": [], "collectives": 0, "wire_bytes": 0.0})
            g["collectives"] += 1
            g["wire_bytes"] += c.wire_bytes
        return sorted(groups.values(), key=lambda g: (g["file"], g["line"], g["source"]))

    # -- memory --------------------------------------------------------------------------
    def memory(self, compiled=False) -> dict:
        """Per-device bytes (estimates from the plan): arguments by role, outputs, and
        activations as the peak of live intermediates in program order (no fusion, so an
        upper estimate of XLA's temporaries). ``compiled=True`` (or a ``jax.stages.Compiled``)
        adds XLA's ``memory_analysis()`` under ``"xla"`` (compiles once; cached)."""
        p = self.program
        by_role = dict.fromkeys(ROLES, 0)
        arrive = getattr(p, "in_boundary", {})      # uneven inputs arrive in their even part
        for v, path in zip(p.graph.invars, p.in_paths):
            by_role[self.role_of(path)] += self._local_bytes(v, arrive.get(v, p.layouts[v]))
        outs = sum(self._local_bytes(v, lay) for v, lay in zip(p.graph.outvars, p.out_layouts))
        inter = [self._local_bytes(o, p.final_layout(o)) for e in self._eqns for o in e.outvars]
        out = {
            "arguments": sum(by_role.values()),
            "parameters": by_role["parameters"],
            "optimizer_state": by_role["optimizer state"],
            "batch": by_role["batch"],
            "other_inputs": by_role["inputs"],
            "outputs": outs,
            "activations_peak": self._activation_peak(),
            "largest_intermediate": max(inter, default=0),
            "intermediates_total": sum(inter),
        }
        out.update(self._step_memory(out))
        if compiled is not False and compiled is not None:
            if compiled is not True:
                self._compiled_box[0] = compiled
            out["xla"] = self._xla_memory()
        elif self._compiled_box[0] is not None:
            out["xla"] = self._xla_memory()
        return out

    # The estimate itself lives in memory_estimate.py (XLA CPU's fusion, schedule and buffer
    # assignment, modelled from the plan).
    def _materialized(self):
        return memory_estimate.materialized(self)

    def _temporaries_peak(self) -> int:
        return memory_estimate.temporaries(self)["peak"]

    def _step_memory(self, base: dict) -> dict:
        return memory_estimate.step_memory(self, base)

    def _activation_peak(self) -> int:
        return memory_estimate.activation_peak(self)

    def compiled(self):
        """XLA's executable for this plan (``pf.lower(*args).compile()``), compiled once."""
        if self._compiled_box[0] is None:
            pf = self._pf
            if pf is None:
                raise ValueError("this report was built from a program alone; build it with "
                                 "pf.report(...) to compile it, or pass memory(compiled=pf.lower(...).compile())")
            entry = next((e for e in getattr(pf, "_cache", {}).values()
                          if getattr(e, "program", None) is self._source_program), None)
            if entry is None or entry.jitted is None:
                from ..errors import PlanningOnlyError
                raise PlanningOnlyError("XLA's memory analysis needs a concrete mesh: parallelize on "
                                        "autoshard.make_mesh(...) rather than abstract_mesh(...)")
            import jax
            avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                     for a, s in zip(entry.avals, entry.in_shardings)]
            self._compiled_box[0] = entry.jitted.lower(*avals).compile()
        return self._compiled_box[0]

    def _xla_memory(self) -> dict:
        stats = self.compiled().memory_analysis()
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes")
        out = {f: int(getattr(stats, f, 0) or 0) for f in fields}
        out["total_in_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                 + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
        return out

    def hlo_collectives(self):
        """Collectives parsed from the compiled HLO (``runtime.hlo.parse_collectives``)."""
        from ..runtime.hlo import parse_collectives
        return parse_collectives(self.compiled().as_text(), self._pf.mesh)

    # -- warnings ------------------------------------------------------------------------
    @property
    def warnings(self) -> list[ReportWarning]:
        if self._warnings is None:
            self._warnings = self._find_warnings()
        return self._warnings

    def _suggest_split(self, v, lay: Layout):
        """A spec splitting ``v`` over one more mesh axis: the largest free axis on the
        largest dim it divides (ties: the later dim / axis), or None."""
        sizes = self.program.axis_sizes
        used = set(lay.split_axes)
        best = None
        for a in self.mesh_axes:
            if a in used or sizes[a] < 2:
                continue
            for d, s in enumerate(v.shape):
                cur = math.prod(sizes[x] for x in lay.dims[d])
                if s % (cur * sizes[a]) == 0:
                    key = (sizes[a], s // cur, d, self.mesh_axes.index(a))
                    if best is None or key >= best[0]:
                        best = (key, d, a)
        if best is None:
            return None
        _, d, a = best
        dims = list(lay.dims)
        dims[d] = tuple(dims[d]) + (a,)
        return Layout(tuple(dims))

    def _find_warnings(self) -> list[ReportWarning]:
        p, th = self.program, self.thresholds
        n_devices = math.prod(self.mesh_shape.values())
        out: list[ReportWarning] = []
        if n_devices < 2:
            return out
        arg_bytes = self.memory()["arguments"]
        limit = min(th["replicated_bytes"], max(th["replicated_min_bytes"], th["replicated_fraction"] * arg_bytes))

        # 1. Large values left fully replicated: inputs, and values no annotation reaches.
        candidates = [(v, path, True) for v, path in zip(p.graph.invars, p.in_paths)]
        candidates += [(o, self.name_of(o), False) for e in self._eqns for o in e.outvars
                       if getattr(p.provenance.get(o), "kind", "") == "default"]
        for v, name, is_input in candidates:
            lay = p.layouts[v] if is_input else p.final_layout(v)
            b = self._local_bytes(v, lay)
            if not lay.is_replicated() or b < limit:
                continue
            prov = p.provenance.get(v)
            why = (f"annotated {prov.detail}" if prov is not None and prov.kind in ("annotation", "constraint")
                   else "no annotation reaches it")
            sugg = self._suggest_split(v, lay)
            dtype = np.dtype(v.dtype).name
            msg = (f"{name} ({dtype}{list(v.shape)}, {_fmt_bytes(b)}) is replicated on all {n_devices} "
                   f"devices ({why})")
            if sugg is None:
                fix = "no dim divides by a mesh axis: resize it or shard the mesh differently"
            else:
                where = (f"in_specs {name} = {_spec_text(sugg)}" if is_input else
                         f"ash.constrain({name}, {_spec_text(sugg)}) at {self._made_at(v)}")
                fix = (f"split it: {where} ({_fmt_bytes(self._local_bytes(v, sugg))} per device instead of "
                       f"{_fmt_bytes(b)}; "
                       f"propagation then splits what it feeds)")
            src = self._made_at(v) if not is_input else ""
            out.append(ReportWarning("replicated-value", msg, fix, name, b, src))

        # 2. All-gathers of parameters / optimizer state, and 3. reshards between annotations.
        for r in p.reshards:
            coll = [t for t in r.transforms if t.is_collective]
            if not coll:
                continue
            wire = sum(c.wire_bytes for c in self.collectives
                       if c.value == self.name_of(r.value) and c.consumer == r.consumer and c.source == r.source)
            base = self._parameter_of(r.value)
            if base is not None and any(t.kind == "all-gather" for t in coll):
                gathered = self._local_bytes(r.value, r.dst)
                if gathered >= th["gather_bytes"]:
                    bv, bpath = base
                    axes = ",".join(a for t in coll if t.kind == "all-gather" for a in t.axes)
                    msg = (f"parameter {bpath} is all-gathered over {axes} for {r.consumer} "
                           f"({_fmt_bytes(gathered)} per device after the gather, {_fmt_bytes(wire)} on the wire "
                           f"per step): its annotation splits it but this op needs it as {self._sbp(r.dst)}")
                    want = r.dst if bv is r.value else None
                    fix = (f"if this is not FSDP by design, annotate in_specs {bpath} = {_spec_text(want)} "
                           f"(the layout {r.consumer} uses, so nothing moves)" if want is not None else
                           f"if this is not FSDP by design, annotate {bpath} with the layout {r.consumer} needs "
                           f"({self._sbp(r.dst)} on {self.name_of(r.value)}), so nothing moves")
                    fix += (f", or change the annotations of the op's other operands so that it can use "
                            f"{bpath} as {self._sbp(r.src)} and run on the shards")
                    out.append(ReportWarning("implicit-all-gather", msg, fix, bpath, gathered, r.source))
                    continue                 # one warning per reshard: this one is the more specific
            conflict = self._conflict(r)
            if conflict is not None:
                src_ann, dst_ann, on_value = conflict
                name = self.name_of(r.value)
                kinds = "+".join(t.kind for t in coll)
                msg = (f"{name} is resharded {self._sbp(r.src)} -> {self._sbp(r.dst)} ({kinds}, "
                       f"{_fmt_bytes(wire)} on the wire) because two annotations disagree: {src_ann} "
                       f"vs {dst_ann}")
                if on_value:
                    fix = (f"make them agree: change {dst_ann} to {_spec_text(r.src)}, or change {src_ann} so "
                           f"that {name} is made as {_spec_text(r.dst)}")
                else:
                    fix = (f"make them agree: change {src_ann} so that {name} arrives at {r.consumer} as "
                           f"{_spec_text(r.dst)}, or change {dst_ann} so that {r.consumer} can use {name} as "
                           f"{_spec_text(r.src)}")
                out.append(ReportWarning("conflicting-annotations", msg, fix, name,
                                         self._local_bytes(r.value, r.src), r.source))
        # 4. Notes the passes left for the report: ``("padding", message, fix)`` for a dim split
        #    unevenly (padded per device) becomes an "uneven-padding" warning.
        for note in getattr(p, "notes", ()):
            kind, message, fix = (tuple(note) + ("", "", ""))[:3]
            kind = {"padding": "uneven-padding"}.get(kind, kind)
            name = message.split(":", 1)[0] if ":" in message else ""
            v = self._by_name.get(name)
            b = self._local_bytes(v, p.final_layout(v)) if v is not None else 0
            src = self._made_at(v) if v is not None and v in self._producer else ""
            out.append(ReportWarning(kind, message, fix, name, b, src))
        return out

    def _made_at(self, v) -> str:
        e = self._producer.get(v)
        return e.source if e is not None else "<input>"

    def _parameter_of(self, v):
        """(input value, path) if ``v`` is a parameter/optimizer-state input, or made from one
        by layout-preserving unary ops only."""
        p = self.program
        inputs = dict(zip(p.graph.invars, p.in_paths))
        for _ in range(8):
            if v in inputs:
                path = inputs[v]
                return (v, path) if self.role_of(path) in ("parameters", "optimizer state", "inputs") \
                    and jax.dtypes.issubdtype(v.dtype, np.floating) else None
            e = self._producer.get(v)
            live = [x for x in e.invars if not x.is_const] if e is not None else []
            if e is None or e.prim.name not in _PASS_THROUGH or len(live) != 1:
                return None
            v = live[0]
        return None

    def _annotation_of(self, v, axes) -> str | None:
        """The annotation that decided ``v``'s split over one of ``axes`` (or its own)."""
        p = self.program
        prov = p.provenance.get(v)
        if prov is not None and prov.kind in ("annotation", "constraint"):
            return prov.detail
        for a in axes:
            chain = self._chain(v, a)
            if chain:
                return p.provenance[chain[-1]].detail
        return None

    def _conflict(self, r):
        """``(source annotation, destination annotation, destination is on r.value)`` when
        reshard ``r`` moves split axes only because two user annotations disagree, else None."""
        p = self.program
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
            i = self._consumer_index(r)
            if i is not None:
                e = self._eqn_by_index[i]
                for w in (*e.invars, *e.outvars):
                    if w is not v and w in p.closed and set(p.layouts[w].split_axes) & moved:
                        dst_ann, on_value = p.provenance[w].detail, False
                        break
        if dst_ann is None:
            return None
        if v in p.post and p.post[v] == r.dst and v in p.closed:
            e = self._producer.get(v)
            src_ann = None
            for w in (e.invars if e is not None else ()):
                if not w.is_const and set(p.layouts[w].split_axes) & moved:
                    src_ann = self._annotation_of(w, moved)
                    if src_ann:
                        break
        else:
            src_ann = self._annotation_of(v, moved & set(r.src.split_axes) or moved)
        if src_ann is None or src_ann == dst_ann:
            return None
        return src_ann, dst_ann, on_value

    # -- provenance ----------------------------------------------------------------------
    def _lookup(self, name):
        v = self._by_name.get(name)
        if v is None:
            raise KeyError(f"no value named {name!r}; names are input paths (args[0]...), output paths "
                           f"(out...), or jaxpr names listed in report.layouts")
        return v

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

    def _operand_chain(self, e, axis) -> list[str]:
        """Why an operand of ``e`` is split over ``axis``: the shortest chain among them."""
        p = self.program
        best = None
        for i, w in enumerate(e.invars):
            if w.is_const:
                continue
            lay = p.operand_layouts.get((e.index, i)) or p.final_layout(w)
            if axis not in lay.split_axes and axis not in lay.partial_axes:
                continue
            chain = self._chain(w, axis) if axis in p.layouts.get(w, lay).split_axes else None
            if chain and (best is None or len(chain) < len(best[1])):
                best = (w, chain)
        if best is None:
            return []
        w, chain = best
        out = [f"    because operand {self.name_of(w)} is split over {axis!r}:"]
        end = p.provenance[chain[-1]]
        out.append(f"      {end.kind}: {end.detail}  => {self.name_of(chain[-1])} {self._sbp(p.layouts[chain[-1]])}")
        for val in reversed(chain[:-1]):
            pr = p.provenance[val]
            out.append(f"      -> {pr.direction} through {self._step_line(pr)}  => "
                       f"{self.name_of(val)} {self._sbp(p.layouts[val])}")
        return out

    def _code(self, source: str) -> str:
        """The text of a ``file.py:LINE (fn)`` source line, when the file can be found."""
        info = parse_source(source)
        if not info["line"]:
            return ""
        path = self._find_file(info["file"])
        return linecache.getline(path, info["line"]).strip() if path else ""

    def _find_file(self, base: str):
        if not hasattr(self, "_files"):
            files: dict = {}
            mods = list(sys.modules.values())
            fun = getattr(self._pf, "fun", None)
            extra = [getattr(getattr(fun, "__code__", None), "co_filename", None)]
            for f in [getattr(m, "__file__", None) for m in mods] + extra:
                if f and f.endswith(".py"):
                    files.setdefault(os.path.basename(f), set()).add(f)
            self._files = files
        found = self._files.get(base, ())
        return next(iter(found)) if len(found) == 1 else None

    def _step_line(self, prov) -> str:
        where = prov.detail
        code = self._code(where.split(" at ", 1)[1]) if " at " in where else ""
        return f"{where}" + (f"   | {code}" if code else "")

    def explain(self, name: str) -> str:
        """Where ``name``'s layout came from: per mesh axis it is split over, the chain from
        the annotation that decided it through each (op, source line) to the value; then how
        it is made partial or resharded, and which collectives move it."""
        p = self.program
        v = self._lookup(name)
        lay = p.final_layout(v)
        if name in p.out_paths:
            lay = p.out_layouts[p.out_paths.index(name)]
        made = p.final_layout(v)
        shown = self._sbp(lay) if made == lay else f"{self._sbp(made)} -> {self._sbp(lay)}"
        head = f"{name}: {shown}  ({np.dtype(v.dtype).name}{list(v.shape)}, " \
               f"{_fmt_bytes(self._local_bytes(v, lay))} per device)"
        lines = [head]
        e = self._producer.get(v)
        if e is not None:
            code = self._code(e.source)
            lines.append(f"  made by {e.prim.name} at {e.source}" + (f"   | {code}" if code else ""))
        prov = p.provenance.get(v)
        if prov is not None and prov.kind != "propagated":
            lines.append(f"  decided by {prov.kind}: {prov.detail}")
        for axis in p.layouts[v].split_axes:
            chain = self._chain(v, axis)
            if not chain or len(chain) == 1:
                continue
            lines.append(f"  split over {axis!r} because:")
            end = p.provenance[chain[-1]]
            lines.append(f"    {end.kind}: {end.detail}  => {self.name_of(chain[-1])} {self._sbp(p.layouts[chain[-1]])}")
            for val in reversed(chain[:-1]):
                pr = p.provenance[val]
                lines.append(f"    -> {pr.direction} through {self._step_line(pr)}  => "
                             f"{self.name_of(val)} {self._sbp(p.layouts[val])}")
        if v in p.produced and p.produced[v].partial and e is not None:
            for axis, op in p.produced[v].partial:
                lines.append(f"  partial over {axis!r} (P({op})): {e.prim.name} at {e.source} reduces over a dim "
                             f"split over {axis!r} (or passes a partial operand)")
                lines += self._operand_chain(e, axis)
        if v in p.post:
            lines.append(f"  resharded where it is made: {self._sbp(p.produced[v])} -> {self._sbp(p.post[v])}")
        for c in self.collectives:
            if c.value == name:
                lines.append(f"  collective: {c.kind} over {','.join(c.mesh_axes)} ({_fmt_bytes(c.wire_bytes)} "
                             f"on the wire, ~{_fmt_time(c.time_s)}): {c.reason}")
        if not v.shape:
            pass                             # scalars are never split
        elif lay.is_replicated() and (prov is None or prov.kind == "default"):
            lines.append("  replicated: no annotation reaches it; annotate it or a neighbour to split it")
        elif lay.is_replicated() and prov is not None and prov.kind == "propagated":
            lines.append(f"  replicated: propagation through {self._step_line(prov)} found no split for it "
                         f"(its neighbours {', '.join(self.name_of(s) for s in prov.sources[:4]) or 'none'} "
                         f"are replicated or their split does not map onto it)")
        return "\n".join(lines)

    # -- output --------------------------------------------------------------------------
    def _value_entry(self, v, name, layout) -> dict:
        return {"name": name, "shape": list(v.shape), "dtype": np.dtype(v.dtype).name,
                "layout": self._sbp(layout), "spec": _spec_text(layout),
                "dims": [list(a) for a in layout.dims],
                "partial": [[a, op] for a, op in layout.partial],
                "bytes_per_device": self._local_bytes(v, layout)}

    def _provenance_dict(self) -> dict:
        p = self.program
        out = {}
        for v in p.graph.values:
            if v.is_const or v not in p.provenance:
                continue
            pr = p.provenance[v]
            out[self.name_of(v)] = {"kind": pr.kind, "detail": pr.detail, "eqn": pr.eqn,
                                    "direction": pr.direction,
                                    "sources": [self.name_of(s) for s in pr.sources]}
        return out

    def to_dict(self) -> dict:
        """JSON-safe dict; schema ``docs/report_schema.json`` (``schema_version`` 1)."""
        p = self.program
        inputs = []
        for v, path in zip(p.graph.invars, p.in_paths):
            d = self._value_entry(v, path, p.layouts[v])
            d["role"] = self.role_of(path)
            inputs.append(d)
        outputs = [self._value_entry(v, path, lay) for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts)]
        by_axes = {",".join(k): v for k, v in self.wire_bytes_by("mesh_axes").items()}
        xla = None
        if self._compiled_box[0] is not None:
            xla = {"memory_analysis": self._xla_memory()}
            try:
                hlo = self.hlo_collectives()
                xla["hlo_collectives"] = len(hlo)
                xla["hlo_total_wire_bytes"] = float(sum(c.wire_bytes for c in hlo))
            except Exception:            # noqa: BLE001 - the memory analysis still stands
                pass
        return {
            "schema_version": SCHEMA_VERSION,
            "mesh": dict(self.mesh_shape),
            "links": {a: {"latency_s": l.latency_s, "bandwidth_bytes_per_s": l.bandwidth_bytes_per_s}
                      for a, l in self.links.items()},
            "thresholds": dict(self.thresholds),
            "summary": {
                "equations": len(self.equations),
                "collectives": len(self.collectives),
                "total_wire_bytes": self.total_wire_bytes,
                "total_time_s": self.total_time_s,
                "wire_bytes_by_kind": self.wire_bytes_by("kind"),
                "wire_bytes_by_axes": by_axes,
                "wire_bytes_by_layer": self.wire_bytes_by("layer"),
                "wire_bytes_by_module": self.wire_bytes_by("module"),
                "warnings": len(self.warnings),
                "step_wire_bytes": self.step_wire_bytes,
                "step_time_s": self.step_time_s,
                "communication": self.communication(),
            },
            "equations": [asdict(r) for r in self.equations],
            "sources": self.sources(),
            "collectives": [asdict(c) for c in self.collectives],
            "total_wire_bytes": self.total_wire_bytes,
            "wire_bytes_by_kind": self.wire_bytes_by("kind"),
            "wire_bytes_by_axes": by_axes,
            "inputs": inputs,
            "outputs": outputs,
            "layouts": self.layouts,
            "provenance": self._provenance_dict(),
            "memory_per_device": {k: v for k, v in self.memory().items() if k != "xla"},
            "warnings": [asdict(w) for w in self.warnings],
            "xla": xla,
            "pass_seconds": dict(p.pass_seconds),
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=list)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_html(self, path) -> str:
        """One self-contained HTML page (inline CSS/JS, no network): device grids, a sortable
        table of collectives, provenance chains, memory and warnings. Returns the page."""
        from .report_html import render
        page = render(self)
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        return page

    def summary(self) -> str:
        by_kind = self.wire_bytes_by("kind")
        kinds = ", ".join(f"{k} {sum(1 for c in self.collectives if c.kind == k)}x {b / 1024:.1f} KiB"
                          for k, b in sorted(by_kind.items())) or "none"
        mem = self.memory()
        text = (f"mesh {self.mesh_shape}: {len(self.equations)} equations, {len(self.collectives)} collectives "
                f"({kinds}); {self.total_wire_bytes / 1024:.1f} KiB on the wire per device "
                f"(~{_fmt_time(self.total_time_s)}); arguments {mem['arguments'] / 1024:.1f} KiB per device")
        if any(c.trips > 1 for c in self.collectives):
            text += (f"; per step with loop trips {_fmt_bytes(self.step_wire_bytes)} "
                     f"(~{_fmt_time(self.step_time_s)})")
        if self.warnings:
            text += f"; {len(self.warnings)} warning(s)"
        text += f"\ncost model: {self.cost_model_source}"
        search = getattr(self.program, "search", None)
        if search is not None:
            text += (f"\nauto plan: MILP over {search.nodes} nodes ({search.equations} equations, "
                     f"{search.edges} coupled edges, {search.variables} variables), axes in order "
                     f"{', '.join(search.axis_order)}, solved in {search.solve_seconds:.1f} s "
                     f"({search.status.split('(')[-1].rstrip(')')}); estimated step "
                     f"{self.estimated_step_seconds()['total_s'] * 1e3:.3f} ms")
            for layer, words in self.layer_strategies().items():
                text += f"\n  {layer}: {words}"
            from ..passes.auto_search import replication_note
            if note := replication_note(self.program):
                text += f"\n  {note}"
        return text

    def layer_strategies(self) -> dict[str, str]:
        """The strategy of each layer in words, read off its parameters' matmuls
        (``{"blocks.0.mlp": "Megatron tensor parallel over model (column up; row down); ..."}``)."""
        from ..passes.auto_search import describe_layers
        return describe_layers(self.program)

    def estimated_step_seconds(self, compute_rate: float | None = None) -> dict:
        """Per-device compute plus collective time under the link models: the cost the layout
        search minimises (``passes/auto_search.estimated_step_seconds``); compares any plans."""
        from ..passes.auto_search import DEFAULT_POINTS_PER_SECOND, estimated_step_seconds
        search_rate = getattr(self.program, "search_compute_rate", None)
        return estimated_step_seconds(self.program, compute_rate or search_rate or DEFAULT_POINTS_PER_SECOND)

    # -- terminal rendering (rich) -------------------------------------------------------
    def _renderables(self, max_warnings: int = 20):
        from rich.table import Table
        from rich.text import Text
        yield Text(f"autoshard sharding report — mesh {self.mesh_shape}", style="bold")
        yield Text("links: " + "; ".join(f"{a}: {l.latency_s * 1e6:g} us, {l.bandwidth_bytes_per_s / 1e9:g} GB/s"
                                         for a, l in self.links.items()), style="dim")
        eq = Table(title="equations (grouped by source line)", show_lines=False, title_style="bold")
        for col in ("#", "op", "source", "operands", "result", "name", "layer"):
            eq.add_column(col, overflow="fold")
        by_index = {r.index: r for r in self.equations}
        for g in self.sources():
            if not g["equations"]:
                continue
            eq.add_section()
            coll = f"; {g['collectives']} collective(s), {_fmt_bytes(g['wire_bytes'])}" if g["collectives"] else ""
            code = self._code(g["source"])
            short = f"{g['file']}:{g['line']}"
            eq.add_row("", Text(short, style="bold cyan"), Text(g["function"], style="cyan"),
                       Text((code[:60] + ("..." if len(code) > 60 else "")) + coll, style="cyan"), "", "", "")
            for i in g["equations"]:
                r = by_index[i]
                eq.add_row(str(r.index), r.op, short, " ".join(r.operands), " ".join(r.results),
                           " ".join(r.result_names), r.layer)
        yield eq
        co = Table(title="collectives", title_style="bold")
        for col, just in (("kind", "left"), ("axes", "left"), ("shape", "left"), ("dtype", "left"),
                          ("payload", "right"), ("wire bytes", "right"), ("est. time", "right"),
                          ("value", "left"), ("layer", "left"), ("source", "left"), ("reason", "left")):
            co.add_column(col, justify=just, overflow="fold")
        for c in self.collectives:
            co.add_row(Text(c.kind, style="magenta"), ",".join(c.mesh_axes), str(c.shape), c.dtype,
                       _fmt_bytes(c.payload_bytes), f"{c.wire_bytes:.0f}", _fmt_time(c.time_s), c.value,
                       c.layer, c.source, c.reason)
        yield co
        wb = Table(title="wire bytes per step (per device)", title_style="bold")
        for col in ("by", "key", "bytes", "share"):
            wb.add_column(col, justify="right" if col in ("bytes", "share") else "left")
        total = self.total_wire_bytes or 1.0
        for by, field in (("kind", "kind"), ("mesh axes", "mesh_axes"), ("layer", "layer")):
            for k, b in sorted(self.wire_bytes_by(field).items(), key=lambda kv: -kv[1]):
                key = ",".join(k) if isinstance(k, tuple) else (k or "-")
                wb.add_row(by, key, f"{b:.0f}", f"{100 * b / total:.0f}%")
        yield wb
        mem = self.memory()
        mt = Table(title="memory per device (bytes)", title_style="bold")
        mt.add_column("what")
        mt.add_column("estimate", justify="right")
        mt.add_column("XLA memory_analysis", justify="right")
        rows = memory_rows(mem, with_total=True)
        for what, est, x in rows:
            mt.add_row(what, f"{est}", "" if x is None else f"{x}")
        yield mt
        if self.warnings:
            yield Text(f"warnings ({len(self.warnings)})", style="bold yellow")
            for w in self.warnings[:max_warnings]:
                yield Text(f"  [{w.kind}] {w.message}", style="yellow")
                yield Text(f"      fix: {w.fix}", style="green")
            if len(self.warnings) > max_warnings:
                yield Text(f"  ... and {len(self.warnings) - max_warnings} more (report.warnings)", style="yellow")
        yield Text(self.summary())

    def __rich_console__(self, console, options):
        yield from self._renderables()

    def __str__(self) -> str:
        from rich.console import Console
        buf = io.StringIO()
        tty = sys.stdout.isatty()
        width = shutil.get_terminal_size((160, 40)).columns if tty else 160
        console = Console(file=buf, width=max(width, 100), force_terminal=tty,
                          color_system="auto" if tty else None, highlight=False)
        for r in self._renderables():
            console.print(r)
        return buf.getvalue()

    def __repr__(self) -> str:
        return f"<ShardingReport {self.summary()}>"
