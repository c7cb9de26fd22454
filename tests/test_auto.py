"""Issue #6: ``auto=True`` chooses every layout the annotations leave open by a MILP.

The search minimises the same cost model the report's estimate uses, plus per-device work at
``compute_rate`` points per second. At this test's sizes, with the default rate (a fast
device), communication latency dwarfs compute and replicating most work is genuinely cheapest;
the tests that compare with the presets use a slow device (compute-bound, where splitting work
pays, as it does for real models), stated in each test.
"""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, count
from autoshard.errors import NoFeasiblePlanError
from autoshard.models import get_model, presets
from autoshard.report.strategy import describe_layers, estimated_step_seconds

GPT_CFG = dict(vocab_size=128, d_model=32, n_heads=8, seq_len=16)
SLOW_DEVICE = 1e10        # points per second: compute-bound regime


def _gpt(n_layers, batch_size=8, **config):
    m = get_model("gpt")
    cfg = m.Config(**GPT_CFG, n_layers=n_layers, **config)
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    batch = m.make_batch(cfg, batch_size, seed=0)
    return m.make_train_step(model_def, optimizer), (params, optimizer.init(params), batch)


def _auto(step, mesh, batch_spec, **options):
    budget = options.pop("memory_budget", None)
    return ash.parallelize(step, mesh=mesh, in_specs=(None, None, batch_spec),
                           auto=options or True, memory_budget=budget)


def _preset(model, step, args, strategy, mesh):
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs(model, args[0], strategy, axes, dict(mesh.shape)), None,
             presets.batch_specs(model, args[2], strategy, axes))
    return ash.parallelize(step, mesh=mesh, in_specs=specs)


def _gpt_preset_costs(step, args, mesh, rate) -> dict:
    """Estimated step seconds of every GPT preset on ``mesh`` under the search's cost model."""
    return {s: estimated_step_seconds(_preset("gpt", step, args, s, mesh).program(*args), rate)["total_s"]
            for s in ("dp", "fsdp", "tp", "dp_tp")}


def _close(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want[2]))
    assert_tree_close(got[2], want[2], rtol=1e-4, atol=1e-5 * scale)       # optimizer state


@pytest.mark.parametrize("rate", [None, pytest.param(SLOW_DEVICE, marks=pytest.mark.slow)])
def test_gpt_12_layers_batch_only_against_every_preset_and_equals_one_device(rate):
    """At either rate the plan must cost no more than the best preset (dp, fsdp, tp, dp_tp).
    The search prices partials passed on through sums and products (PassPartial), so the
    Megatron plan's single reduction of the q, k and v input gradients is among its choices."""
    step, args = _gpt(12)
    mesh = ash.make_mesh("data=2,model=4")
    batch_spec = {"tokens": P("data", None), "labels": P("data", None)}
    pf = _auto(step, mesh, batch_spec, **({"compute_rate": rate} if rate else {}))
    program = pf.program(*args)
    rate = program.search_compute_rate
    auto_cost = estimated_step_seconds(program, rate)["total_s"]
    costs = _gpt_preset_costs(step, args, mesh, rate)
    assert auto_cost <= min(costs.values()) * (1 + 1e-9), (auto_cost, costs)
    # The report of the auto plan is the compiled program's, and the program is exact.
    assert_report_matches_hlo(pf, *args)
    _close(pf(*args), jax.jit(step)(*args))
    # The batch annotation is kept, and every layer's strategy is named.
    assert program.layouts[program.graph.invars[-1]].dims[0] == ("data",)
    words = describe_layers(program)
    assert {f"blocks.{i}.mlp" for i in range(12)} <= set(words)
    assert all(w for w in words.values())


def test_problem_does_not_grow_with_depth():
    mesh = ash.make_mesh("data=2,model=4")
    batch_spec = {"tokens": P("data", None), "labels": P("data", None)}
    sizes = []
    for layers in (12, 24):
        step, args = _gpt(layers)
        search = _auto(step, mesh, batch_spec).program(*args).search
        sizes.append((search.nodes, search.edges, search.variables))
        assert search.status.endswith("Optimal)"), search.status
    assert sizes[0] == sizes[1], sizes


def test_memory_budget_that_dp_cannot_meet_gives_sharded_parameters():
    """The budget bounds per-device inputs, outputs and activations kept for backward. It is
    set under what dp's arguments and outputs alone take; the plan's, from memory_analysis(),
    plus its activations kept for backward (the report's estimate), fit in it."""
    step, args = _gpt(2)
    mesh = ash.make_mesh("data=2,model=4")
    batch_spec = {"tokens": P("data", None), "labels": P("data", None)}

    def analysis(pf):
        return pf.lower(*args).compile().memory_analysis()

    dp = analysis(_preset("gpt", step, args, "dp", mesh))
    dp_state = dp.argument_size_in_bytes + dp.output_size_in_bytes
    # dp keeps parameters and both Adam moments whole, in and out (6 copies), and its
    # activations split over data only: 40% of its total is well under its state alone.
    budget = int(0.4 * (dp_state + dp.temp_size_in_bytes))
    assert budget < dp_state
    pf = _auto(step, mesh, batch_spec, memory_budget=budget)
    mem = analysis(pf)
    kept = pf.report(*args).memory()["activations_for_backward"]
    assert mem.argument_size_in_bytes + mem.output_size_in_bytes + kept <= budget
    program = pf.program(*args)
    params = [v for v, p in zip(program.graph.invars, program.in_paths) if p.startswith("args[0]")]
    sizes = program.axis_sizes
    whole = sum(np.prod(v.shape) for v in params)
    per_device = sum(np.prod(program.layouts[v].local_shape(v.shape, sizes)) for v in params)
    assert per_device < 0.9 * whole, (per_device, whole)
    # State leaves as it came in: the step can be fed its own outputs.
    assert pf.output_shardings(*args)[1] == pf.input_shardings(*args)[0]
    _close(pf(*args), jax.jit(step)(*args))


def test_budget_nothing_can_meet_raises_a_typed_error():
    step, args = _gpt(1)
    mesh = ash.make_mesh("data=2,model=4")
    pf = _auto(step, mesh, {"tokens": P("data", None), "labels": P("data", None)}, memory_budget=1)
    with pytest.raises(NoFeasiblePlanError, match="memory_budget"):
        pf.program(*args)


def test_annotations_are_constraints():
    step, args = _gpt(1)
    mesh = ash.make_mesh("data=2,model=4")
    specs = jax.tree.map(lambda _: None, args[0])
    specs["blocks"]["0"]["mlp"]["up"]["kernel"] = P("model", None)     # an odd choice, kept
    pf = ash.parallelize(step, mesh=mesh, in_specs=(specs, None, P("data")), auto=True)
    program = pf.program(*args)
    k = program.in_paths.index("args[0]['blocks']['0']['mlp']['up']['kernel']")
    assert program.layouts[program.graph.invars[k]].dims == (("model",), ())
    _close(pf(*args), jax.jit(step)(*args))


def test_moe_auto_chooses_expert_parallelism_when_cheaper():
    m = get_model("moe")
    cfg = m.Config()
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    args = (params, optimizer.init(params), m.make_batch(cfg, 16, seed=0))
    step = m.make_train_step(model_def, optimizer)
    mesh = ash.make_mesh("expert=8")
    rate = 1e9                 # compute-bound: replicating the experts' work costs most
    pf = _auto(step, mesh, {"tokens": P("expert", None), "labels": P("expert", None)}, compute_rate=rate)
    program = pf.program(*args)
    auto_cost = estimated_step_seconds(program, rate)["total_s"]
    ep = estimated_step_seconds(_preset("moe", step, args, "ep", mesh).program(*args), rate)["total_s"]
    dp_mesh = ash.make_mesh("data=8")
    dp = estimated_step_seconds(_preset("moe", step, args, "dp", dp_mesh).program(*args), rate)["total_s"]
    assert auto_cost <= min(ep, dp) * (1 + 1e-9), (auto_cost, ep, dp)
    _, hlo = assert_report_matches_hlo(pf, *args)
    assert count(hlo, "all-to-all", ("expert",)) >= 4 * cfg.n_layers
    # The stacked expert weights are stored split on their expert dim.
    experts = [(v, p) for v, p in zip(program.graph.invars, program.in_paths)
               if p.startswith("args[0]") and re.search(r"\['moe'\]\['(up|down)'\]\['kernel'\]", p)]
    assert len(experts) == 2 * cfg.n_layers
    for v, p in experts:
        assert program.layouts[v].dims[0] == ("expert",), p
    assert any("expert parallel over expert" in w for w in describe_layers(program).values())
    _close(pf(*args), jax.jit(step)(*args))


@pytest.mark.slow
def test_gpt_12_layers_at_a_realistic_size_is_cheaper_than_every_preset_with_fewer_bytes():
    """Planning only (abstract inputs; compiled, not run): a 12-layer GPT with d_model 1024 at
    a GPU-class rate. The plan costs less than the best preset and its compiled HLO sends no
    more bytes than that preset's (measured: dp_tp is the best preset; auto -15% time, -38%
    bytes with ZeRO-3 over data and batch over model)."""
    import dataclasses
    from autoshard.models import gpt
    from autoshard.report.hlo import parse_collectives
    cfg = dataclasses.replace(gpt.SIZES["test"], d_model=1024, n_heads=16, seq_len=512,
                              vocab_size=8192, n_layers=12)
    rate = 1e14
    model_def, params = gpt.abstract_init(cfg)
    optimizer = gpt.default_optimizer()
    args = (params, jax.eval_shape(optimizer.init, params), gpt.abstract_batch(cfg, 16))
    step = gpt.make_train_step(model_def, optimizer)
    mesh = ash.make_mesh("data=2,model=4")
    presets_seen = {s: _preset("gpt", step, args, s, mesh).report(*args) for s in ("dp", "fsdp", "tp", "dp_tp")}
    best = min(presets_seen, key=lambda s: estimated_step_seconds(presets_seen[s].program, rate)["total_s"])
    pf = _auto(step, mesh, {"tokens": P("data", None), "labels": P("data", None)}, compute_rate=rate)
    program = pf.program(*args)
    assert estimated_step_seconds(program, rate)["total_s"] <= \
        estimated_step_seconds(presets_seen[best].program, rate)["total_s"]
    auto_hlo = sum(c.wire_bytes for c in parse_collectives(pf.lower(*args).compile().as_text(), mesh))
    assert auto_hlo == pytest.approx(pf.report(*args).total_wire_bytes)
    assert auto_hlo <= presets_seen[best].total_wire_bytes, (auto_hlo, best, presets_seen[best].total_wire_bytes)


def test_scanned_layers_body_is_searched_cheaper_than_every_preset_and_equals_one_device():
    """A scan over layers is searched with the program: its body's equations are nodes whose
    costs count once per iteration, its inputs are nodes (resharded once before the loop), and
    each carry-out is priced back into its carry-in layout."""
    step, args = _gpt(3, scan_layers=True)
    mesh = ash.make_mesh("data=2,model=4")
    pf = _auto(step, mesh, {"tokens": P("data", None), "labels": P("data", None)}, compute_rate=SLOW_DEVICE)
    program = pf.program(*args)
    assert program.search.status.endswith("Optimal)")
    auto_cost = estimated_step_seconds(program, SLOW_DEVICE)["total_s"]
    costs = _gpt_preset_costs(step, args, mesh, SLOW_DEVICE)
    assert auto_cost <= min(costs.values()), (auto_cost, costs)
    # Body matmuls split the work: the scanned weights' words come from inside the loop.
    assert describe_layers(program)["blocks"] != "replicated: every device computes the whole layer"
    assert_report_matches_hlo(pf, *args)
    _close(pf(*args), jax.jit(step)(*args))


def test_bfloat16_parameters_are_labelled_so_layers_merge():
    """Layer merging labels values by their nearest floating parameter; bfloat16 parameters
    count (numpy's issubdtype does not know bfloat16 is a float)."""
    import dataclasses
    from autoshard.models import gpt
    mesh = ash.make_mesh("data=2,model=4")
    sizes = []
    for layers in (2, 3):
        cfg = dataclasses.replace(gpt.SIZES["test"], n_layers=layers, dtype=jax.numpy.bfloat16)
        model_def, params = gpt.abstract_init(cfg)
        optimizer = gpt.default_optimizer()
        args = (params, jax.eval_shape(optimizer.init, params), gpt.abstract_batch(cfg, 8))
        pf = _auto(gpt.make_train_step(model_def, optimizer), mesh,
                   {"tokens": P("data", None), "labels": P("data", None)})
        program = pf.program(*args)
        sizes.append((program.search.nodes, program.search.variables))
        assert {f"blocks.{i}.mlp" for i in range(layers)} <= set(describe_layers(program))
    assert sizes[0] == sizes[1], sizes


def test_1t_gpt_on_2048_devices_with_a_budget_plans_without_devices():
    """The scanned 1T GPT on an abstract 2,048-device mesh with only the batch annotated and
    300 GiB per device: the plan's inputs, outputs and kept activations fit the budget and it
    costs no more than the fsdp_tp preset (measured: -5%)."""
    from autoshard.models import gpt
    cfg, rate, budget = gpt.SIZES["1t"], 1e15, 300 * 2**30
    model_def, params = gpt.abstract_init(cfg)
    optimizer = gpt.default_optimizer()
    args = (params, jax.eval_shape(optimizer.init, params), gpt.abstract_batch(cfg, 256))
    step = gpt.make_train_step(model_def, optimizer)
    mesh = ash.abstract_mesh("data=16,fsdp=16,model=8")
    pf = ash.parallelize(step, mesh=mesh, in_specs=(None, None, {"tokens": P(("data", "fsdp"), None),
                                                                  "labels": P(("data", "fsdp"), None)}),
                         auto={"compute_rate": rate}, memory_budget=budget,
                         # The MILPs stop at their time limit; 10 s (the default) cut them short on
                         # a loaded 2-core machine and left a plan 0.3% above the preset.
                         search_time_limit=60.0)
    rep = pf.report(*args)
    assert rep.program.search.memory_bytes <= budget
    mem = rep.memory()
    assert mem["arguments"] + mem["outputs"] + mem["activations_for_backward"] <= budget, mem
    axes = tuple(mesh.axis_names)
    preset = ash.parallelize(step, mesh=mesh, in_specs=(
        presets.param_specs("gpt", params, "fsdp_tp", axes, dict(mesh.shape)), None,
        presets.batch_specs("gpt", args[2], "fsdp_tp", axes))).program(*args)
    assert estimated_step_seconds(rep.program, rate)["total_s"] <= estimated_step_seconds(preset, rate)["total_s"]
    assert describe_layers(rep.program)["blocks"] != "replicated: every device computes the whole layer"
