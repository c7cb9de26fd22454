"""The benchmark's tables: ``RESULTS.md`` (markdown) and ``results.csv`` from a
``measure.run`` result.

>>> print(markdown_table(result["rows"]))          # one line per (model, mesh, strategy)  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io
import platform
import time
from collections import Counter

import jax

from ..compiler.cost_model import KINDS
from .measure import Measured, Row, linear_fit, ratio_text


CSV_FIELDS = ("model", "mesh", "strategy",
              "wire_bytes", "jit_wire_bytes", "analytic_min_bytes",
              "counts", "jit_counts",
              "memory_bytes", "jit_memory_bytes", "argument_bytes", "temp_bytes", "state_bytes",
              "flops", "jit_flops",
              "pass_s", "compile_s", "jit_compile_s", "step_s", "jit_step_s", "note")


def _counts_text(counts: Counter) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
             "all-to-all": "A2A", "collective-permute": "CP"}
    return " ".join(f"{counts[k]}{short[k]}" for k in KINDS if counts.get(k)) or "none"


def row_record(row: Row) -> dict:
    jit = row.jit
    return {
        "model": row.model, "mesh": row.mesh_text, "strategy": row.strategy,
        "wire_bytes": round(row.ours.wire_bytes), "jit_wire_bytes": "" if jit is None else round(jit.wire_bytes),
        "analytic_min_bytes": "" if row.analytic_bytes is None else round(row.analytic_bytes),
        "counts": _counts_text(row.ours.counts), "jit_counts": "" if jit is None else _counts_text(jit.counts),
        "memory_bytes": row.ours.memory_bytes, "jit_memory_bytes": "" if jit is None else jit.memory_bytes,
        "argument_bytes": row.ours.argument_bytes, "temp_bytes": row.ours.temp_bytes,
        "state_bytes": row.state_bytes,
        "flops": round(row.ours.flops), "jit_flops": "" if jit is None else round(jit.flops),
        "pass_s": f"{row.pass_s:.3f}", "compile_s": f"{row.ours.compile_s:.3f}",
        "jit_compile_s": "" if jit is None else f"{jit.compile_s:.3f}",
        "step_s": f"{row.ours.step_s:.5f}", "jit_step_s": "" if jit is None else f"{jit.step_s:.5f}",
        "note": row.note,
    }


def write_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row_record(row))
    return out.getvalue()


_NO_JIT = Measured(wire_bytes=0.0, counts=Counter(), memory_bytes=0, argument_bytes=0, temp_bytes=0,
                   flops=0.0, compile_s=0.0, step_s=0.0)


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def markdown_table(rows: list[Row]) -> str:
    head = ("| model | mesh | strategy | wire KiB | jit wire KiB | min KiB | ours/jit | ours/min "
            "| collectives | jit collectives | mem KiB | jit mem KiB | GFLOP | jit GFLOP "
            "| pass s | compile s | jit compile s | step ms | jit step ms | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        # A row without a jit baseline (pp: jax.jit has no pipeline) prints '-' in jit's columns.
        j = r.jit or _NO_JIT
        dash = (lambda text: "-") if r.jit is None else (lambda text: text)
        lines.append(
            f"| {r.model} | {r.mesh_text} | {r.strategy} | {_kib(r.ours.wire_bytes)} "
            f"| {dash(_kib(j.wire_bytes))} | {'-' if r.analytic_bytes is None else _kib(r.analytic_bytes)} "
            f"| {dash(ratio_text(r.ours.wire_bytes, j.wire_bytes))} "
            f"| {'-' if r.analytic_bytes is None else ratio_text(r.ours.wire_bytes, r.analytic_bytes)} "
            f"| {_counts_text(r.ours.counts)} | {dash(_counts_text(j.counts))} "
            f"| {_kib(r.ours.memory_bytes)} | {dash(_kib(j.memory_bytes))} "
            f"| {r.ours.flops / 1e9:.4f} | {dash(f'{j.flops / 1e9:.4f}')} "
            f"| {r.pass_s:.2f} | {r.ours.compile_s:.2f} | {dash(f'{j.compile_s:.2f}')} "
            f"| {r.ours.step_s * 1e3:.2f} | {dash(f'{j.step_s * 1e3:.2f}')} | {r.note} |")
    return "\n".join(lines)


def machine_line() -> str:
    devices = jax.devices()
    return (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
            f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}, "
            f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices")


def auto_markdown(rows: list[dict]) -> list[str]:
    lines = ["", "## auto=True against the presets", "",
             "GPT (benchmark size) with only the batch annotated, mesh data=2,model=4. Estimated "
             "step = per-device compute at the rate shown + collectives (alpha-beta, 5 us, 100 GB/s); "
             "the same model prices the presets. Bytes: auto from the compiled HLO, presets from "
             "their reports (equal to their HLO, see the table above).", "",
             "| layers | compute rate | search s | nodes | MILP variables | auto ms | auto KiB "
             "| dp ms | fsdp ms | tp ms | dp_tp ms | best preset KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        presets_ms = [f"{r[s + '_s'] * 1e3:.3f}" if s + "_s" in r else "-" for s in ("dp", "fsdp", "tp", "dp_tp")]
        best = min((s for s in ("dp", "fsdp", "tp", "dp_tp") if s + "_s" in r), key=lambda s: r[s + "_s"],
                   default=None)
        lines.append(f"| {r['layers']} | {r['rate']:.0e} | {r['solve_s']:.2f} | {r['nodes']} | {r['variables']} "
                     f"| {r['auto_s'] * 1e3:.3f} | {r['auto_bytes'] / 1024:.1f} | " + " | ".join(presets_ms)
                     + f" | {'-' if best is None else f'{best}: ' + format(r[best + '_bytes'] / 1024, '.1f')} |")
    return lines


def results_markdown(result: dict, command: str) -> str:
    rows, scaling, reference = result["rows"], result["scaling"], result["reference"]
    parts = [
        "# autoshard benchmark results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Per device and per training step (adamw). `wire`: bytes each device sends, from the "
        "collectives of the compiled HLO; `min`: the strategy's analytic minimum (formulas in "
        "`autoshard/benchmark/__init__.py`); `jit`: `jax.jit` with the same annotations as "
        "`NamedSharding`s (XLA's propagation); `mem`: `memory_analysis()` arguments + outputs + "
        "temporaries - aliased; the checks hold each row to wire bytes and flops <= 1.00x jit's "
        "and memory <= 1.02x (XLA's buffer-assignment noise); pass s: autoshard trace + passes + lowering; compile s: XLA. Step times "
        "are medians on simulated CPU devices sharing two cores: noise, not a claim. `pp` "
        "(the scanned GPT pipelined over `stage`): jax.jit has no pipeline baseline, so its "
        "jit columns are `-` and it compares with `min` only; its wire bytes are the report's "
        "per step with the tick loops' trips (the HLO holds a loop body once), its GFLOP "
        "XLA's cost_analysis.",
        "",
        markdown_table(rows),
        "",
        "## Checks",
        "",
    ]
    for c in result["checks"]:
        parts.append(f"- **{'PASS' if c.passed else 'FAIL'}** {c.name}: {c.detail}")
    if scaling:
        a, b, r2 = linear_fit([p.equations for p in scaling], [p.passes_s for p in scaling])
        parts += ["", "## Pass time against program size", "",
                  "GPT train step, unrolled layers, mesh data=2,model=4, dp_tp. `passes`: "
                  "import_annotations through verify; `front end`: JAX's trace + passes + "
                  "lowering to StableHLO.", "",
                  "| layers | equations | passes s | us / equation | trace s | front end s |",
                  "|---|---|---|---|---|---|"]
        for p in scaling:
            parts.append(f"| {p.layers} | {p.equations:,} | {p.passes_s:.2f} "
                         f"| {p.passes_s / p.equations * 1e6:.1f} | {p.trace_s:.2f} | {p.front_end_s:.2f} |")
        parts += ["", f"Least squares: passes = {a:.3f} s + {b * 1e6:.1f} us x equations "
                  f"(R^2 = {r2:.3f})."]
    if reference is not None:
        parts += ["", f"{reference.layers}-layer GPT ({reference.equations:,} equations), fastest of 3 runs: passes "
                  f"{reference.passes_s:.2f} s, front end {reference.front_end_s:.2f} s, XLA compile "
                  f"{reference.compile_s:.2f} s."]
    if result.get("auto"):
        parts += auto_markdown(result["auto"])
    parts += ["", "## GPU", ""]
    single = result.get("single")
    if single is None:
        parts.append("No GPU in this run. On a machine with one, `autoshard bench` adds the "
                     "12-layer GPT step on one GPU: autoshard on a 1-device mesh against "
                     "`jax.jit`, step time and MFU.")
    else:
        parts += ["| device | layers | GFLOP / step | autoshard ms | jit ms | autoshard MFU | jit MFU |",
                  "|---|---|---|---|---|---|---|",
                  f"| {single['device']} | {single['layers']} | {single['flops'] / 1e9:.2f} "
                  f"| {single['ours_ms']:.2f} | {single['jit_ms']:.2f} | {single['ours_mfu']} "
                  f"| {single['jit_mfu']} |"]
    return "\n".join(parts) + "\n"
