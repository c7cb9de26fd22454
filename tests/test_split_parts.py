"""Issue #15: a fused column-parallel projection split into equal parts (an LSTM's four gates,
a fused qkv) keeps every part split over the model axis: the rows that cross device blocks move
by collective-permutes (compiler/reindex.py), instead of an all-gather of the whole projection
and every part computed (and held for the backward pass) on every device."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, against_jit, count

RNG = np.random.default_rng(0)


def lstm_cell_loss(x, w, c):
    i, f, g, o = jnp.split(x @ w, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return (jax.nn.sigmoid(o) * jnp.tanh(c)).sum()


step = jax.value_and_grad(lstm_cell_loss, argnums=(0, 1))


def _args(batch=16, d=64, h=64):
    return (RNG.normal(size=(batch, d)).astype(np.float32),
            RNG.normal(size=(d, 4 * h)).astype(np.float32) * 0.1,
            RNG.normal(size=(batch, h)).astype(np.float32))


SPECS = (P("data"), P(None, "model"), P("data"))


def test_equal_split_of_a_column_parallel_projection_stays_split():
    args = _args()
    mesh = ash.make_mesh("data=2,model=4")
    pf = ash.parallelize(step, mesh=mesh, in_specs=SPECS)
    assert_tree_close(pf(*args), step(*args), rtol=1e-5, atol=1e-5)
    report, hlo = assert_report_matches_hlo(pf, *args)
    assert count(hlo, "all-gather") == 0, "the gates are never gathered whole"
    assert count(hlo, "collective-permute", ("model",)) > 0, "the crossing rows move by permutes"
    gates = [r for r in report.equations if r.op == "split"][0]
    assert all("S(" in res.split(",", 2)[-1] for res in gates.results), gates.results
    # Memory and work as jax.jit's own propagation with the same annotations.
    ours, theirs = against_jit(pf, step, mesh, SPECS, *args)
    assert ours[1] <= 1.02 * theirs[1], ("memory", ours, theirs)
    assert ours[0] <= theirs[0], ("flops", ours, theirs)
    assert ours[2] <= theirs[2], ("wire bytes", ours, theirs)


def test_parts_that_do_not_divide_the_axis_are_gathered_as_before():
    """Three parts over four devices: no all-to-all can keep them split, and the batch split
    stays (only the model axis is gathered)."""
    def qkv(x, w):
        q, k, v = jnp.split(x @ w, 3, axis=-1)
        return ((q * k).sum(-1, keepdims=True) * v).sum()
    x, w = RNG.normal(size=(16, 32)).astype(np.float32), RNG.normal(size=(32, 96)).astype(np.float32) * 0.1
    pf = ash.parallelize(jax.value_and_grad(qkv, argnums=(0, 1)), mesh=ash.make_mesh("data=2,model=4"),
                         in_specs=(P("data"), P(None, "model")))
    assert_tree_close(pf(x, w), jax.value_and_grad(qkv, argnums=(0, 1))(x, w), rtol=1e-4, atol=1e-4)
    _, hlo = assert_report_matches_hlo(pf, x, w)
    assert count(hlo, "all-gather", ("data",)) == 0
