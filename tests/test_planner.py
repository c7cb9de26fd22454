"""Table-driven tests of the reshard planner: each SBP transition maps to the expected
collectives, and running the plan inside shard_map moves the data correctly."""
import jax
import numpy as np
import pytest

import autoshard as ash
from autoshard.compiler.layout import Layout
from autoshard.compiler.planner import plan
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
