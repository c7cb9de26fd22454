"""Control flow (issue #3): scan, while, fori_loop, cond and remat kept as regions; loop
carries keep one layout; loops stay loops in the compiled program; results equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close

RNG = np.random.default_rng(0)
W = (RNG.normal(size=(4, 16, 16)) / 4).astype(np.float32)
X = RNG.normal(size=(8, 16)).astype(np.float32)


def scan_layers(w, x):
    def layer(h, wi):
        return jnp.tanh(h @ wi) + h, h.sum()
    h, sums = jax.lax.scan(layer, x, w)
    return h, sums


@pytest.mark.parametrize("w_spec,x_spec", [(P(None, None, "model"), P("data")), (None, P("data")),
                                           (P(None, "model", None), None)])
def test_scan_equals_one_device_and_stays_a_loop(w_spec, x_spec):
    pf = ash.parallelize(scan_layers, mesh=ash.make_mesh("data=2,model=4"), in_specs=(w_spec, x_spec))
    assert_tree_close(pf(W, X), scan_layers(W, X), rtol=1e-5, atol=1e-5)
    text = pf.lower(W, X).compile().as_text()
    assert text.count(" while(") == 1, "the scan must stay one loop"
    assert_report_matches_hlo(pf, W, X)


def test_scan_gradient_equals_one_device():
    def loss(w, x):
        h, sums = scan_layers(w, x)
        return (h ** 2).mean() + sums.sum()
    g = jax.value_and_grad(loss)
    pf = ash.parallelize(g, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P(None, None, "model"), P("data")))
    assert_tree_close(pf(W, X), g(W, X), rtol=1e-5, atol=1e-5)


def test_while_and_fori_loop():
    def f(x):
        def body(i, c):
            return c * 0.5 + jnp.sin(c) * i
        y = jax.lax.fori_loop(0, 3, body, x)
        n, z = jax.lax.while_loop(lambda s: s[1].sum() < 1e4, lambda s: (s[0] + 1, s[1] * 2), (0, jnp.abs(y) + 1))
        return n, z
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=8"), in_specs=(P("data"),))
    assert_tree_close(pf(X), f(X), rtol=1e-6, atol=1e-6)
    # The loop condition reads a sum of split data: it is all-reduced inside the loop.
    report = pf.report(X)
    assert any(c.kind == "all-reduce" for c in report.collectives)


def test_cond_branches_keep_the_split_layout():
    def f(x, flag):
        return jax.lax.cond(flag > 0, lambda a: a * 2, lambda a: a - 1, x)
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", "model"), None))
    for flag in (np.int32(1), np.int32(-1)):
        np.testing.assert_allclose(pf(X, flag), f(X, flag), rtol=1e-6)
    report = pf.report(X, np.int32(1))
    assert report.layouts["out"] == "[S(0), S(1)]"
    assert report.collectives == []


def test_remat_survives_lowering():
    def loss(w, x, remat):
        layer = lambda h: jnp.tanh(h @ w)
        if remat:
            layer = jax.checkpoint(layer)
        return layer(layer(x)).sum()
    w = W[0]
    texts = {}
    for remat in (True, False):
        g = jax.grad(lambda w, x: loss(w, x, remat))
        pf = ash.parallelize(g, mesh=ash.make_mesh("data=8"), in_specs=(None, P("data")))
        np.testing.assert_allclose(pf(w, X), g(w, X), rtol=1e-5, atol=1e-5)
        texts[remat] = pf.lower(w, X).as_text()
    # jax.checkpoint's recomputation is fenced by an optimization barrier (prevent_cse), so
    # XLA cannot merge it back into the forward pass.
    assert "optimization_barrier" in texts[True] and "optimization_barrier" not in texts[False]
