"""Table-driven tests of factor rules: per op, which tensor dims share which factors and of
what kind (pass / sum / max / replicate)."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from autoshard.compiler import ir
from autoshard.compiler.ops import get_rule
from autoshard.compiler.ops.shape import reshape_factor_dims
from autoshard.compiler.ops import FactorBuilder


def first_eqn(fn, *shapes, prim=None):
    avals = [jax.ShapeDtypeStruct(s, jnp.float32) if isinstance(s, tuple) else s for s in shapes]
    graph = ir.trace(lambda *a: [fn(*a)], avals)
    eqn = next(e for e in graph.eqns if prim is None or e.prim.name == prim)
    return eqn, get_rule(eqn).factors(eqn)


def named(rule):
    """Render a rule as 'operands -> results' with factors lettered and kinds marked."""
    order = {}
    for tensor in (*rule.operands, *rule.results):
        for d in tensor:
            for f in d:
                order.setdefault(f, len(order))
    letter = lambda f: "abcdefghijklmnop"[order[f]] + {"pass": "", "sum": "+", "max": "^", "min": "_",
                                                       "replicate": "!"}[rule.kinds[f]]
    dims = lambda tensor: "".join("(" + "".join(letter(f) for f in d) + ")" for d in tensor)
    return ",".join(dims(t) for t in rule.operands) + "->" + ",".join(dims(t) for t in rule.results)


CASES = [
    ("matmul", lambda x, w: x @ w, [(8, 16), (16, 4)], "dot_general", "(a)(b+),(b+)(c)->(a)(c)"),
    ("batched", lambda x, w: jnp.einsum("bik,bkj->bij", x, w), [(2, 8, 16), (2, 16, 4)], "dot_general",
     "(a)(b)(c+),(a)(c+)(d)->(a)(b)(d)"),
    ("add", lambda x, y: x + y, [(8, 4), (8, 4)], "add", "(a)(b),(a)(b)->(a)(b)"),
    ("scalar", lambda x: x * 2.0, [(8, 4)], "mul", "(a)(b),->(a)(b)"),
    ("reduce_sum", lambda x: x.sum(1), [(8, 4)], "reduce_sum", "(a)(b+)->(a)"),
    ("reduce_max", lambda x: x.max(0), [(8, 4)], "reduce_max", "(a^)(b)->(b)"),
    ("argmax", lambda x: jnp.argmax(x, 1), [(8, 4)], "argmax", "(a)(b!)->(a)"),
    ("transpose", lambda x: x.T, [(8, 4)], "transpose", "(a)(b)->(b)(a)"),
    ("broadcast", lambda x: lax.broadcast_in_dim(x, (8, 3, 4), (0, 2)), [(8, 4)], "broadcast_in_dim",
     "(a)(b)->(a)(c)(b)"),
    ("broadcast_size1", lambda x: lax.broadcast_in_dim(x, (8, 3, 4), (0, 1, 2)), [(8, 1, 4)],
     "broadcast_in_dim", "(a)()(b)->(a)(c)(b)"),
    ("split_heads", lambda x: x.reshape(8, 4, 8), [(8, 32)], "reshape", "(a)(bc)->(a)(b)(c)"),
    ("merge_heads", lambda x: x.reshape(8, 32), [(8, 4, 8)], "reshape", "(a)(b)(c)->(a)(bc)"),
    # A sliced dim is one even factor (gcd of the lengths, ``c!`` of size 1 makes it compound):
    # a split one stays split, the rows crossing device blocks move (compiler/reindex.py).
    ("slice", lambda x: x[:, 1:3], [(8, 4)], "slice", "(a)(bc!)->(a)(bc!)"),
    ("strided_slice", lambda x: x[:, ::2], [(8, 4)], "slice", "(a)(b!)->(a)(c!)"),
    ("cumsum", lambda x: jnp.cumsum(x, 0), [(8, 4)], "cumsum", "(a!)(b)->(a!)(b)"),
]


@pytest.mark.parametrize("name,fn,shapes,prim,expected", CASES, ids=[c[0] for c in CASES])
def test_factor_rule(name, fn, shapes, prim, expected):
    _, rule = first_eqn(fn, *shapes, prim=prim)
    assert named(rule) == expected


def test_embedding_gather_keeps_batch_and_feature_dims_and_sums_over_vocab():
    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    eqn, rule = first_eqn(lambda t, i: jnp.take(t, i, axis=0), (64, 8), ids, prim="gather")
    table, indices = rule.operands
    (out,) = rule.results
    assert rule.kinds[table[0][0]] == "sum"                        # vocab: a split gives P(sum)
    assert all(table[0][0] not in d for d in out)
    assert table[1] == out[2] and rule.kinds[table[1][0]] == "pass"  # feature
    assert indices[0] == out[0] and indices[1] == out[1]            # batch dims


def test_embedding_gradient_scatter_add_is_a_sum_over_the_batch():
    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    grad = jax.grad(lambda t, i: jnp.take(t, i, axis=0).sum())
    eqn, rule = first_eqn(grad, (64, 8), ids, prim="scatter-add")
    operand, _, updates = rule.operands
    assert [rule.kinds[d[0]] for d in updates[:2]] == ["sum", "sum"]
    assert rule.accumulators == (0,)


@pytest.mark.parametrize("src,dst,expected_in,expected_out", [
    ((6, 4), (24,), [[0], [1]], [[0, 1]]),
    ((6, 4), (4, 6), [[0, 1], [2]], [[0, 3], [4]]),       # no common divisor after 2: replicate rest
    ((8,), (2, 4), [[0, 1]], [[0], [1]]),
    ((1, 8), (8, 1), [[], [0]], [[0], []]),
])
def test_reshape_factorization(src, dst, expected_in, expected_out):
    fb = FactorBuilder()
    ins, outs = reshape_factor_dims(src, dst, fb)
    assert [list(d) for d in ins] == expected_in and [list(d) for d in outs] == expected_out
    # Shared factors have the same size on both sides; the product matches each dim.
    for shape, dims in ((src, ins), (dst, outs)):
        for size, d in zip(shape, dims):
            prod = 1
            for f in d:
                prod *= fb.sizes[f]
            assert prod == size
