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
  (estimated, ``memory.py``), with XLA's ``memory_analysis()`` beside them when ``compiled=True``.
* ``warnings``: problems with the change that removes each (``warnings.py``; thresholds in
  ``DEFAULT_THRESHOLDS``).
* ``explain(name)``: the provenance chain of one value's layout (``explain.py``).

The report reads nothing of the runtime: whoever builds it hands it what it cannot compute
from the plan (``ParallelFunction.report`` passes ``compile``, a callable that returns XLA's
executable for the plan, the mesh and the traced function's file).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict


from .. import compat
from ..compiler.cost_model import DEFAULT_POINTS_PER_SECOND, LinkModel
from . import explain as _explain
from . import records, strategy, text
from .context import ReportContext
from .fmt import spec_text
from .memory import MemoryModel
from .warnings import DEFAULT_THRESHOLDS, find_warnings

SCHEMA_VERSION = 1


def _as_link(axis, value) -> LinkModel:
    if isinstance(value, LinkModel):
        return value
    if isinstance(value, dict):
        return LinkModel(**value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return LinkModel(float(value[0]), float(value[1]))
    raise TypeError(f"link model for mesh axis {axis!r} must be a LinkModel, a (latency_s, "
                    f"bandwidth_bytes_per_s) pair or a dict of those fields, got {value!r}")


class ShardingReport:
    """The sharding plan of one traced function, for people (``print``, ``to_html``) and
    programs (``to_dict``/``to_json``, schema in ``docs/report_schema.json``).

    ``links``: ``{mesh_axis: LinkModel}`` overriding the program's link models for the time
    estimates (the plan itself is not re-made). ``roles``: ``{arg_index: role}`` with roles
    from ``ROLES``, for the memory table (default: guessed from the argument paths).
    ``thresholds``: overrides of ``DEFAULT_THRESHOLDS``. ``compile``: a callable returning XLA's
    executable of the plan (``memory(compiled=True)``, ``hlo_collectives``); ``mesh``: the
    ``jax.sharding.Mesh`` it runs on; ``source_files``: files to find source lines in besides
    the imported modules'.

    >>> rep = ShardingReport(pf.program(x, w), links={"model": LinkModel(25e-6, 12.5e9)})  # doctest: +SKIP
    >>> rep.total_wire_bytes, rep.memory()["parameters"]                                    # doctest: +SKIP
    (3072.0, 1024)
    """

    def __init__(self, program, *, compile=None, mesh=None, source_files=(), links=None, roles=None,
                 thresholds=None):
        self._source_program = program
        if links:
            program = dataclasses.replace(program, mesh=self._mesh_with_links(program.mesh, links))
        self.program = program
        self.mesh = mesh
        self._compile = compile
        self._source_files = tuple(source_files)
        self._compiled_box: list = [None]       # shared with reports made by with_options
        unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
        if unknown:
            raise ValueError(f"unknown warning thresholds {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}")
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        #: Names, roles, trips, layers and per-device bytes of the program's values.
        self.context = ReportContext(program, roles)
        self.mesh_axes = self.context.mesh_axes
        self.mesh_shape = self.context.mesh_shape
        self.unknown_trip_counts = self.context.unknown_trip_counts
        #: Finds the user's source lines for explanations and tables.
        self.source_lines = _explain.SourceLines(self._source_files)
        self._memory = MemoryModel(self.context)
        self.collectives = records.collective_records(self.context)
        self.equations = records.equation_rows(self.context)
        #: One record per pipelined layer loop (axis, stages, microbatches, schedule, bubble).
        self.pipeline = records.pipeline_records(program)
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
        links = {**self.links, **(links or {})}
        rep = ShardingReport(self._source_program, compile=self._compile, mesh=self.mesh,
                             source_files=self._source_files, links=links,
                             roles={**self.context.roles_given, **(roles or {})},
                             thresholds={**self.thresholds, **(thresholds or {})})
        rep._compiled_box = self._compiled_box
        return rep

    def with_links(self, links: dict) -> "ShardingReport":
        """``report.with_links({"data": LinkModel(latency_s=25e-6, bandwidth_bytes_per_s=12.5e9)})``:
        the same report with the time estimates of collectives over ``data`` recomputed."""
        return self.with_options(links=links)

    @property
    def links(self) -> dict[str, LinkModel]:
        return self.context.links

    # -- values --------------------------------------------------------------------------
    def name_of(self, v) -> str:
        return self.context.name_of(v)

    def names_at(self, source_substring: str, op: str | None = None) -> list[str]:
        """Names of the results of equations whose source contains ``source_substring``
        (e.g. ``"gpt.py:107"``), optionally only of primitive ``op``."""
        return self.context.names_at(source_substring, op)

    def role_of(self, path: str) -> str:
        return self.context.role_of(path)

    def layer_of_value(self, v) -> str:
        return self.context.layer_of_value(v)

    def trips_of(self, v) -> int:
        """Times per step the value ``v`` is made (1 outside loops)."""
        return self.context.trips_of(v)

    @property
    def layouts(self) -> dict[str, str]:
        p, ctx = self.program, self.context
        out = {}
        for v in p.graph.values:
            if v.is_const:
                continue
            out[ctx.name_of(v)] = ctx.sbp(p.final_layout(v))
        for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts):
            out[path] = ctx.sbp(lay)
        return out

    # -- communication -------------------------------------------------------------------
    @property
    def total_wire_bytes(self) -> float:
        return float(sum(c.wire_bytes for c in self.collectives))

    @property
    def total_time_s(self) -> float:
        """Sum of the collectives' time estimates (no overlap assumed)."""
        return float(sum(c.time_s for c in self.collectives))

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
        return records.communication(self.collectives)

    def wire_bytes_by(self, key: str) -> dict:
        """Total wire bytes grouped by a ``CollectiveRecord`` field: ``kind``, ``mesh_axes``,
        ``layer``, ``module``, ``source`` or ``value``."""
        return records.wire_bytes_by(self.collectives, key)

    def sources(self) -> list[dict]:
        """Equations grouped by user source line (ordered by file and line), with the
        collectives each line causes."""
        return records.source_groups(self.equations, self.collectives)

    # -- memory --------------------------------------------------------------------------
    def memory(self, compiled=False) -> dict:
        """Per-device bytes (estimates from the plan): arguments by role, outputs, and
        activations as the peak of live intermediates in program order (no fusion, so an
        upper estimate of XLA's temporaries), and the modelled step memory (``memory.py``).
        ``compiled=True`` (or a ``jax.stages.Compiled``) adds XLA's ``memory_analysis()``
        under ``"xla"`` (compiles once; cached)."""
        out = self._memory.memory()
        if compiled is not False and compiled is not None:
            if compiled is not True:
                self._compiled_box[0] = compiled
            out["xla"] = self._xla_memory()
        elif self._compiled_box[0] is not None:
            out["xla"] = self._xla_memory()
        return out

    def compiled(self):
        """XLA's executable for this plan (``pf.lower(*args).compile()``), compiled once."""
        if self._compiled_box[0] is None:
            if self._compile is None:
                raise ValueError("this report was built from a program alone; build it with "
                                 "pf.report(...) to compile it, or pass memory(compiled=pf.lower(...).compile())")
            self._compiled_box[0] = self._compile()
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
        """Collectives parsed from the compiled HLO (``report.hlo.parse_collectives``)."""
        from .hlo import parse_collectives
        if self.mesh is None:
            raise ValueError("this report has no mesh to read the compiled HLO's device groups on; "
                             "build it with pf.report(...)")
        return parse_collectives(self.compiled().as_text(), self.mesh)

    # -- warnings and provenance ---------------------------------------------------------
    @property
    def warnings(self) -> list:
        if self._warnings is None:
            arguments = sum(self._memory.argument_bytes().values())
            self._warnings = find_warnings(self.context, self.collectives, self.thresholds, arguments)
        return self._warnings

    def explain(self, name: str) -> str:
        """Where ``name``'s layout came from: per mesh axis it is split over, the chain from
        the annotation that decided it through each (op, source line) to the value; then how
        it is made partial or resharded, and which collectives move it."""
        return _explain.explain(self.context, self.collectives, name, self.source_lines)

    # -- strategy ------------------------------------------------------------------------
    def layer_strategies(self) -> dict[str, str]:
        """The strategy of each layer in words, read off its parameters' matmuls
        (``{"blocks.0.mlp": "Megatron tensor parallel over model (column up; row down); ..."}``)."""
        return strategy.describe_layers(self.program)

    def estimated_step_seconds(self, compute_rate: float | None = None) -> dict:
        """Per-device compute plus collective time under the link models: the cost the layout
        search minimises (``strategy.estimated_step_seconds``); compares any plans."""
        search_rate = getattr(self.program, "search_compute_rate", None)
        return strategy.estimated_step_seconds(self.program,
                                               compute_rate or search_rate or DEFAULT_POINTS_PER_SECOND)

    # -- output --------------------------------------------------------------------------
    def _value_entry(self, v, name, layout) -> dict:
        ctx = self.context
        return {"name": name, "shape": list(v.shape), "dtype": compat.dtype_name(v.dtype),
                "layout": ctx.sbp(layout), "spec": spec_text(layout),
                "dims": [list(a) for a in layout.dims],
                "partial": [[a, op] for a, op in layout.partial],
                "bytes_per_device": ctx.local_bytes(v, layout)}

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
            "provenance": _explain.provenance_dict(self.context),
            "memory_per_device": {k: v for k, v in self.memory().items() if k != "xla"},
            "warnings": [asdict(w) for w in self.warnings],
            "xla": xla,
            "pass_seconds": dict(p.pass_seconds),
            "cost_model_source": self.cost_model_source,
            "pipeline": [asdict(r) for r in self.pipeline],
        }

    def to_json(self, path=None) -> str:
        text_ = json.dumps(self.to_dict(), indent=2, default=list)
        if path is not None:
            with open(path, "w") as f:
                f.write(text_)
        return text_

    def to_html(self, path) -> str:
        """One self-contained HTML page (inline CSS/JS, no network): device grids, a sortable
        table of collectives, provenance chains, memory and warnings. Returns the page."""
        from .html import render
        page = render(self)
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        return page

    @property
    def idle_axes(self) -> str:
        """Whether mesh axes no annotation names split the batch, and why (or why not);
        empty when no axis is idle (``passes/idle_axes.py``, ``parallelize(idle_axes=...)``)."""
        return self.program.idle_decision

    @property
    def cost_model_source(self) -> str:
        """What priced the times and the auto search: an entry of ``compiler/hardware.py``'s
        table, an ``ash.calibrate`` measurement, or a fallback (``parallelize(costs=...)``)."""
        return self.program.mesh.cost_source

    def summary(self) -> str:
        return text.summary(self)

    def __rich_console__(self, console, options):
        yield from text.renderables(self)

    def __str__(self) -> str:
        return text.to_text(self)

    def __repr__(self) -> str:
        return f"<ShardingReport {self.summary()}>"
