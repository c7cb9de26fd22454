"""dm-haiku: a decoder-only transformer as haiku's examples/transformer writes it
(hk.MultiHeadAttention, hk.Linear, hk.LayerNorm) and an LSTM language model over
hk.dynamic_unroll (a lax.scan over time)."""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from harness import Built, register

VOCAB, D, HEADS, MLP, SEQ, LAYERS, BATCH = 64, 32, 4, 64, 16, 2, 16


def _tokens(seed):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
            "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ----------------------------------------------------------------------------- transformer

class Transformer(hk.Module):
    def __init__(self, layers, heads, mlp, name=None):
        super().__init__(name=name)
        self.layers, self.heads, self.mlp = layers, heads, mlp

    def __call__(self, x):
        d = x.shape[-1]
        mask = jnp.tril(jnp.ones((1, 1, x.shape[1], x.shape[1]), bool))
        init = hk.initializers.VarianceScaling(2 / self.layers)
        for i in range(self.layers):
            h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=f"ln_attn_{i}")(x)
            h = hk.MultiHeadAttention(num_heads=self.heads, key_size=d // self.heads, model_size=d,
                                      w_init=init, name=f"attn_{i}")(h, h, h, mask=mask)
            x = x + h
            h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=f"ln_mlp_{i}")(x)
            h = hk.Linear(self.mlp, w_init=init, name=f"mlp_{i}_up")(h)
            h = hk.Linear(d, w_init=init, name=f"mlp_{i}_down")(jax.nn.gelu(h))
            x = x + h
        return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name="ln_f")(x)


def _lm(tokens):
    embed = hk.Embed(VOCAB, D, name="embed")
    pos = hk.get_parameter("pos_embed", [SEQ, D], init=hk.initializers.TruncatedNormal(0.02))
    x = Transformer(LAYERS, HEADS, MLP, name="transformer")(embed(tokens) + pos)
    return hk.Linear(VOCAB, name="head")(x)


HAIKU_TP = [
    (r".*attn_\d+/(query|key|value)/w", P(None, "model")),
    (r".*attn_\d+/(query|key|value)/b", P("model")),
    (r".*attn_\d+/linear/w", P("model", None)),
    (r".*mlp_\d+_up/w", P(None, "model")),
    (r".*mlp_\d+_up/b", P("model")),
    (r".*mlp_\d+_down/w", P("model", None)),
    (r"embed/embeddings", P(None, "model")),
    (r"head/w", P(None, "model")),
    (r"head/b", P("model")),
]


def _pure(fn, batch, key="tokens"):
    f = hk.without_apply_rng(hk.transform(fn))
    return f, jax.jit(f.init)(jax.random.PRNGKey(0), batch[key])


@register("haiku/transformer", "dm-haiku",
          f"vocab {VOCAB}, d {D}, {HEADS} heads, mlp {MLP}, {LAYERS} layers, seq {SEQ}, batch {BATCH}",
          HAIKU_TP)
def transformer():
    batch = _tokens(10)
    f, params = _pure(_lm, batch)

    def loss(params, batch):
        return _xent(f.apply(params, batch["tokens"]), batch["labels"])
    return Built(params, batch, loss)


# ----------------------------------------------------------------------------- LSTM LM

def _lstm_lm(tokens):
    x = hk.Embed(VOCAB, D, name="embed")(tokens)
    core = hk.LSTM(D, name="lstm")
    state = core.initial_state(tokens.shape[0])
    out, _ = hk.dynamic_unroll(core, x, state, time_major=False)
    return hk.Linear(VOCAB, name="head")(out)


# The LSTM's fused gate projection [in+hidden, 4 hidden] is column-parallel; the head too.
LSTM_TP = [
    (r"lstm/linear/w", P(None, "model")),
    (r"lstm/linear/b", P("model")),
    (r"head/w", P(None, "model")),
    (r"head/b", P("model")),
]


@register("haiku/lstm_lm", "dm-haiku",
          f"embed {D}, LSTM hidden {D} over hk.dynamic_unroll (scan over {SEQ} steps), vocab {VOCAB}, "
          f"batch {BATCH}", LSTM_TP)
def lstm_lm():
    batch = _tokens(11)
    f, params = _pure(_lstm_lm, batch)

    def loss(params, batch):
        return _xent(f.apply(params, batch["tokens"]), batch["labels"])
    return Built(params, batch, loss)
