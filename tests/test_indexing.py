"""Indexing (issue #3): vocabulary-parallel embedding lookup and its gradient, with the
single-device behaviour of out-of-range ids kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo

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
