"""The report as text: the one-paragraph summary, and the full tables (equations grouped by
source line, collectives, wire bytes, memory, warnings) rendered with rich.

>>> print(summary(rep))                 # the README's MLP       # doctest: +SKIP
mesh {'data': 2, 'model': 4}: 14 equations, 1 collectives (all-reduce 1x 0.4 KiB); 0.4 KiB on the
wire per device (~30.0 us); arguments 1.3 KiB per device
>>> print(to_text(rep))         # what print(rep) shows              # doctest: +SKIP
"""
from __future__ import annotations

import io
import shutil
import sys

from . import strategy
from .fmt import fmt_bytes, fmt_time
from .memory import memory_rows


def summary(report) -> str:
    by_kind = report.wire_bytes_by("kind")
    kinds = ", ".join(f"{k} {sum(1 for c in report.collectives if c.kind == k)}x {b / 1024:.1f} KiB"
                      for k, b in sorted(by_kind.items())) or "none"
    mem = report.memory()
    text = (f"mesh {report.mesh_shape}: {len(report.equations)} equations, {len(report.collectives)} collectives "
            f"({kinds}); {report.total_wire_bytes / 1024:.1f} KiB on the wire per device "
            f"(~{fmt_time(report.total_time_s)}); arguments {mem['arguments'] / 1024:.1f} KiB per device")
    if any(c.trips > 1 for c in report.collectives):
        text += (f"; per step with loop trips {fmt_bytes(report.step_wire_bytes)} "
                 f"(~{fmt_time(report.step_time_s)})")
    if report.warnings:
        text += f"; {len(report.warnings)} warning(s)"
    for pipe in getattr(report, "pipeline", ()):
        text += f"\n{pipe}"
    text += f"\ncost model: {report.cost_model_source}"
    if report.program.idle_decision:
        text += f"\nidle axes: {report.program.idle_decision}"
    if getattr(report.program, "refine_decision", ""):
        text += f"\nrefined mesh: {report.program.refine_decision}"
    search = getattr(report.program, "search", None)
    if search is not None:
        text += (f"\nauto plan: MILP over {search.nodes} nodes ({search.equations} equations, "
                 f"{search.edges} coupled edges, {search.variables} variables), axes in order "
                 f"{', '.join(search.axis_order)}, solved in {search.solve_seconds:.1f} s "
                 f"({search.status.split('(')[-1].rstrip(')')}); estimated step "
                 f"{report.estimated_step_seconds()['total_s'] * 1e3:.3f} ms")
        for layer, words in report.layer_strategies().items():
            text += f"\n  {layer}: {words}"
        if note := strategy.replication_note(report.program):
            text += f"\n  {note}"
    return text


def renderables(report, max_warnings: int = 20):
    """The rich renderables of ``print(report)``, in order."""
    from rich.table import Table
    from rich.text import Text
    yield Text(f"autoshard sharding report — mesh {report.mesh_shape}", style="bold")
    yield Text("links: " + "; ".join(f"{a}: {l.latency_s * 1e6:g} us, {l.bandwidth_bytes_per_s / 1e9:g} GB/s"
                                     for a, l in report.links.items()), style="dim")
    eq = Table(title="equations (grouped by source line)", show_lines=False, title_style="bold")
    for col in ("#", "op", "source", "operands", "result", "name", "layer"):
        eq.add_column(col, overflow="fold")
    by_index = {r.index: r for r in report.equations}
    for g in report.sources():
        if not g["equations"]:
            continue
        eq.add_section()
        coll = f"; {g['collectives']} collective(s), {fmt_bytes(g['wire_bytes'])}" if g["collectives"] else ""
        code = report.source_lines.code(g["source"])
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
    for c in report.collectives:
        co.add_row(Text(c.kind, style="magenta"), ",".join(c.mesh_axes), str(c.shape), c.dtype,
                   fmt_bytes(c.payload_bytes), f"{c.wire_bytes:.0f}", fmt_time(c.time_s), c.value,
                   c.layer, c.source, c.reason)
    yield co
    wb = Table(title="wire bytes per step (per device)", title_style="bold")
    for col in ("by", "key", "bytes", "share"):
        wb.add_column(col, justify="right" if col in ("bytes", "share") else "left")
    total = report.total_wire_bytes or 1.0
    for by, field in (("kind", "kind"), ("mesh axes", "mesh_axes"), ("layer", "layer")):
        for k, b in sorted(report.wire_bytes_by(field).items(), key=lambda kv: -kv[1]):
            key = ",".join(k) if isinstance(k, tuple) else (k or "-")
            wb.add_row(by, key, f"{b:.0f}", f"{100 * b / total:.0f}%")
    yield wb
    mem = report.memory()
    mt = Table(title="memory per device (bytes)", title_style="bold")
    mt.add_column("what")
    mt.add_column("estimate", justify="right")
    mt.add_column("XLA memory_analysis", justify="right")
    for what, est, x in memory_rows(mem, with_total=True):
        mt.add_row(what, f"{est}", "" if x is None else f"{x}")
    yield mt
    if report.warnings:
        yield Text(f"warnings ({len(report.warnings)})", style="bold yellow")
        for w in report.warnings[:max_warnings]:
            yield Text(f"  [{w.kind}] {w.message}", style="yellow")
            yield Text(f"      fix: {w.fix}", style="green")
        if len(report.warnings) > max_warnings:
            yield Text(f"  ... and {len(report.warnings) - max_warnings} more (report.warnings)", style="yellow")
    yield Text(report.summary())


def to_text(report) -> str:
    """``print(report)``: the tables at the terminal's width (160 columns when not a tty)."""
    from rich.console import Console
    buf = io.StringIO()
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size((160, 40)).columns if tty else 160
    console = Console(file=buf, width=max(width, 100), force_terminal=tty,
                      color_system="auto" if tty else None, highlight=False)
    for r in renderables(report):
        console.print(r)
    return buf.getvalue()
