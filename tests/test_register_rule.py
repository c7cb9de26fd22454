"""Issue #14 part 5: rules of your own (factor strings), custom_partitioning with a
sharding_rule, and a Pallas kernel (interpret mode) that keeps its split with no collective.

Expected factor tables are derived by hand from the rule strings; sharded results are compared
with the same function on one device; collectives are read from the compiled HLO."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jcore
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

import autoshard as ash
from autoshard.compiler.ops import RULES, FactorBuilder, _load_families
from autoshard.compiler.ops import custom
from autoshard.compiler.ops.custom import factor_rule, parse_rule

from autoshard.report.hlo import parse_collectives

from _util import assert_report_matches_hlo, assert_tree_close, kinds


@pytest.fixture(autouse=True)
def _restore_registry():
    """Rules registered here do not leak into other test modules (test_op_database checks
    that every registered primitive has a sample)."""
    # The op families register their rules on first use: load them before the snapshot, or
    # the restore would drop every rule a test here happened to load (and later modules would
    # run those ops on the fallback).
    _load_families()
    saved = dict(RULES), set(custom._USER), dict(custom._KERNELS)
    yield
    RULES.clear(), RULES.update(saved[0])
    custom._USER.clear(), custom._USER.update(saved[1])
    custom._KERNELS.clear(), custom._KERNELS.update(saved[2])


def named(rule):
    """'operands -> results' with factors lettered by first appearance and kinds marked
    (+ sum, ! never split), as in test_rules.py."""
    order = {}
    for tensor in (*rule.operands, *rule.results):
        for d in tensor:
            for f in d:
                order.setdefault(f, len(order))
    mark = {"pass": "", "sum": "+", "max": "^", "min": "_", "replicate": "!"}
    letter = lambda f: "abcdefghijklmnop"[order[f]] + mark[rule.kinds[f]]
    dims = lambda tensor: "".join("(" + "".join(letter(f) for f in d) + ")" for d in tensor)
    return ",".join(dims(t) for t in rule.operands) + "->" + ",".join(dims(t) for t in rule.results)


# (rule string, keywords, operand shapes, result shapes, expected table)
PARSE_CASES = [
    ("matmul", "i j, j k -> i k", {}, [(8, 16), (16, 4)], [(8, 4)], "(a)(b+),(b+)(c)->(a)(c)"),
    ("scores", "b h q d, b h k d -> b h q k", {}, [(2, 4, 8, 16), (2, 4, 8, 16)], [(2, 4, 8, 8)],
     "(a)(b)(c)(d+),(a)(b)(e)(d+)->(a)(b)(c)(e)"),
    ("attention", "b h q d, b h k d, b h k d -> b h q d", {"need_replication_factors": ("k",)},
     [(2, 4, 8, 16)] * 3, [(2, 4, 8, 16)], "(a)(b)(c)(d),(a)(b)(e!)(d),(a)(b)(e!)(d)->(a)(b)(c)(d)"),
    ("split_heads", "(h d) -> h d", {}, [(32,)], [(4, 8)], "(ab)->(a)(b)"),
    ("compound_size", "b (h d) -> b h", {"d": 8}, [(2, 32)], [(2, 4)], "(a)(bc+)->(a)(b)"),
    ("ellipsis", "... i, ... i -> ...", {}, [(2, 3, 8), (2, 3, 8)], [(2, 3)], "(a)(b)(c+),(a)(b)(c+)->(a)(b)"),
    ("ellipsis_empty", "... i -> ... i", {}, [(8,)], [(8,)], "(a)->(a)"),
    ("ellipsis_groups", "...0 i, ...1 j -> ...0 i", {},
     [(2, 8), (3, 3, 4)], [(2, 8)], "(a)(b),(c+)(d+)(e+)->(a)(b)"),
    ("broadcast_size1", "i j, i j -> i j", {}, [(8, 4), (8, 1)], [(8, 4)], "(a)(b),(a)()->(a)(b)"),
    ("one", "i 1 -> i", {}, [(8, 1)], [(8,)], "(a)()->(a)"),
    ("one_in_product", "(i 1) -> i", {}, [(8,)], [(8,)], "(a)->(a)"),
    ("reduction_factor", "i j -> i", {"reduction_factors": ("j",)}, [(8, 4)], [(8,)], "(a)(b+)->(a)"),
    ("need_replication", "i j -> i", {"need_replication_factors": ("j",)}, [(8, 4)], [(8,)], "(a)(b!)->(a)"),
    ("permutation", "i j -> i j", {"permutation_factors": ("j",)}, [(8, 4)], [(8, 4)], "(a)(b!)->(a)(b!)"),
    ("result_only", "i -> i j", {}, [(8,)], [(8, 4)], "(a)->(a)(b!)"),
    ("to_scalar", "i ->", {}, [(8,)], [()], "(a+)->"),
    ("two_results", "i j -> i j, i", {}, [(8, 4)], [(8, 4), (8,)], "(a)(b)->(a)(b),(a)"),
]


@pytest.mark.parametrize("name,text,kw,ins,outs,expected", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_factor_string_table(name, text, kw, ins, outs, expected):
    assert named(factor_rule(parse_rule(text, **kw), ins, outs)) == expected


def test_factor_sizes_come_from_the_shapes():
    fr = factor_rule(parse_rule("b (h d) -> b h", d=8), [(2, 32)], [(2, 4)])
    assert fr.sizes == (2, 4, 8)
    assert fr.operands == (((0,), (1, 2)),)          # (h d): h major, d minor


def test_the_notation_is_jax_own():
    """The same string gives the same mapping in JAX's SdyShardingRule (one parser)."""
    spec = parse_rule("b (h d), ... -> b h", d=8)
    assert tuple(map(tuple, spec.sdy.operand_mappings))[0] == ("b", ("h", "d"))
    assert spec.sdy.factor_sizes == {"d": 8}
    assert custom.rule_text(spec.sdy) == "b (h d), ... -> b h"


# ------------------------------------------------------------------- bad rules: typed errors
BAD = [
    ("i j, j k", {}, "->"),
    ("i j -> i (j", {}, "not balanced"),
    ("i 2j -> i", {}, "start with a letter"),
    ("i ...j -> i", {}, "Ellipsis"),
    ("i j -> i", {"reduction_factors": ("x",)}, "not used in the rule"),
    ("(i j) -> i", {}, "must specify its size"),
    ("i j -> i j", {"reduction_factors": ("j",)}, "appears in a result"),
    ("i j -> i", {"reduction_factors": "j"}, "tuple of factor names"),
    ("i j -> i", {"reduction_factors": ("j",), "need_replication_factors": ("j",)}, "only be in one"),
]


@pytest.mark.parametrize("text,kw,problem", BAD, ids=[b[0] + str(sorted(b[1])) for b in BAD])
def test_bad_rule_strings_raise_a_typed_error(text, kw, problem):
    with pytest.raises(ash.ShardingRuleError) as info:
        ash.register_rule("autoshard_test_bad_p", text, **kw)
    msg = str(info.value)
    assert isinstance(info.value, ash.ShardingError)
    assert problem in msg and repr(text) in msg and "fix:" in msg
    assert "autoshard_test_bad_p" not in RULES


@pytest.mark.parametrize("text,ins,outs,problem", [
    ("i j -> i", [(8, 4, 2)], [(8,)], "operand 0 has rank 3"),
    ("i, i -> i", [(8,), (4,)], [(8,)], "factor 'i' has sizes [4, 8]"),
    ("i j -> i j", [(8, 4), (8, 4)], [(8, 4)], "the rule has 1 operand(s)"),
    ("(h d) -> h d", [(30,)], [(4, 8)], "multiply to 32"),
    ("... i, ... i -> ... i", [(2, 8), (2, 3, 8)], [(2, 8)], "'...' stands for 1 leading dims"),
    ("i 1 -> i", [(8, 2)], [(8,)], "'1' marks a dim of size 2"),
])
def test_rules_that_do_not_fit_the_op_name_rule_and_op(text, ins, outs, problem):
    with pytest.raises(ash.ShardingRuleError) as info:
        factor_rule(parse_rule(text), ins, outs, where="my_op at model.py:3")
    msg = str(info.value)
    assert problem in msg and repr(text) in msg and "model.py:3" in msg and "fix:" in msg


def test_a_rule_that_does_not_fit_fails_at_trace_with_the_source_line():
    p = _matmul_prim("autoshard_test_misfit_p")
    ash.register_rule(p, "i j k, k l -> i l")
    pf = ash.parallelize(lambda x, w: p.bind(x, w), mesh=ash.make_mesh("data=2,model=4"))
    with pytest.raises(ash.ShardingRuleError, match="operand 0 has rank 2") as info:
        pf.report(np.ones((8, 16), np.float32), np.ones((16, 4), np.float32))
    assert "test_register_rule.py" in str(info.value)


def test_register_rule_targets():
    with pytest.raises(ash.ShardingRuleError, match="one primitive for many functions"):
        ash.register_rule("pallas_call", "i -> i")
    with pytest.raises(ash.ShardingRuleError, match="needs lower="):
        ash.register_rule(_row_kernel, "r c -> r c")
    with pytest.raises(ash.ShardingRuleError, match="target is a Primitive"):
        ash.register_rule(3, "i -> i")


def test_overriding_a_builtin_rule_warns_and_replaces(monkeypatch):
    RULES["sin"]                                      # loaded (autoshard's own rule)
    monkeypatch.setitem(RULES, "sin", RULES["sin"])   # restored after the test
    monkeypatch.setattr(custom, "_USER", set())
    with pytest.warns(UserWarning, match="replaces autoshard's built-in rule for 'sin'"):
        ash.register_rule(jax.lax.sin_p, "i j -> i j", need_replication_factors=("j",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ash.register_rule("sin", "i j -> i j", need_replication_factors=("j",))   # again: no warning
    mesh = ash.make_mesh("data=2,model=4")
    pf = ash.parallelize(jnp.sin, mesh=mesh, in_specs=(P("data", "model"),))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    assert pf.report(x).layouts["out"] == "[S(0), B]"
    np.testing.assert_allclose(np.asarray(pf(x)), np.sin(x), rtol=1e-6)


# ------------------------------------------------------------------- a primitive of your own
def _matmul_prim(name):
    p = jcore.Primitive(name)
    p.def_impl(lambda x, w: jnp.dot(x, w))
    p.def_abstract_eval(lambda x, w: jax.core.ShapedArray((x.shape[0], w.shape[1]), x.dtype))
    mlir.register_lowering(p, mlir.lower_fun(lambda x, w: jnp.dot(x, w), multiple_results=False))
    return p


my_matmul_p = _matmul_prim("autoshard_test_matmul")


def test_custom_primitive_contracted_split_is_a_partial_sum_then_one_all_reduce():
    ash.register_rule(my_matmul_p, "i j, j k -> i k")
    mesh = ash.make_mesh("data=2,model=4")
    f = lambda x, w: jnp.tanh(my_matmul_p.bind(x, w))
    pf = ash.parallelize(f, mesh=mesh, in_specs=(P("data", "model"), P("model", None)))
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16, 4).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x, w)
    assert _results_of(report, "autoshard_test_matmul") == ("[S(0), P(sum)]",)
    assert report.layouts["out"] == "[S(0), B]"
    assert kinds(hlo) == {("all-reduce", ("model",)): 1}
    assert_tree_close(pf(x, w), f(x, w), rtol=1e-5, atol=1e-5)


def _results_of(report, op):
    """Result layouts of the (first) equation ``op`` in the report's table."""
    return next(e["results"] for e in report.to_dict()["equations"] if e["op"] == op)


def test_custom_primitive_rule_as_a_function_and_by_name():
    p = _matmul_prim("autoshard_test_matmul_fn")

    def rule(eqn):                                    # x[i,j] @ w[j,k]: j never split
        (i, j), (_, k) = eqn.invars[0].shape, eqn.invars[1].shape
        fb = FactorBuilder()
        fi, fj, fk = fb.new(i), fb.new(j, "replicate"), fb.new(k)
        return fb.build([[fi, fj], [fj, fk]], [[fi, fk]])
    ash.register_rule("autoshard_test_matmul_fn", rule)
    pf = ash.parallelize(lambda x, w: p.bind(x, w), mesh=ash.make_mesh("data=2,model=4"),
                         in_specs=(P("data", "model"), P("model", None)))
    x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
    report, hlo = assert_report_matches_hlo(pf, x, w)
    assert {k for k, _ in kinds(hlo)} == {"all-gather"}
    assert_tree_close(pf(x, w), x @ w)


# ------------------------------------------------------------------- custom_partitioning
def _softmax_cp(arg_shardings_fn=None):
    @custom_partitioning
    def softmax_rows(x):
        return jax.nn.softmax(x, axis=-1)

    def partition(mesh, arg_shapes, result_shape):
        arg = arg_shapes[0].sharding
        want = arg_shardings_fn(mesh) if arg_shardings_fn else arg
        return mesh, lambda x: jax.nn.softmax(x, axis=-1), want, (want,)
    softmax_rows.def_partition(partition, sharding_rule="b d -> b d", need_replication_factors=("d",))
    return softmax_rows


def test_custom_partitioning_sharding_rule_is_honoured():
    softmax_rows = _softmax_cp()
    f = lambda x: softmax_rows(x * 2.0) + 1.0
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P(("data", "model"), None),))
    x = np.random.RandomState(0).randn(16, 8).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x)
    assert hlo == []                                  # rows stay split, d is whole already
    assert_tree_close(pf(x), f(x), rtol=1e-5, atol=1e-6)


def test_custom_partitioning_need_replication_factor_is_gathered_first():
    softmax_rows = _softmax_cp()
    pf = ash.parallelize(softmax_rows, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", "model"),))
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x)
    assert kinds(hlo) == {("all-gather", ("model",)): 1}
    assert_tree_close(pf(x), jax.nn.softmax(x, axis=-1), rtol=1e-5, atol=1e-6)


def test_custom_partitioning_contracted_factor_stays_whole():
    """JAX's partition callback returns complete results, so a contracted factor is not split
    (the operand is gathered) and no partial sum is planned."""
    @custom_partitioning
    def mm(x, w):
        return x @ w

    def partition(mesh, arg_shapes, result_shape):
        return mesh, lambda x, w: x @ w, result_shape.sharding, tuple(a.sharding for a in arg_shapes)
    mm.def_partition(partition, sharding_rule="i j, j k -> i k")
    pf = ash.parallelize(mm, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", "model"), P("model", None)))
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16, 4).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x, w)
    assert "all-reduce" not in {k for k, _ in kinds(hlo)}
    assert_tree_close(pf(x, w), x @ w, rtol=1e-5, atol=1e-5)


def test_custom_partitioning_partition_that_disagrees_raises():
    softmax_rows = _softmax_cp(lambda mesh: NamedSharding(mesh, P()))
    pf = ash.parallelize(softmax_rows, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None),))
    with pytest.raises(ash.ShardingRuleError, match="partition callback of 'softmax_rows' returned operand"):
        pf(np.ones((8, 16), np.float32))


def test_custom_partitioning_without_a_rule_runs_replicated_with_a_warning():
    @custom_partitioning
    def double(x):
        return x * 2

    double.def_partition(lambda mesh, a, r: (mesh, lambda x: x * 2, r.sharding, (a[0].sharding,)))
    pf = ash.parallelize(double, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None),))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    with pytest.warns(UserWarning, match="'double'.*replicated"):
        got = pf(x)
    np.testing.assert_allclose(np.asarray(got), x * 2)


# ------------------------------------------------------------------- Pallas (interpret mode)
def _attn_kernel(q_ref, k_ref, v_ref, o_ref):
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]               # [T, D]
    s = q @ k.T / math.sqrt(q.shape[-1])
    p = jnp.exp(s - s.max(-1, keepdims=True))
    o_ref[0, 0] = (p / p.sum(-1, keepdims=True)) @ v


def attention(q, k, v):
    """One (batch, head) per grid step: grid and blocks come from each argument's shape (under
    autoshard q and k may hold different sequence lengths per device)."""
    B, H, T, D = q.shape
    q_spec = pl.BlockSpec((1, 1, T, D), lambda b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((1, 1, k.shape[2], D), lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(_attn_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                          grid=(B, H), in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
                          interpret=True)(q, k, v)


def attention_reference(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)


ATTN_RULE = "b h q d, b h k d, b h k d -> b h q d"


def _qkv(B=4, H=4, T=8, D=16):
    rs = np.random.RandomState(0)
    return [rs.randn(B, H, T, D).astype(np.float32) for _ in range(3)]


def test_pallas_attention_with_rule_keeps_batch_and_heads_split_with_no_collective():
    attn = ash.with_rule(attention, ATTN_RULE, need_replication_factors=("k",))
    f = lambda q, k, v: attn(q * 0.5, k, v) + q
    spec = P("data", "model")
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(spec, spec, spec))
    q, k, v = _qkv()
    report, hlo = assert_report_matches_hlo(pf, q, k, v)
    assert hlo == [] and report.collectives == []
    out = pf(q, k, v)
    assert out.sharding.spec == P("data", "model")
    assert_tree_close(out, attention_reference(q * 0.5, k, v) + q, rtol=1e-5, atol=1e-5)
    # The per-device kernel ran on [2, 1, 8, 16] blocks: a grid of (2, 1), re-traced locally.
    text = pf.lower(q, k, v).as_text()
    assert "tensor<2x1x8x16xf32>" in text


def test_pallas_attention_with_an_uneven_batch_split():
    """3 sequences over 2 devices: blocks are padded to 2, the kernel runs on the padding too,
    and the output (a jax.Array cannot be split unevenly) leaves with its batch dim whole."""
    attn = ash.with_rule(attention, ATTN_RULE, need_replication_factors=("k",))
    pf = ash.parallelize(attn, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", "model"),) * 3)
    q, k, v = _qkv(B=3)
    assert pf.report(q, k, v).layouts["out"] == "[B, S(1)]"
    assert_tree_close(pf(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_pallas_attention_sequence_split_is_gathered_for_the_kernel():
    attn = ash.with_rule(attention, ATTN_RULE, need_replication_factors=("k",))
    pf = ash.parallelize(attn, mesh=ash.make_mesh("data=2,model=4"),
                         in_specs=(P("data", None, "model"),) * 3)
    q, k, v = _qkv()
    report, hlo = assert_report_matches_hlo(pf, q, k, v)
    # q keeps its sequence split (q passes through); k and v are gathered over 'model'.
    assert kinds(hlo) == {("all-gather", ("model",)): 2}
    assert_tree_close(pf(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_with_rule_as_a_decorator_under_plain_jax_jit():
    """The same rule drives JAX's own partitioner (Shardy) when not under autoshard."""
    attn = ash.with_rule(ATTN_RULE, need_replication_factors=("k",))(attention)
    mesh = ash.make_mesh("data=2,model=4")
    q, k, v = _qkv()
    sh = NamedSharding(mesh, P("data", "model"))
    args = [jax.device_put(a, sh) for a in (q, k, v)]
    out = jax.jit(attn)(*args)
    assert out.sharding.spec == P("data", "model")
    assert parse_collectives(jax.jit(attn).lower(*args).compile().as_text(), mesh) == []
    assert_tree_close(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert_tree_close(attn(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def _matmul_kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]


def pallas_matmul(x, w):
    return pl.pallas_call(_matmul_kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
                          interpret=True)(x, w)


def test_with_rule_contracted_split_is_a_partial_sum():
    mm = ash.with_rule(pallas_matmul, "i j, j k -> i k")
    pf = ash.parallelize(mm, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", "model"), P("model", None)),
                         out_specs=P("data", None))
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16, 4).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x, w)
    assert kinds(hlo) == {("all-reduce", ("model",)): 1}
    assert_tree_close(pf(x, w), x @ w, rtol=1e-5, atol=1e-5)


def _row_kernel(x_ref, o_ref):
    x = x_ref[...]
    o_ref[...] = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def rms_rows(x):
    """A row-wise kernel called from code the user cannot change (no with_rule there)."""
    R, C = x.shape
    return pl.pallas_call(_row_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(R // 2,),
                          in_specs=[pl.BlockSpec((2, C), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((2, C), lambda i: (i, 0)), interpret=True)(x)


def test_register_rule_on_a_pallas_kernel_function_with_lower(monkeypatch):
    monkeypatch.setattr(custom, "_KERNELS", {})
    ash.register_rule(_row_kernel, "r c -> r c", need_replication_factors=("c",), lower=rms_rows)
    f = lambda x: rms_rows(x) * 2.0
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P(("data", "model"), None),))
    x = np.random.RandomState(0).randn(32, 8).astype(np.float32)
    report, hlo = assert_report_matches_hlo(pf, x)
    assert hlo == []
    assert_tree_close(pf(x), f(x), rtol=1e-5, atol=1e-5)


def test_a_pallas_kernel_without_a_rule_says_how_to_give_it_one(monkeypatch):
    monkeypatch.setattr(custom, "_KERNELS", {})
    pf = ash.parallelize(rms_rows, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None),))
    with pytest.raises(ash.UnsupportedPrimitiveError) as info:
        pf.report(np.ones((32, 8), np.float32))
    msg = str(info.value)
    assert "Pallas kernel '_row_kernel' has no sharding rule" in msg
    assert "test_register_rule.py" in msg and "ash.with_rule" in msg


def test_a_lowering_that_ignores_local_shapes_is_named():
    def bad(x):                              # the grid from a global size, as a bug would
        return pl.pallas_call(_row_kernel, out_shape=jax.ShapeDtypeStruct((32, 8), x.dtype),
                              grid=(16,), in_specs=[pl.BlockSpec((2, 8), lambda i: (i, 0))],
                              out_specs=pl.BlockSpec((2, 8), lambda i: (i, 0)), interpret=True)(x)
    f = ash.with_rule(bad, "r c -> r c")
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None),))
    with pytest.raises(ash.ShardingRuleError, match=r"returned per-device results of shapes \[\(32, 8\)\]"):
        pf(np.ones((32, 8), np.float32))


def test_a_user_rule_is_split_only_where_its_operands_are():
    """Attention's rule written for propagation calls the contracted head dim ``d`` a pass
    factor. With the sequence split and ``k`` needing replication, the engine must not move the
    axis onto ``d`` of its own accord (an all-to-all that would contract a split ``d`` without a
    sum): it gathers, and the result is exact."""
    attn = ash.with_rule(attention, ATTN_RULE, need_replication_factors=("k",))
    pf = ash.parallelize(attn, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None, "model"),) * 3)
    q, k, v = _qkv()
    layouts = [e["operands"] for e in pf.report(q, k, v).to_dict()["equations"] if e["op"] == "custom_partitioning"]
    assert layouts and all("S(3)" not in layout for ops in layouts for layout in ops)
    assert_tree_close(pf(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
