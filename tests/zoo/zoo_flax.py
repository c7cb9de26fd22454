"""flax: models written as flax's examples write them (linen lm1b-style decoder, linen MNIST
CNN, an nnx miniGPT), as a user would, with the library's own layers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from harness import Built, register

VOCAB, D, HEADS, MLP, SEQ, LAYERS, BATCH = 64, 32, 4, 64, 16, 2, 16


def _tokens(seed=0, batch=BATCH, seq=SEQ, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "labels": rng.integers(0, vocab, (batch, seq), dtype=np.int32)}


def lm_loss(logits, labels):
    import optax
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


# ----------------------------------------------------------------------------- linen LM

class MlpBlock(nn.Module):
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic):
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, name="wi")(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(d, name="wo")(x)


class DecoderBlock(nn.Module):
    heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, deterministic):
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y, mask=mask)
        x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.LayerNorm(name="ln2")(x)
        return x + MlpBlock(self.mlp_dim, self.dropout, name="mlp")(y, deterministic)


class TransformerLM(nn.Module):
    vocab: int
    d: int
    heads: int
    mlp_dim: int
    layers: int
    max_len: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, deterministic=True):
        embed = nn.Embed(self.vocab, self.d, name="embed")
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.d))
        x = embed(tokens) + pos[None, : tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = DecoderBlock(self.heads, self.mlp_dim, self.dropout, name=f"block_{i}")(x, mask, deterministic)
        x = nn.LayerNorm(name="ln_f")(x)
        return embed.attend(x)


LINEN_TP = [
    (r".*attn/(query|key|value)/kernel", P(None, "model", None)),
    (r".*attn/(query|key|value)/bias", P("model", None)),
    (r".*attn/out/kernel", P("model", None, None)),
    (r".*mlp/wi/kernel", P(None, "model")),
    (r".*mlp/wi/bias", P("model")),
    (r".*mlp/wo/kernel", P("model", None)),
    (r"embed/embedding", P("model", None)),     # vocab-parallel embedding and tied head
]


@register("flax_linen/lm1b_decoder", "flax.linen",
          f"vocab {VOCAB}, d {D}, {HEADS} heads, mlp {MLP}, {LAYERS} layers, dropout 0.1 (typed key "
          f"jax.random.key in the batch), seq {SEQ}, batch {BATCH}",
          LINEN_TP)
def linen_lm():
    model = TransformerLM(VOCAB, D, HEADS, MLP, LAYERS, SEQ, dropout=0.1)
    batch = _tokens()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"])["params"]
    batch["dropout_key"] = jax.random.key(1)     # the spelling JAX recommends

    def loss(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], deterministic=False,
                             rngs={"dropout": batch["dropout_key"]})
        return lm_loss(logits, batch["labels"])
    return Built(params, batch, loss)


# ----------------------------------------------------------------------------- linen CNN

class CNN(nn.Module):
    """flax examples/mnist, with a batch norm in training mode (statistics over the whole
    batch, which dp and fsdp split)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=8, kernel_size=(3, 3), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=False, name="bn1")(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=16, kernel_size=(3, 3), name="conv2")(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=32, name="fc1")(x)
        x = nn.relu(x)
        return nn.Dense(features=10, name="fc2")(x)


CNN_TP = [
    (r"conv1/kernel", P(None, None, None, "model")),
    (r"conv1/bias", P("model")),
    (r"conv2/kernel", P(None, None, "model", None)),
    (r"fc1/kernel", P(None, "model")),
    (r"fc1/bias", P("model")),
    (r"fc2/kernel", P("model", None)),
]


@register("flax_linen/mnist_cnn", "flax.linen",
          "conv 8 (3x3) + batch norm (training mode), conv 16, dense 32-10, 16x16x1 images, batch 16", CNN_TP)
def linen_cnn():
    model = CNN()
    rng = np.random.default_rng(1)
    batch = {"image": rng.normal(size=(BATCH, 16, 16, 1)).astype(np.float32),
             "label": rng.integers(0, 10, (BATCH,), dtype=np.int32)}
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"])
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": stats}, batch["image"],
                                mutable=["batch_stats"])
        return lm_loss(logits, batch["label"])
    return Built(params, batch, loss)


# ----------------------------------------------------------------------------- nnx miniGPT

class NnxBlock(nnx.Module):
    def __init__(self, d, heads, mlp, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class MiniGPT(nnx.Module):
    """The flax nnx miniGPT tutorial's shape: token + position embeddings, pre-LN blocks."""

    def __init__(self, vocab, d, heads, mlp, layers, max_len, rngs):
        self.tok = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(d, heads, mlp, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


NNX_TP = [
    (r".*attn/(query|key|value)/kernel", P(None, "model", None)),
    (r".*attn/(query|key|value)/bias", P("model", None)),
    (r".*attn/out/kernel", P("model", None, None)),
    (r".*up/kernel", P(None, "model")),
    (r".*up/bias", P("model")),
    (r".*down/kernel", P("model", None)),
    (r"head/kernel", P(None, "model")),
    (r"head/bias", P("model")),
]


@register("flax_nnx/minigpt", "flax.nnx",
          f"vocab {VOCAB}, d {D}, {HEADS} heads, mlp {MLP}, {LAYERS} layers, seq {SEQ}, batch {BATCH}",
          NNX_TP)
def nnx_minigpt():
    model = MiniGPT(VOCAB, D, HEADS, MLP, LAYERS, SEQ, nnx.Rngs(0))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_get(nnx.to_pure_dict(params_state))

    def loss(params, batch):
        state = jax.tree.map(lambda x: x, params_state)
        nnx.replace_by_pure_dict(state, params)
        logits = nnx.merge(graphdef, state, rest)(batch["tokens"])
        return lm_loss(logits, batch["labels"])
    return Built(params, _tokens(), loss)
