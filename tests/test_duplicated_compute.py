"""Issue #15 item 1: no layout buys its wire bytes with work every device repeats. Each
program here is compiled by autoshard and by ``jax.jit`` with the same annotations (as
``NamedSharding``s); per device, autoshard's flops (``cost_analysis()``) must not exceed
jit's and its memory (``memory_analysis()``: arguments + outputs + temporaries - aliased)
must stay within 2% of jit's, with the result equal to the one-device function's."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_tree_close, mesh, flops_and_memory

T, D = 64, 32


def _attention_loss(w, x):
    q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
    p = jax.nn.softmax(q @ k.T / np.sqrt(D), axis=-1)
    return jnp.sum(((p @ v) @ w["o"]) ** 2)


def test_sequence_split_attention_backward_splits_the_projections_work():
    """Sequence parallelism: x split over its tokens, weights whole. The keys' and values'
    gradients come out of the attention backward partial (each device's queries saw every
    key); passed partial through the k/v projections' backward, those two matmuls (input and
    weight gradients) ran whole on every device, 8x the work, where a reduce-scatter of the
    gradient first (the bytes the partial result's reduction costs anyway) splits them."""
    m = mesh("model=8")
    rng = np.random.default_rng(0)
    w = {n: rng.normal(size=(D, D)).astype(np.float32) / np.sqrt(D) for n in "qkvo"}
    x = rng.normal(size=(T, D)).astype(np.float32)
    step = jax.grad(_attention_loss, argnums=(0, 1))
    specs = ({n: P() for n in w}, P("model", None))

    pf = ash.parallelize(step, mesh=m, in_specs=specs)
    assert_tree_close(pf(w, x), step(w, x), rtol=1e-4, atol=1e-4)
    ours = flops_and_memory(pf.lower(w, x).compile())
    named = jax.tree.map(lambda s: NamedSharding(m, s), specs,
                         is_leaf=lambda s: isinstance(s, P))
    with jax.set_mesh(m):
        jit = flops_and_memory(jax.jit(step, in_shardings=named).lower(w, x).compile())
    assert ours[0] <= jit[0], f"flops per device: autoshard {ours[0]:,.0f}, jax.jit {jit[0]:,.0f}"
    assert ours[1] <= 1.02 * jit[1], f"memory per device: autoshard {ours[1]:,} B, jax.jit {jit[1]:,} B"
