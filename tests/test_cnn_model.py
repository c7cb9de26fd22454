"""Issue #5: the ResNet-style CNN reference model (autoshard/models/cnn.py) and its presets.

For each strategy the sharded train step (flax nnx, adamw; only parameters and batch
annotated) equals the single-device step, and the report's collectives equal the compiled
HLO's. Under sp (image height over 'model') the convolutions exchange halos with
collective-permutes and no activation is gathered whole."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, hlo_collectives, kinds
from autoshard.models import get_model, merge_params, presets

CNN = get_model("cnn")
LR = 1e-3
BATCH = 8


FAST = [("dp", "data=8"), ("fsdp", "data=8"),
        ("tp", "data=2,model=4"), ("dp_tp", "data=2,model=4"), ("sp", "data=2,model=4")]
SLOW = [("dp", "data=2,model=4"), ("fsdp", "data=2,model=4"),
        ("tp", "model=8"), ("sp", "model=8"), ("dp_tp", "data=4,model=2")]


def _is_p(x):
    return isinstance(x, P)


@functools.lru_cache(maxsize=None)
def _model():
    """(step, params, opt_state, batch, single-device result): the same for every strategy."""
    cfg = CNN.Config()
    model_def, params = CNN.init(cfg, seed=0)
    optimizer = CNN.default_optimizer(LR)
    step = CNN.make_train_step(model_def, optimizer)
    batch = CNN.make_batch(cfg, BATCH, seed=0)
    opt_state = optimizer.init(params)
    return step, params, opt_state, batch, jax.jit(step)(params, opt_state, batch)


def setup(strategy, mesh_text):
    mesh = ash.make_mesh(mesh_text)
    step, params, opt_state, batch, _ = _model()
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs("cnn", params, strategy, axes, dict(mesh.shape)), None,
             presets.batch_specs("cnn", batch, strategy, axes))
    return mesh, step, params, opt_state, batch, specs


def assert_adam_step_close(got, want):
    """Loss and Adam's first moment (0.1 x the gradient after one step) within 1e-5 relative,
    the second moment within 1e-4 (it squares the gradient); parameters within 1e-5 relative
    where the gradient is above float32 noise. Adam's first step moves a parameter by about
    lr * sign(g): where g is rounding noise its sign is arbitrary, on one device as on eight,
    so there the update may differ by up to 2 lr (see tests/test_gpt_strategies.py)."""
    (loss, params, state), (ref_loss, ref_params, ref_state) = got, want
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref_params)[0]]
    mu, ref_mu = jax.tree.leaves(state[0].mu), jax.tree.leaves(ref_state[0].mu)
    scale = max(float(np.abs(m).max()) for m in ref_mu)
    for path, g, w in zip(paths, mu, ref_mu):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=path)
    nu, ref_nu = jax.tree.leaves(state[0].nu), jax.tree.leaves(ref_state[0].nu)
    nu_scale = max(float(np.abs(v).max()) for v in ref_nu)
    for path, g, w in zip(paths, nu, ref_nu):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * nu_scale, err_msg=path)
    noisy = 0
    for path, g, w, m in zip(paths, jax.tree.leaves(params), jax.tree.leaves(ref_params), ref_mu):
        g, w = np.asarray(g), np.asarray(w)
        noise = np.abs(np.asarray(m)) <= 1e-6 * scale
        noisy += int(noise.sum())
        np.testing.assert_allclose(np.where(noise, w, g), w, rtol=1e-5, atol=1e-7, err_msg=path)
        assert np.all(np.abs(g - w)[noise] <= 2 * LR + 1e-6), path
    assert noisy < 0.01 * sum(np.size(w) for w in jax.tree.leaves(ref_params))


def check_strategy(strategy, mesh_text):
    mesh, step, params, opt_state, batch, specs = setup(strategy, mesh_text)
    pf = ash.parallelize(step, mesh=mesh, in_specs=specs)
    got = pf(params, opt_state, batch)
    want = _model()[-1]
    assert_adam_step_close(got, want)
    # Annotated parameters come back in their annotated layouts.
    for spec, leaf in zip(jax.tree.leaves(specs[0], is_leaf=_is_p), jax.tree.leaves(got[1])):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
    hlo = hlo_collectives(pf, params, opt_state, batch)
    seen = kinds(hlo)
    if strategy == "dp":
        # Only the gradients (and the loss) are reduced, over 'data'.
        assert set(seen) == {("all-reduce", ("data",))}, seen
    if strategy == "fsdp":
        assert ("all-gather", ("data",)) in seen and ("reduce-scatter", ("data",)) in seen, seen
    if strategy in ("tp", "dp_tp"):
        # Megatron pairs: conv2's partial sums (forward) and conv1's input gradient (backward)
        # are all-reduced over 'model' once per block; nothing else crosses 'model', and
        # only gradients cross 'data'.
        cfg = CNN.Config()
        assert seen[("all-reduce", ("model",))] == 2 * len(cfg.widths) * cfg.blocks_per_stage, hlo
        assert set(seen) == {("all-reduce", ("model",))} | (
            {("all-reduce", ("data",))} if strategy == "dp_tp" else set()), seen
    if strategy == "sp":
        assert ("collective-permute", ("model",)) in seen, seen
        # No activation is gathered whole: every all-gather over 'model' is smaller than one
        # device's block of the smallest activation (the last stage's feature map).
        cfg = CNN.Config()
        n_data = mesh.shape.get("data", 1)
        smallest = BATCH * cfg.out_size ** 2 * cfg.widths[-1] // (n_data * mesh.shape["model"])
        assert all(np.prod(c.shape) * mesh.shape["model"] < smallest
                   for c in hlo if c.kind == "all-gather" and "model" in c.mesh_axes), hlo
        # Halo rows only: each collective-permute moves at most one row of an activation.
        assert all(c.shape[1] == 1 for c in hlo if c.kind == "collective-permute"), hlo
    report, hlo = assert_report_matches_hlo(pf, params, opt_state, batch)
    return report, hlo


@pytest.mark.parametrize("strategy,mesh_text", FAST)
def test_cnn_train_step_equals_one_device_and_report_matches_hlo(strategy, mesh_text):
    check_strategy(strategy, mesh_text)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,mesh_text", SLOW)
def test_cnn_train_step_more_meshes(strategy, mesh_text):
    check_strategy(strategy, mesh_text)


# ----------------------------------------------------------------- model and presets


def test_model_shapes_and_learnable_batch():
    cfg = CNN.Config()
    model_def, params = CNN.init(cfg, seed=0)
    batch = CNN.make_batch(cfg, BATCH, seed=0)
    assert batch["images"].shape == (BATCH, cfg.image_size, cfg.image_size, cfg.in_channels)
    assert batch["images"].dtype == np.float32 and batch["labels"].dtype == np.int32
    assert batch["labels"].min() >= 0 and batch["labels"].max() < cfg.num_classes
    blk = params["stages"]["1"]["0"]
    assert blk["conv1"]["kernel"].shape == (3, 3, cfg.widths[0], cfg.widths[1])
    assert blk["proj"]["kernel"].shape == (1, 1, cfg.widths[0], cfg.widths[1])
    assert "proj" not in params["stages"]["0"]["0"]           # same shape: identity skip
    logits = jax.jit(lambda p, x: merge_params(model_def, p)(x))(params, batch["images"])
    assert logits.shape == (BATCH, cfg.num_classes)
    # Convolutions carry no bias; the jaxpr has strided convs (downsample and projection).
    jaxpr = jax.make_jaxpr(lambda p: CNN.loss_fn(model_def, p, batch))(params)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert sorted(e.params["window_strides"] for e in convs).count((2, 2)) == 2, convs


def test_presets_tp_pairs_and_sp_batch():
    cfg = CNN.Config()
    _, params = CNN.init(cfg, seed=0)
    batch = CNN.make_batch(cfg, BATCH)
    axes, shape = ("data", "model"), {"data": 2, "model": 4}
    for strategy in ("tp", "dp_tp"):
        specs = presets.param_specs("cnn", params, strategy, axes, shape)
        for stage in specs["stages"].values():
            for blk in stage.values():
                assert blk["conv1"]["kernel"] == P(None, None, None, "model")
                assert blk["conv2"]["kernel"] == P(None, None, "model", None)
                assert blk["norm1"] == {"scale": P("model"), "bias": P("model")}
                rest = [s for k, v in blk.items() if k not in ("conv1", "conv2", "norm1")
                        for s in jax.tree.leaves(v, is_leaf=_is_p)]
                assert rest and all(s == P() for s in rest)
        for key in ("stem", "head"):
            assert all(s == P() for s in jax.tree.leaves(specs[key], is_leaf=_is_p))
    assert presets.batch_specs("cnn", batch, "tp", axes) == {"images": P(), "labels": P()}
    assert presets.batch_specs("cnn", batch, "dp_tp", axes) == {
        "images": P("data", None, None, None), "labels": P("data")}
    assert presets.batch_specs("cnn", batch, "sp", axes) == {
        "images": P("data", "model", None, None), "labels": P("data")}
    assert presets.batch_specs("cnn", batch, "sp", ("model",)) == {
        "images": P(None, "model", None, None), "labels": P()}
    for strategy in ("dp", "sp"):
        specs = presets.param_specs("cnn", params, strategy, axes, shape)
        assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=_is_p))
    fsdp = presets.param_specs("cnn", params, "fsdp", ("data",), {"data": 8})
    assert fsdp["stem"]["conv"]["kernel"] == P(None, None, None, "data")   # [3,3,3,16]
    assert fsdp["head"] == {"kernel": P("data", None), "bias": P()}         # bias [10]
    assert presets.strategies("cnn") == ("dp", "fsdp", "tp", "dp_tp", "sp")
    with pytest.raises(ValueError, match="not divisible"):
        presets.param_specs("cnn", params, "tp", ("model",), {"model": 3})
    with pytest.raises(ValueError, match="'model'"):
        presets.batch_specs("cnn", batch, "sp", ("data",))
