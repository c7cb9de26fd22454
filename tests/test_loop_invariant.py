"""Issue #15: a language model whose LSTM runs over ``lax.scan`` (packed gates: one
``[in+hidden, 4 hidden]`` weight split into four), every parameter split over ``data``
(fsdp) and the batch split over ``data`` too, as the zoo's haiku/lstm_lm.

A weight the loop reads is a loop constant: its reshard is hoisted out of the loop (XLA's
loop-invariant code motion) and runs once per step, while a reshard of the activations runs
every trip. Priced alike, gathering the weight once looked as dear as gathering ``[x, h]``
on each trip, and the gates ran column-parallel over ``data``: per trip an all-gather of
``[x, h]``, collective-permutes of the gate columns that cross device blocks and an all-to-all
of ``h`` back to the batch split, and between the loops every residual of the backward pass
moved from the hidden split to the batch split (all-to-alls whose pieces XLA holds together:
more memory than jax.jit). Two propagation details led there as well: its first look at the
loop stamped the loop's outputs replicated, so the head's dot reading them merged in its
weight's split of the contracted dim (the activations came out split over hidden); and a
priced choice took such a provisional replicated result as a layout to gather into. Now the
chooser weighs each reshard by how often it runs (``ir.hoisted_runs``), a loop's results take
the body's layouts before their consumers are visited, and an open result is only a target
once settled: the loop runs batch-parallel with the weight gathered once, as jax.jit's does.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, against_jit, count

T, B, D, H, V = 16, 16, 32, 32, 64


def lstm_loss(params, tokens, labels):
    w, b = params["w"], params["b"]

    def cell(carry, x):
        h, c = carry
        i, g, f, o = jnp.split(jnp.concatenate([x, h], -1) @ w + b, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h
    init = (jnp.zeros((tokens.shape[0], H)), jnp.zeros((tokens.shape[0], H)))
    _, hs = jax.lax.scan(cell, init, jnp.swapaxes(params["embed"][tokens], 0, 1))
    logits = jnp.swapaxes(hs, 0, 1) @ params["head"] + params["head_b"]
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)
    return -picked.mean()


def step(params, tokens, labels):
    """One SGD step: the updated parameters keep the parameters' (fsdp) layouts."""
    loss, grads = jax.value_and_grad(lstm_loss)(params, tokens, labels)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


PARAMS = ("embed", "w", "b", "head", "head_b")
SPECS = ({k: P("data") for k in PARAMS}, P("data"), P("data"))


def _args():
    rng = np.random.default_rng(0)
    shapes = {"embed": (V, D), "w": (D + H, 4 * H), "b": (4 * H,), "head": (H, V), "head_b": (V,)}
    params = {k: (rng.normal(size=s) * (1.0 if k == "embed" else 0.2)).astype(np.float32)
              for k, s in shapes.items()}
    return params, rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def test_fsdp_lstm_gathers_its_weight_once_not_the_activations_every_trip():
    args = _args()
    mesh = ash.make_mesh("data=8")
    pf = ash.parallelize(step, mesh=mesh, in_specs=SPECS)
    assert_tree_close(pf(*args), step(*args), rtol=1e-5, atol=1e-6)
    _, hlo = assert_report_matches_hlo(pf, *args)
    assert count(hlo, "collective-permute") == 0, "the gates run on the batch split: no gate columns move"
    (of, om, ow), (tf, tm, tw) = against_jit(pf, step, mesh, SPECS, *args)
    assert of <= tf, (of, tf)
    assert om <= 1.02 * tm, (om, tm)
    assert ow <= tw, (ow, tw)


def test_reshards_of_loop_constants_run_once_per_step():
    """The report counts a loop constant's reshard once per step (hoisted out of the loop),
    an activation's once per trip."""
    args = _args()
    report = ash.parallelize(step, mesh=ash.make_mesh("data=8"), in_specs=SPECS).report(*args)
    gathers = [c for c in report.collectives if c.kind == "all-gather"]
    weight = [c for c in gathers if c.wire_bytes == 7 / 8 * (D + H) * 4 * H * 4]
    assert weight and all(c.trips == 1 for c in weight), [(c.value, c.trips) for c in gathers]
    assert any(c.trips == T for c in report.collectives), "the backward loop's own collectives run every trip"
