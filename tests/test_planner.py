"""Table-driven tests of the reshard planner: each SBP transition maps to the expected
collectives, running the plan inside shard_map moves the data correctly, and the plan's cost
(bytes and alpha-beta time, worked out by hand) is what the cost model says."""
import jax
import numpy as np
import pytest

import autoshard as ash
from autoshard.compiler.cost_model import LinkModel, collective_time, group_link, wire_bytes
from autoshard.compiler.layout import Layout
from autoshard.compiler.planner import plan, reshard_time, transform_bytes, transform_time
from autoshard.compiler import collectives

SIZES = {"data": 2, "model": 4}


def L(*dims, partial=()):
    return Layout(tuple(tuple(d) for d in dims), tuple(partial))


# (src, dst, expected transform kinds)
TABLE = [
    (L(("data",), ()), L((), ()), ["all-gather"]),
    (L((), ()), L(("model",), ()), ["slice"]),
    (L(("data",), ()), L((), ("data",)), ["all-to-all"]),
    (L((), (), partial=[("model", "sum")]), L((), ()), ["all-reduce"]),
    (L((), (), partial=[("model", "sum")]), L((), ("model",)), ["reduce-scatter"]),
    (L(("data",), (), partial=[("model", "sum")]), L(("data", "model"), ()), ["reduce-scatter"]),
    (L((), (), partial=[("data", "sum"), ("model", "sum")]), L((), ()), ["all-reduce"]),  # one, over both axes
    (L((), (), partial=[("model", "max")]), L((), ()), ["all-reduce"]),
    (L(("data", "model"), ()), L(("data",), ()), ["all-gather"]),
    (L(("data", "model"), ()), L((), ()), ["all-gather", "all-gather"]),
    (L(("data", "model"), ()), L(("model",), ()), ["all-gather", "all-gather", "slice"]),
    (L((), ()), L((), (), partial=[("model", "sum")]), ["mask"]),
    (L(("model",), ()), L(("model",), ()), []),
]


@pytest.mark.parametrize("src,dst,expected", TABLE)
def test_plan_kinds(src, dst, expected):
    steps = plan(src, dst, (8, 16), SIZES)
    assert [t.kind for t in steps] == expected
    assert steps == () or steps[-1].dst == dst


def test_multi_axis_all_reduce_is_one_collective_over_both_axes():
    (t,) = plan(L((), (), partial=[("data", "sum"), ("model", "sum")]), L((), ()), (8, 16), SIZES)
    assert set(t.axes) == {"data", "model"} and t.group_size(SIZES) == 8


@pytest.mark.parametrize("src,dst,expected", [row for row in TABLE if not row[1].partial])
def test_plan_moves_data_correctly(src, dst, expected):
    mesh = ash.make_mesh("data=2,model=4")
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    start = src.without_partial()
    partial_ops = dict(src.partial)

    def body(block):
        if partial_ops:
            # Make the partial value from the replicated one: keep it on one device per axis
            # (sum), or spread smaller copies (max) so the reduction has to recover it.
            for axis, op in partial_ops.items():
                if op == "sum":
                    block = collectives.apply(block, plan(start, start.with_partial([(axis, "sum")]),
                                                          x.shape, SIZES), SIZES)
                else:
                    block = block - jax.lax.axis_index(axis).astype(block.dtype)
        return collectives.apply(block, plan(src, dst, x.shape, SIZES), SIZES)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=start.spec(), out_specs=dst.spec(), check_vma=False))
    placed = jax.device_put(x, jax.sharding.NamedSharding(mesh, start.spec()))
    np.testing.assert_array_equal(np.asarray(f(placed)), x)


# ------------------------------------------------------------------ costs of a plan
# Hand-worked: f32, default link 5 us per step and 100 GB/s unless given.

def test_transform_bytes_and_time_of_an_all_gather():
    # [8,16] split over model (4) on dim 1 -> replicated: one all-gather of the [8,4] block,
    # 128 B per device; each device receives the other 3 blocks: 3 * 128 = 384 wire bytes,
    # 3 latency steps.
    (t,) = plan(L((), ("model",)), L((), ()), (8, 16), SIZES)
    assert (t.kind, t.in_shape) == ("all-gather", (8, 4))
    assert transform_bytes(t, 4, SIZES) == 384
    assert transform_time(t, 4, SIZES, {}) == pytest.approx(3 * 5e-6 + 384 / 100e9, rel=1e-12)


def test_free_transforms_cost_nothing():
    (t,) = plan(L((), ()), L(("model",), ()), (8, 16), SIZES)
    assert t.kind == "slice"
    assert transform_bytes(t, 4, SIZES) == 0 and transform_time(t, 4, SIZES, {}) == 0


def test_a_collective_over_two_axes_runs_at_the_worst_link_of_each_kind():
    # P(sum) over data and model -> B: one all-reduce over 8 devices of the whole [8,16]
    # (512 B): 2 * 7/8 * 512 = 896 wire bytes, 14 steps. data is slow in latency, model in
    # bandwidth: the group gets data's latency and model's bandwidth.
    (t,) = plan(L((), (), partial=[("data", "sum"), ("model", "sum")]), L((), ()), (8, 16), SIZES)
    links = {"data": LinkModel(50e-6, 100e9), "model": LinkModel(5e-6, 10e9)}
    assert group_link(links, t.axes) == LinkModel(50e-6, 10e9)
    assert transform_bytes(t, 4, SIZES) == 896
    assert transform_time(t, 4, SIZES, links) == pytest.approx(14 * 50e-6 + 896 / 10e9, rel=1e-12)


def test_reshard_time_weighs_latency_for_choices():
    # S(0) over data (2) -> B: an all-gather of the [4,16] block (256 B): 256 wire bytes and
    # one latency step, weighed 1e-6 in the propagation passes' choices, fully in the search's.
    src, dst = L(("data",), ()), L((), ())
    assert reshard_time(src, dst, (8, 16), 4, SIZES, {}) == pytest.approx(256 / 100e9 + 1e-6 * 5e-6, rel=1e-12)
    assert reshard_time(src, dst, (8, 16), 4, SIZES, {}, latency_weight=1.0) == pytest.approx(
        256 / 100e9 + 5e-6, rel=1e-12)
    assert reshard_time(src, src, (8, 16), 4, SIZES, {}) == 0.0


def test_reshard_time_adds_every_collective_of_the_plan():
    # [S(0) over (data, model)] -> B: two all-gathers, model's first ([1,16] = 64 B, 3 steps,
    # 192 wire bytes), then data's ([4,16] = 256 B, 1 step, 256 wire bytes).
    src, dst = L(("data", "model"), ()), L((), ())
    assert [(t.kind, t.axes, t.in_shape) for t in plan(src, dst, (8, 16), SIZES)] == [
        ("all-gather", ("model",), (1, 16)), ("all-gather", ("data",), (4, 16))]
    want = (192 / 100e9 + 3 * 5e-6) + (256 / 100e9 + 1 * 5e-6)
    assert reshard_time(src, dst, (8, 16), 4, SIZES, {}, latency_weight=1.0) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind,n,steps,wire", [
    # S = 1024 bytes per device.
    ("all-reduce", 4, 6, 2 * 3 / 4 * 1024),
    ("all-gather", 4, 3, 3 * 1024),
    ("reduce-scatter", 4, 3, 3 / 4 * 1024),
    ("all-to-all", 4, 3, 3 / 4 * 1024),
    ("collective-permute", 4, 1, 1024),
    ("all-reduce", 1, 0, 0),
])
def test_collective_time_per_kind(kind, n, steps, wire):
    link = LinkModel(10e-6, 50e9)
    assert wire_bytes(kind, n, 1024) == wire
    assert collective_time(kind, n, 1024, link) == pytest.approx(steps * 10e-6 + wire / 50e9, rel=1e-12)
    assert link.time(kind, n, 1024) == collective_time(kind, n, 1024, link)
