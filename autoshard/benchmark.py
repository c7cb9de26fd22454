"""``autoshard bench``: autoshard against XLA's own propagation and the analytic optimum.

One row per (model, mesh, strategy). Both programs get the same annotations: the preset's
parameter and batch specs. autoshard receives them as ``in_specs``; the baseline is
``jax.jit`` with them as ``NamedSharding`` ``in_shardings`` (XLA/Shardy propagation decides
everything else). The optimizer state is not annotated by the presets; both programs get the
layout autoshard infers for it, which is its parameter's layout (what a user of ``jax.jit``
writes by hand), so they start from the same per-device state.

Measured per program, from the compiled executable (never from wall time alone):

* ``wire``: bytes each device sends per step, summed over the collectives parsed from the
  compiled HLO (``runtime/hlo.py``) with the ring formulas of ``compiler/cost_model.py``;
* collective counts by kind;
* per-device memory from ``memory_analysis()``: arguments + outputs + temporaries - aliased;
* per-device flops from ``cost_analysis()``;
* autoshard's pass time (trace to lowered StableHLO), XLA's compile time, and the median step
  time over a few steps (noise on the shared-core CPU machine; a ratio at best).

The analytic minimum (``min``) is the fewest bytes per device and step that the strategy
itself requires, in the same ring model. With ``N`` the bytes of all parameters, ``s`` a
scalar's 4 bytes, ``n_d`` / ``n_m`` the sizes of the ``data`` / ``model`` axes, ``A`` the
bytes of one layer's activation ``[B/n_d, T, D]`` (``[B/n_d, D]`` for the MLP) and ``L``
layers:

* ``dp``:     ``2 (n_d-1)/n_d (N + s)``: one all-reduce of every gradient and of the loss;
* ``fsdp``:   ``2 (n_d-1)/n_d (N + s)``: all-gather every parameter once ((n_d-1)/n_d N,
  kept for the backward pass inside one step) and reduce-scatter its gradient
  ((n_d-1)/n_d N); parameters with no divisible dim are all-reduced (the same 2 (n_d-1)/n_d);
* ``tp``:     ``2 (n_m-1)/n_m k L A``: Megatron all-reduces ``k`` activations per layer, forward
  and backward (GPT: k = 4, after attention and after the MLP, and their input gradients;
  MLP: k = 2); replicated parameters see whole activations, so their gradients need nothing;
* ``dp_tp``:  the tp term over ``model`` plus ``2 (n_d-1)/n_d (N_rep + N_split/n_m + s)`` over
  ``data``: gradients of replicated and of model-split parameters, and the loss;
* ``sp``:     as dp_tp, plus ``2 (n_m-1)/n_m N_seq`` for the gradients of the replicated
  parameters that see sequence shards (layernorms, embeddings, head, row-parallel biases), and
  the loss reduced over both axes; the tp term is the same bytes moved as all-gathers and
  reduce-scatters instead of all-reduces.

Models other than GPT and the MLP (MoE, CNN) get the dp / fsdp minimum only; their other rows
print ``-``. Collectives inside loops are counted once per instruction, so the benchmark uses
unrolled layers.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import platform
import statistics
import time
from collections import Counter
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from .compiler.cost_model import KINDS

#: Small configurations: big enough that activations and parameters are not dwarfed by
#: scalars, small enough that two compiles per row take seconds on two cores.
BENCH_CONFIGS = {
    "gpt": dict(vocab_size=256, d_model=64, n_heads=8, n_layers=2, seq_len=32),
    "mlp": dict(d_model=64, n_layers=2),
    "moe": dict(),
    "cnn": dict(),
}
BENCH_BATCH = {"gpt": 16, "mlp": 32, "moe": 16, "cnn": 16}
MESHES = ("8", "2x4")


def mesh_axes(mesh_kind: str, strategy: str) -> dict[str, int] | None:
    """The mesh of shape ``mesh_kind`` (``"8"`` or ``"2x4"``) with the axis names ``strategy``
    uses, or None where the strategy needs two axes and the mesh has one."""
    from .models.presets import DATA_AXIS, EXPERT_AXIS, MODEL_AXIS, required_axes
    need = required_axes(strategy)
    second = EXPERT_AXIS if strategy == "ep" else MODEL_AXIS
    if mesh_kind == "8":
        return None if len(need) > 1 else {need[0]: 8}
    return {DATA_AXIS: 2, second: 4}


@dataclasses.dataclass
class Measured:
    """One compiled program's numbers (per device, per step)."""
    wire_bytes: float
    counts: Counter
    memory_bytes: int
    argument_bytes: int
    temp_bytes: int
    flops: float
    compile_s: float
    step_s: float


@dataclasses.dataclass
class Row:
    model: str
    mesh: dict
    strategy: str
    ours: Measured
    jit: Measured
    pass_s: float
    analytic_bytes: float | None
    state_bytes: int              # parameters + optimizer state, whole (not per device)
    note: str = ""

    @property
    def mesh_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.mesh.items())


# ----------------------------------------------------------------------------- analytic

def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _ring_all_reduce(n: int, nbytes: float) -> float:
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def analytic_min_bytes(model: str, cfg: Any, batch: int, strategy: str, mesh: dict,
                       params: dict, param_specs: dict) -> float | None:
    """The formulas of the module docstring; None where none is given for the pair."""
    scalar = 4.0
    n_d, n_m = mesh.get("data", 1), mesh.get("model", 1)
    total = float(_nbytes(params))
    if strategy in ("dp", "fsdp"):
        return _ring_all_reduce(n_d, total + scalar)
    if model not in ("gpt", "mlp") or strategy not in ("tp", "dp_tp", "sp"):
        return None
    itemsize = np.dtype(cfg.dtype).itemsize
    if model == "gpt":
        per_layer, activation = 4, (batch // n_d) * cfg.seq_len * cfg.d_model * itemsize
    else:
        per_layer, activation = 2, (batch // n_d) * cfg.d_model * itemsize
    model_term = _ring_all_reduce(n_m, per_layer * cfg.n_layers * activation)
    if strategy == "tp":
        return model_term
    flat_params = jax.tree.leaves(params)
    flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    split = sum(_nbytes(p) for p, s in zip(flat_params, flat_specs) if any(a is not None for a in s))
    data_term = _ring_all_reduce(n_d, (total - split) + split / n_m + scalar)
    if strategy == "dp_tp":
        return model_term + data_term
    # sp: replicated parameters see sequence shards, so their gradients are reduced over
    # 'model' too; the loss is reduced over both axes (one all-reduce over all devices).
    replicated = total - split
    return (model_term + _ring_all_reduce(n_m, replicated)
            + _ring_all_reduce(n_d, (total - split) + split / n_m)
            + _ring_all_reduce(n_d * n_m, scalar))


# ----------------------------------------------------------------------------- measuring

def _compiled_numbers(compiled, mesh, compile_s: float, run) -> Measured:
    from .runtime.hlo import parse_collectives
    hlo = parse_collectives(compiled.as_text(), mesh, strict=False)
    mem = compiled.memory_analysis()
    memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
              - mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Measured(wire_bytes=sum(c.wire_bytes for c in hlo),
                    counts=Counter(c.kind for c in hlo),
                    memory_bytes=int(memory), argument_bytes=int(mem.argument_size_in_bytes),
                    temp_bytes=int(mem.temp_size_in_bytes),
                    flops=float(cost.get("flops", float("nan"))), compile_s=compile_s,
                    step_s=_median_step_seconds(run))


def _median_step_seconds(run, repeats: int = 5) -> float:
    jax.block_until_ready(run())            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: str, mesh_shape: dict, strategy: str, *, config: dict | None = None,
            batch_size: int | None = None) -> Row:
    """Compile one (model, mesh, strategy) under autoshard and under ``jax.jit``; measure both."""
    from . import make_mesh, parallelize
    from .models import get_model, presets

    n = math.prod(mesh_shape.values())
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    axes = tuple(mesh.axis_names)
    m = get_model(model)
    cfg = m.Config(**(BENCH_CONFIGS.get(model, {}) if config is None else config))
    cfg = presets.configure(model, cfg, strategy, axes)
    batch_size = batch_size or BENCH_BATCH.get(model, 16)
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    opt_state = optimizer.init(params)
    batch = m.make_batch(cfg, batch_size, seed=0)
    step = m.make_train_step(model_def, optimizer)
    pspecs = presets.param_specs(model, params, strategy, axes, dict(mesh.shape))
    bspecs = presets.batch_specs(model, batch, strategy, axes)
    args = (params, opt_state, batch)

    # autoshard: pass time is trace + passes + lowering to StableHLO; XLA compiles after.
    pf = parallelize(step, mesh=mesh, in_specs=(pspecs, None, bspecs))
    t0 = time.perf_counter()
    lowered = pf.lower(*args)
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    ours_compile_s = time.perf_counter() - t0
    shardings = tuple(pf.input_shardings(*args))
    placed = jax.device_put(args, shardings)
    flat = jax.tree.leaves(placed)
    ours = _compiled_numbers(compiled, mesh, ours_compile_s, lambda: compiled(*flat))

    # XLA's propagation from the same annotations (optimizer state: see the module docstring).
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    in_shardings = (named(pspecs), shardings[1], named(bspecs))
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, in_shardings=in_shardings)
        t0 = time.perf_counter()
        jit_lowered = jitted.lower(*args)
        jit_lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jit_compiled = jit_lowered.compile()
        jit_compile_s = time.perf_counter() - t0
    jit_placed = jax.device_put(args, in_shardings)
    baseline = _compiled_numbers(jit_compiled, mesh, jit_compile_s, lambda: jit_compiled(*jit_placed))
    del jit_lower_s

    return Row(model=model, mesh=dict(mesh_shape), strategy=strategy, ours=ours, jit=baseline,
               pass_s=pass_s,
               analytic_bytes=analytic_min_bytes(model, cfg, batch_size, strategy, dict(mesh.shape),
                                                 params, pspecs),
               state_bytes=_nbytes(params) + _nbytes(opt_state))


def rows_to_measure(models=None, meshes=MESHES, strategies=None):
    """(model, mesh shape, strategy) for every pair that applies on each mesh."""
    from .models import MODEL_NAMES, presets
    for model in models or MODEL_NAMES:
        for mesh_kind in meshes:
            for strategy in presets.strategies(model):
                if strategies and strategy not in strategies:
                    continue
                shape = mesh_axes(mesh_kind, strategy)
                if shape is not None:
                    yield model, shape, strategy


# ----------------------------------------------------------------------------- tables

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
    return {
        "model": row.model, "mesh": row.mesh_text, "strategy": row.strategy,
        "wire_bytes": round(row.ours.wire_bytes), "jit_wire_bytes": round(row.jit.wire_bytes),
        "analytic_min_bytes": "" if row.analytic_bytes is None else round(row.analytic_bytes),
        "counts": _counts_text(row.ours.counts), "jit_counts": _counts_text(row.jit.counts),
        "memory_bytes": row.ours.memory_bytes, "jit_memory_bytes": row.jit.memory_bytes,
        "argument_bytes": row.ours.argument_bytes, "temp_bytes": row.ours.temp_bytes,
        "state_bytes": row.state_bytes,
        "flops": round(row.ours.flops), "jit_flops": round(row.jit.flops),
        "pass_s": f"{row.pass_s:.3f}", "compile_s": f"{row.ours.compile_s:.3f}",
        "jit_compile_s": f"{row.jit.compile_s:.3f}",
        "step_s": f"{row.ours.step_s:.5f}", "jit_step_s": f"{row.jit.step_s:.5f}",
        "note": row.note,
    }


def write_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row_record(row))
    return out.getvalue()


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "=" if a == 0 else "inf"
    return f"{a / b:.3f}"


def markdown_table(rows: list[Row]) -> str:
    head = ("| model | mesh | strategy | wire KiB | jit wire KiB | min KiB | ours/jit | ours/min "
            "| collectives | jit collectives | mem KiB | jit mem KiB | GFLOP | jit GFLOP "
            "| pass s | compile s | jit compile s | step ms | jit step ms | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.mesh_text} | {r.strategy} | {_kib(r.ours.wire_bytes)} "
            f"| {_kib(r.jit.wire_bytes)} | {'-' if r.analytic_bytes is None else _kib(r.analytic_bytes)} "
            f"| {_ratio(r.ours.wire_bytes, r.jit.wire_bytes)} "
            f"| {'-' if r.analytic_bytes is None else _ratio(r.ours.wire_bytes, r.analytic_bytes)} "
            f"| {_counts_text(r.ours.counts)} | {_counts_text(r.jit.counts)} "
            f"| {_kib(r.ours.memory_bytes)} | {_kib(r.jit.memory_bytes)} "
            f"| {r.ours.flops / 1e9:.4f} | {r.jit.flops / 1e9:.4f} "
            f"| {r.pass_s:.2f} | {r.ours.compile_s:.2f} | {r.jit.compile_s:.2f} "
            f"| {r.ours.step_s * 1e3:.2f} | {r.jit.step_s * 1e3:.2f} | {r.note} |")
    return "\n".join(lines)


def machine_line() -> str:
    devices = jax.devices()
    return (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
            f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}, "
            f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices")
