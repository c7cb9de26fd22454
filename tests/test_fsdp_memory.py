"""FSDP on data=8 holds no more memory than ``jax.jit`` with the same annotations (issue #15).

A layernorm scale gathered once and read again by the backward (a product a reduction
reads) would make XLA CPU store its broadcast to activation size from the forward to the
backward; insert_collectives re-gathers it for that consumer instead (as XLA's own partitioner
does), which the report lists and the HLO shows.

A broadcast that widens a small fsdp-split value (a bias or a norm scale over features, a pooled
gradient over features) takes its layout from its consumers before its operand's split
(passes/propagate.py): taken from the operand first, the activation-sized result came out split
over features and met the batch-split activations in all-to-alls (haiku's transformer: the
biases; the CNN: its head's input gradient, broadcast back over height and width by the mean).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import autoshard as ash
from autoshard.benchmark.measure import BENCH_CONFIGS
from autoshard.models import get_model, presets

from _util import assert_report_matches_hlo, assert_tree_close, flops_memory_wire


def _against_jit(f, args, in_specs, out_specs):
    """``(pf, ours, jit's)``: the (flops, memory, wire bytes) per device of ``f`` under autoshard
    and under jax.jit with the same annotations, on data=8."""
    mesh = ash.make_mesh({"data": 8}, devices=jax.devices()[:8])
    pf = ash.parallelize(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    ours = flops_memory_wire(pf.lower(*args).compile(), mesh)
    named = lambda specs: tuple(NamedSharding(mesh, s) for s in specs)
    with jax.set_mesh(mesh):
        jitted = jax.jit(f, in_shardings=named(in_specs), out_shardings=named(out_specs))
        ref = flops_memory_wire(jitted.lower(*args).compile(), mesh)
    return pf, ours, ref


def test_gpt_fsdp_step_memory_within_jit():
    mesh = ash.make_mesh({"data": 8}, devices=jax.devices()[:8])
    axes = tuple(mesh.axis_names)
    m = get_model("gpt")
    cfg = presets.configure("gpt", m.Config(**BENCH_CONFIGS["gpt"]), "fsdp", axes)
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    args = (params, optimizer.init(params), m.make_batch(cfg, 16, seed=0))
    step = m.make_train_step(model_def, optimizer)
    pspecs = presets.param_specs("gpt", params, "fsdp", axes, dict(mesh.shape))
    bspecs = presets.batch_specs("gpt", args[2], "fsdp", axes)
    pf = ash.parallelize(step, mesh=mesh, in_specs=(pspecs, None, bspecs))

    report, hlo = assert_report_matches_hlo(pf, *args)
    regathers = [r for r in report.program.reshards if "re-gathers" in r.reason]
    assert len(regathers) == 5            # the five layernorm scales, for their backward use
    assert sum(c.kind == "all-gather" for c in hlo) == 43

    flops, memory, wire = flops_memory_wire(pf.lower(*args).compile(), mesh)
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda s: isinstance(s, P))
    shardings = tuple(pf.input_shardings(*args))
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, in_shardings=(named(pspecs), shardings[1], named(bspecs)))
        ref_flops, ref_memory, ref_wire = flops_memory_wire(jitted.lower(*args).compile(), mesh)
    assert memory <= 1.02 * ref_memory, (memory, ref_memory)
    assert flops <= ref_flops, (flops, ref_flops)
    assert wire <= ref_wire, (wire, ref_wire)

    got = pf(*args)
    want = jax.jit(step)(*args)
    # Adam divides by sqrt(nu): entries of near-zero gradient amplify reduction-order noise up
    # to ~lr, with or without the re-gathers (test_gpt_strategies masks them the same way).
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)


def test_a_bias_broadcast_is_batch_split_as_the_sum_it_feeds():
    # hk.Linear's bias: broadcast_to the activation's shape, then added. Split over features
    # from the bias, the broadcast was moved to the batch split by an all-to-all of the whole
    # activation; taking the add's batch split instead, only the 128-byte bias is gathered.
    def step(x, w, b):
        def loss(w, b):
            h = x @ w
            y = jnp.tanh(h + jnp.broadcast_to(b, h.shape))
            return jnp.sum(y * y)
        gw, gb = jax.grad(loss, argnums=(0, 1))(w, b)
        return w - 0.1 * gw, b - 0.1 * gb

    rng = np.random.default_rng(0)
    args = (rng.normal(size=(16, 16, 32)).astype(np.float32),
            rng.normal(size=(32, 32)).astype(np.float32), rng.normal(size=(32,)).astype(np.float32))
    specs = (P("data"), P("data"), P("data"))
    pf, (flops, memory, wire), (ref_flops, ref_memory, ref_wire) = _against_jit(step, args, specs, specs[1:])

    report, hlo = assert_report_matches_hlo(pf, *args)
    assert not [c for c in hlo if c.kind == "all-to-all"]
    program = pf.program(*args)
    bias = next(e for e in program.graph.all_eqns() if e.prim.name == "broadcast_in_dim"
                and e.outvars[0].shape == (16, 16, 32))
    assert program.layouts[bias.outvars[0]].dims == (("data",), (), ())
    assert memory <= 1.02 * ref_memory, (memory, ref_memory)
    assert flops <= ref_flops, (flops, ref_flops)
    assert wire <= ref_wire, (wire, ref_wire)
    assert_tree_close(pf(*args), jax.jit(step)(*args), rtol=1e-5, atol=1e-5)


def test_a_mean_broadcast_keeps_the_input_gradient_batch_split():
    # The CNN's head on data=8: its weight split over input features, the gradient of the
    # pooled features comes out of a conflict (batch split from the logits' gradient, features
    # from the weight), settled by cost on the small [B, C] value: split over features, it
    # spares gathering the weight. The mean's broadcast back over the pooled dim then carried
    # that split over the whole activation gradient, which met the batch-split activations
    # in all-to-alls of activation size (1.2x jax.jit's memory, 1.05x its bytes here).
    B, S, D, C, K = 32, 8, 16, 64, 8

    def step(x, w1, w2):
        def loss(w1, w2):
            h = jnp.tanh(x @ w1)                       # [B, S, C]
            return jnp.sum((h.mean(axis=1) @ w2) ** 2)
        g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
        return w1 - 0.1 * g1, w2 - 0.1 * g2

    rng = np.random.default_rng(0)
    args = (rng.normal(size=(B, S, D)).astype(np.float32),
            rng.normal(size=(D, C)).astype(np.float32), rng.normal(size=(C, K)).astype(np.float32))
    specs = (P("data"), P("data"), P("data"))
    pf, (flops, memory, wire), (ref_flops, ref_memory, ref_wire) = _against_jit(step, args, specs, specs[1:])

    report, hlo = assert_report_matches_hlo(pf, *args)
    program = pf.program(*args)
    grad = next(e for e in program.graph.all_eqns() if e.prim.name == "broadcast_in_dim"
                and e.outvars[0].shape == (B, S, C))
    assert program.layouts[grad.outvars[0]].dims == (("data",), (), ())
    # What moves between the splits is the pooled [B, C] gradient, never an activation.
    assert all(c.payload_bytes <= B * C * 4 // 8 for c in report.collectives if c.kind == "all-to-all")
    assert memory <= 1.02 * ref_memory, (memory, ref_memory)
    assert flops <= ref_flops, (flops, ref_flops)
    assert wire <= ref_wire, (wire, ref_wire)
    assert_tree_close(pf(*args), jax.jit(step)(*args), rtol=1e-5, atol=1e-5)


def test_a_scale_broadcast_does_not_split_per_sample_statistics_over_features():
    # A group norm: per-sample statistics [B, G], repeated over each group's channels (a
    # broadcast), times the scale reshaped to [1, 1, C] (fsdp-split over channels: an implicit
    # broadcast). The statistics get the batch split through their broadcast; left to the
    # scale, whose split only widens, they would come out split over channels and be moved
    # back and forth in all-to-alls (1.005x jax.jit's flops, 1.023x its memory here).
    B, H, C, G = 16, 8, 16, 8

    def step(x, w, scale):
        def loss(w, scale):
            h = x @ w                                            # [B, H, C]
            g = h.reshape(B, H, G, C // G)
            mean = g.mean(axis=(1, 3))                           # [B, G]
            var = (g * g).mean(axis=(1, 3)) - mean * mean
            per_channel = lambda s: jnp.broadcast_to(s[:, :, None], (B, G, C // G)).reshape(B, 1, C)
            y = (h - per_channel(mean)) * (jax.lax.rsqrt(per_channel(var) + 1e-5) * scale.reshape(1, 1, C))
            return jnp.sum(jnp.tanh(y) ** 2)
        gw, gs = jax.grad(loss, argnums=(0, 1))(w, scale)
        return w - 0.1 * gw, scale - 0.1 * gs

    rng = np.random.default_rng(0)
    args = (rng.normal(size=(B, H, C)).astype(np.float32),
            rng.normal(size=(C, C)).astype(np.float32), rng.normal(size=(C,)).astype(np.float32))
    specs = (P("data"), P("data"), P("data"))
    pf, (flops, memory, wire), (ref_flops, ref_memory, ref_wire) = _against_jit(step, args, specs, specs[1:])

    report, hlo = assert_report_matches_hlo(pf, *args)
    assert not [c for c in hlo if c.kind == "all-to-all"]
    assert memory <= 1.02 * ref_memory, (memory, ref_memory)
    assert flops <= ref_flops, (flops, ref_flops)
    assert wire <= ref_wire, (wire, ref_wire)
    assert_tree_close(pf(*args), jax.jit(step)(*args), rtol=1e-5, atol=1e-5)
