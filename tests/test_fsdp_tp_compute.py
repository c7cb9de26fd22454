"""Issue #15 item 1, fsdp+tp: a layer that the tensor-parallel axis leaves replicated (a
language model's head under Megatron + fsdp on a ``data x model`` mesh) repeats its work on
every device along ``model``. Its weight gradient (a contraction over the batch, partial over
``data``, reduce-scattered onto the weight's ``data`` shard) is split over ``model`` as well:
the operands are sliced locally, the partial result is reduce-scattered on its quarter and
the shard gathered over ``model`` (the planner reduces before it gathers), so the work is a
quarter for the same bytes. Compiled by autoshard and by ``jax.jit`` with the same
annotations: flops per device no more than jit's, wire bytes no more, the result equal to
the one-device function's, and the report's collectives equal the HLO's. Memory on this small
function is still 1.07x jit's (the benchmark's gpt fsdp_tp row is at 0.975x):
``test_memory_within_two_percent_of_jit`` is an expected failure until spare-axis splits are
offered during propagation (its reason says which buffer)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.report.hlo import parse_collectives
from _util import assert_report_matches_hlo, assert_tree_close, mesh, flops_and_memory

B, D, V = 64, 32, 512


def _loss(p, x):
    h = x + jnp.tanh(x @ p["up"]) @ p["down"]        # Megatron MLP over 'model'
    return jnp.sum(jnp.tanh(h @ p["head"]) ** 2)      # head: fsdp over 'data' only



def _setup():
    m = mesh("data=2,model=4")
    rng = np.random.default_rng(0)
    p = {"up": rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D),
         "down": rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D),
         "head": rng.normal(size=(D, V)).astype(np.float32) / np.sqrt(D)}
    x = rng.normal(size=(B, D)).astype(np.float32)
    step = jax.grad(_loss)
    specs = ({"up": P(None, "model"), "down": P("model", None), "head": P("data", None)},
             P("data", None))

    return m, p, x, step, specs, ash.parallelize(step, mesh=m, in_specs=specs, out_specs=specs[0])


def _compiled(m, p, x, step, specs, pf):
    ours = pf.lower(p, x).compile()
    named = jax.tree.map(lambda s: NamedSharding(m, s), specs, is_leaf=lambda s: isinstance(s, P))
    with jax.set_mesh(m):
        jit = jax.jit(step, in_shardings=named, out_shardings=named[0]).lower(p, x).compile()
    return ours, jit


@pytest.mark.xfail(strict=True, reason="memory 1.07x jit's (temporaries 151,568 B against 137,240 B): "
                   "missing feature: spare-axis splits offered during propagation. They are chosen only "
                   "after it (factors.with_spare_axes in insert_collectives), so the head gradient's "
                   "[32,128] model-slice of the logits' cotangent is materialised beside the whole "
                   "forward tanh [32,512]; splitting the forward head over 'model' too would remove it")
def test_memory_within_two_percent_of_jit():
    ours, jit = _compiled(*_setup())
    (_, om), (_, jm) = flops_and_memory(ours), flops_and_memory(jit)
    assert om <= 1.02 * jm, f"memory per device: autoshard {om:,} B, jax.jit {jm:,} B"


def test_head_weight_gradient_splits_over_the_tensor_parallel_axis():
    m, p, x, step, specs, pf = _setup()
    assert_tree_close(pf(p, x), step(p, x), rtol=1e-4, atol=1e-4)
    report, hlo = assert_report_matches_hlo(pf, p, x)
    # The head's gradient: reduce-scattered over 'data' on its [D/2, V/4] block, then gathered
    # over 'model' to the weight's layout (reduced first: the gather moves the smaller shard).
    head = [c for c in report.collectives if c.shape in ((D, V // 4), (D // 2, V // 4))]
    assert [(c.kind, tuple(c.mesh_axes), c.shape) for c in head] == [
        ("reduce-scatter", ("data",), (D, V // 4)), ("all-gather", ("model",), (D // 2, V // 4))], head

    ours, jit = _compiled(m, p, x, step, specs, pf)
    (of, _), (jf, _) = flops_and_memory(ours), flops_and_memory(jit)
    assert of <= jf, f"flops per device: autoshard {of:,.0f}, jax.jit {jf:,.0f}"
    jit_wire = sum(c.wire_bytes for c in parse_collectives(jit.as_text(), m))
    assert report.total_wire_bytes <= jit_wire, f"wire: autoshard {report.total_wire_bytes:,.0f}, jit {jit_wire:,.0f}"
