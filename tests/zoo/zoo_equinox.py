"""equinox: a small ViT (eqx.nn.Conv2d patches, eqx.nn.MultiheadAttention, LayerNorm, MLP)
and a GRU language model (eqx.nn.GRUCell under jax.lax.scan), written per example and
jax.vmap'ed over the batch, as equinox's docs write models. Parameters are the array leaves
of the module (eqx.partition); the loss recombines them with the static part."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from harness import Built, register

D, HEADS, MLP, LAYERS, BATCH, PATCH, IMAGE, CLASSES = 32, 4, 64, 2, 16, 4, 16, 10
VOCAB, SEQ = 64, 16


def _split(model):
    params, static = eqx.partition(model, eqx.is_array)
    return jax.device_get(params), static


# ----------------------------------------------------------------------------- ViT

class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(HEADS, D, key=k1)
        self.fc1, self.fc2 = eqx.nn.Linear(D, MLP, key=k2), eqx.nn.Linear(MLP, D, key=k3)

    def __call__(self, x):                                   # x: [tokens, D]
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.ln2)(x)
        return x + jax.vmap(lambda t: self.fc2(jax.nn.gelu(self.fc1(t))))(h)


class ViT(eqx.Module):
    patch: eqx.nn.Conv2d
    cls: jax.Array
    pos: jax.Array
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, LAYERS + 4)
        self.patch = eqx.nn.Conv2d(3, D, PATCH, stride=PATCH, key=keys[0])
        tokens = (IMAGE // PATCH) ** 2 + 1
        self.cls = 0.02 * jax.random.normal(keys[1], (1, D))
        self.pos = 0.02 * jax.random.normal(keys[2], (tokens, D))
        self.blocks = [Block(k) for k in keys[4:]]
        self.norm = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, CLASSES, key=keys[3])

    def __call__(self, image):                               # image: [3, H, W]
        x = self.patch(image).reshape(D, -1).T
        x = jnp.concatenate([self.cls, x]) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[0]))


# eqx.nn.Linear weights are [out, in]: column-parallel splits dim 0, row-parallel dim 1.
VIT_TP = [
    (r"blocks/\d+/attn/(query|key|value)_proj/weight", P("model", None)),
    (r"blocks/\d+/attn/output_proj/weight", P(None, "model")),
    (r"blocks/\d+/fc1/weight", P("model", None)),
    (r"blocks/\d+/fc1/bias", P("model")),
    (r"blocks/\d+/fc2/weight", P(None, "model")),
]


@register("equinox/vit", "equinox",
          f"{IMAGE}x{IMAGE}x3 images, {PATCH}x{PATCH} patches, d {D}, {HEADS} heads, mlp {MLP}, "
          f"{LAYERS} layers, {CLASSES} classes, batch {BATCH}", VIT_TP)
def vit():
    params, static = _split(ViT(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(20)
    batch = {"image": rng.normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32),
             "label": rng.integers(0, CLASSES, (BATCH,), dtype=np.int32)}

    def loss(params, batch):
        model = eqx.combine(params, static)
        logits = jax.vmap(model)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return Built(params, batch, loss)


# ----------------------------------------------------------------------------- GRU LM

class GRULM(eqx.Module):
    embed: eqx.nn.Embedding
    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(VOCAB, D, key=k1)
        self.cell = eqx.nn.GRUCell(D, D, key=k2)
        self.head = eqx.nn.Linear(D, VOCAB, key=k3)

    def __call__(self, tokens):                              # tokens: [SEQ]
        def step(h, tok):
            h = self.cell(self.embed(tok), h)
            return h, h
        _, hs = jax.lax.scan(step, jnp.zeros(D), tokens)
        return jax.vmap(self.head)(hs)


# GRUCell's fused gate weights are [3 hidden, in] (rows = gates): column-parallel on dim 0.
GRU_TP = [
    (r"cell/weight_(ih|hh)", P("model", None)),
    (r"cell/bias(_n)?", P("model")),
    (r"head/weight", P("model", None)),
    (r"head/bias", P("model")),
]


@register("equinox/gru_lm", "equinox",
          f"embed {D}, eqx.nn.GRUCell hidden {D} under lax.scan over {SEQ} steps, vocab {VOCAB}, "
          f"batch {BATCH}", GRU_TP)
def gru_lm():
    params, static = _split(GRULM(jax.random.PRNGKey(1)))
    rng = np.random.default_rng(21)
    batch = {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32),
             "labels": rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32)}

    def loss(params, batch):
        logits = jax.vmap(eqx.combine(params, static))(batch["tokens"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return Built(params, batch, loss)
