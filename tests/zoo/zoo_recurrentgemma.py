"""recurrentgemma: Griffin (its JAX/flax implementation), one recurrent block (Conv1D +
RG-LRU, a lax.scan over time) and one local-attention block (multi-query), tiny config,
random init."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from recurrentgemma import jax as rg

from harness import Built, register

VOCAB, D, SEQ, BATCH = 64, 32, 16, 16

# Megatron pairs as recurrentgemma's own sharding does: the recurrent branch's width (conv,
# RG-LRU heads, their block-diagonal gates) and the MLP's hidden units over 'model'; the
# multi-query attention splits query heads (its single key/value head stays whole).
GRIFFIN_TP = [
    (r".*mlp_block/ffw_up/w", P(None, None, "model")),
    (r".*mlp_block/ffw_up/b", P(None, None, None, "model")),
    (r".*mlp_block/ffw_down/kernel", P("model", None)),
    (r".*recurrent_block/linear_(x|y)/kernel", P(None, "model")),
    (r".*recurrent_block/linear_(x|y)/bias", P("model")),
    (r".*recurrent_block/conv_1d/w", P(None, "model")),
    (r".*recurrent_block/conv_1d/b", P("model")),
    (r".*recurrent_block/rg_lru/(a_gate|input_gate)/(w|b)", P("model")),
    (r".*recurrent_block/rg_lru/a_param", P("model")),
    (r".*recurrent_block/linear_out/kernel", P("model", None)),
    (r".*attention_block/proj_q/kernel", P(None, "model")),
    (r".*attention_block/proj_final/kernel", P("model", None)),
    (r"embedder/input_embedding", P("model", None)),
]


@register("recurrentgemma/griffin", "recurrentgemma",
          f"Griffin: vocab {VOCAB}, width {D}, lru width {D}, 4 heads, mlp 64, blocks (recurrent, "
          f"local attention window 8), native linear scan, seq {SEQ}, batch {BATCH}", GRIFFIN_TP)
def griffin():
    config = rg.GriffinConfig(
        vocab_size=VOCAB, width=D, mlp_expanded_width=64, num_heads=4, lru_width=D,
        block_types=(rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION),
        embeddings_scale_by_sqrt_dim=True, attention_window_size=8, logits_soft_cap=30.0,
        scan_type=rg.ScanType.LINEAR_NATIVE)
    model = rg.Griffin(config)
    rng = np.random.default_rng(40)
    batch = {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
             "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
    params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"], positions)["params"])

    def loss(params, batch):
        pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), batch["tokens"].shape)
        logits, _ = model.apply({"params": params}, batch["tokens"], pos, return_logits=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return Built(params, batch, loss)
