"""Unit tests of ``compiler/factors.py``: projecting layouts onto an op's factors and back,
merging, legalising and choosing assignments. Every expected value is worked out by hand
from the factor rule in the comment beside it."""
import pytest

from autoshard.compiler import factors
from autoshard.compiler.cost_model import LinkModel
from autoshard.compiler.factors import (UNDECIDED_RESULT_WEIGHT, Tensor, axis_conflicts, candidate_assignments, choose, clear_caches,
                                        compound_factors, legalize, merged_assignment, project, project_back,
                                        required_layout, result_partial)
from autoshard.compiler.kinds import FactorKind
from autoshard.compiler.layout import Layout
from autoshard.compiler.ops import FactorBuilder

SUM, REPLICATE = FactorKind.SUM, FactorKind.REPLICATE


def L(*dims, partial=()):
    return Layout(tuple(tuple(d) for d in dims), tuple(partial))


def matmul_rule(m=8, k=16, n=32):
    """``x[m,k] @ w[k,n] -> y[m,n]``: factors 0=m, 1=k (sum), 2=n."""
    fb = FactorBuilder()
    fm, fk, fn = fb.new(m), fb.new(k, SUM), fb.new(n)
    return fb.build([[fm, fk], [fk, fn]], [[fm, fn]])


def reshape_rule():
    """``[6,4] -> [24]``: factors 0 (6) and 1 (4); the result dim is their product."""
    fb = FactorBuilder()
    a, b = fb.new(6), fb.new(4)
    return fb.build([[a, b]], [[a + b]])


# (tensor dims, layout, factor sizes, axis sizes, expected {factor: axes})
PROJECT = [
    # One factor per dim: each dim's axes go to its factor.
    (((0,), (1,)), L(("data",), ()), (8, 16), {"data": 2}, {0: ("data",)}),
    (((0,), (1,)), L((), ("model", "data")), (8, 16), {"data": 2, "model": 4}, {1: ("model", "data")}),
    # A dim of one factor takes every axis even when they do not divide it (6 over 4 x 2).
    (((0,),), L(("data", "model"),), (6,), {"data": 4, "model": 2}, {0: ("data", "model")}),
    # (2)(4) over [x=2, y=2]: x fills the major factor exactly, so y goes to the minor one.
    (((0, 1),), L(("x", "y"),), (2, 4), {"x": 2, "y": 2}, {0: ("x",), 1: ("y",)}),
    # (6)(4) over [x=2, y=3]: 6 = 2 * 3, so both axes stay on the major factor.
    (((0, 1),), L(("x", "y"),), (6, 4), {"x": 2, "y": 3}, {0: ("x", "y")}),
    # (6)(4) over [x=4]: 4 does not divide 6; nothing can be said about the factors.
    (((0, 1),), L(("x",),), (6, 4), {"x": 4}, {}),
    # A size-1 dim lists no factor and contributes nothing.
    (((), (0,)), L((), ("data",)), (8,), {"data": 2}, {0: ("data",)}),
]


@pytest.mark.parametrize("dims,layout,sizes,axis_sizes,expected", PROJECT)
def test_project(dims, layout, sizes, axis_sizes, expected):
    assert project(dims, layout, sizes, axis_sizes) == expected


# (assignment, tensor dims, factor sizes, axis sizes, expected layout dims or None)
PROJECT_BACK = [
    ((("x",), ()), ((0,), (1,)), (8, 16), {"x": 2}, (("x",), ())),
    ((("x",), ("y",)), ((0, 1),), (2, 4), {"x": 2, "y": 2}, (("x", "y"),)),
    # The minor factor split while the major one is whole: no layout expresses it.
    (((), ("y",)), ((0, 1),), (2, 4), {"y": 2}, None),
    # The major factor split but not fully (4 of 8): the minor factor may not be split.
    ((("x",), ("y",)), ((0, 1),), (8, 4), {"x": 4, "y": 2}, None),
    ((("x",),), ((), (0,)), (8,), {"x": 2}, ((), ("x",))),
]


@pytest.mark.parametrize("assignment,dims,sizes,axis_sizes,expected", PROJECT_BACK)
def test_project_back(assignment, dims, sizes, axis_sizes, expected):
    assert project_back(assignment, dims, sizes, axis_sizes) == expected


def test_project_then_project_back_round_trips_a_compound_dim():
    dims, sizes, axis_sizes = ((0, 1),), (2, 4), {"x": 2, "y": 2}
    got = project(dims, L(("x", "y"),), sizes, axis_sizes)
    assignment = tuple(got.get(f, ()) for f in range(2))
    assert project_back(assignment, dims, sizes, axis_sizes) == (("x", "y"),)


@pytest.mark.parametrize("assignment,expected", [
    ((("data",), (), ()), ()),                                   # m split: nothing partial
    (((), ("model",), ()), (("model", "sum"),)),                 # k split: P(sum) over model
    (((), ("model", "data"), ()), (("data", "sum"), ("model", "sum"))),   # sorted by axis
])
def test_result_partial_of_a_matmul(assignment, expected):
    got = result_partial(assignment, matmul_rule())
    assert got == expected
    assert all(type(op) is str for _, op in got)     # layouts hold plain strings, not enums


@pytest.mark.parametrize("assignment,expected", [
    # m and n share the result y[m,n]: one axis cannot split both.
    ((("data",), (), ("data",)), [("data", [0, 2])]),
    # m and k never share... but k is a reduction: every other factor must stay whole on
    # its axis, so k and m may not share 'model'.
    ((("model",), ("model",), ()), [("model", [0, 1])]),
    ((("data",), ("model",), ()), []),
    (((), (), ()), []),
])
def test_axis_conflicts(assignment, expected):
    assert axis_conflicts(assignment, matmul_rule()) == expected


def test_a_reduction_factor_claims_its_axis_even_across_tensors():
    # f0 (sum) only in operand 0, f1 only in operand 1 and the result: no tensor holds both,
    # yet a split reduction factor combines devices along its axis.
    for kind, expected in ((SUM, [("a", [0, 1])]), (FactorKind.PASS, [])):
        fb = FactorBuilder()
        f0, f1 = fb.new(4, kind), fb.new(4)
        rule = fb.build([[f0], [f1]], [[f1]])
        assert axis_conflicts((("a",), ("a",)), rule) == expected


def test_compound_factors_are_those_sharing_a_dim():
    assert compound_factors(reshape_rule()) == frozenset({0, 1})
    assert compound_factors(matmul_rule()) == frozenset()


@pytest.mark.parametrize("rule,assignment,reserved,axis_sizes,expected", [
    # A replicate factor loses its axes.
    ("replicate", (("x",), ("y",)), set(), {"x": 2, "y": 2}, [(("x",), ())]),
    # A compound factor stops at the first axis that does not divide what is left: 6 / 4.
    ("reshape", (("x",), ()), set(), {"x": 4}, [((), ())]),
    # 6 / 2 = 3, then 3 / 2 does not divide: the second axis is dropped.
    ("reshape", (("x", "y"), ()), set(), {"x": 2, "y": 2}, [(("x",), ())]),
    # Reserved axes are dropped, with the axes after them on that factor.
    ("matmul", (("x", "y"), (), ()), {"x"}, {"x": 2, "y": 2}, [((), (), ())]),
    # A conflict becomes one variant per factor that may keep the axis.
    ("matmul", (("d",), (), ("d",)), set(), {"d": 2}, [(("d",), (), ()), ((), (), ("d",))]),
])
def test_legalize(rule, assignment, reserved, axis_sizes, expected):
    if rule == "replicate":
        fb = FactorBuilder()
        a, b = fb.new(8), fb.new(6, REPLICATE)
        rule = fb.build([[a, b]], [[a, b]])
    else:
        rule = {"reshape": reshape_rule, "matmul": matmul_rule}[rule]()
    assert legalize(assignment, rule, axis_sizes, reserved) == expected


def _matmul_tensors(x, w, y=None, x_priority=1, w_priority=1):
    return [Tensor(((0,), (1,)), (8, 16), 4, x, x_priority),
            Tensor(((1,), (2,)), (16, 32), 4, w, w_priority),
            Tensor(((0,), (2,)), (8, 32), 4, y, 1, is_result=True)]


def test_merged_assignment_of_agreeing_layouts():
    # x S(0) over data, w S(1) over model: m=data, n=model, k whole; they agree.
    merged, agree, _ = merged_assignment(matmul_rule(), _matmul_tensors(L(("data",), ()), L((), ("model",))),
                                         {"data": 2, "model": 4})
    assert merged == (("data",), (), ("model",)) and agree


def test_merged_assignment_of_conflicting_lists_keeps_the_annotation():
    # x splits m over [data], y (priority 0, an annotation) over [model]: not prefixes of
    # each other, so the best-priority list wins.
    tensors = _matmul_tensors(L(("data",), ()), None)
    tensors[2] = Tensor(((0,), (2,)), (8, 32), 4, L(("model",), ()), 0, is_result=True)
    merged, agree, _ = merged_assignment(matmul_rule(), tensors, {"data": 2, "model": 4})
    assert merged[0] == ("model",) and not agree


def test_candidates_include_the_merge_each_projection_and_nothing():
    sizes = {"data": 2, "model": 4}
    got = candidate_assignments(matmul_rule(), _matmul_tensors(L(("data",), ()), L((), ("model",))), sizes)
    assert got[0] == (("data",), (), ("model",))
    assert got[-1] == ((), (), ())


def test_required_layout_of_a_row_parallel_result():
    # k split over model: y is made P(sum) over model; an accumulator operand carries it too.
    rule, a = matmul_rule(), ((), ("model",), ())
    y = Tensor(((0,), (2,)), (8, 32), 4, None, is_result=True)
    assert required_layout(y, a, rule, {"model": 4}, ()) == L((), ())
    acc = Tensor(((0,), (2,)), (8, 32), 4, None, accumulator=True)
    assert required_layout(acc, a, rule, {"model": 4}, result_partial(a, rule)) == L((), (), partial=[("model", "sum")])


def test_choose_takes_agreeing_annotations_as_they_are():
    c = choose(matmul_rule(), _matmul_tensors(L(("data",), ()), L((), ("model",))),
               {"data": 2, "model": 4}, {})
    assert c.assignment == (("data",), (), ("model",)) and not c.by_cost


def test_choose_prices_a_conflict_and_moves_the_smaller_operand():
    # a[8,16] f32 split over x on dim 0, b[8,16] f64 over x on dim 1 (x = 2): one of them must
    # move with an all-to-all of its [8,8] block. a's block is 256 B, b's 512 B, so dim 1 wins:
    # (n-1)/n * 256 = 128 wire bytes at 100 GB/s, plus one latency step (5 us) weighed 1e-6,
    # plus 8 * 8 points of work at 1e-13 s, plus the undecided result's [8,8] f32 block (256 B)
    # at UNDECIDED_RESULT_WEIGHT.
    fb = FactorBuilder()
    f0, f1 = fb.new(8), fb.new(16)
    rule = fb.build([[f0, f1], [f0, f1]], [[f0, f1]])
    tensors = [Tensor(((0,), (1,)), (8, 16), 4, L(("x",), ())),
               Tensor(((0,), (1,)), (8, 16), 8, L((), ("x",))),
               Tensor(((0,), (1,)), (8, 16), 4, None, is_result=True)]
    c = choose(rule, tensors, {"x": 2}, {"x": LinkModel()})
    assert c.assignment == ((), ("x",)) and c.by_cost
    assert c.cost == pytest.approx(128 / 100e9 + 1e-6 * 5e-6 + 64 * 1e-13
                                   + UNDECIDED_RESULT_WEIGHT * 256 / 100e9, rel=1e-12)


def test_clear_caches_empties_every_memo():
    choose(matmul_rule(), _matmul_tensors(L(("data",), ()), None), {"data": 2}, {})
    project_back((("x",), ()), ((0,), (1,)), (8, 16), {"x": 2})
    assert factors._CHOICES and factors._project_back.cache_info().currsize
    clear_caches()
    assert not factors._CHOICES
    assert factors._project_back.cache_info().currsize == 0
    assert factors._result_partial.cache_info().currsize == 0


def split_rule(n=4, s=32, b=8):
    """``split`` of ``[b, n, s]`` along dim 1 (the IR's spelling of an equal split of ``[b, n*s]``):
    factors 0=b, 1=n of the operand (replicate), 2=s; each part is ``[b, 1, s]``."""
    fb = FactorBuilder()
    fb_, fn, fs = fb.new(b), fb.new(n, REPLICATE), fb.new(s)
    parts = [[fb_, fb.new(1, REPLICATE), fs] for _ in range(n)]
    return fb.build([[fb_, fn, fs]], parts)


def test_an_axis_on_a_replicate_factor_moves_to_the_nearest_unsplit_pass_factor():
    rule = split_rule()
    sizes = {"data": 2, "model": 4}
    extra = ((),) * (len(rule.sizes) - 3)
    moved = factors.relocated((("data",), ("model",), ()) + extra, rule, sizes)
    # b already carries data: the axis goes to s, not onto the batch.
    assert moved[0][:3] == (("data",), (), ("model",))
    assert all(m[0] == ("data",) for m in moved)


def test_chooser_prefers_the_all_to_all_over_gathering_the_parts():
    """Operand split over model on the part dim: moving the axis to s (one all-to-all) costs
    an eighth of the all-gather's bytes and splits the work, so the cost model takes it."""
    rule = split_rule()
    sizes = {"data": 2, "model": 4}
    x = Tensor(rule.operands[0], (8, 4, 32), 4, L(("data",), ("model",), ()))
    parts = [Tensor(d, (8, 1, 32), 4, None, is_result=True) for d in rule.results]
    clear_caches()
    choice = choose(rule, [x, *parts], sizes, {"model": LinkModel(), "data": LinkModel()})
    assert choice.assignment[:3] == (("data",), (), ("model",))


def test_a_compound_dim_split_only_on_its_minor_factor_is_repaired():
    """``[b, n, s] -> [b, n*s]`` with s split over model: the result cannot carry it (the
    major n is unsplit); the variants move model to n where it divides, else drop it."""
    fb = FactorBuilder()
    fb_, fn, fs = fb.new(8), fb.new(4), fb.new(32)
    rule = fb.build([[fb_, fn, fs]], [[fb_, fn + fs]])
    sizes = {"model": 4}
    assert project_back(((), (), ("model",)), rule.results[0], rule.sizes, sizes) is None
    assert factors.relocated(((), (), ("model",)), rule, sizes) == [((), ("model",), ()), ((), (), ())]
    fb = FactorBuilder()
    fb_, fn, fs = fb.new(8), fb.new(3), fb.new(32)       # 3 parts over 4 devices: dropped only
    rule = fb.build([[fb_, fn, fs]], [[fb_, fn + fs]])
    assert factors.relocated(((), (), ("model",)), rule, sizes) == [((), (), ())]
