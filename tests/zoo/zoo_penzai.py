"""penzai: the library's own llama-like transformer builder (named axes), unrolled (Llama:
SwiGLU, grouped-query attention) and as a ``LayerStack`` (Gemma-style: GeGLU, tied embedding;
the blocks run under a lax.scan over stacked parameters). Parameters are the frozen
``pz.ParameterValue``s keyed by label (their NamedArrays' ``data_array`` are the leaves); the
loss binds them back into the model."""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as llamalike

from harness import Built, register

VOCAB, D, SEQ, BATCH = 64, 32, 16, 16


def _config(**kw):
    base = dict(num_kv_heads=4, query_head_multiplier=2, embedding_dim=D, projection_dim=4,
                mlp_hidden_dim=64, num_decoder_blocks=2, vocab_size=VOCAB)
    return llamalike.LlamalikeTransformerConfig(**{**base, **kw})


def _build(config, seed):
    model = llamalike.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))
    unbound, frozen = pz.unbind_params(model, freeze=True)
    params = jax.device_get({p.label: p.value for p in frozen})
    rng = np.random.default_rng(seed)
    batch = {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
             "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}

    def loss(params, batch):
        bound = pz.bind_variables(unbound, [pz.ParameterValue(label=k, value=v) for k, v in params.items()])
        logits = bound(pz.nx.wrap(batch["tokens"]).tag("batch", "seq"))
        logits = logits.untag("batch", "seq", "vocabulary").unwrap()
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return Built(params, batch, loss)


# data_array dims follow the named axes: query [embedding, head_groups, query_heads,
# projection], key/value [embedding, head_groups, projection], output [head_groups,
# query_heads, projection, embedding]; a LayerStack puts "blocks" first.
LLAMA_TP = [
    (r".*attention/(query|key|value)\.weights/data_array", P(None, "model")),
    (r".*attention/output\.weights/data_array", P("model")),
    (r".*mlp/(gating|value)_linear\.weights/data_array", P(None, "model")),
    (r".*mlp/out_linear\.weights/data_array", P("model")),
    (r".*lm_head\.weights/data_array", P(None, "model")),
]
STACKED_TP = [
    (r".*blocks/attention/(query|key|value)\.weights/data_array", P(None, None, "model")),
    (r".*blocks/attention/output\.weights/data_array", P(None, "model")),
    (r".*blocks/mlp/(gating|value)_linear\.weights/data_array", P(None, None, "model")),
    (r".*blocks/mlp/out_linear\.weights/data_array", P(None, "model")),
    (r".*embedder\.embeddings/data_array", P("model")),
]


@register("penzai/llama", "penzai",
          f"llamalike: vocab {VOCAB}, d {D}, 4 kv heads x 2 query heads of 4, SwiGLU 64, 2 blocks, "
          f"seq {SEQ}, batch {BATCH}", LLAMA_TP)
def llama():
    return _build(_config(mlp_variant="swiglu", tie_embedder_and_logits=False), seed=30)


@register("penzai/gemma_layerstack", "penzai",
          f"llamalike, LayerStack (scan): vocab {VOCAB}, d {D}, 4 kv heads x 2 query heads of 4, "
          f"GeGLU 64, tied embedding, 2 stacked blocks, seq {SEQ}, batch {BATCH}", STACKED_TP)
def gemma_layerstack():
    return _build(_config(mlp_variant="geglu_approx", tie_embedder_and_logits=True,
                          use_layer_stack=True), seed=31)
