"""The benchmark's measurements: one (model, mesh, strategy) compiled under autoshard and under
``jax.jit``, pass time against program size, auto=True against the presets, and the checks
``RESULTS.md`` lists (see the package docstring for what is measured and the analytic
formulas).

>>> row = measure("gpt", {"data": 8}, "dp", repeats=0)                 # doctest: +SKIP
>>> row.ours.wire_bytes <= row.jit.wire_bytes, row.analytic_bytes        # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from ..compiler.cost_model import wire_bytes

_PIPELINE_STRATEGIES = ("pp",)

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
#: Layers of the scanned GPT under ``pp``: one per stage of the 2x4 mesh's ``'stage'`` axis.
PIPELINE_LAYERS = 4


def mesh_axes(mesh_kind: str, strategy: str) -> dict[str, int] | None:
    """The mesh of shape ``mesh_kind`` (``"8"`` or ``"2x4"``) with the axis names ``strategy``
    uses, or None where the strategy needs two axes and the mesh has one. ``pp`` runs on the
    2x4 mesh only, as ``data=2,stage=4`` (4 stages of the 4-layer scanned GPT)."""
    from ..models.presets import DATA_AXIS, EXPERT_AXIS, MODEL_AXIS, required_axes
    if strategy == "pp":
        return {DATA_AXIS: 2, "stage": 4} if mesh_kind == "2x4" else None
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
    jit: Measured | None          # None: jax.jit has no equivalent (pp: no pipeline baseline)
    pass_s: float
    analytic_bytes: float | None
    state_bytes: int              # parameters + optimizer state, whole (not per device)
    replicated_state_bytes: int   # of which leaves that stay whole on every device
    batch_bytes: int
    note: str = ""
    #: pp: the pipelined loops, ``(stages, microbatches, ticks, bytes_per_tick)`` each (report).
    pipelines: tuple = ()
    #: pp: wire bytes per step of the collective-permutes (loop trips included), from the report.
    permute_bytes: float = 0.0

    @property
    def mesh_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.mesh.items())


# ----------------------------------------------------------------------------- analytic

def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def analytic_min_bytes(model: str, cfg: Any, batch: int, strategy: str, mesh: dict,
                       params: dict, param_specs: dict) -> float | None:
    """The formulas of the package docstring (``autoshard/benchmark/__init__.py``); None where
    none is given for the pair."""
    scalar = 4.0
    n_d, n_m = mesh.get("data", 1), mesh.get("model", 1)
    total = float(_nbytes(params))
    if strategy == "dp":
        return wire_bytes("all-reduce", n_d, total + scalar)
    if strategy == "fsdp":
        # 'model', when the mesh has it, is idle: data parallel over it (passes/idle_axes.py).
        return (wire_bytes("all-reduce", n_d, total) + wire_bytes("all-reduce", n_m, total / n_d)
                + wire_bytes("all-reduce", n_d * n_m, scalar))
    if strategy == "pp" and model == "gpt":
        return pipeline_min_bytes(cfg, batch, mesh, params)
    if model not in ("gpt", "mlp") or strategy not in ("tp", "dp_tp", "sp"):
        return None
    itemsize = np.dtype(cfg.dtype).itemsize
    rows = batch // n_d if strategy in ("dp_tp", "sp") else batch   # tp: 'data' is idle
    if model == "gpt":
        reductions, activation = 4 * cfg.n_layers, rows * cfg.seq_len * cfg.d_model * itemsize
    else:
        # The first block's input is the batch: its gradient is not needed.
        reductions, activation = 2 * cfg.n_layers - 1, rows * cfg.d_model * itemsize
    model_term = wire_bytes("all-reduce", n_m, reductions * activation)
    if strategy == "tp":
        return model_term
    flat_params = jax.tree.leaves(params)
    flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    split = sum(_nbytes(p) for p, s in zip(flat_params, flat_specs) if any(a is not None for a in s))
    data_term = wire_bytes("all-reduce", n_d, (total - split) + split / n_m + scalar)
    if strategy == "dp_tp":
        return model_term + data_term
    # sp: replicated parameters see sequence shards, so their gradients are reduced over
    # 'model' too; the loss is reduced over both axes (one all-reduce over all devices).
    replicated = total - split
    return (model_term + wire_bytes("all-reduce", n_m, replicated)
            + wire_bytes("all-reduce", n_d, (total - split) + split / n_m)
            + wire_bytes("all-reduce", n_d * n_m, scalar))


def pipeline_min_bytes(cfg: Any, batch: int, mesh: dict, params: dict, microbatches: int | None = None) -> float:
    """``pp`` on a ``data x stage`` mesh (package docstring): the activation shifts of the forward
    and backward tick loops, the broadcast of the last stage's output (and of the input
    gradient) over ``stage``, and the data-parallel gradient all-reduce of this device's
    parameters (its stage's slice of the stacked layers, every unstacked one) and the loss."""
    n_d, S = mesh.get("data", 1), mesh["stage"]
    M = microbatches or S
    itemsize = np.dtype(cfg.dtype).itemsize
    activation = batch // n_d * cfg.seq_len * cfg.d_model * itemsize      # A: [B/n_d, T, D]
    permutes = 2 * (M + S - 1) * (activation / M)
    broadcasts = 2 * wire_bytes("all-reduce", S, activation)
    stacked = sum(_nbytes(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if getattr(path[0], "key", None) == "blocks")
    local = (_nbytes(params) - stacked) + stacked / S
    return permutes + broadcasts + wire_bytes("all-reduce", n_d, local + 4.0)


# ----------------------------------------------------------------------------- measuring

def _compiled_numbers(compiled, mesh, compile_s: float, run, repeats: int) -> Measured:
    from ..report.hlo import parse_collectives
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
                    step_s=_median_step_seconds(run, repeats))


def _timed(fn):
    """``(fn(), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _median_step_seconds(run, repeats: int = 5) -> float:
    if repeats <= 0:
        return float("nan")
    jax.block_until_ready(run())            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: str, mesh_shape: dict, strategy: str, *, config: dict | None = None,
            batch_size: int | None = None, repeats: int = 5) -> Row:
    """Compile one (model, mesh, strategy) under autoshard and under ``jax.jit``; measure both
    (``repeats=0`` skips the step timing)."""
    from .. import make_mesh, parallelize
    from ..models import get_model, presets

    n = math.prod(mesh_shape.values())
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    axes = tuple(mesh.axis_names)
    m = get_model(model)
    cfg = m.Config(**(BENCH_CONFIGS.get(model, {}) if config is None else config))
    if strategy == "pp" and config is None:
        cfg = dataclasses.replace(cfg, n_layers=PIPELINE_LAYERS)
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
    lowered, pass_s = _timed(lambda: pf.lower(*args))
    compiled, ours_compile_s = _timed(lowered.compile)
    shardings = tuple(pf.input_shardings(*args))
    placed = jax.device_put(args, shardings)
    flat = jax.tree.leaves(placed)
    ours = _compiled_numbers(compiled, mesh, ours_compile_s, lambda: compiled(*flat), repeats)
    common = dict(model=model, mesh=dict(mesh_shape), strategy=strategy, ours=ours, pass_s=pass_s,
                  analytic_bytes=analytic_min_bytes(model, cfg, batch_size, strategy, dict(mesh.shape),
                                                    params, pspecs),
                  state_bytes=_nbytes(params) + _nbytes(opt_state),
                  replicated_state_bytes=sum(
                      _nbytes(x) for x, sh in zip(jax.tree.leaves((params, opt_state)),
                                                  jax.tree.leaves(shardings[:2]))
                      if sh.is_fully_replicated),
                  batch_bytes=_nbytes(batch))
    if strategy in _PIPELINE_STRATEGIES:
        # The collectives of the tick loops sit in while bodies, which the HLO count takes once
        # per instruction: the wire bytes per step come from the report, loop trips included
        # (its per-instruction total equals the HLO's: tests/test_pipeline.py). jax.jit has no
        # pipeline to compare against.
        rep = pf.report(*args)
        ours.wire_bytes = rep.step_wire_bytes
        return Row(**common, jit=None,
                   pipelines=tuple((p.stages, p.microbatches, p.ticks, p.bytes_per_tick) for p in rep.pipeline),
                   permute_bytes=float(sum(c.wire_bytes * c.trips for c in rep.collectives
                                           if c.kind == "collective-permute")),
                   note="no jax.jit baseline: jit has no pipeline; compare with min")

    # XLA's propagation from the same annotations (optimizer state: see the module docstring).
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    in_shardings = (named(pspecs), shardings[1], named(bspecs))
    with jax.set_mesh(mesh):
        jit_compiled, jit_compile_s = _timed(jax.jit(step, in_shardings=in_shardings).lower(*args).compile)
    jit_placed = jax.device_put(args, in_shardings)
    baseline = _compiled_numbers(jit_compiled, mesh, jit_compile_s, lambda: jit_compiled(*jit_placed), repeats)

    return Row(**common, jit=baseline)


def rows_to_measure(models=None, meshes=MESHES, strategies=None):
    """(model, mesh shape, strategy) for every pair that applies on each mesh."""
    from ..models import MODEL_NAMES, presets
    for model in models or MODEL_NAMES:
        for mesh_kind in meshes:
            for strategy in presets.strategies(model) + presets.PIPELINE_STRATEGIES.get(model, ()):
                if strategies and strategy not in strategies:
                    continue
                shape = mesh_axes(mesh_kind, strategy)
                if shape is not None:
                    yield model, shape, strategy


# ----------------------------------------------------------------------------- scaling

@dataclasses.dataclass
class ScalingPoint:
    layers: int
    equations: int
    front_end_s: float      # trace + passes + lowering to StableHLO
    passes_s: float         # import_annotations .. verify (autoshard's own passes)
    trace_s: float
    compile_s: float | None = None   # XLA compile of the same program (12 layers only)


def scaling_point(layers: int, mesh_shape: dict, strategy: str = "dp_tp",
                  compile_too: bool = False, repeats: int = 1) -> ScalingPoint:
    """Pass time of the GPT step with ``layers`` unrolled layers (fresh caches each time); with
    ``repeats`` > 1 the fastest of that many runs of each time (the machine's other load only
    ever adds time)."""
    if repeats > 1:
        points = [scaling_point(layers, mesh_shape, strategy, compile_too) for _ in range(repeats)]
        fastest = lambda attr: min(getattr(p, attr) for p in points)
        return ScalingPoint(layers, points[0].equations, fastest("front_end_s"), fastest("passes_s"),
                            fastest("trace_s"), fastest("compile_s") if compile_too else None)
    from .. import make_mesh, parallelize
    from ..compiler import factors
    from ..models import get_model, presets
    factors.clear_caches()
    n = math.prod(mesh_shape.values())
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    axes = tuple(mesh.axis_names)
    m = get_model("gpt")
    cfg = m.Config(**{**BENCH_CONFIGS["gpt"], "n_layers": layers})
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    opt_state = optimizer.init(params)
    batch = m.make_batch(cfg, BENCH_BATCH["gpt"], seed=0)
    pf = parallelize(m.make_train_step(model_def, optimizer), mesh=mesh,
                     in_specs=(presets.param_specs("gpt", params, strategy, axes, dict(mesh.shape)),
                               None, presets.batch_specs("gpt", batch, strategy, axes)))
    t0 = time.perf_counter()
    lowered = pf.lower(params, opt_state, batch)
    front_end = time.perf_counter() - t0
    program = pf.program(params, opt_state, batch)
    passes = sum(v for k, v in program.pass_seconds.items() if k != "trace")
    compile_s = None
    if compile_too:
        t0 = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - t0
    return ScalingPoint(layers, sum(1 for _ in program.graph.all_eqns()), front_end, passes,
                        program.pass_seconds.get("trace", float("nan")), compile_s)


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns ``(a, b, r2)``."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), 1.0 - ss_res / ss_tot if ss_tot else 1.0


# ----------------------------------------------------------------------------- checks

def ratio_text(a: float, b: float) -> str:
    """``a / b`` to three places (``=`` for 0 / 0, ``inf`` for a / 0)."""
    if b == 0:
        return "=" if a == 0 else "inf"
    return f"{a / b:.3f}"


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str


#: The three yardsticks against ``jax.jit`` on the same annotations: (name, ``Measured`` field,
#: the largest ratio ours / jit that passes). Memory's 2% is for the noise of XLA's buffer
#: assignment between two programs that hold the same tensors, not for a known gap.
YARDSTICKS = (("wire bytes", "wire_bytes", 1.00), ("flops", "flops", 1.00), ("memory", "memory_bytes", 1.02))


def yardstick_checks(pairs) -> list[Check]:
    """One check per yardstick over ``pairs`` of ``(row label, ours, jit)`` (``Measured`` each;
    ``ours`` None where autoshard could not compile the row, which fails every yardstick). The
    ratio is judged as the tables print it, to three places: 1.0004x is XLA counting a few
    scalar ops of a million differently, 1.001x is over."""
    out = []
    for name, attr, limit in YARDSTICKS:
        over = []
        for label, ours, jit in pairs:
            if ours is None:
                over.append(f"{label} (autoshard did not compile it)")
            elif round(getattr(ours, attr) / max(getattr(jit, attr), 1e-300), 3) > limit:
                over.append(f"{label} ({ratio_text(getattr(ours, attr), getattr(jit, attr))}x)")
        out.append(Check(f"{name} <= {limit:.2f}x jax.jit's in every row", bool(pairs) and not over,
                         f"all {len(pairs)} rows" if not over else f"{len(over)} of {len(pairs)} rows over: "
                         + "; ".join(over)))
    return out


def checks(rows: list[Row], scaling: list[ScalingPoint], reference: ScalingPoint | None) -> list[Check]:
    """The issue's must-show list, evaluated on this run's numbers."""
    out = yardstick_checks([(f"{r.model} {r.mesh_text} {r.strategy}", r.ours, r.jit)
                            for r in rows if r.jit is not None])
    near = [r for r in rows if r.model == "gpt" and r.strategy in ("dp", "fsdp", "tp")]
    off = [r for r in near if r.analytic_bytes is None
           or abs(r.ours.wire_bytes - r.analytic_bytes) > 0.01 * r.analytic_bytes]
    out.append(Check(
        "GPT dp, fsdp, tp: wire bytes within 1% of the analytic minimum", bool(near) and not off,
        ", ".join(f"{r.strategy} on {r.mesh_text}: {ratio_text(r.ours.wire_bytes, r.analytic_bytes or 0)}"
                  for r in near)))
    for r in rows:
        if r.strategy != "fsdp":
            continue
        n = r.mesh.get("data", 1)          # fsdp shards over 'data' only
        # Arguments are this device's parameters, optimizer state and batch; outputs the
        # updated state (no donation here); temporaries the gathered parameters, gradients and
        # activations. Leaves no mesh axis divides (biases of odd size, Adam's step count)
        # stay whole on every device.
        split = r.state_bytes - r.replicated_state_bytes
        bound = split / n + r.replicated_state_bytes + r.batch_bytes / n
        out.append(Check(
            f"fsdp memory, {r.model} on {r.mesh_text}: per-device state <= 1/{n} of parameters "
            f"+ optimizer state", r.ours.argument_bytes <= bound * 1.001,
            f"arguments {r.ours.argument_bytes:,} B vs 1/{n} of the split state {split / n:,.0f} B + "
            f"whole leaves {r.replicated_state_bytes:,} B + batch share {r.batch_bytes / n:,.0f} B "
            f"= {bound:,.0f} B (whole state {r.state_bytes:,} B); temporaries (activations, "
            f"gathered parameters, gradients) {r.ours.temp_bytes:,} B; total {r.ours.memory_bytes:,} B"))
    for r in rows:
        if not r.pipelines:
            continue
        # The activation shifts: per loop, (M+S-1) ticks of one microbatch's activation.
        want = sum(ticks * per_tick for _, _, ticks, per_tick in r.pipelines)
        out.append(Check(
            f"pp, {r.model} on {r.mesh_text}: activation collective-permutes = 2 (M+S-1) x microbatch "
            f"activation", len(r.pipelines) == 2 and abs(r.permute_bytes - want) <= 1e-6 * max(want, 1),
            f"{len(r.pipelines)} pipelined loops (S, M, ticks, bytes/tick) {list(r.pipelines)}: "
            f"{r.permute_bytes:,.0f} B of permutes vs {want:,.0f} B; all collectives "
            f"{ratio_text(r.ours.wire_bytes, r.analytic_bytes or 0)}x the analytic minimum"))
    if reference is not None and reference.compile_s:
        out.append(Check(
            f"{reference.layers}-layer GPT: autoshard's passes <= 25% of XLA compile time",
            reference.passes_s <= 0.25 * reference.compile_s,
            f"passes {reference.passes_s:.2f} s = {reference.passes_s / reference.compile_s:.0%} of "
            f"XLA's {reference.compile_s:.2f} s; with JAX's trace and lowering to StableHLO the "
            f"front end is {reference.front_end_s:.2f} s = {reference.front_end_s / reference.compile_s:.0%}"))
    if len(scaling) >= 3:
        a, b, r2 = linear_fit([p.equations for p in scaling], [p.passes_s for p in scaling])
        per_eqn = [p.passes_s / p.equations for p in scaling]
        out.append(Check(
            "pass time linear in jaxpr size (R^2 >= 0.95)", r2 >= 0.95,
            f"slope {b * 1e6:.1f} us per equation, intercept {a:.2f} s, R^2 {r2:.3f}; "
            f"time per equation from {per_eqn[0] * 1e6:.1f} to {per_eqn[-1] * 1e6:.1f} us"))
    return out


# ----------------------------------------------------------------------------- one device

#: Peak dense f32/bf16 flops per second, for MFU; only devices listed here get an MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def single_device_row(layers: int = 12) -> dict:
    """The GPT step on one device: autoshard on a 1-device mesh against plain ``jax.jit``
    (step time, and MFU where the device's peak is known)."""
    from .. import make_mesh, parallelize
    from ..models import get_model
    m = get_model("gpt")
    cfg = m.Config(**{**BENCH_CONFIGS["gpt"], "n_layers": layers})
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    args = (params, optimizer.init(params), m.make_batch(cfg, BENCH_BATCH["gpt"], seed=0))
    step = m.make_train_step(model_def, optimizer)
    device = jax.devices()[0]
    pf = parallelize(step, mesh=make_mesh({"data": 1}, devices=[device]))
    ours = pf.lower(*args).compile()
    flat = jax.tree.leaves(jax.device_put(args, tuple(pf.input_shardings(*args))))
    jit = jax.jit(step).lower(*args).compile()
    placed = jax.device_put(args, device)
    flops = float((jit.cost_analysis()[0] if isinstance(jit.cost_analysis(), (list, tuple))
                   else jit.cost_analysis()).get("flops", float("nan")))
    ours_s = _median_step_seconds(lambda: ours(*flat), repeats=20)
    jit_s = _median_step_seconds(lambda: jit(*placed), repeats=20)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
    mfu = (lambda s: f"{flops / s / peak:.1%}") if peak else (lambda s: "-")
    return {"device": device.device_kind, "layers": layers, "flops": flops,
            "ours_ms": ours_s * 1e3, "jit_ms": jit_s * 1e3, "ours_mfu": mfu(ours_s),
            "jit_mfu": mfu(jit_s)}


# ----------------------------------------------------------------------------- auto=True

def auto_rows(layers=(12, 24), rates=(None, 1e10)) -> list[dict]:
    """GPT with only the batch annotated on data=2,model=4: the auto plan against every preset
    under the same cost model (estimated step: compute at ``rate`` + collectives), its wire
    bytes from the compiled HLO, and the search time per depth."""
    from jax.sharding import PartitionSpec as P

    from .. import make_mesh, parallelize
    from ..models import get_model, presets
    from ..report.hlo import parse_collectives
    from ..report.strategy import estimated_step_seconds
    mesh = make_mesh({"data": 2, "model": 4})
    axes = tuple(mesh.axis_names)
    m = get_model("gpt")
    out = []
    for n_layers in layers:
        cfg = m.Config(**{**BENCH_CONFIGS["gpt"], "n_layers": n_layers})
        model_def, params = m.init(cfg, seed=0)
        optimizer = m.default_optimizer()
        args = (params, optimizer.init(params), m.make_batch(cfg, BENCH_BATCH["gpt"], seed=0))
        step = m.make_train_step(model_def, optimizer)
        for rate in rates:
            auto = {"compute_rate": rate} if rate else True
            pf = parallelize(step, mesh=mesh, in_specs=(None, None, {"tokens": P("data", None),
                                                                       "labels": P("data", None)}),
                             auto=auto)
            program = pf.program(*args)
            rate = program.search_compute_rate
            row = {"layers": n_layers, "rate": rate, "solve_s": program.search.solve_seconds,
                   "nodes": program.search.nodes, "variables": program.search.variables,
                   "auto_s": estimated_step_seconds(program, rate)["total_s"],
                   "auto_bytes": sum(c.wire_bytes for c in parse_collectives(
                       pf.lower(*args).compile().as_text(), mesh))}
            if n_layers == layers[0]:
                for strategy in ("dp", "fsdp", "tp", "dp_tp"):
                    specs = (presets.param_specs("gpt", params, strategy, axes, dict(mesh.shape)), None,
                             presets.batch_specs("gpt", args[2], strategy, axes))
                    other = parallelize(step, mesh=mesh, in_specs=specs)
                    row[f"{strategy}_s"] = estimated_step_seconds(other.program(*args), rate)["total_s"]
                    row[f"{strategy}_bytes"] = other.report(*args).total_wire_bytes
            out.append(row)
    return out


# ----------------------------------------------------------------------------- the run

#: Why a row moves more bytes than jax.jit, keyed (model, strategy); filled from the run's
#: own numbers and the report, never guessed. Rows without a note fail the check.
NOTES: dict = {}

SCALING_LAYERS = (2, 4, 8, 16, 32, 64)


def run(models=None, meshes=MESHES, strategies=None, scaling_layers=SCALING_LAYERS,
        reference_layers: int = 12, progress=print, auto_layers=(12, 24)) -> dict:
    """Measure everything; returns ``{"rows", "scaling", "reference", "single", "auto",
    "checks"}``."""
    rows = []
    for model, shape, strategy in rows_to_measure(models, meshes, strategies):
        progress(f"  {model} {shape} {strategy} ...")
        row = measure(model, shape, strategy)
        row.note = NOTES.get((model, strategy), "") or row.note
        rows.append(row)
    scaling = []
    for layers in scaling_layers:
        progress(f"  scaling: gpt with {layers} layers ...")
        scaling.append(scaling_point(layers, {"data": 2, "model": 4}))
    reference = None
    if reference_layers:
        progress(f"  {reference_layers}-layer gpt: passes against XLA compile ...")
        reference = scaling_point(reference_layers, {"data": 2, "model": 4}, compile_too=True, repeats=3)
    auto = []
    if auto_layers:
        progress(f"  auto=True on gpt with {auto_layers} layers ...")
        auto = auto_rows(tuple(auto_layers))
    single = None
    if jax.devices()[0].platform == "gpu":
        progress("  one GPU: step time against jax.jit ...")
        single = single_device_row(reference_layers or 12)
    found = checks(rows, scaling, reference)
    found += auto_checks(auto)
    return {"rows": rows, "scaling": scaling, "reference": reference, "single": single,
            "auto": auto, "checks": found}


def auto_checks(rows: list[dict]) -> list[Check]:
    out = []
    for r in rows:
        if "tp_s" in r:
            best = min(r[s + "_s"] for s in ("dp", "fsdp", "tp", "dp_tp"))
            out.append(Check(f"auto on {r['layers']}-layer GPT at {r['rate']:.0e} points/s: estimated "
                             f"step <= the best preset's", r["auto_s"] <= best * (1 + 1e-9),
                             f"auto {r['auto_s'] * 1e3:.3f} ms, best preset {best * 1e3:.3f} ms "
                             f"({r['auto_s'] / best - 1:+.1%})"))
    by_rate = defaultdict(dict)
    for r in rows:
        by_rate[r["rate"]][r["layers"]] = r["solve_s"]
    for rate, times in by_rate.items():
        if len(times) >= 2:
            small, large = min(times), max(times)
            out.append(Check(f"auto search time at {rate:.0e}: {large} layers <= 10 s and <= 2x {small} layers",
                             times[large] <= 10 and times[large] <= 2 * times[small],
                             f"{times[small]:.2f} s for {small} layers, {times[large]:.2f} s for {large}"))
    return out
