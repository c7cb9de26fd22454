"""Uneven shapes (issue #3): a dim that does not divide by its mesh axes is padded per
device and masked where padding would change a result — exact, never a silent fallback to
replication."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close

RNG = np.random.default_rng(0)


def head(x, w):
    h = x @ w
    return jax.nn.softmax(h, axis=-1).sum(0), h.max(0), h.min(1), jnp.mean(h)


@pytest.mark.parametrize("mesh_text,specs", [
    ("data=4,model=2", (P("data"), None)),                   # batch 10 on 4
    ("data=4,model=2", (None, P(None, "data"))),             # 50 columns on 4: softmax over a padded dim
    ("data=4,model=2", (P(None, "data"), P("data"))),        # contraction over a padded dim
    ("data=4,model=2", (P("data"), P(None, ("data", "model")))),  # axis reused: resolved, still exact
    ("a=8", (P("a"), P(None, "a"))),
])
def test_uneven_splits_are_exact(mesh_text, specs):
    x = RNG.normal(size=(10, 18)).astype(np.float32)
    w = RNG.normal(size=(18, 50)).astype(np.float32)
    pf = ash.parallelize(head, mesh=ash.make_mesh(mesh_text), in_specs=specs)
    assert_tree_close(pf(x, w), head(x, w), rtol=1e-5, atol=1e-6)
    assert_report_matches_hlo(pf, x, w)


def test_uneven_gradient_is_exact_and_noted():
    x = RNG.normal(size=(10, 18)).astype(np.float32)
    w = RNG.normal(size=(18, 50)).astype(np.float32)

    def loss(w, x):
        return jnp.mean(jax.nn.log_softmax(x @ w) ** 2)
    g = jax.value_and_grad(loss)
    pf = ash.parallelize(g, mesh=ash.make_mesh("data=4,model=2"), in_specs=(P(None, "model"), P("data")))
    assert_tree_close(pf(w, x), g(w, x), rtol=1e-5, atol=1e-7)
    notes = pf.program(w, x).notes
    assert any(kind == "padding" and "args[1]" in msg and "size 10" in msg for kind, msg, _ in notes)


def test_vocabulary_50257_split_8_ways():
    vocab, d = 50257, 16
    h = RNG.normal(size=(4, d)).astype(np.float32)
    w = (RNG.normal(size=(d, vocab)) / 4).astype(np.float32)
    labels = RNG.integers(0, vocab, size=(4,)).astype(np.int32)

    def xent(h, w, labels):
        logits = h @ w
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, vocab), -1))
    g = jax.value_and_grad(xent, argnums=(0, 1))
    pf = ash.parallelize(g, mesh=ash.make_mesh("model=8"), in_specs=(None, P(None, "model"), None))
    (loss, (dh, dw)) = pf(h, w, labels)
    (ref_loss, (ref_dh, ref_dw)) = g(h, w, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-9)
    # The logits stay split: nothing gathers the [4, 50257] matrix. (The weight gradient is
    # gathered once, at the output: a jax.Array cannot be split unevenly.)
    report = pf.report(h, w, labels)
    gathers = [c for c in report.collectives if c.kind == "all-gather"]
    assert [(c.shape, c.value) for c in gathers] == [((d, -(-vocab // 8)), "out[1][1]")]


def test_six_heads_over_four_devices():
    b, t, heads, dh = 2, 4, 6, 8
    d = heads * dh
    x = RNG.normal(size=(b, t, d)).astype(np.float32)
    wq = (RNG.normal(size=(d, d)) / 8).astype(np.float32)

    def attn(x, wq):
        q = (x @ wq).reshape(b, t, heads, dh)
        s = jnp.einsum("bthd,bshd->bhts", q, q)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), q).reshape(b, t, d)
    pf = ash.parallelize(attn, mesh=ash.make_mesh("data=2,model=4"), in_specs=(None, P(None, "model")))
    np.testing.assert_allclose(pf(x, wq), attn(x, wq), rtol=1e-5, atol=1e-5)
    q_heads = ash.parallelize(lambda x, wq: ash.constrain((x @ wq).reshape(b, t, heads, dh), P(None, None, "model")),
                              mesh=ash.make_mesh("data=2,model=4"), in_specs=(None, None))
    np.testing.assert_allclose(q_heads(x, wq), (x @ wq).reshape(b, t, heads, dh), rtol=1e-5, atol=1e-5)


def test_bfloat16_uneven_max_min_and_gather_fill_are_exact():
    """bfloat16 is a float to the rules (numpy's issubdtype says it is not): padding under a
    split max/min is masked with -inf/+inf, and an out-of-bounds gather fills with NaN."""
    x = jnp.asarray(RNG.normal(size=(10, 50)), jnp.bfloat16)
    idx = jnp.asarray([0, 3, 9, 12, -1, 4])          # 12 and -1 are out of bounds

    def f(x, idx):
        gathered = x.at[idx].get(mode="fill")
        return x.max(0), x.min(0), gathered

    pf = ash.parallelize(f, mesh=ash.make_mesh("data=4,model=2"), in_specs=(P("data", "model"), None))
    got, want = pf(x, idx), f(x, idx)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
