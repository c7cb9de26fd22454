"""Indexing (issue #3): vocabulary-parallel embedding lookup and its gradient, with the
single-device behaviour of out-of-range ids kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, flops_and_memory, hlo_collectives

RNG = np.random.default_rng(0)


def lookups(table, ids):
    return (jnp.take(table, ids, axis=0),                  # fill mode: NaN for ids outside
            jnp.take(table, ids, axis=0, mode="clip"),
            jnp.take_along_axis(table, jnp.abs(ids[:, :1]) % table.shape[0], axis=0))


def embedding_grad(table, ids):
    return jax.grad(lambda t: (jnp.take(t, jnp.clip(ids, 0, t.shape[0] - 1), axis=0) ** 2).sum())(table)


@pytest.mark.parametrize("vocab", [64, 50])   # 50 rows over 8 or 4 devices: uneven
@pytest.mark.parametrize("mesh_text,spec", [("model=8", P("model")), ("data=2,model=4", P("model", None)),
                                            ("data=2,model=4", P(("data", "model")))])
def test_vocab_parallel_lookup(vocab, mesh_text, spec):
    table = RNG.normal(size=(vocab, 16)).astype(np.float32)
    ids = RNG.integers(-3, vocab + 3, size=(4, 6)).astype(np.int32)
    pf = ash.parallelize(lookups, mesh=ash.make_mesh(mesh_text), in_specs=(spec, None))
    for got, want in zip(pf(table, ids), lookups(table, ids)):
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    report, _ = assert_report_matches_hlo(pf, table, ids)
    lookup = [r for r in report.equations if r.op == "gather"][0]
    assert "P(sum)" in lookup.results[0], "the lookup runs on the local rows, leaving a partial sum"
    pg = ash.parallelize(embedding_grad, mesh=ash.make_mesh(mesh_text), in_specs=(spec, None))
    np.testing.assert_allclose(pg(table, ids), embedding_grad(table, ids), rtol=1e-5, atol=1e-6)


def label_logits(logits, labels):
    """``take_along_axis`` over the last axis: a gather whose other dims are batching dims."""
    return (jnp.take_along_axis(logits, labels[..., None], axis=-1),
            jnp.take_along_axis(logits, labels[..., None], axis=-1, mode="clip"))


@pytest.mark.parametrize("vocab", [64, 50])   # 50 over 4 devices: uneven
def test_vocab_parallel_take_along_axis(vocab):
    """Batched gather (operand_batching_dims) on a vocab-split operand: looked up locally,
    P(sum), and its gradient (a batched scatter-add) scatters only each device's columns."""
    logits = RNG.normal(size=(4, 6, vocab)).astype(np.float32)
    labels = RNG.integers(-3, vocab + 3, size=(4, 6)).astype(np.int32)
    spec = P("data", None, "model")
    pf = ash.parallelize(label_logits, mesh=ash.make_mesh("data=2,model=4"), in_specs=(spec, None))
    for got, want in zip(pf(logits, labels), label_logits(logits, labels)):
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    report, hlo = assert_report_matches_hlo(pf, logits, labels)
    lookup = [r for r in report.equations if r.op == "gather"][0]
    assert "P(sum)" in lookup.results[0], "the lookup runs on the local columns, leaving a partial sum"
    assert not [c for c in hlo if c.kind == "all-gather"], "the logits are never gathered whole"

    def grad(lg, lb):
        return jax.grad(lambda x: (jnp.take_along_axis(x, jnp.clip(lb, 0, vocab - 1)[..., None], -1) ** 2).sum())(lg)
    pg = ash.parallelize(grad, mesh=ash.make_mesh("data=2,model=4"), in_specs=(spec, None), out_specs=spec)
    np.testing.assert_allclose(pg(logits, labels), grad(logits, labels), rtol=1e-5, atol=1e-6)


def tied_lm_step(params, batch):
    """Vocab-parallel embedding, tied head and cross-entropy (optax's form: take_along_axis of
    the logits at the labels), value_and_grad and an SGD step."""
    def loss(p):
        x = jnp.take(p["embed"], batch["tokens"], axis=0)
        x = jnp.tanh(x @ p["w"])
        logits = x @ p["embed"].T
        logz = jax.nn.logsumexp(logits, axis=-1)
        return (logz - jnp.take_along_axis(logits, batch["labels"][..., None], -1)[..., 0]).mean()
    value, g = jax.value_and_grad(loss)(params)
    return value, jax.tree.map(lambda a, b: a - 0.1 * b, params, g)


def test_vocab_parallel_cross_entropy_holds_no_more_memory_than_jit():
    """Issue #15: the cross-entropy of vocab-split logits used to all-gather them (and hold the
    whole-vocab logits and their gradient on every device), 7-11% above jax.jit's memory under
    Megatron tp; it now stays vocab-parallel like XLA's own propagation."""
    from jax.sharding import NamedSharding
    vocab, d = 256, 32
    params = {"embed": RNG.normal(size=(vocab, d)).astype(np.float32) * 0.1,
              "w": RNG.normal(size=(d, d)).astype(np.float32) * 0.1}
    batch = {"tokens": RNG.integers(0, vocab, (8, 16)).astype(np.int32),
             "labels": RNG.integers(0, vocab, (8, 16)).astype(np.int32)}
    mesh = ash.make_mesh("data=2,model=4")
    pspecs = {"embed": P("model", None), "w": P()}
    bspecs = {"tokens": P("data"), "labels": P("data")}
    pf = ash.parallelize(tied_lm_step, mesh=mesh, in_specs=(pspecs, bspecs))
    want = tied_lm_step(params, batch)
    got = pf(params, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-6)
    ours = pf.lower(params, batch).compile()
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), (pspecs, bspecs),
                         is_leaf=lambda s: isinstance(s, P))
    with jax.set_mesh(mesh):
        theirs = jax.jit(tied_lm_step, in_shardings=named).lower(params, batch).compile()

    (_, ours_memory), (_, theirs_memory) = flops_and_memory(ours), flops_and_memory(theirs)
    assert ours_memory <= 1.02 * theirs_memory, (ours_memory, theirs_memory)
    hlo = hlo_collectives(pf, params, batch)
    assert not [c for c in hlo if c.kind == "all-gather"], "the logits are never gathered whole"


def window_of_one(table_t, ids):
    """A lookup along dim 1 of a transposed table ``[D, V]`` that keeps the indexed dim as a
    size-1 window (not collapsed), as penzai's named-axis indexing emits it."""
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(0, 3), collapsed_slice_dims=(), start_index_map=(1,))
    return jax.lax.gather(table_t, ids[..., None], dn, (table_t.shape[0], 1),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def test_vocab_parallel_lookup_with_a_window_of_one():
    table_t = RNG.normal(size=(16, 64)).astype(np.float32)
    ids = RNG.integers(0, 64, size=(4, 6)).astype(np.int32)
    spec = P(None, "model")
    mesh = ash.make_mesh("data=2,model=4")
    pf = ash.parallelize(window_of_one, mesh=mesh, in_specs=(spec, P("data")))
    np.testing.assert_allclose(pf(table_t, ids), window_of_one(table_t, ids), rtol=1e-6)
    report, hlo = assert_report_matches_hlo(pf, table_t, ids)
    assert "P(sum)" in [r for r in report.equations if r.op == "gather"][0].results[0]
    assert not [c for c in hlo if c.kind == "all-gather"], "the table is never gathered whole"

    def grad(t, i):
        return jax.grad(lambda t: (window_of_one(t, i) ** 2).sum())(t)
    pg = ash.parallelize(grad, mesh=mesh, in_specs=(spec, P("data")), out_specs=spec)
    np.testing.assert_allclose(pg(table_t, ids), grad(table_t, ids), rtol=1e-5, atol=1e-6)
