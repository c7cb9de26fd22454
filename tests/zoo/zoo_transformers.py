"""transformers (4.x; v5 dropped Flax): Flax GPT-2, Llama and BERT from local configs, random
init (no hub). Parameters are the models' own ``params`` dicts; the loss calls the model with
``params=`` as users do."""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from transformers import (BertConfig, FlaxBertForMaskedLM, FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM,
                          GPT2Config, LlamaConfig)

from harness import Built, register

VOCAB, D, SEQ, BATCH, LAYERS = 64, 32, 16, 16, 2


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
            "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _init(cls, config):
    """Random init, traced once (``_do_init=False`` + jit, as the transformers docs show)."""
    model = cls(config, input_shape=(1, SEQ), seed=0, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, SEQ))
    return model, jax.device_get(params)


# GPT-2's Conv1D kernels are stored [out, in]: column-parallel splits dim 0.
GPT2_TP = [
    (r".*attn/c_attn/kernel", P("model", None)),
    (r".*attn/c_attn/bias", P("model")),
    (r".*attn/c_proj/kernel", P(None, "model")),
    (r".*mlp/c_fc/kernel", P("model", None)),
    (r".*mlp/c_fc/bias", P("model")),
    (r".*mlp/c_proj/kernel", P(None, "model")),
    (r".*wte/embedding", P("model", None)),
]


@register("transformers/gpt2", "transformers",
          f"FlaxGPT2LMHeadModel: vocab {VOCAB}, n_embd {D}, 4 heads, {LAYERS} layers, seq {SEQ}, batch {BATCH}",
          GPT2_TP)
def gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=D, n_layer=LAYERS, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model, params = _init(FlaxGPT2LMHeadModel, cfg)

    def loss(params, batch):
        return _xent(model(batch["input_ids"], params=params).logits, batch["labels"])
    return Built(params, _batch(0), loss)


LLAMA_TP = [
    (r".*self_attn/(q|k|v)_proj/kernel", P(None, "model")),
    (r".*self_attn/o_proj/kernel", P("model", None)),
    (r".*mlp/(gate|up)_proj/kernel", P(None, "model")),
    (r".*mlp/down_proj/kernel", P("model", None)),
    (r".*embed_tokens/embedding", P(None, "model")),
    (r"lm_head/kernel", P(None, "model")),
]


@register("transformers/llama", "transformers",
          f"FlaxLlamaForCausalLM: vocab {VOCAB}, hidden {D}, 8 heads, 4 kv heads (GQA), mlp 64, "
          f"{LAYERS} layers, RoPE, seq {SEQ}, batch {BATCH}", LLAMA_TP)
def llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ)
    model, params = _init(FlaxLlamaForCausalLM, cfg)

    def loss(params, batch):
        return _xent(model(batch["input_ids"], params=params).logits, batch["labels"])
    return Built(params, _batch(1), loss)


BERT_TP = [
    (r".*attention/self/(query|key|value)/kernel", P(None, "model")),
    (r".*attention/self/(query|key|value)/bias", P("model")),
    (r".*attention/output/dense/kernel", P("model", None)),
    (r".*intermediate/dense/kernel", P(None, "model")),
    (r".*intermediate/dense/bias", P("model")),
    (r".*layer/\d+/output/dense/kernel", P("model", None)),
    (r".*word_embeddings/embedding", P("model", None)),
]


@register("transformers/bert", "transformers",
          f"FlaxBertForMaskedLM: vocab {VOCAB}, hidden {D}, 4 heads, intermediate 64, {LAYERS} layers, "
          f"seq {SEQ}, batch {BATCH}", BERT_TP)
def bert():
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model, params = _init(FlaxBertForMaskedLM, cfg)
    batch = _batch(2)
    rng = np.random.default_rng(3)
    batch["attention_mask"] = (rng.random((BATCH, SEQ)) < 0.9).astype(np.int32)

    def loss(params, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params).logits
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        mask = batch["attention_mask"]
        return (per_token * mask).sum() / mask.sum()
    return Built(params, batch, loss)
