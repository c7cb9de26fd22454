"""Issue #16: pipeline parallelism from annotations. A mesh axis splitting the stacked dim of a
scan over layers makes the scan a GPipe pipeline over that axis (passes/stages.py,
runtime/pipelined_scan.py); its gradient (the transposed scan) runs as a pipeline in reverse."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, hlo_collectives
from autoshard.models import get_model, presets

GPT = get_model("gpt")
LR = 1e-3


# ----------------------------------------------------------------------------- a tiny layer loop

def _mlp_stack(w, x, remat=False):
    """8 residual tanh layers as a scan; returns the output and every layer's activation."""
    def layer(h, wi):
        h = h + jnp.tanh(h @ wi)
        return h, h
    h, hs = jax.lax.scan(jax.checkpoint(layer) if remat else layer, x, w)
    return h, hs


def _stack_args(L=8, B=8, D=16, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (L, D, D)) / np.sqrt(D), jax.random.normal(k2, (B, D))


@pytest.mark.parametrize("microbatches,remat", [(None, False), (2, False), (8, True)])
def test_layer_loop_pipeline_forward_and_grad(microbatches, remat):
    w, x = _stack_args()
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])

    def f(w, x):
        (h, hs), vjp = jax.vjp(lambda w, x: _mlp_stack(w, x, remat), w, x)
        gw, gx = vjp((jnp.ones_like(h), jnp.zeros_like(hs)))
        return h, hs, gw, gx
    pf = ash.parallelize(f, mesh=mesh, in_specs=(P("stage"), None), microbatches=microbatches)
    got, want = pf(w, x), jax.jit(f)(w, x)
    assert_tree_close(got, want, rtol=1e-5, atol=1e-5)
    rep = pf.report(w, x)
    m = microbatches or 4
    assert [(r.direction, r.stages, r.microbatches, r.schedule) for r in rep.pipeline] == [
        ("forward", 4, m, "gpipe"), ("backward", 4, m, "gpipe")]
    # The per-layer activations stay split over the stage axis.
    assert got[1].sharding.spec[0] == "stage" and got[2].sharding.spec[0] == "stage"
    assert_report_matches_hlo(pf, w, x)


def test_bubble_fraction_and_bytes_per_tick():
    w, x = _stack_args()
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])
    rep = ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh, in_specs=(P("stage"), None),
                          microbatches=2).report(w, x)
    (pipe,) = rep.pipeline
    S, M = 4, 2
    assert pipe.axis == "stage" and pipe.stages == S and pipe.microbatches == M
    assert pipe.bubble_fraction == (S - 1) / (M + S - 1) and pipe.ticks == M + S - 1
    assert pipe.layers_per_stage == 2
    assert pipe.bytes_per_tick == (8 // M) * 16 * 4          # one microbatch of [B, D] float32
    assert "pipeline over 'stage'" in rep.summary()


def test_bad_microbatches_is_a_sharding_error():
    w, x = _stack_args(B=6)
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])
    pf = ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh, in_specs=(P("stage"), None),
                         microbatches=4)
    with pytest.raises(ash.ShardingError, match="microbatches"):
        pf.report(w, x)
    with pytest.raises(ash.ShardingError, match="microbatches"):
        ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh, in_specs=(P("stage"), None),
                        microbatches=0).report(*_stack_args())


def test_batch_statistics_in_the_body_is_a_clear_error():
    w, x = _stack_args()
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])

    def batchnorm_stack(w, x):
        def layer(h, wi):
            h = h @ wi
            h = h - jnp.mean(h, axis=0)          # batch statistic: needs the whole batch
            return h, None
        return jax.lax.scan(layer, x, w)[0]
    pf = ash.parallelize(batchnorm_stack, mesh=mesh, in_specs=(P("stage"), None))
    with pytest.raises(ash.ShardingError, match=r"not separable over the batch: \w+ at test_pipeline.py:\d+"):
        pf.report(w, x)


def test_layers_not_divisible_by_stages():
    w, x = _stack_args(L=6)
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])
    with pytest.raises(ash.ShardingError, match="6 layers"):
        ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh,
                        in_specs=(P("stage"), None)).report(w, x)


# ----------------------------------------------------------------------------- scanned GPT + adamw

def _gpt_step(model_def, opt):
    def step(params, opt_state, batch):
        loss, g = jax.value_and_grad(lambda p: GPT.loss_fn(model_def, p, batch))(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return loss, g, optax.apply_updates(params, updates), opt_state
    return step


def _check_gpt_pipeline(mesh_shape, n_layers, batch_size):
    n = int(np.prod(list(mesh_shape.values())))
    mesh = ash.make_mesh(mesh_shape, devices=jax.devices()[:n])
    axes, shape = tuple(mesh.axis_names), dict(mesh.shape)
    cfg = presets.configure("gpt", GPT.Config(n_layers=n_layers), "pp", axes)
    model_def, params = GPT.init(cfg, seed=0)
    batch = GPT.make_batch(cfg, batch_size, seed=0)
    opt = optax.adamw(LR, weight_decay=0.01)
    opt_state = opt.init(params)
    specs = (presets.param_specs("gpt", params, "pp", axes, shape), None,
             presets.batch_specs("gpt", batch, "pp", axes))
    step = _gpt_step(model_def, opt)
    pf = ash.parallelize(step, mesh=mesh, in_specs=specs)
    loss, g, new_params, _ = pf(params, opt_state, batch)
    ref_loss, ref_g, ref_params, _ = jax.jit(step)(params, opt_state, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(ref_g))
    assert_tree_close(g, ref_g, rtol=1e-4, atol=1e-6 * scale)
    # Adam turns rounding noise on a zero gradient (the key bias: softmax ignores it) into a
    # step of up to ~lr; everywhere else the updates agree to 0.1 lr.
    for path, got, want, gw in zip(jax.tree_util.tree_flatten_with_path(ref_params)[0],
                                   jax.tree.leaves(new_params), jax.tree.leaves(ref_params),
                                   jax.tree.leaves(ref_g)):
        noise = float(np.abs(gw).max()) < 1e-6 * scale
        np.testing.assert_allclose(got, want, rtol=0, atol=(2 if noise else 0.1) * LR,
                                   err_msg=jax.tree_util.keystr(path[0]))

    S = shape["stage"]
    rep = pf.report(params, opt_state, batch)
    assert [(r.direction, r.stages, r.microbatches) for r in rep.pipeline] == [
        ("forward", S, S), ("backward", S, S)]
    assert rep.pipeline[0].bubble_fraction == (S - 1) / (2 * S - 1)
    # Collective-permutes between stages in the compiled program, as the report says.
    _, hlo = assert_report_matches_hlo(pf, params, opt_state, batch)
    permutes = [c for c in hlo if c.kind == "collective-permute"]
    assert len(permutes) == 2 and all(c.mesh_axes == ("stage",) for c in permutes)
    # Each device's arguments hold one stage's layers: 1/S of every stacked parameter.
    shardings = pf.input_shardings(params, opt_state, batch)[0]
    for path, (x, sh) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             zip(jax.tree.leaves(params), jax.tree.leaves(shardings))):
        if "blocks" in jax.tree_util.keystr(path[0]):
            assert sh.shard_shape(x.shape)[0] == n_layers // S, jax.tree_util.keystr(path[0])
    return pf, (params, opt_state, batch), rep


def test_scanned_gpt_adamw_pipelined_over_four_stages():
    pf, args, rep = _check_gpt_pipeline({"stage": 4}, n_layers=4, batch_size=8)
    params = args[0]
    stacked = sum(x.nbytes for x in jax.tree.leaves(params["blocks"]))
    rest = sum(x.nbytes for x in jax.tree.leaves(params)) - stacked
    # params, adam mu and nu: 1/S of the stacked bytes each, the rest whole; plus the batch.
    want = 3 * (stacked // 4 + rest) + sum(x.nbytes for x in jax.tree.leaves(args[2])) + 4
    got = pf.lower(*args).compile().memory_analysis().argument_size_in_bytes
    assert abs(got - want) <= 64, (got, want)


def test_scanned_gpt_adamw_pipeline_with_data_and_model_axes():
    _, _, rep = _check_gpt_pipeline({"stage": 2, "data": 2, "model": 2}, n_layers=4, batch_size=8)
    kinds = {(c.kind, c.mesh_axes) for c in rep.collectives}
    assert ("all-reduce", ("model",)) in kinds and ("collective-permute", ("stage",)) in kinds


# ----------------------------------------------------------------------------- planning at scale

def test_1t_gpt_pipeline_plan_on_2048_abstract_devices():
    """The 1T GPT with the pp preset on data=8,fsdp=8,stage=4,model=8: per-device parameters
    and kept activations against the analytic formulas (no devices needed)."""
    import test_abstract_planning
    import test_planning
    from autoshard.models import gpt
    cfg, batch_size = gpt.SIZES["1t"], 256
    shape = {"data": 8, "fsdp": 8, "stage": 4, "model": 8}
    rep, *_ = test_planning._plan(cfg, ash.abstract_mesh(shape), "pp", batch_size)
    S, m, f = shape["stage"], shape["model"], shape["fsdp"]
    d, ff, v, t, L = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.seq_len, cfg.n_layers
    item = jnp.dtype(cfg.dtype).itemsize
    # Kernels: stacked layers over stage, Megatron over model, one dim over fsdp; embeddings,
    # positions and the lm head over fsdp only (biases and layernorms are below 0.1%).
    params = (L * (4 * d * d + 2 * d * ff) / (S * m * f) + (2 * v * d + t * d) / f) * item
    mem = rep.memory()
    assert abs(mem["parameters"] - params) / params < 0.01, (mem["parameters"], params)
    # Kept activations: the fsdp_tp formula's per-layer residuals for this stage's L/S layers
    # (every microbatch's: GPipe keeps them all), plus the loss head on every stage.
    an = test_abstract_planning._analytic_activations(
        cfg, {"data": 8, "fsdp": 8, "model": 8}, batch_size,
        kept=test_abstract_planning.residuals_kept(rep, cfg, batch_size))
    b = batch_size // (shape["data"] * shape["fsdp"])
    top = 3 * b * t * d * 4 + 2 * b * t * v * 4
    acts = (an["activations_for_backward"] - top) / S + top
    # (0.3% on JAX 0.10.2; the same 5% as test_abstract_planning's fsdp_tp check.)
    assert mem["activations_for_backward"] == pytest.approx(acts, rel=0.05)
    (fwd, bwd) = rep.pipeline
    assert (fwd.stages, fwd.microbatches, fwd.layers_per_stage) == (4, 4, 32)
    assert fwd.bytes_per_tick == (b // 4) * t * d * item == bwd.bytes_per_tick


def test_pipeline_collectives_run_once_per_tick():
    w, x = _stack_args()
    mesh = ash.make_mesh({"stage": 4}, devices=jax.devices()[:4])
    rep = ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh, in_specs=(P("stage"), None),
                          microbatches=2).report(w, x)
    (permute,) = [c for c in rep.collectives if c.kind == "collective-permute"]
    (handoff,) = [c for c in rep.collectives if c.kind == "all-reduce"]
    assert permute.trips == rep.pipeline[0].ticks == 5 and handoff.trips == 1
    assert rep.step_wire_bytes == 5 * permute.wire_bytes + handoff.wire_bytes


def test_auto_search_with_a_pipeline_is_refused_clearly():
    w, x = _stack_args()
    mesh = ash.make_mesh({"stage": 4, "data": 2})
    with pytest.raises(ash.ShardingError, match="auto=True does not plan pipelined"):
        ash.parallelize(lambda w, x: _mlp_stack(w, x)[0], mesh=mesh, in_specs=(P("stage"), P("data")),
                        auto=True).report(w, x)
