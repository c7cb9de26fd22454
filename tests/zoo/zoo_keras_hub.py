"""keras-hub on the JAX backend: GPT2CausalLM and MixtralCausalLM (sparse MoE, top-2 of 4
experts) built from local configs (``preprocessor=None``: no tokenizer, nothing downloaded).
The loss is Keras' functional ``stateless_call`` with the trainable variables passed in, keyed
by their ``variable.path``.

keras-hub declares tensorflow-text as a dependency but the backbones and causal LMs import
without it; the zoo installs keras-hub with ``--no-deps`` next to keras (see requirements)."""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from harness import Built, register  # noqa: E402

assert keras.backend.backend() == "jax", f"KERAS_BACKEND must be jax, is {keras.backend.backend()}"

VOCAB, D, SEQ, BATCH, LAYERS = 64, 32, 16, 16, 2


def _stateless(model, seed):
    """``Built`` for a keras CausalLM: params {path: value}, a token batch, the LM loss."""
    variables = model.trainable_variables
    assert len({v.path for v in variables}) == len(variables)
    params = {v.path: np.asarray(v.value) for v in variables}
    order = [v.path for v in variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    rng = np.random.default_rng(seed)
    batch = {"token_ids": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
             "padding_mask": np.ones((BATCH, SEQ), np.int32),
             "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}

    def loss(params, batch):
        inputs = {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}
        logits, _ = model.stateless_call([params[k] for k in order], non_trainable, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return Built(params, batch, loss)


# Keras EinsumDense attention kernels: query/key/value [hidden, heads, head_dim] (split
# heads), attention_output [heads, head_dim, hidden]; Dense kernels [in, out].
GPT2_TP = [
    (r".*self_attention/(query|key|value)/kernel", P(None, "model", None)),
    (r".*self_attention/(query|key|value)/bias", P("model", None)),
    (r".*self_attention/attention_output/kernel", P("model", None, None)),
    (r".*feedforward_intermediate_dense/kernel", P(None, "model")),
    (r".*feedforward_intermediate_dense/bias", P("model")),
    (r".*feedforward_output_dense/kernel", P("model", None)),
    (r"token_embedding/embeddings", P("model", None)),
]


@register("keras_hub/gpt2", "keras-hub",
          f"GPT2CausalLM: vocab {VOCAB}, hidden {D}, 4 heads, intermediate 64, {LAYERS} layers, "
          f"seq {SEQ}, batch {BATCH}", GPT2_TP)
def gpt2():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=4, hidden_dim=D, intermediate_dim=64,
        dropout=0.0, max_sequence_length=SEQ)
    return _stateless(keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), seed=50)


# Experts [experts, in, out]: gate and intermediate split their hidden units, the output
# projection its input (Megatron inside every expert). Key/value have 2 heads: with 4 model
# shards their rule does not fit and they stay whole (as Megatron replicates KV heads).
MIXTRAL_TP = [
    (r".*self_attention/(query|key|value)/kernel", P(None, "model", None)),
    (r".*self_attention/attention_output/kernel", P("model", None, None)),
    (r".*experts/expert_feedforward_(gate|intermediate)_dense", P(None, None, "model")),
    (r".*experts/expert_feedforward_output_dense", P(None, "model", None)),
    (r"token_embedding/embeddings", P("model", None)),
    (r"token_embedding/reverse_embeddings", P(None, "model")),
]


@register("keras_hub/mixtral_moe", "keras-hub",
          f"MixtralCausalLM: vocab {VOCAB}, hidden {D}, 4 query / 2 kv heads, 4 experts (top 2) "
          f"of intermediate 32, {LAYERS} layers, seq {SEQ}, batch {BATCH}", MIXTRAL_TP)
def mixtral():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_query_heads=4, num_key_value_heads=2, hidden_dim=D,
        intermediate_dim=32, num_experts=4, top_k=2, sliding_window=SEQ)
    return _stateless(keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None), seed=51)
