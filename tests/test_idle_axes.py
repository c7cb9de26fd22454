"""Issue #15 item 1: a mesh axis no annotation names (an *idle* axis) splits the batch too, as
data parallelism over it (HSDP: fsdp over 'data', plain data parallel over 'model'); see
``autoshard/passes/idle_axes.py``. Per device, autoshard's flops (``cost_analysis()``) must
not exceed jax.jit's, its memory stay within 2% and its wire bytes not exceed jit's, with
the same annotations as NamedShardings; results equal the one-device function's, outputs
keep their annotated layouts, and the report's collectives equal the compiled HLO's."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, flops_memory_wire, mesh

B, D, H = 128, 32, 64
LR = 0.1


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    err = h @ params["w2"] - batch["y"]
    return jnp.mean(err * err)


def _step(params, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    return loss, jax.tree.map(lambda p, g: p - LR * g, params, grads)


def _args():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(D, H)).astype(np.float32) / np.sqrt(D),
              "b1": np.zeros((H,), np.float32),
              "w2": rng.normal(size=(H, D)).astype(np.float32) / np.sqrt(H)}
    batch = {"x": rng.normal(size=(B, D)).astype(np.float32),
             "y": rng.normal(size=(B, D)).astype(np.float32)}
    return params, batch


FSDP = ({"w1": P("data", None), "b1": P("data"), "w2": P("data", None)},
        {"x": P("data", None), "y": P("data", None)})


def test_fsdp_with_an_idle_axis_splits_the_batch_over_it():
    m = mesh("data=2,model=4")
    params, batch = _args()
    out_specs = (P(), FSDP[0])
    pf = ash.parallelize(_step, mesh=m, in_specs=FSDP, out_specs=out_specs)
    got = pf(params, batch)
    assert_tree_close(got, _step(params, batch), rtol=1e-5, atol=1e-6)
    # Outputs keep their annotated layouts; the batch enters as annotated.
    for leaf, spec in zip(jax.tree.leaves(got[1]), jax.tree.leaves(FSDP[0], is_leaf=lambda s: isinstance(s, P))):
        assert leaf.sharding.is_equivalent_to(NamedSharding(m, spec), leaf.ndim)
    assert [s.spec for s in jax.tree.leaves(pf.input_shardings(params, batch)[1])] == [P("data"), P("data")]
    rep = pf.report(params, batch)
    assert "('model',) are idle" in rep.idle_axes, rep.idle_axes
    assert_report_matches_hlo(pf, params, batch)
    # The gradients are reduce-scattered over data, then all-reduced over model on the shard.
    model_reductions = [c for c in rep.collectives if c.kind == "all-reduce" and tuple(c.mesh_axes) == ("model",)]
    assert len(model_reductions) == 3, [(c.kind, c.mesh_axes) for c in rep.collectives]

    ours = flops_memory_wire(pf.lower(params, batch).compile(), m)
    named = jax.tree.map(lambda s: NamedSharding(m, s), FSDP, is_leaf=lambda s: isinstance(s, P))
    with jax.set_mesh(m):
        jit = flops_memory_wire(jax.jit(_step, in_shardings=named).lower(params, batch).compile(), m)
    assert ours[0] <= jit[0], f"flops per device: autoshard {ours[0]:,.0f}, jax.jit {jit[0]:,.0f}"
    assert ours[1] <= 1.02 * jit[1], f"memory per device: autoshard {ours[1]:,} B, jax.jit {jit[1]:,} B"
    assert ours[2] <= jit[2], f"wire bytes per device: autoshard {ours[2]:,.0f}, jax.jit {jit[2]:,.0f}"

    # Turned off: the idle axis repeats the work (4x the matmul flops of the idle plan).
    off = ash.parallelize(_step, mesh=m, in_specs=FSDP, out_specs=out_specs, idle_axes=False)
    assert_tree_close(off(params, batch), got, rtol=1e-5, atol=1e-6)
    assert off.report(params, batch).idle_axes == ""
    assert flops_memory_wire(off.lower(params, batch).compile(), m)[0] > 2 * ours[0]


def _plan(pf, *args):
    rep = pf.report(*args)
    return rep.layouts, [(c.kind, tuple(c.mesh_axes), c.wire_bytes) for c in rep.collectives]


def test_no_idle_axis_leaves_the_plan_unchanged():
    """Both axes annotated (fsdp over data, Megatron over model): nothing is idle."""
    m = mesh("data=2,model=4")
    params, batch = _args()
    specs = ({"w1": P("data", "model"), "b1": P("model"), "w2": P("model", "data")}, FSDP[1])
    on = ash.parallelize(_step, mesh=m, in_specs=specs)
    off = ash.parallelize(_step, mesh=m, in_specs=specs, idle_axes=False)
    assert on.report(params, batch).idle_axes == ""
    assert _plan(on, params, batch) == _plan(off, params, batch)


def test_without_parameter_gradients_no_batch_is_recognised():
    """An inference function has no parameter-gradient contraction: no batch, idle axes unused."""
    m = mesh("data=2,model=4")
    params, batch = _args()
    fwd = lambda params, batch: jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
    pf = ash.parallelize(fwd, mesh=m, in_specs=FSDP)
    assert_tree_close(pf(params, batch), fwd(params, batch), rtol=1e-5, atol=1e-6)
    assert "no batch was recognised" in pf.report(params, batch).idle_axes
    off = ash.parallelize(fwd, mesh=m, in_specs=FSDP, idle_axes=False)
    assert _plan(pf, params, batch) == _plan(off, params, batch)


def test_batch_not_divisible_by_the_idle_axes_is_left_alone():
    m = mesh("data=2,model=4")
    params, batch = _args()
    batch = {k: v[:6] for k, v in batch.items()}       # 6 rows: 2 x 4 does not divide them
    pf = ash.parallelize(_step, mesh=m, in_specs=FSDP)
    assert_tree_close(pf(params, batch), _step(params, batch), rtol=1e-5, atol=1e-6)
    assert "does not divide" in pf.report(params, batch).idle_axes


def _model_step(model, batch_size):
    """A benchmark model's training step on data=2,model=4 with its fsdp annotations (as
    ``benchmark/measure.py`` builds it): ``(pf, step, args, jit-compiled step, mesh)``."""
    from autoshard.benchmark.measure import BENCH_CONFIGS
    from autoshard.models import get_model, presets
    m = mesh("data=2,model=4")
    axes = tuple(m.axis_names)
    mod = get_model(model)
    cfg = presets.configure(model, mod.Config(**BENCH_CONFIGS.get(model, {})), "fsdp", axes)
    model_def, params = mod.init(cfg, seed=0)
    opt = mod.default_optimizer()
    args = (params, opt.init(params), mod.make_batch(cfg, batch_size, seed=0))
    step = mod.make_train_step(model_def, opt)
    pspecs = presets.param_specs(model, params, "fsdp", axes, dict(m.shape))
    bspecs = presets.batch_specs(model, args[2], "fsdp", axes)
    pf = ash.parallelize(step, mesh=m, in_specs=(pspecs, None, bspecs))
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(m, s), specs, is_leaf=lambda s: isinstance(s, P))
    shardings = (named(pspecs), tuple(pf.input_shardings(*args))[1], named(bspecs))
    with jax.set_mesh(m):
        jit = jax.jit(step, in_shardings=shardings).lower(*args).compile()
    return pf, step, args, jit, m


def _assert_no_worse_than_jit(model, batch_size):
    pf, step, args, jit, m = _model_step(model, batch_size)
    assert_tree_close(pf(*args), jax.jit(step)(*args), rtol=1e-4, atol=1e-5)
    assert "('model',) are idle" in pf.report(*args).idle_axes
    ours, theirs = flops_memory_wire(pf.lower(*args).compile(), m), flops_memory_wire(jit, m)
    assert ours[0] <= theirs[0], f"flops per device: autoshard {ours[0]:,.0f}, jax.jit {theirs[0]:,.0f}"
    assert ours[1] <= 1.02 * theirs[1], f"memory per device: autoshard {ours[1]:,} B, jax.jit {theirs[1]:,} B"
    assert ours[2] <= theirs[2], f"wire bytes per device: autoshard {ours[2]:,.0f}, jax.jit {theirs[2]:,.0f}"


def test_mlp_fsdp_keeps_the_idle_axis_where_a_weight_wins_the_data_axis():
    """4 rows per device: the weights stay in place and the activations move. Where a
    contraction's weight keeps 'data' (split over the summed dim), the batch, split over
    (data, model), loses 'data' only and stays split over 'model' (a candidate made of the
    weight's factors and the batch's less the axes taken): the work stays 8-way split."""
    _assert_no_worse_than_jit("mlp", 32)


def test_cnn_fsdp_keeps_the_head_gradient_split_over_the_batch():
    """The head's input gradient gathers the 640-byte kernel and stays split over the batch
    (its undecided result's bytes are priced), rather than splitting over channels to spare
    the gather and carrying that split, by all-to-alls, through the last block's backward."""
    _assert_no_worse_than_jit("cnn", 16)
