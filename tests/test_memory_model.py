"""Unit tests of the report's memory model (``report/memory.py``, ``report/schedule.py``) on
programs small enough to work out by hand: which results XLA CPU keeps in memory and which it
fuses away, argument bytes by role, gradients, the temporaries' peak and the step total.
The whole-model checks against XLA's ``memory_analysis()`` are in test_planning.py."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.report import ReportContext
from autoshard.report.memory import MemoryModel

F32 = jnp.float32


@pytest.fixture(scope="module")
def mesh():
    return ash.make_mesh("data=2,model=4")


def sds(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def model_of(fn, mesh, in_specs, *args, out_specs=None, roles=None):
    program = ash.parallelize(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs).program(*args)
    return MemoryModel(ReportContext(program, roles))


def kept(model) -> dict:
    """``{primitive: bytes}`` of the intermediates the model keeps in memory."""
    ctx = model.context
    out = {}
    for e in ctx.eqns:
        for o in e.outvars:
            if model.materialized().get(o, 0):
                out[e.prim.name] = out.get(e.prim.name, 0) + model.materialized()[o]
    return out


def test_a_matmul_of_split_rows(mesh):
    # x[8,16] split over data (2): 4 x 16 x 4 B = 256 per device; w[16,32] whole: 2048; y[8,32]
    # split like x: 4 x 32 x 4 = 512. Plain arrays have no module path: role "inputs". The
    # product is an output (its buffer is the output's), so nothing else is kept.
    m = model_of(lambda x, w: x @ w, mesh, (P("data", None), None), sds(8, 16), sds(16, 32))
    mem = m.memory()
    assert (mem["other_inputs"], mem["parameters"], mem["arguments"], mem["outputs"]) == (2304, 0, 2304, 512)
    assert (mem["largest_intermediate"], mem["intermediates_total"]) == (512, 512)
    assert mem["activations_peak"] == 0            # outputs are not intermediates
    assert (mem["temporaries_peak"], mem["largest_temporary"], mem["gradients"]) == (0, 0, 0)
    assert mem["step_total"] == 2304 + 512         # one output: no tuple table


def test_an_elementwise_chain_into_a_small_reduction_is_one_fusion(mesh):
    # exp -> mul -> reduce_sum over 128 elements (below XLA CPU's YNNPACK threshold of 4096):
    # exp and mul fuse into the reduction, whose scalar result is the output.
    m = model_of(lambda x: jnp.sum(jnp.exp(x) * 2.0), mesh, (None,), sds(8, 16))
    assert kept(m) == {}
    assert m.temporaries() == {"peak": 0, "in_outputs": 0}


def test_a_result_read_by_a_matmul_is_stored(mesh):
    # exp(x) feeds a dot, which does not fuse its operands: the [8,16] result (512 B, x whole)
    # lives from exp to the dot.
    m = model_of(lambda x, w: jnp.exp(x) @ w, mesh, (None, None), sds(8, 16), sds(16, 32))
    assert kept(m) == {"exp": 512}
    assert m.temporaries()["peak"] == 512
    mem = m.memory()
    assert mem["step_total"] == (512 + 2048) + 8 * 32 * 4 + 512


@pytest.mark.parametrize("op,stored", [(jnp.exp, 512), (lambda x: x * 3.0, 0)])
def test_an_expensive_result_read_by_two_fusions_is_computed_once(mesh, op, stored):
    # e feeds two outputs through one elementwise op each. XLA duplicates a cheap producer
    # into both fusions, but not an expensive one (exp): that one is stored, 8 x 16 x 4 B.
    def f(x):
        e = op(x)
        return e + 1.0, e * 2.0
    m = model_of(f, mesh, (None,), sds(8, 16))
    assert sum(kept(m).values()) == stored
    # None fused, e is the only intermediate that is not an output: the upper bound is e.
    assert m.activation_peak() == 512


def test_arguments_by_role(mesh):
    # params['dense']['kernel'][16,32] split over model on dim 1: 16 x 8 x 4 B = 512;
    # batch['tokens'] int32[8,16] split over data: 4 x 16 x 4 B = 256. A string-keyed float
    # leaf is a parameter, an integer argument the batch.
    params, batch = {"dense": {"kernel": sds(16, 32)}}, {"tokens": sds(8, 16, dtype=jnp.int32)}
    f = lambda p, b: p["dense"]["kernel"].sum() + b["tokens"].sum()
    specs = ({"dense": {"kernel": P(None, "model")}}, {"tokens": P("data", None)})
    m = model_of(f, mesh, specs, params, batch)
    assert m.argument_bytes() == {"parameters": 512, "optimizer state": 0, "batch": 256, "inputs": 0}
    # Roles given by the caller win over the guess.
    m = model_of(f, mesh, specs, params, batch, roles={0: "optimizer state"})
    assert m.argument_bytes()["optimizer state"] == 512 and m.argument_bytes()["parameters"] == 0


def test_gradients_and_activations_kept_for_backward(mesh):
    # loss = sum(tanh(x @ kernel)), one SGD step. The gradient of the kernel takes the layout
    # of the updated kernel (pinned to P(None, 'model')): 16 x 8 x 4 B = 512. tanh's
    # derivative reads tanh's result t (1 - t^2), and tanh is expensive: t is stored for the
    # backward pass, in the layout of x @ kernel: [8,32] over data and model, 4 x 8 x 4 B = 128.
    def step(p, x):
        loss, g = jax.value_and_grad(lambda p: jnp.sum(jnp.tanh(x @ p["dense"]["kernel"])))(p)
        return loss, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    kernel_spec = {"dense": {"kernel": P(None, "model")}}
    m = model_of(step, mesh, (kernel_spec, P("data", None)), {"dense": {"kernel": sds(16, 32)}}, sds(8, 16),
                 out_specs=(P(), kernel_spec))
    mem = m.memory()
    assert mem["parameters"] == 512 and mem["gradients"] == 512
    assert mem["activations_for_backward"] == 128
