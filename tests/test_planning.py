"""Planning without devices (issue #8): abstract meshes, per-step memory and communication
estimates, and their validation against what XLA compiles on the 8-device CPU mesh.

Fast tests run by default; the 128-layer plan is ``slow`` (``pytest -q -m slow
tests/test_planning.py``).
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard import compat
from autoshard.errors import PlanningOnlyError
from autoshard.models import MODEL_NAMES, get_model, gpt, presets
from autoshard.report.hlo import parse_collectives


# Validation pairs: every reference model under every strategy it has, on the 8-device mesh
# with the axes the strategy needs (all of them: ~60 s on 2 CPU cores).
# Pairs whose memory model is known to miss XLA's step memory (xfail, with the reason). cnn fsdp
# was one while its last block's backward ran all-to-alls (XLA CPU's tuple buffers); it has none
# since the head's input gradient stays split over the batch (compiler/factors.py).
_MEMORY_MODEL_GAPS: dict = {}
# gpt fsdp_tp on JAX 0.12: XLA 0.12's buffer assignment reuses more of the step's temporaries
# than report/memory.py models (XLA 0.10's): XLA's temporaries are 198 KiB on 0.12.1 against
# 211 KiB on 0.10.2 for the same plan, and the estimate is 1.12x XLA's there (1.06x on 0.10.2).
if compat.JAX_VERSION >= (0, 12):
    _MEMORY_MODEL_GAPS[("gpt", "fsdp_tp")] = ("memory model: XLA 0.12's temporaries for the fsdp_tp plan "
                                             "(report/memory.py models XLA 0.10's buffer reuse)")


def _pairs():
    return [pytest.param(name, strategy, id=f"{name}-{strategy}",
                         marks=[pytest.mark.xfail(reason=_MEMORY_MODEL_GAPS[name, strategy], strict=False)]
                         if (name, strategy) in _MEMORY_MODEL_GAPS else [])
            for name in MODEL_NAMES for strategy in presets.strategies(name)]


def _mesh_axes(strategy):
    """An 8-device mesh with the axes ``strategy`` needs (``ep``: experts over 4 devices)."""
    return "data=2,expert=4" if "expert" in presets.required_axes(strategy) else "data=2,model=4"


def _plan(cfg, mesh, strategy, batch_size, optimizer=None):
    """(report, pf, params, opt_state, batch) of the GPT step, all abstract."""
    model_def, params = gpt.abstract_init(cfg)
    opt = optimizer or gpt.default_optimizer()
    opt_state = jax.eval_shape(opt.init, params)
    batch = gpt.abstract_batch(cfg, batch_size)
    axes, shape = tuple(mesh.axis_names), dict(mesh.shape)
    in_specs = (presets.param_specs("gpt", params, strategy, axes, shape), None,
                presets.batch_specs("gpt", batch, strategy, axes))
    pf = ash.parallelize(gpt.make_train_step(model_def, opt), mesh=mesh, in_specs=in_specs)
    return pf.report(params, opt_state, batch), pf, params, opt_state, batch


# ----------------------------------------------------------------------------- abstract meshes

def test_abstract_mesh_plans_without_devices_and_refuses_to_run():
    mesh = ash.abstract_mesh("data=16,fsdp=16,model=8")
    assert isinstance(mesh, jax.sharding.AbstractMesh) and math.prod(mesh.shape.values()) == 2048
    rep, pf, params, opt_state, batch = _plan(gpt.SIZES["test"], mesh, "fsdp_tp", 256)
    assert rep.collectives and rep.step_wire_bytes > 0
    mem = rep.memory()
    assert mem["parameters"] > 0 and mem["step_total"] >= mem["arguments"]
    with pytest.raises(PlanningOnlyError, match="planning"):
        pf(params, opt_state, batch)
    with pytest.raises(PlanningOnlyError):
        rep.memory(compiled=True)


def test_abstract_init_matches_init_and_param_count():
    cfg = gpt.SIZES["test"]
    _, real = gpt.init(cfg)
    _, abstract = gpt.abstract_init(cfg)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), real) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    assert gpt.param_count(cfg) == sum(x.size for x in jax.tree.leaves(real))
    assert 0.95e12 < gpt.param_count(gpt.SIZES["1t"]) < 1.05e12
    assert 0.9e9 < gpt.param_count(gpt.SIZES["1b"]) < 1.1e9


def test_fsdp_tp_specs_on_three_axes():
    _, params = gpt.abstract_init(dataclasses.replace(gpt.SIZES["test"], scan_layers=True))
    specs = presets.param_specs("gpt", params, "fsdp_tp", ("data", "fsdp", "model"),
                                {"data": 2, "fsdp": 2, "model": 2})
    assert specs["blocks"]["attn"]["q"]["kernel"] == P(None, "fsdp", "model")
    assert specs["blocks"]["mlp"]["down"]["kernel"] == P(None, "model", "fsdp")
    assert specs["tok_emb"]["embedding"] == P("fsdp", None)
    batch = gpt.abstract_batch(gpt.SIZES["test"], 8)
    assert presets.batch_specs("gpt", batch, "fsdp_tp", ("data", "fsdp", "model"))["tokens"] == \
        P(("data", "fsdp"), None)


def test_loop_trips_multiply_step_bytes():
    cfg = dataclasses.replace(gpt.SIZES["test"], scan_layers=True, n_layers=3)
    rep, *_ = _plan(cfg, ash.abstract_mesh("data=2,model=4"), "dp_tp", 8)
    in_loop = [c for c in rep.collectives if c.trips > 1]
    assert in_loop and all(c.trips == 3 for c in in_loop)
    assert rep.step_wire_bytes == pytest.approx(sum(c.wire_bytes * c.trips for c in rep.collectives))
    assert rep.step_wire_bytes > rep.total_wire_bytes
    comm = rep.communication()
    assert sum(r["wire_bytes"] for r in comm.values()) == pytest.approx(rep.step_wire_bytes)
    slow = rep.with_links({"model": (1e-3, 1e9)}).communication()["model"]["time_s"]
    assert slow > comm["model"]["time_s"]


def test_pass_time_does_not_grow_with_device_count():
    cfg = dataclasses.replace(gpt.SIZES["test"], n_layers=2)
    # The same 'model' size on both: the test GPT's 4 heads do not divide 8, so both plans are
    # also made on a mesh with 'model' cut into sub-axes (passes/refine_mesh.py), a second plan
    # whatever the device count.
    shapes = ("data=2,fsdp=2,model=8", "data=16,fsdp=16,model=8")
    runs = {shape: [] for shape in shapes}
    # Interleaved, and the fastest of each: other work on the 2 shared cores only ever adds
    # time, so a burst of it lands on both meshes' runs and the minimum is the pass's own.
    for _ in range(3):
        for shape in shapes:
            rep, *_ = _plan(cfg, ash.abstract_mesh(shape), "fsdp_tp", 256)
            runs[shape].append(sum(v for k, v in rep.program.pass_seconds.items() if k != "trace"))
    times = {shape: min(r) for shape, r in runs.items()}
    small, big = times.values()
    # The claim is < 10% (measured in the README); 2 shared CPU cores make timings noisy.
    assert big < 1.5 * small + 0.05, times


# ----------------------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def mesh8():
    return ash.make_mesh("data=2,model=4")


def _real_step(name, strategy, mesh, config=None):
    m = get_model(name)
    axes = tuple(mesh.axis_names)
    cfg = presets.configure(name, config or m.Config(), strategy, axes)
    model_def, params = m.init(cfg, seed=0)
    opt = m.default_optimizer()
    batch = m.make_batch(cfg, 8, seed=0)
    in_specs = (presets.param_specs(name, params, strategy, axes, dict(mesh.shape)), None,
                presets.batch_specs(name, batch, strategy, axes))
    pf = ash.parallelize(m.make_train_step(model_def, opt), mesh=mesh, in_specs=in_specs)
    return pf.report(params, opt.init(params), batch)


def _check_memory(rep):
    """Arguments exact, outputs exact up to XLA's tuple index table (8 bytes each), and the
    step's memory estimate within 10% of memory_analysis()."""
    mem = rep.memory(compiled=True)
    xla = mem["xla"]
    assert mem["arguments"] == xla["argument_size_in_bytes"]
    assert abs(mem["outputs"] + 8 * len(rep.program.graph.outvars) - xla["output_size_in_bytes"]) <= 64
    ratio = mem["step_total"] / xla["total_in_bytes"]
    assert abs(ratio - 1) <= 0.10, (ratio, mem)
    return mem


@pytest.mark.parametrize("name,strategy", _pairs())
def test_estimates_against_compiled_program(name, strategy):
    rep = _real_step(name, strategy, ash.make_mesh(_mesh_axes(strategy)))
    _check_memory(rep)
    # Communication: the planned collectives are the compiled ones, byte for byte.
    hlo = rep.hlo_collectives()
    assert sum(c.wire_bytes for c in hlo) == pytest.approx(rep.total_wire_bytes)
    assert rep.step_wire_bytes == pytest.approx(rep.total_wire_bytes)     # no loops here


@pytest.mark.parametrize("strategy", ["dp", "dp_tp"])
def test_scanned_estimates_match_compiled(strategy, mesh8):
    cfg = dataclasses.replace(gpt.SIZES["test"], scan_layers=True)
    rep = _real_step("gpt", strategy, mesh8, cfg)
    _check_memory(rep)
    hlo = parse_collectives(rep.compiled().as_text(), mesh8)
    # The HLO text holds each loop-body collective once: compare per occurrence, then check
    # that exactly the loop-body ones are multiplied by the layer count per step.
    assert sum(c.wire_bytes for c in hlo) == pytest.approx(rep.total_wire_bytes)
    assert rep.step_wire_bytes == pytest.approx(sum(c.wire_bytes * c.trips for c in rep.collectives))
    if strategy == "dp_tp":
        assert {c.trips for c in rep.collectives} == {1, cfg.n_layers}


# ----------------------------------------------------------------------------- at scale (slow)

def _analytic_fsdp_tp(cfg, mesh_shape, batch_size):
    """Per-device bytes of the fsdp_tp GPT step from the architecture alone (Adam, bf16).

    Parameters: Megatron-split ones over fsdp x model, the rest over fsdp. Communication per
    step: block weights all-gathered over fsdp in the forward and again in the backward pass,
    top-level weights once; every gradient reduce-scattered over fsdp and its shard
    all-reduced over data; per layer two [b, T, D] all-reduces over model forward (bf16)
    and two backward (f32, after the layernorms' upcast)."""
    n_d, n_f, n_m = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["model"]
    d, f, v, t, layers = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.seq_len, cfg.n_layers
    item = 2
    tp_block = 4 * d * d + 3 * d + 2 * d * f + f             # split over model
    rest_block = d + d + 4 * d                              # out/down biases, two layernorms
    top = v * d + t * d + 2 * d + d * v + v
    shard = lambda n, split: n * item / (n_f * (n_m if split else 1))
    params = layers * (shard(tp_block, True) + shard(rest_block, False)) + shard(top, False)
    gather = lambda n, split: (n_f - 1) * shard(n, split)
    ag = 2 * layers * (gather(tp_block, True) + gather(rest_block, False)) + gather(top, False)
    rs = (n_f - 1) / n_f * n_f * params
    ar_data = 2 * (n_d - 1) / n_d * params
    b = batch_size // (n_d * n_f)
    act = b * t * d
    ar_model = layers * 2 * 2 * (n_m - 1) / n_m * act * (item + 4)
    return {"parameters": params, "optimizer_state": 2 * params, "gradients": params,
            "fsdp": ag + rs, "data": ar_data, "model": ar_model}


def test_1t_gpt_on_2048_devices_under_a_minute_and_matches_the_formulas():
    cfg, shape = gpt.SIZES["1t"], {"data": 16, "fsdp": 16, "model": 8}
    t0 = time.perf_counter()
    rep, *_ = _plan(cfg, ash.abstract_mesh(shape), "fsdp_tp", 256)
    mem, comm = rep.memory(), rep.communication()
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, elapsed
    want = _analytic_fsdp_tp(cfg, shape, 256)
    for key in ("parameters", "gradients"):
        assert mem[key] == pytest.approx(want[key], rel=0.05), key
    assert mem["optimizer_state"] == pytest.approx(want["optimizer_state"], rel=0.05)
    for axis in ("fsdp", "data", "model"):
        assert comm[axis]["wire_bytes"] == pytest.approx(want[axis], rel=0.05), (axis, comm[axis], want[axis])


@pytest.mark.slow
def test_128_layer_unrolled_gpt_plans_under_a_minute():
    # From the config to the report's tables, all of it timed: the 128-block abstract nnx
    # model (gpt.abstract_init, ~0.3 s), the trace, the passes and rep.memory()
    # (measured: 21 s in all; trace 9 s, passes 6 s, report 3 s).
    t0 = time.perf_counter()
    cfg = dataclasses.replace(gpt.SIZES["test"], n_layers=128)
    rep, *_ = _plan(cfg, ash.abstract_mesh("data=2,model=4"), "dp_tp", 8)
    rep.memory()
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, (elapsed, rep.program.pass_seconds)
    assert len(rep.collectives) >= 4 * 128
