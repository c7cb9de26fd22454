"""A small GPT-style decoder LM in flax nnx, with a pure functional train step.

The architecture is deliberately "textbook" so that the jaxpr exercises the ops
a parallelizer must handle in real transformers: an embedding ``gather``,
separate q/k/v projections, head reshapes, ``einsum`` attention with a causal
``where`` mask, ``softmax`` (a ``custom_jvp``), ``gelu``, layernorm reductions
and a one-hot cross-entropy.

Parameter paths (used by ``presets.py``)::

    tok_emb/embedding            [V, D]
    pos_emb                      [T, D]
    blocks/<i>/ln1/{scale,bias}  [D]
    blocks/<i>/attn/{q,k,v,out}/{kernel [D, D], bias [D]}
    blocks/<i>/ln2/{scale,bias}  [D]
    blocks/<i>/mlp/up/{kernel [D, F], bias [F]}
    blocks/<i>/mlp/down/{kernel [F, D], bias [D]}
    ln_f/{scale,bias}            [D]
    lm_head/{kernel [D, V], bias [V]}

Example::

    >>> cfg = GPTConfig()
    >>> model_def, params = init(cfg, seed=0)
    >>> opt = default_optimizer()
    >>> step = jax.jit(make_train_step(model_def, opt))
    >>> loss, params, opt_state = step(params, opt.init(params), make_batch(cfg, 4))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from autoshard.models import (ModelDef, adamw, cross_entropy, functional_train_step, merge_params,
                              split_params)

__all__ = ["GPTConfig", "Config", "GPT", "init", "make_batch", "loss_fn",
           "make_train_step", "default_optimizer"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of :class:`GPT`; ``d_ff=None`` means ``4 * d_model``.

    >>> GPTConfig(d_model=64, n_heads=8).ff_dim
    256
    """
    vocab_size: int = 64
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 16
    d_ff: int | None = None
    dtype: Any = jnp.float32
    # Stack the blocks' parameters on a leading layer dim and run them with nnx.scan: one
    # loop in the program instead of n_layers copies (params["blocks"][...] gain dim 0).
    scan_layers: bool = False
    # Sequence parallelism (Megatron-SP): a PartitionSpec tuple for the residual stream
    # [B, T, D], e.g. ("data", "model", None). The stream is pinned to it at every block
    # boundary with a sharding constraint, so layernorms and residual adds run on sequence
    # shards. Set by ``presets.configure(..., "sp", ...)``; needs a mesh in context.
    residual_spec: tuple | None = None

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


#: Uniform name used by :func:`autoshard.models.get_model`.
Config = GPTConfig


def _linear(cfg: GPTConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=True, dtype=cfg.dtype,
                      param_dtype=cfg.dtype, rngs=rngs)


def _layernorm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with separate q, k, v projections.

    Separate projections (rather than one fused ``qkv``) keep each kernel a
    plain ``[D, D]`` matrix, which is what the Megatron preset splits.
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        d = cfg.d_model
        self.q = _linear(cfg, d, d, rngs)
        self.k = _linear(cfg, d, d, rngs)
        self.v = _linear(cfg, d, d, rngs)
        self.out = _linear(cfg, d, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.n_heads, self.head_dim)  # [B,T,H,Dh]
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # Scale q (a [B,T,H,Dh] multiply) rather than the [B,H,T,T] scores.
        q = q * jnp.asarray(1.0 / math.sqrt(self.head_dim), q.dtype)
        scores = jnp.einsum("bthd,bshd->bhts", q, k)
        # Causal mask: query t may attend to keys s <= t. tril lowers to iota/ge.
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        # finfo.min instead of -inf: no NaN from (-inf) - (-inf) in softmax.
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, d)
        return self.out(y)


class FeedForward(nnx.Module):
    """``down(gelu(up(x)))``; ``up`` is column-, ``down`` row-parallel under tp."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.up = _linear(cfg, cfg.d_model, cfg.ff_dim, rngs)
        self.down = _linear(cfg, cfg.ff_dim, cfg.d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-layernorm transformer block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(.))``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.residual_spec = cfg.residual_spec
        self.ln1 = _layernorm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln2 = _layernorm(cfg, rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _pin_residual(x, self.residual_spec)
        x = _pin_residual(x + self.attn(self.ln1(x)), self.residual_spec)
        return x + self.mlp(self.ln2(x))


def _pin_residual(x: jax.Array, spec: tuple | None) -> jax.Array:
    """Constrain the residual stream to ``spec`` (sequence parallelism), or leave it free."""
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


class GPT(nnx.Module):
    """Decoder-only LM: token + learned position embedding, blocks, ln_f, lm_head.

    >>> model = GPT(GPTConfig(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 64)
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # nnx.Embed looks tokens up with jnp.take: a `gather` in the jaxpr (wanted).
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                                 param_dtype=cfg.dtype, rngs=rngs)
        self.pos_emb = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model), cfg.dtype))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Block(cfg, rngs=rngs)
            self.blocks = stacked(rngs)
        else:
            # A plain python list, unrolled in the jaxpr; nnx.data marks it as
            # pytree data (nnx 0.12 rejects sub-modules in un-annotated lists).
            self.blocks = nnx.data([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = _layernorm(cfg, rngs)
        # Untied head: a separate [D, V] matrix, not tok_emb.embedding.T.
        self.lm_head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.cfg.seq_len}")
        pos = self.pos_emb[...]
        if t != pos.shape[0]:  # avoid a no-op slice in the common full-length case
            pos = pos[:t]
        x = self.tok_emb(tokens) + pos[None]
        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(h, block):
                return block(h)
            x = run(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
        x = _pin_residual(x, self.cfg.residual_spec)
        return self.lm_head(self.ln_f(x))  # logits [B, T, V]


# ----------------------------------------------------------------- pure API


def init(config: GPTConfig = GPTConfig(), seed: int = 0) -> tuple[ModelDef, dict]:
    """Initialise a GPT; returns ``(model_def, params)`` with pure-dict params.

    >>> model_def, params = init(GPTConfig(), seed=0)
    >>> params["blocks"]["0"]["attn"]["q"]["kernel"].shape
    (32, 32)
    """
    return split_params("gpt", config, GPT(config, rngs=nnx.Rngs(seed)))


def make_batch(config: GPTConfig, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable synthetic LM batch: ``{'tokens', 'labels'}``, int32 ``[B, T]``.

    Each row is an arithmetic progression mod ``vocab_size`` with a random
    start and stride, and ``labels`` are the next tokens, so a causal model can
    predict them from the two previous tokens (the loss really goes down).

    >>> make_batch(GPTConfig(), 2)["tokens"].shape
    (2, 16)
    """
    rng = np.random.default_rng(seed)
    t = config.seq_len
    start = rng.integers(0, config.vocab_size, size=(batch_size, 1))
    stride = rng.integers(1, config.vocab_size, size=(batch_size, 1))
    pos = np.arange(t + 1)[None, :]
    seq = ((start + stride * pos) % config.vocab_size).astype(np.int32)
    return {"tokens": seq[:, :t], "labels": seq[:, 1:]}


def loss_fn(model_def: ModelDef, params: dict, batch: dict) -> jax.Array:
    """Mean token cross-entropy, via one-hot labels (a dot, not a gather).

    >>> loss_fn(model_def, params, make_batch(GPTConfig(), 2))   # doctest: +SKIP
    Array(4.2, dtype=float32)
    """
    model = merge_params(model_def, params)
    logits = model(batch["tokens"])
    return cross_entropy(logits, batch["labels"], model_def.config.vocab_size)


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation):
    """Pure ``step(params, opt_state, batch) -> (loss, new_params, new_opt_state)``.

    >>> step = make_train_step(model_def, default_optimizer())    # doctest: +SKIP
    """
    return functional_train_step(loss_fn, model_def, optimizer)


def default_optimizer(lr: float = 1e-3) -> optax.GradientTransformation:
    """``optax.adamw(lr, weight_decay=0.01)``."""
    return adamw(lr)


# ----------------------------------------------------------------- planning at scale

#: Presets of the reference GPT for planning (``autoshard report --model gpt --size 1t``).
#: Parameter counts (``param_count``): test 30K, 1b 1.04B, 70b 71.4B, 1t 1.01T. The
#: large ones stack their layers (``scan_layers``: one loop in the program, so the plan's
#: size does not grow with depth) and use bfloat16 parameters and activations.
SIZES = {
    "test": GPTConfig(),
    "1b": GPTConfig(vocab_size=32768, d_model=2048, n_heads=16, n_layers=18, seq_len=2048,
                    dtype=jnp.bfloat16, scan_layers=True),
    "70b": GPTConfig(vocab_size=32768, d_model=8192, n_heads=64, n_layers=88, seq_len=4096,
                     dtype=jnp.bfloat16, scan_layers=True),
    "1t": GPTConfig(vocab_size=32768, d_model=25600, n_heads=160, n_layers=128, seq_len=2048,
                    dtype=jnp.bfloat16, scan_layers=True),
}


def param_count(config: GPTConfig) -> int:
    """Number of parameters of ``GPT(config)``, from the architecture (no arrays made).

    >>> param_count(GPTConfig())
    30144
    """
    d, f, v, t, n = config.d_model, config.ff_dim, config.vocab_size, config.seq_len, config.n_layers
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return v * d + t * d + n * block + 2 * d + d * v + v


def abstract_init(config: GPTConfig = GPTConfig()) -> tuple[ModelDef, dict]:
    """``init(config)`` without materializing anything: ``params`` has ``jax.ShapeDtypeStruct``
    leaves (so a 1T-parameter model costs no memory). For planning on an abstract mesh.

    >>> model_def, params = abstract_init(SIZES["1t"])
    >>> params["blocks"]["attn"]["q"]["kernel"].shape
    (128, 25600, 25600)
    """
    if config.scan_layers or config.n_layers <= 1:
        return split_params("gpt", config, nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    # Unrolled: one small trace for the model without blocks and one for a block, the other
    # blocks copies of it. Tracing all of GPT(config) at once is quadratic in depth (each
    # random draw's bookkeeping makes JAX walk the jaxpr traced so far): 128 blocks took
    # ~2 minutes, this takes ~0.3 s. Same graphdef and parameter tree as init(config).
    model = nnx.eval_shape(lambda: GPT(dataclasses.replace(config, n_layers=0), rngs=nnx.Rngs(0)))
    block = nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0)))
    model.cfg = config
    model.blocks = nnx.data([block] + [nnx.clone(block) for _ in range(config.n_layers - 1)])
    return split_params("gpt", config, model)


def abstract_batch(config: GPTConfig, batch_size: int) -> dict:
    """``make_batch``'s structure as ``jax.ShapeDtypeStruct`` leaves (int32 ``[B, T]``)."""
    leaf = jax.ShapeDtypeStruct((batch_size, config.seq_len), jnp.int32)
    return {"tokens": leaf, "labels": leaf}
