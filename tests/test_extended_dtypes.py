"""Inputs and outputs of every JAX dtype (API.md "parallelize"): typed PRNG keys
(``jax.random.key``) and arrays of them (``jax.random.split``), bfloat16, float8_e4m3fn and
int4. Each equals one device: bitwise for keys and integers, and for the floats computed by
the same elementwise ops."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash

from _util import mesh


def _equal(got, want, exact=True, rtol=0.0):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for k, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        assert isinstance(g.sharding, NamedSharding)
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.extended):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        g, w = np.asarray(g), np.asarray(w)
        if exact:
            np.testing.assert_array_equal(g, w, err_msg=f"out[{k}]")
        else:
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=rtol, atol=rtol,
                                       err_msg=f"out[{k}]")


def test_typed_key_argument():
    m = mesh("data=2,model=4")
    key = jax.random.key(0)
    x = np.arange(128, dtype=np.float32).reshape(8, 16)

    def f(k, x):
        k1, k2 = jax.random.split(k)
        return jax.random.normal(k1, x.shape) * x, jax.random.bits(k2, (8, 4)), k1

    pf = ash.parallelize(f, mesh=m, in_specs=(None, P("data", "model")))
    _equal(pf(key, x), jax.jit(f)(key, x))
    assert pf.trace_count == 1


def test_array_of_keys_split_over_data():
    """``jax.random.split(key, 8)`` passed in split over 'data', each device drawing for its own
    keys (vmap of normal, fold_in, split); keys also come back out, split."""
    m = mesh("data=2,model=4")
    keys = jax.random.split(jax.random.key(1), 8)
    ids = np.arange(8, dtype=np.int32)

    def f(ks, ids):
        noise = jax.vmap(lambda k: jax.random.normal(k, (16,)))(ks)
        folded = jax.vmap(jax.random.fold_in)(ks, ids)
        pairs = jax.vmap(lambda k: jax.random.split(k, 2))(ks)
        return noise, folded, pairs, jax.random.key_data(ks), jax.vmap(jax.random.uniform)(folded)

    pf = ash.parallelize(f, mesh=m, in_specs=(P("data"), P("data")))
    got = pf(keys, ids)
    _equal(got, jax.jit(f)(keys, ids))
    assert got[0].sharding.spec[0] == "data" and got[1].sharding.spec[0] == "data"
    # Keys placed beforehand in the expected layout are used as they are.
    placed = jax.device_put((keys, ids), pf.input_shardings(keys, ids))
    pf(*placed)
    assert pf.last_call_copies == 0


def test_report_on_key_inputs(tmp_path):
    """The report names, sizes and renders typed-key values (it used ``np.dtype`` on them and
    crashed): a key array split over 'data' is 8 key-data bytes per device here."""
    m = mesh("data=8")
    keys = jax.random.split(jax.random.key(0), 8)

    def f(ks, x):
        return jax.vmap(lambda k, r: jax.random.normal(k, (4,)) + r)(ks, x)

    pf = ash.parallelize(f, mesh=m, in_specs=(P("data"), P("data", None)))
    rep = pf.report(keys, jnp.ones((8, 4)))
    assert rep.layouts["args[0]"] == "[S(0)]"
    key_bytes = jax.random.key_data(keys).nbytes // 8        # one key per device
    assert f"key<fry>[8], {key_bytes} B per device" in rep.explain("args[0]")
    entry = rep.to_dict()["inputs"][0]
    assert (entry["dtype"], entry["bytes_per_device"]) == ("key<fry>", key_bytes)
    rep.to_html(tmp_path / "keys.html")
    assert "key&lt;fry&gt;[8]" in (tmp_path / "keys.html").read_text()


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_low_precision_floats_in_and_out(dtype):
    m = mesh("data=2,model=4")
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 16)), dt)
    w = jnp.asarray(rng.standard_normal((16, 8)) * 0.25, dt)

    def elementwise(x):
        return x, (x.astype(jnp.float32) * 2 + 1).astype(dt), jnp.maximum(x, jnp.zeros((), dt)), x.T

    pf = ash.parallelize(elementwise, mesh=m, in_specs=(P("data", "model"),))
    _equal(pf(x), jax.jit(elementwise)(x))          # same ops on the same elements: bitwise

    def matmul(x, w):
        return (x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(dt), x.astype(jnp.float32).sum(0)

    pf = ash.parallelize(matmul, mesh=m, in_specs=(P("data", "model"), P("model", None)))
    # Sums over a split dim add in another order: equal to the dtype's rounding.
    _equal(pf(x, w), jax.jit(matmul)(x, w), exact=False, rtol=0.07 if dtype == "float8_e4m3fn" else 1e-2)


def test_int4_in_and_out():
    m = mesh("data=2,model=4")
    x = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (8, 16)), jnp.int4)

    def f(x):
        return x, x + jnp.int4(1), x.astype(jnp.int32).sum(1), x.T, (x.astype(jnp.int32) * 3).astype(jnp.int4)

    pf = ash.parallelize(f, mesh=m, in_specs=(P("data", "model"),))
    _equal(pf(x), jax.jit(f)(x))
