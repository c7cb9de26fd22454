"""Random number primitives give the same values as on one device, split or not, with no
communication (issue #3)."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_tree_close


def noisy(x, seed):
    k = jax.random.key(seed)
    k1, k2 = jax.random.split(k)
    noise = jax.random.normal(k1, x.shape)
    keep = jax.random.bernoulli(k2, 0.5, x.shape)       # a dropout mask
    bits = jax.random.bits(jax.random.fold_in(k, 3), x.shape, jnp.uint8)
    return jnp.where(keep, x + noise, 0.0), bits, jax.random.uniform(jax.random.PRNGKey(seed), (10, 3))


@pytest.mark.parametrize("mesh_text,spec", [("data=2,model=4", P("data", "model")), ("a=8", P(None, "a")),
                                            ("a=8", P("a"))])   # 6 rows on 8 devices: uneven
def test_random_values_equal_one_device(mesh_text, spec):
    x = np.ones((6, 16), np.float32)
    pf = ash.parallelize(noisy, mesh=ash.make_mesh(mesh_text), in_specs=(spec, None))
    assert_tree_close(pf(x, 7), jax.jit(noisy)(x, 7), rtol=0, atol=0)
    report = pf.report(x, 7)
    if spec == P("data", "model"):
        assert report.collectives == []
        assert report.layouts["out[0]"] == "[S(0), S(1)]"


@pytest.mark.skipif("num_streams" not in inspect.signature(jax.random.bits).parameters,
                    reason="jax.random.bits(num_streams=) is new in JAX 0.12.1")
def test_several_streams_equal_one_device():
    """JAX 0.12.1's random_bits returns one result per stream (a multiple-results primitive):
    single keys keep them whole, batched keys split over their batch dim."""
    def f(keys, key):
        batched = jax.vmap(lambda k: jax.random.bits(k, (4,), num_streams=2))(keys)
        return batched, jax.random.bits(key, (6, 16), num_streams=2)

    keys = jax.random.split(jax.random.key(3), 8)
    pf = ash.parallelize(f, mesh=ash.make_mesh("a=8"), in_specs=(P("a"), None))
    assert_tree_close(pf(keys, jax.random.key(4)), jax.jit(f)(keys, jax.random.key(4)), rtol=0, atol=0)
