"""Tests of the reference models' pure API and of the sharding presets.

Everything runs on the CPU backend (tests/conftest.py simulates 8 devices; the
train-step tests only need one). Models use their small default configs so
each test stays well under a few seconds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from autoshard.models import MODEL_NAMES, get_model, model_registry
from autoshard.models.presets import (STRATEGIES, batch_specs, param_specs, required_axes,
                                      strategies)

MESH_AXES = ("data", "model")
MESH_SHAPE = {"data": 2, "model": 4}
BATCH = 8


@pytest.fixture(scope="module", params=MODEL_NAMES)
def setup(request):
    """(name, api, config, model_def, params, optimizer, batch) for one model."""
    m = get_model(request.param)
    cfg = m.Config()
    model_def, params = m.init(cfg, seed=0)
    opt = m.default_optimizer()
    batch = m.make_batch(cfg, BATCH, seed=0)
    return request.param, m, cfg, model_def, params, opt, batch


def _is_p(x):
    return isinstance(x, P)


def _flat_with_paths(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_with_paths(v, path + (k,))
    else:
        yield path, tree


# ----------------------------------------------------------------- model API


def test_registry_exposes_uniform_api():
    reg = model_registry()
    assert set(reg) == set(MODEL_NAMES)
    for m in reg.values():
        for field in ("Config", "init", "make_batch", "loss_fn",
                      "make_train_step", "default_optimizer"):
            assert callable(getattr(m, field)), field
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet")


def test_params_are_pure_nested_dicts(setup):
    _, _, _, _, params, _, _ = setup
    for path, leaf in _flat_with_paths(params):
        assert all(isinstance(k, str) for k in path), path
        assert isinstance(leaf, jax.Array), path
    # Only builtin dicts: no nnx.State or other custom containers.
    def containers(t):
        if isinstance(t, dict):
            yield type(t)
            for v in t.values():
                yield from containers(v)
    assert set(containers(params)) == {dict}


def test_init_is_deterministic(setup):
    name, m, cfg, _, params, _, _ = setup
    _, again = m.init(cfg, seed=0)
    _, other = m.init(cfg, seed=1)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, again)))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params, other)))


def test_batch_shapes_and_dtypes(setup):
    name, m, cfg, _, _, _, batch = setup
    if name == "gpt":
        assert set(batch) == {"tokens", "labels"}
        for v in batch.values():
            assert v.shape == (BATCH, cfg.seq_len) and v.dtype == np.int32
            assert v.min() >= 0 and v.max() < cfg.vocab_size
        # labels are the next tokens
        np.testing.assert_array_equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    elif name == "mlp":
        assert set(batch) == {"x", "y"}
        for v in batch.values():
            assert v.shape == (BATCH, cfg.d_model) and v.dtype == np.float32
    else:   # models with their own test file check their batch there; all lead with BATCH
        for v in batch.values():
            assert np.shape(v)[0] == BATCH


def test_loss_decreases_under_jit(setup):
    _, m, _, model_def, params, opt, batch = setup
    step = jax.jit(m.make_train_step(model_def, opt))
    opt_state = opt.init(params)
    losses = []
    for _ in range(5):
        loss, params, opt_state = step(params, opt_state, batch)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("use_default_opt", [False, True], ids=["sgd", "default_opt"])
def test_make_jaxpr_matches_jit(setup, use_default_opt):
    _, m, _, model_def, params, opt, batch = setup
    # Bit-level comparison only makes sense under SGD: GPT's k-projection bias
    # has a mathematically zero gradient (softmax is shift-invariant), so
    # adam(w) normalises rounding noise into +-lr-sized updates there. With the
    # default optimizer we check tracing, the loss and the output structure.
    opt = opt if use_default_opt else optax.sgd(0.1)
    step = m.make_train_step(model_def, opt)
    opt_state = opt.init(params)
    closed = jax.make_jaxpr(step)(params, opt_state, batch)
    args = jax.tree.leaves((params, opt_state, batch))
    assert len(closed.jaxpr.invars) == len(args)
    # jit the jaxpr (eager eval_jaxpr is op-by-op and takes ~20 s for GPT).
    from_jaxpr = jax.jit(jax.extend.core.jaxpr_as_fun(closed))(*args)
    from_jit = jax.tree.leaves(jax.jit(step)(params, opt_state, batch))
    assert len(from_jaxpr) == len(from_jit)
    assert [np.shape(a) for a in from_jaxpr] == [np.shape(b) for b in from_jit]
    pairs = list(zip(from_jaxpr, from_jit))
    for a, b in (pairs if not use_default_opt else pairs[:1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Output structure is (loss, params, opt_state) with params' exact structure.
    out_shape = jax.eval_shape(step, params, opt_state, batch)
    assert out_shape[0].shape == ()
    assert jax.tree.structure(out_shape[1]) == jax.tree.structure(params)


def test_gpt_key_bias_gradient_is_zero():
    """Documents a model property that matters when comparing optimizer outputs."""
    m = get_model("gpt")
    model_def, params = m.init(m.Config())
    grad_fn = jax.jit(jax.grad(lambda p, b: m.loss_fn(model_def, p, b)))
    grads = grad_fn(params, m.make_batch(m.Config(), 4))
    for blk in grads["blocks"].values():
        assert float(jnp.max(jnp.abs(blk["attn"]["k"]["bias"]))) < 1e-5
        assert float(jnp.max(jnp.abs(blk["attn"]["q"]["bias"]))) > 1e-5


def test_gpt_jaxpr_has_embedding_gather_and_no_take_along_axis():
    m = get_model("gpt")
    model_def, params = m.init(m.Config())
    batch = m.make_batch(m.Config(), 2)
    jaxpr = jax.make_jaxpr(lambda p: m.loss_fn(model_def, p, batch))(params)
    prims = _primitives(jaxpr.jaxpr)
    assert "gather" in prims        # nnx.Embed lookup
    assert "dot_general" in prims
    # one gather only: the loss uses one_hot, not take_along_axis
    assert _count(jaxpr.jaxpr, "gather") == 1


def test_gpt_rejects_too_long_sequence():
    m = get_model("gpt")
    cfg = m.Config()
    model_def, params = m.init(cfg)
    batch = m.make_batch(cfg.__class__(seq_len=cfg.seq_len * 2), 2)
    with pytest.raises(ValueError, match="seq_len"):
        m.loss_fn(model_def, params, batch)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _primitives(jaxpr) -> set[str]:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in _subjaxprs(eqn):
            out |= _primitives(sub)
    return out


def _count(jaxpr, name) -> int:
    return sum((eqn.primitive.name == name) + sum(_count(s, name) for s in _subjaxprs(eqn))
               for eqn in jaxpr.eqns)


# ----------------------------------------------------------------- presets


def _mesh_for(strategy):
    """(axes, shape) of a 2x4 mesh with the axes ``strategy`` needs ('expert' for ep)."""
    second = "expert" if strategy == "ep" else "model"
    return ("data", second), {"data": 2, second: 4}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_specs_match_structure_rank_and_mesh(setup, strategy):
    name, _, _, _, params, _, batch = setup
    if strategy not in strategies(name):
        with pytest.raises(ValueError, match="has no strategy"):
            param_specs(name, params, strategy, *_mesh_for(strategy))
        return
    mesh_axes, mesh_shape = _mesh_for(strategy)
    specs = param_specs(name, params, strategy, mesh_axes, mesh_shape)
    assert (jax.tree.structure(specs, is_leaf=_is_p)
            == jax.tree.structure(jax.tree.map(lambda _: P(), params), is_leaf=_is_p))
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.tree.map(lambda s: 0, specs, is_leaf=_is_p))
    bspecs = batch_specs(name, batch, strategy, mesh_axes)
    assert set(bspecs) == set(batch)
    for tree, ref in ((specs, params), (bspecs, batch)):
        for (path, spec), (_, x) in zip(_flat_with_paths(tree), _flat_with_paths(ref)):
            assert isinstance(spec, P), path
            assert len(spec) <= np.ndim(x), (path, spec)
            used = [a for a in spec if a is not None]
            used = [a for entry in used for a in (entry if isinstance(entry, tuple) else (entry,))]
            assert set(used) <= set(mesh_axes) and set(required_axes(strategy)) <= set(mesh_axes)
            assert len(used) == len(set(used)), (path, spec)   # no axis twice
            for dim, axis in enumerate(spec):
                if axis is not None:
                    size = np.prod([mesh_shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))])
                    assert np.shape(x)[dim] % size == 0, (path, spec)


@pytest.mark.parametrize("name", ["gpt", "mlp"])   # moe and cnn own their presets: their files test them
def test_dp_and_fsdp_layouts(name):
    m = get_model(name)
    _, params = m.init(m.Config(), seed=0)
    batch = m.make_batch(m.Config(), BATCH, seed=0)
    dp = param_specs(name, params, "dp", ("data",), {"data": 8})
    assert all(s == P() for s in jax.tree.leaves(dp, is_leaf=_is_p))
    fsdp = param_specs(name, params, "fsdp", ("data",), {"data": 8})
    for (path, spec), (_, x) in zip(_flat_with_paths(fsdp), _flat_with_paths(params)):
        divisible = [i for i, n in enumerate(x.shape) if n % 8 == 0]
        expect = P(*("data" if i == divisible[0] else None for i in range(x.ndim))) \
            if divisible else P()
        assert spec == expect, path
    for strategy in ("dp", "fsdp"):
        for k, spec in batch_specs(name, batch, strategy, ("data",)).items():
            assert spec == P("data", *([None] * (batch[k].ndim - 1)))


def test_fsdp_leaves_indivisible_params_replicated():
    specs = param_specs("mlp", {"w": jnp.zeros((3, 6)), "b": jnp.zeros((5,)),
                                "s": jnp.zeros(())}, "fsdp", ("data",), {"data": 2})
    assert specs == {"w": P(None, "data"), "b": P(), "s": P()}


def test_tp_megatron_layout_gpt():
    m = get_model("gpt")
    _, params = m.init(m.Config())
    for strategy in ("tp", "dp_tp"):
        specs = param_specs("gpt", params, strategy, MESH_AXES, MESH_SHAPE)
        for i in params["blocks"]:
            attn, mlp = specs["blocks"][i]["attn"], specs["blocks"][i]["mlp"]
            for proj in ("q", "k", "v"):
                assert attn[proj]["kernel"] == P(None, "model")
                assert attn[proj]["bias"] == P("model")
            assert attn["out"]["kernel"] == P("model", None)
            assert attn["out"]["bias"] == P()
            assert mlp["up"]["kernel"] == P(None, "model")
            assert mlp["up"]["bias"] == P("model")
            assert mlp["down"]["kernel"] == P("model", None)
            assert mlp["down"]["bias"] == P()
            for ln in ("ln1", "ln2"):
                assert all(s == P() for s in specs["blocks"][i][ln].values())
        for key in ("tok_emb", "ln_f", "lm_head"):
            assert all(s == P() for s in jax.tree.leaves(specs[key], is_leaf=_is_p))
        assert specs["pos_emb"] == P()
    batch = m.make_batch(m.Config(), BATCH)
    assert batch_specs("gpt", batch, "tp", MESH_AXES) == {"tokens": P(), "labels": P()}
    assert batch_specs("gpt", batch, "dp_tp", MESH_AXES) == {
        "tokens": P("data", None), "labels": P("data", None)}


def test_tp_megatron_layout_mlp():
    m = get_model("mlp")
    _, params = m.init(m.Config())
    specs = param_specs("mlp", params, "tp", ("model",), {"model": 4})
    for blk in specs["blocks"].values():
        assert blk["up"] == {"kernel": P(None, "model"), "bias": P("model")}
        assert blk["down"] == {"kernel": P("model", None), "bias": P()}


@pytest.mark.parametrize("strategy,axes", [
    ("dp", ("model",)), ("fsdp", ("x", "y")), ("tp", ("data",)), ("dp_tp", ("data",)),
    ("dp_tp", ("model",))])
def test_missing_axis_raises(strategy, axes):
    m = get_model("gpt")
    _, params = m.init(m.Config())
    shape = {a: 2 for a in axes}
    with pytest.raises(ValueError, match=strategy) as err:
        param_specs("gpt", params, strategy, axes, shape)
    for needed in required_axes(strategy):
        assert repr(needed) in str(err.value)
    with pytest.raises(ValueError, match=strategy):
        batch_specs("gpt", m.make_batch(m.Config(), 2), strategy, axes)


def test_bad_names_and_indivisible_tp_raise():
    m = get_model("gpt")
    _, params = m.init(m.Config())
    with pytest.raises(ValueError, match="unknown strategy"):
        param_specs("gpt", params, "zero3", MESH_AXES, MESH_SHAPE)
    with pytest.raises(ValueError, match="unknown model"):
        param_specs("bert", params, "dp", MESH_AXES, MESH_SHAPE)
    with pytest.raises(ValueError, match="not divisible"):
        param_specs("gpt", params, "tp", ("model",), {"model": 3})
