"""Sorting and selection rules (``ops/sort.py``): ``sort``, ``top_k`` and ``approx_top_k``
keep the dim they sort or select along whole on every device and pass the others through;
sharded results equal one device's, whatever the inputs' layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, count
from test_rules import first_eqn, named

RNG = np.random.default_rng(0)

CASES = [
    ("top_k_last", lambda x: lax.top_k(x, 2), [(8, 16)], "top_k", "(a)(b!)->(a)(c!),(a)(c!)"),
    ("top_k_3d", lambda x: lax.top_k(x, 3), [(4, 6, 8)], "top_k", "(a)(b)(c!)->(a)(b)(d!),(a)(b)(d!)"),
    ("top_k_axis0", lambda x: lax.top_k(x, 2, axis=0), [(8, 16)], "top_k", "(a!)(b)->(c!)(b),(c!)(b)"),
    # k == N: the result dim has the operand's size but is still its own (replicated) factor.
    ("top_k_all", lambda x: lax.top_k(x, 16), [(8, 16)], "top_k", "(a)(b!)->(a)(c!),(a)(c!)"),
    ("approx_max_k", lambda x: lax.approx_max_k(x, 2), [(8, 16)], "approx_top_k",
     "(a)(b!)->(a)(c!),(a)(c!)"),
    ("sort", lambda x: jnp.sort(x, axis=1), [(8, 16)], "sort", "(a)(b!)->(a)(b!)"),
    ("sort_axis0", lambda x: jnp.sort(x, axis=0), [(8, 16)], "sort", "(a!)(b)->(a!)(b)"),
    # argsort sorts (keys, iota) together: every operand and result shares the factors.
    ("argsort", lambda x: jnp.argsort(x, axis=1), [(8, 16)], "sort", "(a)(b!),(a)(b!)->(a)(b!),(a)(b!)"),
]


@pytest.mark.parametrize("name,fn,shapes,prim,expected", CASES, ids=[c[0] for c in CASES])
def test_factor_rule(name, fn, shapes, prim, expected):
    _, rule = first_eqn(fn, *shapes, prim=prim)
    assert named(rule) == expected


def test_no_sort_operand_may_stay_partial():
    for fn, prim in ((lambda x: lax.top_k(x, 2), "top_k"), (lambda x: jnp.sort(x), "sort")):
        eqn, _ = first_eqn(fn, (8, 16), prim=prim)
        from autoshard.compiler.ops import get_rule
        assert get_rule(eqn).partial_mode(eqn) == "none"


def routing(x, w):
    """The MoE router's pattern: top-k of a softmax, then one-hot masks and a prefix sum."""
    probs = jax.nn.softmax(x @ w, axis=-1)
    vals, ids = lax.top_k(probs, 2)
    mask = jax.nn.one_hot(ids[..., 0], w.shape[1], dtype=jnp.int32)
    return vals, ids, jnp.cumsum(mask, axis=1), jnp.sort(probs, axis=-1), jnp.argsort(probs, axis=1)


# x [G, S, D], w [D, E]: split on the group dim (passes through), on the sequence dim (the
# cumsum's axis: gathered first), on the expert dim (top_k and sort's axis: gathered), and
# on the contracting dim (top_k of a partial sum: reduced first).
@pytest.mark.parametrize("mesh_text,x_spec,w_spec", [
    ("data=8", P("data"), None),
    ("data=2,model=4", P("data", "model"), None),
    ("model=8", None, P(None, "model")),
    ("data=2,model=4", P("data", None, "model"), P("model", None)),
], ids=["groups", "groups+sequence", "experts", "contracting"])
def test_routing_equals_one_device(mesh_text, x_spec, w_spec):
    x = RNG.normal(size=(8, 16, 32)).astype(np.float32)
    w = (0.1 * RNG.normal(size=(32, 8))).astype(np.float32)   # probs near 1/8, well apart
    pf = ash.parallelize(routing, mesh=ash.make_mesh(mesh_text), in_specs=(x_spec, w_spec))
    got, want = pf(x, w), jax.jit(routing)(x, w)
    ranked = -np.sort(-np.asarray(want[3]), axis=-1)
    assert ((ranked[..., :-1] - ranked[..., 1:]) / ranked[..., :-1]).min() > 1e-5, "inputs must not tie"
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-7)
    report, hlo = assert_report_matches_hlo(pf, x, w)
    # Each op's axis is whole where it runs (top_k and sort along E = dim 2, the cumsum and
    # argsort along S = dim 1), whatever was split before.
    axes = {"top_k": [2], "cumsum": [1], "sort": [2, 1]}
    rows = [r for r in report.equations if r.op in axes]
    assert len(rows) == 4
    for r in rows:
        d = axes[r.op].pop(0)
        assert all(f"S({d})" not in lay for lay in r.operands + r.results), r
    if mesh_text == "data=8":
        assert not hlo, "groups split, every op runs on its own groups: no communication"


def test_split_sorted_dim_is_gathered_not_sorted_per_device():
    """A value split along its sort axis: per-device sorts would give sorted blocks, not a
    sorted row; the pass must gather the axis first."""
    x = RNG.normal(size=(4, 64)).astype(np.float32)
    fn = lambda x: (jnp.sort(x, axis=1), lax.top_k(x, 5)[0])
    pf = ash.parallelize(fn, mesh=ash.make_mesh("model=8"), in_specs=(P(None, "model"),))
    for g, w in zip(pf(x), fn(x)):
        np.testing.assert_array_equal(g, w)
    _, hlo = assert_report_matches_hlo(pf, x)
    assert count(hlo, "all-gather", ("model",)) >= 1
