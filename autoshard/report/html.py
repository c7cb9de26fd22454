"""``ShardingReport.to_html``: one self-contained page (inline CSS and JS, no network).

Sections: summary and wire bytes (by kind, mesh axes, layer, module), the schedule of each
pipelined layer loop (stages x ticks, microbatch per cell, bubbles empty), warnings with fixes,
per-device memory beside XLA's, a table of collectives sortable by any column (click a
header), device grids, provenance chains (collapsible), and the equations grouped by source
line. A device grid draws a tensor's layout as ``jax.debug.visualize_array_sharding`` does:
the tensor cut into the blocks the mesh makes, each labelled with the devices that hold it,
next to the mesh itself with every device coloured by the block it holds.

To stay light on a 1300-equation program, grids are drawn for inputs, outputs, the largest
intermediates and the values the costliest collectives move; chains for values that are
moved, warned about or drawn.

>>> page = render(report)        # doctest: +SKIP
"""
from __future__ import annotations

import html
import math

import numpy as np

from .. import compat
from ..compiler.layout import Layout
from ..compiler.naming import path_tokens
from .fmt import fmt_bytes, fmt_time
from .memory import memory_rows

N_LARGEST = 12          # grids for the largest intermediates
N_COSTLIEST = 8         # src/dst grids for the values of the costliest collectives

_PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
            "#9c755f", "#bab0ac", "#86bcb6", "#d37295", "#a0cbe8", "#ffbe7d", "#8cd17d", "#f1ce63"]

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d232a;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;color:#c8ced6}
nav{padding:6px 24px;background:#e8ebef;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#234;text-decoration:none;font-weight:600}
main{padding:8px 24px 40px}
h2{margin:26px 0 8px;font-size:17px;border-bottom:2px solid #d5dae0;padding-bottom:3px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.stat{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:8px 12px;min-width:130px}
.stat b{display:block;font-size:18px}
.stat span{color:#5b6673;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:12.5px}
th,td{border:1px solid #dde2e8;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eef1f4;position:relative}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:' \\2195';color:#9aa4af}
table.sortable th[data-dir=asc]:after{content:' \\25B2';color:#234}
table.sortable th[data-dir=desc]:after{content:' \\25BC';color:#234}
td.nw{white-space:nowrap}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.bars{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:14px}
.bar{display:flex;align-items:center;font-size:12px;margin:2px 0}
.bar span{white-space:nowrap}
.bar .k{width:120px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar .b{height:12px;background:#4e79a7;margin:0 6px;border-radius:2px}
.warn{background:#fff8e6;border-left:4px solid #e6a700;padding:6px 10px;margin:6px 0}
.warn .fix{color:#1f6f35;margin-top:3px} .warn .kind{font-weight:700;color:#8a5a00}
.grids{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:8px;width:470px}
.card .name{font-weight:600;font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.card .meta{color:#5b6673;font-size:11.5px;margin-bottom:6px}
.pair{display:flex;gap:14px;align-items:flex-start}
.tensor-grid,.device-grid{display:grid;gap:2px;background:#fff}
.tensor-grid div,.device-grid div{color:#fff;font-size:10.5px;display:flex;flex-direction:column;
  align-items:center;justify-content:center;text-align:center;border-radius:2px;overflow:hidden;
  text-shadow:0 0 2px rgba(0,0,0,.6)}
.device-grid div{width:58px;height:36px;font-size:10px}
.cap{font-size:10.5px;color:#5b6673;margin-top:2px}
.partial{font-size:11px;color:#8a3b00}
details{background:#fff;border:1px solid #dde2e8;border-radius:4px;margin:3px 0;padding:3px 8px}
details>summary{cursor:pointer;font-family:ui-monospace,monospace;font-size:12.5px}
pre{margin:4px 0;font-size:12px;white-space:pre-wrap}
input.filter{margin:4px 0 8px;padding:4px 8px;width:320px;border:1px solid #c5ccd4;border-radius:4px}
.muted{color:#5b6673}
table.pipe td.mb{background:#4e79a7;color:#fff;text-align:center;min-width:26px;font-weight:600}
table.pipe td.bubble{background:repeating-linear-gradient(45deg,#f6f7f9,#f6f7f9 4px,#e4e7eb 4px,#e4e7eb 8px);min-width:26px}
table.pipe th{text-align:center;font-weight:600}
.pipe-card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:8px 12px;margin:8px 0;overflow-x:auto}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, i){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-dir') !== 'asc';
      table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', asc ? 'asc' : 'desc');
      function key(r){ var c = r.cells[i]; var v = c.getAttribute('data-v'); return v !== null ? v : c.textContent; }
      rows.sort(function(a, b){
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y), d;
        if (!isNaN(nx) && !isNaN(ny) && String(nx) === x.trim() && String(ny) === y.trim()) d = nx - ny;
        else d = x.localeCompare(y);
        return asc ? d : -d;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
document.querySelectorAll('input.filter').forEach(function(box){
  box.addEventListener('input', function(){
    var q = box.value.toLowerCase();
    document.querySelectorAll(box.getAttribute('data-target')).forEach(function(el){
      el.style.display = el.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


# ----------------------------------------------------------------------------- grids

def _device_labels(report) -> list[str]:
    """Device ids in mesh order (positions for an abstract mesh)."""
    n = math.prod(report.mesh_shape.values())
    mesh = report.mesh
    try:
        devices = getattr(mesh, "devices", None)
    except ValueError:                  # AbstractMesh: no devices
        devices = None
    if devices is not None and not isinstance(devices, (int, float)) and getattr(devices, "size", 0) == n:
        try:
            return [str(d.id) for d in np.asarray(devices).flat]
        except AttributeError:
            pass
    return [str(k) for k in range(n)]


def device_grid(shape, layout: Layout, mesh_axes, mesh_sizes: dict, labels=None) -> dict:
    """Which block of a tensor each device holds, for drawing.

    Returns ``rows_dim``/``cols_dims`` (the tensor dims drawn as rows / columns), the block
    grid ``blocks[r][c] = [device positions]``, each device's ``(r, c)`` and the slice text
    of each block.

    >>> g = device_grid((8, 16), Layout((("data",), ("model",))), ("data", "model"), {"data": 2, "model": 4})
    >>> len(g["blocks"]), len(g["blocks"][0]), g["blocks"][1][3]
    (2, 4, [7])
    """
    rank = len(shape)
    split = [d for d, axes in enumerate(layout.dims) if axes]
    if not split:
        rows, cols = None, []
    elif len(split) == 1:
        d = split[0]
        rows, cols = (None, [d]) if (rank == 1 or d == rank - 1) else (d, [])
    else:
        rows, cols = split[0], split[1:]
    sizes = [mesh_sizes[a] for a in mesh_axes]
    n = math.prod(sizes)

    def nblocks(d):
        return math.prod(mesh_sizes[a] for a in layout.dims[d])

    n_rows = nblocks(rows) if rows is not None else 1
    n_cols = math.prod(nblocks(d) for d in cols) if cols else 1
    blocks = [[[] for _ in range(n_cols)] for _ in range(n_rows)]
    where = []
    for k in range(n):
        coords = dict(zip(mesh_axes, np.unravel_index(k, sizes))) if sizes else {}

        def index(d):
            i = 0
            for a in layout.dims[d]:
                i = i * mesh_sizes[a] + int(coords[a])
            return i
        r = index(rows) if rows is not None else 0
        c = 0
        for d in cols:
            c = c * nblocks(d) + index(d)
        blocks[r][c].append(k)
        where.append((r, c))

    def slice_text(r, c):
        parts = []
        idx = {}
        if rows is not None:
            idx[rows] = (r, nblocks(rows))
        rem = c
        for d in reversed(cols):
            idx[d] = (rem % nblocks(d), nblocks(d))
            rem //= nblocks(d)
        for d in range(rank):
            if d in idx:
                i, m = idx[d]
                b = math.ceil(shape[d] / m)
                parts.append(f"{i * b}:{min((i + 1) * b, shape[d])}")
            else:
                parts.append(":")
        return "[" + ", ".join(parts) + "]"

    return {"rows_dim": rows, "cols_dims": cols, "blocks": blocks, "where": where,
            "slices": [[slice_text(r, c) for c in range(n_cols)] for r in range(n_rows)]}


def _grid_html(report, shape, layout: Layout, labels) -> str:
    axes, sizes = report.mesh_axes, report.mesh_shape
    g = device_grid(shape, layout, axes, sizes)
    blocks, n_rows, n_cols = g["blocks"], len(g["blocks"]), len(g["blocks"][0])
    rows, cols = g["rows_dim"], g["cols_dims"]
    ext_r = shape[rows] if rows is not None else (shape[0] if len(shape) >= 2 and not cols else 1)
    ext_c = math.prod(shape[d] for d in cols) if cols else (shape[-1] if shape else 1)
    ratio = min(max(ext_r / max(ext_c, 1), 0.3), 1.2)
    if not shape:
        ratio = 0.6
    width = 200
    height = max(int(width * ratio), 40)
    cells = []
    for r in range(n_rows):
        for c in range(n_cols):
            color = _PALETTE[(r * n_cols + c) % len(_PALETTE)]
            devs = ",".join(labels[k] for k in blocks[r][c])
            text = f"<b>{_e(devs)}</b>" if n_rows * n_cols <= 16 else ""
            cells.append(f"<div style='background:{color}' title='{_e(g['slices'][r][c])} on devices {_e(devs)}'>"
                         f"{text}{'<span>' + _e(g['slices'][r][c]) + '</span>' if n_rows * n_cols <= 4 else ''}</div>")
    tensor = (f"<div><div class='tensor-grid' style='grid-template-columns:repeat({n_cols},1fr);"
              f"grid-template-rows:repeat({n_rows},1fr);width:{width}px;height:{height}px'>{''.join(cells)}</div>"
              f"<div class='cap'>tensor: rows {'dim ' + str(rows) if rows is not None else '-'}, columns "
              f"{'dims ' + ','.join(map(str, cols)) if cols else '-'}; labels: devices</div></div>")
    msizes = [sizes[a] for a in axes]
    mcols = math.prod(msizes[1:]) if len(msizes) >= 2 else msizes[0]
    dev_cells = []
    for k, (r, c) in enumerate(g["where"]):
        color = _PALETTE[(r * n_cols + c) % len(_PALETTE)]
        dev_cells.append(f"<div style='background:{color}' title='device {_e(labels[k])} holds {_e(g['slices'][r][c])}'>"
                         f"<b>{_e(labels[k])}</b><span>{_e(g['slices'][r][c]) if len(shape) <= 2 else f'[{r},{c}]'}</span></div>")
    mesh_cap = (f"mesh: rows {axes[0]}, columns {'x'.join(axes[1:])}" if len(axes) >= 2 else f"mesh: {axes[0]}")
    mesh = (f"<div><div class='device-grid' style='grid-template-columns:repeat({mcols},58px)'>{''.join(dev_cells)}</div>"
            f"<div class='cap'>{_e(mesh_cap)}</div></div>")
    part = ""
    if layout.partial:
        part = ("<div class='partial'>partial: " + ", ".join(f"P({op}) over {a}" for a, op in layout.partial) +
                " — devices that share a block hold partial values awaiting a reduction</div>")
    return f"<div><div class='pair'>{tensor}{mesh}</div>{part}</div>"


def _card(report, name, v, layout, labels, note="") -> str:
    b = report.context.local_bytes(v, layout)
    meta = (f"{_e(compat.dtype_name(v.dtype))}{list(v.shape)} &middot; {_e(report.context.sbp(layout))} &middot; "
            f"{_e(fmt_bytes(b))} per device{(' &middot; ' + _e(note)) if note else ''}")
    return (f"<div class='card' data-name='{_e(name)}'><div class='name'>{_e(name)}</div><div class='meta'>{meta}</div>"
            f"{_grid_html(report, v.shape, layout, labels)}</div>")


# ----------------------------------------------------------------------------- sections

def pipeline_cells(stages: int, microbatches: int, backward: bool = False) -> list[list]:
    """The GPipe schedule as ``cells[stage][tick]``: the microbatch the stage runs at that tick,
    or None for a bubble. Forward: stage s runs microbatch t-s when 0 <= t-s < M; the backward
    runs the stages last to first (stage s runs microbatch t-(S-1-s))."""
    S, M = stages, microbatches
    rows = []
    for s in range(S):
        lag = S - 1 - s if backward else s
        rows.append([t - lag if 0 <= t - lag < M else None for t in range(M + S - 1)])
    return rows


def _pipeline_chart(pipe) -> str:
    """One pipelined loop: a stages x ticks table (a row per stage, a column per tick, each cell
    the microbatch it runs; bubbles hatched and empty) and its bubble and bytes in words."""
    S, M, T = pipe.stages, pipe.microbatches, pipe.ticks
    cells = pipeline_cells(S, M, pipe.direction == "backward")
    head = "".join(f"<th>t{t}</th>" for t in range(len(cells[0])))
    body = "".join(
        f"<tr class='stage' data-stage='{s}'><th>stage {s}</th>"
        + "".join(f"<td class='mb' data-tick='{t}' data-mb='{m}' title='tick {t}: microbatch {m}'>{m}</td>"
                  if m is not None else f"<td class='bubble' data-tick='{t}' title='tick {t}: idle'></td>"
                  for t, m in enumerate(row)) + "</tr>"
        for s, row in enumerate(cells))
    idle = S * T - S * M
    return (f"<div class='pipe-card' data-direction='{_e(pipe.direction)}'><div class='name'>{_e(pipe.direction)} "
            f"pipeline over <b>{_e(pipe.axis)}</b> at {_e(pipe.source)}</div>"
            f"<p>{_e(pipe.schedule)} schedule: {S} stages &times; {pipe.layers_per_stage} layers "
            f"({pipe.layers} in all), {M} microbatches, {T} ticks"
            f"{' (stages run last to first)' if pipe.direction == 'backward' else ''}. "
            f"Bubble fraction <b>{pipe.bubble_fraction:.1%}</b>: each stage idles {S - 1} of its {T} ticks "
            f"({idle} of {S * T} stage-ticks empty). Bytes per tick: <b>{_e(fmt_bytes(pipe.bytes_per_tick))}</b> "
            f"per device sent to the next stage (one collective-permute per carry), "
            f"{_e(fmt_bytes(pipe.bytes_per_tick * T))} over the {T} ticks.</p>"
            f"<table class='pipe'><thead><tr><th>stage \\ tick</th>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _bars(title, items) -> str:
    items = sorted(items.items(), key=lambda kv: -kv[1])
    top = max((b for _, b in items), default=0) or 1
    rows = "".join(
        f"<div class='bar'><span class='k' title='{_e(k)}'>{_e(k or '-')}</span>"
        f"<span class='b' style='width:{max(2, int(220 * b / top))}px'></span><span>{_e(fmt_bytes(b))}</span></div>"
        for k, b in items) or "<div class='muted'>no collectives</div>"
    return f"<div><h3 style='font-size:14px;margin:6px 0'>{_e(title)}</h3>{rows}</div>"


def _collectives_table(report) -> str:
    cols = ("#", "kind", "axes", "shape", "dtype", "payload B", "wire B", "est. time (us)", "value", "layer",
            "source", "reason")
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = []
    for i, c in enumerate(report.collectives):
        rows.append(
            "<tr>"
            f"<td class='num' data-v='{i}'>{i}</td><td class='nw'>{_e(c.kind)}</td><td class='nw'>{_e(','.join(c.mesh_axes))}</td>"
            f"<td class='nw'>{_e(list(c.shape))}</td><td>{_e(c.dtype)}</td>"
            f"<td class='num' data-v='{c.payload_bytes}'>{c.payload_bytes}</td>"
            f"<td class='num' data-v='{c.wire_bytes:g}'>{c.wire_bytes:.0f}</td>"
            f"<td class='num' data-v='{c.time_s * 1e6:g}'>{c.time_s * 1e6:.2f}</td>"
            f"<td><a href='#prov-{_e(c.value)}'>{_e(c.value)}</a></td><td>{_e(c.layer)}</td>"
            f"<td>{_e(c.source)}</td><td>{_e(c.reason)}</td></tr>")
    return (f"<input class='filter' placeholder='filter collectives' data-target='#collectives tbody tr'>"
            f"<table class='sortable' id='collectives'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _memory_table(mem) -> str:
    xla = mem.get("xla") or {}
    rows = memory_rows(mem)
    body = "".join(f"<tr><td>{_e(w)}</td><td class='num'>{e}</td><td class='num'>{'' if x is None else x}</td></tr>"
                   for w, e, x in rows)
    note = "" if xla else ("<p class='muted'>XLA's column is filled when the report is built with "
                           "<code>report.memory(compiled=True)</code> (the CLI does this unless --no-xla).</p>")
    return (f"<table><thead><tr><th>per device</th><th>estimate (bytes)</th><th>XLA memory_analysis (bytes)</th>"
            f"</tr></thead><tbody>{body}</tbody></table>{note}")


def _equations(report) -> str:
    by_index = {r.index: r for r in report.equations}
    out = []
    for g in report.sources():
        if not g["equations"]:
            continue
        rows = "".join(
            f"<tr><td class='num'>{r.index}</td><td>{_e(r.op)}</td><td>{_e(' '.join(r.operands))}</td>"
            f"<td>{_e(' '.join(r.results))}</td><td>{_e(' '.join(r.result_names))}</td><td>{_e(r.layer)}</td></tr>"
            for r in (by_index[i] for i in g["equations"]))
        coll = f", {g['collectives']} collective(s), {fmt_bytes(g['wire_bytes'])} on the wire" if g["collectives"] else ""
        code = report.source_lines.code(g["source"])
        out.append(f"<details class='src'><summary>{_e(g['source'])} &mdash; {len(g['equations'])} eqns{_e(coll)}"
                   f"{(' &mdash; ' + _e(', '.join(g['layers'][:4]))) if g['layers'] else ''}</summary>"
                   f"{('<pre>' + _e(code) + '</pre>') if code else ''}"
                   f"<table><thead><tr><th>#</th><th>op</th><th>operands</th><th>result</th><th>name</th>"
                   f"<th>layer</th></tr></thead><tbody>{rows}</tbody></table></details>")
    return ("<input class='filter' placeholder='filter source lines' data-target='details.src'>" + "".join(out))


def render(report) -> str:
    p = report.program
    d_mem = report.memory()
    labels = _device_labels(report)
    total_devices = math.prod(report.mesh_shape.values())

    # Summary.
    stats = [("mesh", " x ".join(f"{a}={s}" for a, s in report.mesh_shape.items())),
             ("equations", len(report.equations)), ("collectives", len(report.collectives)),
             ("wire bytes / step / device", fmt_bytes(report.total_wire_bytes)),
             ("est. comm. time / step", fmt_time(report.total_time_s)),
             ("arguments / device", fmt_bytes(d_mem["arguments"])),
             ("warnings", len(report.warnings))]
    cards = "".join(f"<div class='stat'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in stats)
    links = "; ".join(f"{a}: {l.latency_s * 1e6:g} us latency, {l.bandwidth_bytes_per_s / 1e9:g} GB/s"
                      for a, l in report.links.items())
    bars = "".join([_bars("by kind", report.wire_bytes_by("kind")),
                    _bars("by mesh axes", {",".join(k): v for k, v in report.wire_bytes_by("mesh_axes").items()}),
                    _bars("by layer (nearest parameter)", report.wire_bytes_by("layer")),
                    _bars("by module", report.wire_bytes_by("module"))])

    warnings = "".join(
        f"<div class='warn'><span class='kind'>{_e(w.kind)}</span> {_e(w.message)}"
        f"<div class='fix'>fix: {_e(w.fix)}</div></div>" for w in report.warnings) or \
        "<p class='muted'>none</p>"

    # Grids.
    inputs = "".join(_card(report, path, v, p.layouts[v], labels, report.role_of(path))
                     for v, path in zip(p.graph.invars, p.in_paths))
    # Outputs that mirror an input (same pytree keys, shape and layout: updated parameters and
    # optimizer state) are not drawn again.
    seen_in = {(tuple(path_tokens(path)), tuple(v.shape), p.layouts[v]) for v, path in zip(p.graph.invars, p.in_paths)}
    drawn = [(v, path, lay) for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts)
             if (tuple(path_tokens(path)), tuple(v.shape), lay) not in seen_in]
    outputs = "".join(_card(report, path, v, lay, labels) for v, path, lay in drawn)
    if len(drawn) < len(p.graph.outvars):
        outputs += (f"<p class='muted'>{len(p.graph.outvars) - len(drawn)} outputs with the same keys, shape and "
                    f"layout as an input (updated parameters, optimizer state) are drawn with the inputs.</p>")
    inter = [(report.context.local_bytes(o, p.final_layout(o)), o) for e in report.context.eqns for o in e.outvars
             if o not in set(p.graph.outvars)]
    inter.sort(key=lambda t: -t[0])
    largest = [o for _, o in inter[:N_LARGEST]]
    largest_html = "".join(_card(report, report.name_of(o), o, p.final_layout(o), labels,
                                 f"made at {report.context.made_at(o)}") for o in largest)
    # The costliest reshards, identical (shape, src, dst) transitions drawn once with a count.
    wire_of: dict = {}
    for c in report.collectives:
        wire_of[(c.value, c.consumer)] = wire_of.get((c.value, c.consumer), 0.0) + c.wire_bytes
    kinds_of: dict = {}
    for r in p.reshards:
        if not any(t.is_collective for t in r.transforms):
            continue
        key = (r.value.shape, compat.dtype_name(r.value.dtype), r.src, r.dst)
        g = kinds_of.setdefault(key, {"r": r, "n": 0, "wire": 0.0, "names": []})
        g["n"] += 1
        g["wire"] += wire_of.get((report.name_of(r.value), r.consumer), 0.0)
        g["names"].append(report.name_of(r.value))
    costly = sorted(kinds_of.values(), key=lambda g: -g["wire"])[:N_COSTLIEST]
    moved = "".join(
        f"<div class='card' style='width:auto'><div class='name'>{_e(report.context.sbp(g['r'].src))} &rarr; "
        f"{_e(report.context.sbp(g['r'].dst))} on {_e(compat.dtype_name(g['r'].value.dtype))}{_e(list(g['r'].value.shape))}"
        f"</div><div class='meta'>{g['n']}x "
        f"{_e(' + '.join(t.kind for t in g['r'].transforms if t.is_collective))}, {_e(fmt_bytes(g['wire']))} on "
        f"the wire in all; values {_e(', '.join(g['names'][:6]))}{' ...' if g['n'] > 6 else ''} "
        f"(first: for {_e(g['r'].consumer)})</div>"
        f"<div class='pair'>{_grid_html(report, g['r'].value.shape, g['r'].src, labels)}"
        f"<div style='align-self:center;font-size:20px'>&rarr;</div>"
        f"{_grid_html(report, g['r'].value.shape, g['r'].dst, labels)}</div></div>"
        for g in costly)

    # Provenance chains.
    names = []
    for c in report.collectives:
        names.append(c.value)
    names += [w.value for w in report.warnings]
    names += [report.name_of(o) for o in largest]
    names += list(p.out_paths)
    seen, chains = set(), []
    for n in names:
        if n in seen:
            continue
        seen.add(n)
        try:
            text = report.explain(n)
        except KeyError:
            continue
        first = text.splitlines()[0]
        chains.append(f"<details class='prov' id='prov-{_e(n)}'><summary>{_e(first)}</summary>"
                      f"<pre>{_e(text)}</pre></details>")

    xla = d_mem.get("xla")
    hlo_note = ""
    if xla is not None:
        try:
            hlo = report.hlo_collectives()
            hlo_total = sum(c.wire_bytes for c in hlo)
            same = abs(hlo_total - report.total_wire_bytes) < 1e-6
            hlo_note = (f"<p>Compiled HLO: {len(hlo)} collectives, {_e(fmt_bytes(hlo_total))} on the wire per device "
                        f"&mdash; {'equal to' if same else '<b>different from</b>'} the plan's "
                        f"{_e(fmt_bytes(report.total_wire_bytes))}.</p>")
        except Exception:     # noqa: BLE001 - the page still renders without the comparison
            hlo_note = ""

    pipes = list(getattr(report, "pipeline", ()))
    pipelines = ""
    if pipes:
        pipelines = (f'<h2 id="pipeline">Pipeline schedule ({len(pipes)} loops)</h2>'
                     f"<p class='muted'>A row per stage, a column per tick; a cell is the microbatch the stage "
                     f"runs at that tick, a hatched empty cell a bubble (the stage idles).</p>"
                     + "".join(_pipeline_chart(pipe) for pipe in pipes))
    nav = "".join(f"<a href='#{k}'>{t}</a>" for k, t in (
        ("summary", "Summary"), *((("pipeline", "Pipeline"),) if pipes else ()), ("warnings", "Warnings"), ("grids", "Device grids"),
        ("collectives-sec", "Collectives"), ("memory", "Memory"), ("provenance", "Provenance"), ("equations", "Equations")))
    pass_times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in p.pass_seconds.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>autoshard sharding report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<header><h1>autoshard sharding report</h1>
<p>mesh {_e(report.mesh_shape)} ({total_devices} devices) &middot; links: {_e(links)} &middot; passes: {_e(pass_times)}</p></header>
<nav>{nav}</nav><main>
<h2 id="summary">Summary</h2><div class="cards">{cards}</div>{hlo_note}
<h3 style="font-size:14px">Wire bytes per step, per device</h3><div class="bars">{bars}</div>
{pipelines}<h2 id="warnings">Warnings ({len(report.warnings)})</h2>{warnings}
<h2 id="grids">Device grids</h2>
<p class="muted">Left: the tensor cut into the blocks the layout makes, each labelled with the devices holding it (as
jax.debug.visualize_array_sharding draws it). Right: the mesh, each device coloured by the block it holds.</p>
<h3 style="font-size:14px">Costliest reshards</h3><div class="grids">{moved or "<p class='muted'>none</p>"}</div>
<details{" open" if len(p.graph.invars) <= 24 else ""}><summary>Inputs ({len(p.graph.invars)})</summary>
<input class="filter" placeholder="filter inputs" data-target="#grid-inputs .card"><div class="grids" id="grid-inputs">{inputs}</div></details>
<details{" open" if len(drawn) <= 24 else ""}><summary>Outputs ({len(p.graph.outvars)}, {len(drawn)} drawn)</summary><div class="grids">{outputs}</div></details>
<details open><summary>Largest intermediates ({len(largest)})</summary><div class="grids">{largest_html}</div></details>
<h2 id="collectives-sec">Collectives ({len(report.collectives)}) &mdash; click a header to sort</h2>{_collectives_table(report)}
<h2 id="memory">Memory per device</h2>{_memory_table(d_mem)}
<h2 id="provenance">Provenance chains</h2>
<input class="filter" placeholder="filter values" data-target="details.prov">{''.join(chains)}
<h2 id="equations">Equations by source line</h2>{_equations(report)}
</main><script>{_JS}</script></body></html>
"""
