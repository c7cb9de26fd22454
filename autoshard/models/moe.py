"""A small mixture-of-experts (MoE) decoder LM in flax nnx, with a pure train step and
its own sharding presets (``dp``, ``fsdp``, ``tp``, ``dp_tp`` and ``ep``: experts).

The model is :mod:`gpt`'s decoder whose MLP is a GShard-style MoE layer. Tokens
``[B, T, D]`` are cut into groups ``[G, S, D]`` (``S = group_size``, one sequence by
default) so that every step that must see a whole group (the capacity prefix sum) runs
along ``S``, a dim no preset splits; groups are what data and expert parallelism split::

    logits  = x @ router                   [G, S, E]     softmax -> probs
    top-k   = lax.top_k(probs, k)          [G, S, k]     expert ids (router gradient flows
                                                         through probs, not through top_k)
    pos     = cumsum over S of one_hot(id) [G, S, E]     slot in the expert's buffer; choice j
                                                         queues behind all choices < j
    dispatch[g,s,e,c] = one_hot(id)·one_hot(pos, C)      C = ceil(cf·S·k/E): tokens past
    combine [g,s,e,c] = gate · dispatch                  capacity are dropped (zero output)
    expert_in  = einsum("gsec,gsd->egcd")  [E, G, C, D]  experts leading
    expert_out = down(gelu(up(expert_in))) [E, G, C, D]  stacked weights [E, D, F] / [E, F, D]
    y          = einsum("gsec,egcd->gsd")  [G, S, D]

Under ``ep`` the groups are split over ``'expert'`` and the expert weights on their
leading dim: ``expert_in`` arrives split on ``G`` and the expert matmul wants it split on
``E``, which the pass moves with one all-to-all (and back for the combine), as GShard does.
The load-balancing loss is Switch/GShard's ``E · Σ_e f_e · p_e`` (fraction of tokens whose
first choice is ``e`` times mean router probability), averaged over groups and layers and
added to the LM loss with weight ``aux_loss_coef``.

Parameter paths (used by the presets below)::

    tok_emb/embedding                  [V, D]
    pos_emb                            [T, D]
    blocks/<i>/ln1/{scale,bias}        [D]
    blocks/<i>/attn/{q,k,v,out}/{kernel [D, D], bias [D]}
    blocks/<i>/ln2/{scale,bias}        [D]
    blocks/<i>/moe/router/kernel       [D, E]
    blocks/<i>/moe/up/{kernel [E, D, F], bias [E, F]}
    blocks/<i>/moe/down/{kernel [E, F, D], bias [E, D]}
    ln_f/{scale,bias}                  [D]
    lm_head/{kernel [D, V], bias [V]}

Presets (:func:`param_specs`, :func:`batch_specs`; ``autoshard.models.presets`` dispatches
here for ``"moe"``):

======== ======================================================= ==========================
strategy params                                                  batch ``[B, T]``
======== ======================================================= ==========================
dp       all ``P()``                                             ``P('data', None)``
fsdp     first dim divisible by ``|data|`` on ``'data'``          ``P('data', None)``
tp       Megatron attention; expert FFN split on F over 'model'  ``P()``
dp_tp    as tp                                                   ``P('data', None)``
ep       expert weights ``P('expert', ...)``; others ``P()``     ``P(('data', 'expert'))``
======== ======================================================= ==========================

Example::

    >>> cfg = MoEConfig()
    >>> model_def, params = init(cfg, seed=0)
    >>> params["blocks"]["0"]["moe"]["up"]["kernel"].shape
    (8, 32, 64)
    >>> opt = default_optimizer()
    >>> step = jax.jit(make_train_step(model_def, opt))                   # doctest: +SKIP
    >>> loss, params, opt_state = step(params, opt.init(params), make_batch(cfg, 8))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from autoshard.models import (ModelDef, adamw, cross_entropy, functional_train_step, merge_params,
                              split_params)
from autoshard.errors import SpecError
from autoshard.models import gpt
from autoshard.models.presets import (DATA_AXIS, EXPERT_AXIS, MODEL_AXIS, _axis_size,
                                      _fsdp_spec, _map_with_path, _split_dim)

__all__ = ["MoEConfig", "Config", "MoE", "MoELayer", "init", "make_batch", "loss_fn",
           "make_train_step", "default_optimizer", "router_probs", "STRATEGIES", "param_specs",
           "batch_specs"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of :class:`MoE`; ``d_ff=None`` means ``2 * d_model`` (per expert),
    ``group_size=None`` means ``seq_len`` (one routing group per sequence).

    >>> MoEConfig().capacity
    8
    """
    vocab_size: int = 64
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 16
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 2.0
    d_ff: int | None = None
    group_size: int | None = None
    aux_loss_coef: float = 0.01
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.seq_len % self.group_size_:
            raise ValueError(f"group_size={self.group_size_} must divide seq_len={self.seq_len}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be positive")

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 2 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size_(self) -> int:
        return self.group_size if self.group_size is not None else self.seq_len

    @property
    def capacity(self) -> int:
        """Slots per expert and group: ``ceil(capacity_factor * S * top_k / E)``."""
        return max(1, math.ceil(self.capacity_factor * self.group_size_ * self.top_k
                                / self.n_experts))


#: Uniform name used by :func:`autoshard.models.get_model`.
Config = MoEConfig


class _Stacked(nnx.Module):
    """``n_experts`` linear layers as one ``kernel [E, d_in, d_out]`` and ``bias [E, d_out]``."""

    def __init__(self, cfg: MoEConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        self.kernel = nnx.Param(init(rngs.params(), (cfg.n_experts, d_in, d_out), cfg.dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.n_experts, d_out), cfg.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:     # x [E, G, C, d_in]
        y = jnp.einsum("egcd,edf->egcf", x, self.kernel[...])
        return y + self.bias[...][:, None, None, :]


class MoELayer(nnx.Module):
    """Top-k routed experts with capacity; returns ``(y [B, T, D], aux_loss [],
    router probabilities [G, S, E])``."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = nnx.Linear(cfg.d_model, cfg.n_experts, use_bias=False, dtype=cfg.dtype,
                                 param_dtype=cfg.dtype, rngs=rngs)
        self.up = _Stacked(cfg, cfg.d_model, cfg.ff_dim, rngs=rngs)
        self.down = _Stacked(cfg, cfg.ff_dim, cfg.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, d = x.shape
        s, e, cap = cfg.group_size_, cfg.n_experts, cfg.capacity
        x = x.reshape(b * t // s, s, d)                                     # [G, S, D]
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)  # [G, S, E]
        # Expert choice is discrete: no gradient through top_k (the gates carry it).
        _, ids = jax.lax.top_k(jax.lax.stop_gradient(probs), cfg.top_k)      # [G, S, k]
        masks = [jax.nn.one_hot(ids[..., j], e, dtype=jnp.int32) for j in range(cfg.top_k)]
        gates = [jnp.sum(probs * m, axis=-1) for m in masks]                  # [G, S] each
        norm = sum(gates)
        dispatch = combine = 0.0
        queued = jnp.zeros((x.shape[0], 1, e), jnp.int32)   # slots taken by earlier choices
        for m, gate in zip(masks, gates):
            # Slot of each token in its expert's buffer: a prefix sum along the group.
            pos = jnp.cumsum(m, axis=1) - 1 + queued                          # [G, S, E]
            queued = queued + jnp.sum(m, axis=1, keepdims=True)
            # one_hot of a slot >= capacity is all zeros: the token is dropped.
            slot = jax.nn.one_hot(jnp.sum(pos * m, axis=-1), cap, dtype=probs.dtype)  # [G,S,C]
            d_j = m.astype(probs.dtype)[..., None] * slot[:, :, None, :]     # [G, S, E, C]
            dispatch = dispatch + d_j
            combine = combine + (gate / norm)[..., None, None] * d_j
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
        expert_out = self.down(jax.nn.gelu(self.up(expert_in)))             # [E, G, C, D]
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), expert_out)
        # Load balancing: fraction of first choices per expert times mean probability.
        frac = jnp.mean(masks[0].astype(jnp.float32), axis=1)                 # [G, E]
        mean_prob = jnp.mean(probs, axis=1)                                   # [G, E]
        aux = e * jnp.mean(jnp.sum(frac * mean_prob, axis=-1))
        return y.reshape(b, t, d), aux, probs


class Block(nnx.Module):
    """Pre-layernorm block: ``x + attn(ln1(x))``, then ``+ moe(ln2(.))``; also returns the
    MoE layer's aux loss and router probabilities."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.ln1 = gpt._layernorm(cfg, rngs)
        self.attn = gpt.CausalSelfAttention(cfg, rngs=rngs)
        self.ln2 = gpt._layernorm(cfg, rngs)
        self.moe = MoELayer(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = x + self.attn(self.ln1(x))
        y, aux, probs = self.moe(self.ln2(x))
        return x + y, aux, probs


class MoE(nnx.Module):
    """Decoder-only MoE LM; ``__call__(tokens) -> (logits [B, T, V], aux_loss [])``, and
    with ``router_probs=True`` also the list of each layer's router probabilities.

    >>> logits, aux = MoE(MoEConfig(), rngs=nnx.Rngs(0))(jnp.zeros((2, 16), jnp.int32))
    >>> logits.shape
    (2, 16, 64)
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                                 param_dtype=cfg.dtype, rngs=rngs)
        self.pos_emb = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model), cfg.dtype))
        self.blocks = nnx.data([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = gpt._layernorm(cfg, rngs)
        self.lm_head = gpt._linear(cfg, cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens: jax.Array, *, router_probs: bool = False):
        b, t = tokens.shape
        if t > self.cfg.seq_len or t % self.cfg.group_size_:
            raise ValueError(f"sequence length {t} must be at most seq_len={self.cfg.seq_len} "
                             f"and a multiple of group_size={self.cfg.group_size_}")
        pos = self.pos_emb[...]
        if t != pos.shape[0]:
            pos = pos[:t]
        x = self.tok_emb(tokens) + pos[None]
        aux = jnp.zeros((), jnp.float32)
        probs = []
        for block in self.blocks:
            x, a, p = block(x)
            aux, probs = aux + a, probs + [p]
        out = self.lm_head(self.ln_f(x)), aux / len(self.blocks)
        return (*out, probs) if router_probs else out


# ----------------------------------------------------------------- pure API


def init(config: MoEConfig = MoEConfig(), seed: int = 0) -> tuple[ModelDef, dict]:
    """Initialise an MoE LM; returns ``(model_def, params)`` with pure-dict params.

    >>> init(MoEConfig(), seed=0)[1]["blocks"]["0"]["moe"]["router"]["kernel"].shape
    (32, 8)
    """
    return split_params("moe", config, MoE(config, rngs=nnx.Rngs(seed)))


def make_batch(config: MoEConfig, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The same learnable synthetic LM batch as :func:`gpt.make_batch`:
    ``{'tokens', 'labels'}``, int32 ``[B, T]``."""
    return gpt.make_batch(config, batch_size, seed)


def loss_fn(model_def: ModelDef, params: dict, batch: dict) -> jax.Array:
    """Mean token cross-entropy (one-hot labels) plus ``aux_loss_coef`` times the
    load-balancing loss."""
    model = merge_params(model_def, params)
    logits, aux = model(batch["tokens"])
    return (cross_entropy(logits, batch["labels"], model_def.config.vocab_size)
            + model_def.config.aux_loss_coef * aux)


def router_probs(model_def: ModelDef, params: dict, batch: dict) -> list[jax.Array]:
    """Each layer's router probabilities ``[G, S, E]`` on ``batch`` (to inspect routing:
    load, margins between the k-th and (k+1)-th choice)."""
    return merge_params(model_def, params)(batch["tokens"], router_probs=True)[2]


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation):
    """Pure ``step(params, opt_state, batch) -> (loss, new_params, new_opt_state)``."""
    return functional_train_step(loss_fn, model_def, optimizer)


def default_optimizer(lr: float = 1e-3) -> optax.GradientTransformation:
    """``optax.adamw(lr, weight_decay=0.01)``."""
    return adamw(lr)


# ----------------------------------------------------------------- presets

#: Strategies :func:`param_specs` and :func:`batch_specs` accept.
STRATEGIES = ("dp", "fsdp", "tp", "dp_tp", "ep")

# Megatron tp, keyed by (module, leaf): the dim split over 'model'. Attention as in gpt;
# the experts' up projection is column-parallel on F, the down projection row-parallel.
_TP_DIMS = {("q", "kernel"): 1, ("q", "bias"): 0, ("k", "kernel"): 1, ("k", "bias"): 0,
            ("v", "kernel"): 1, ("v", "bias"): 0, ("out", "kernel"): 0,
            ("up", "kernel"): 2, ("up", "bias"): 1, ("down", "kernel"): 1}
_EXPERT_MODULES = ("up", "down")


def _is_expert(path) -> bool:
    return len(path) >= 3 and path[-3] == "moe" and path[-2] in _EXPERT_MODULES


def _check_divisible(path, shape, dim, axis, n):
    # Raise rather than replicate: a half-applied strategy (one expert weight split, its
    # partner whole) is a different strategy.
    if shape[dim] % n:
        raise SpecError(
            f"strategy cannot split dim {dim} of this parameter over mesh axis {axis!r} of "
            f"size {n} (not divisible)", path="params/" + "/".join(path), shape=shape,
            spec=_split_dim(len(shape), dim, axis), mesh_axes=(axis,),
            fix=f"use a {axis!r} axis size that divides {shape[dim]}, or change the config")


def _tp_spec(path, shape, n_model) -> P:
    dim = _TP_DIMS.get(tuple(path[-2:]))
    if dim is None or (path[-2] in _EXPERT_MODULES and not _is_expert(path)):
        return P()
    _check_divisible(path, shape, dim, MODEL_AXIS, n_model)
    return _split_dim(len(shape), dim, MODEL_AXIS)


def _ep_spec(path, shape, n_expert) -> P:
    if not _is_expert(path):
        return P()
    _check_divisible(path, shape, 0, EXPERT_AXIS, n_expert)
    return _split_dim(len(shape), 0, EXPERT_AXIS)


def _check(strategy, mesh_axis_names):
    if strategy not in STRATEGIES:
        raise ValueError(f"model 'moe' has no strategy {strategy!r}; its strategies are "
                         f"{STRATEGIES}")
    need = {"dp": (DATA_AXIS,), "fsdp": (DATA_AXIS,), "tp": (MODEL_AXIS,),
            "dp_tp": (DATA_AXIS, MODEL_AXIS), "ep": (EXPERT_AXIS,)}[strategy]
    missing = [a for a in need if a not in tuple(mesh_axis_names)]
    if missing:
        raise ValueError(f"strategy {strategy!r} needs mesh axes {need}, but the mesh has axes "
                         f"{tuple(mesh_axis_names)} (missing {tuple(missing)})")


def param_specs(params: dict, strategy: str, mesh_axis_names: tuple[str, ...],
                mesh_shape: Mapping[str, int]) -> dict:
    """PartitionSpecs for ``params`` (same nested-dict structure) under ``strategy``.

    >>> _, params = init(MoEConfig())
    >>> specs = param_specs(params, "ep", ("data", "expert"), {"data": 2, "expert": 4})
    >>> specs["blocks"]["0"]["moe"]["up"]["kernel"], specs["blocks"]["0"]["attn"]["q"]["kernel"]
    (P('expert', None, None), P())
    """
    _check(strategy, mesh_axis_names)
    if strategy == "dp":
        return _map_with_path(lambda path, x: P(), params)
    if strategy == "fsdp":
        n_data = _axis_size(mesh_shape, DATA_AXIS)
        return _map_with_path(lambda path, x: _fsdp_spec(tuple(x.shape), n_data), params)
    if strategy == "ep":
        n_expert = _axis_size(mesh_shape, EXPERT_AXIS)
        return _map_with_path(lambda path, x: _ep_spec(path, tuple(x.shape), n_expert), params)
    n_model = _axis_size(mesh_shape, MODEL_AXIS)
    return _map_with_path(lambda path, x: _tp_spec(path, tuple(x.shape), n_model), params)


def batch_specs(batch: dict, strategy: str, mesh_axis_names: tuple[str, ...]) -> dict:
    """PartitionSpecs for the ``[B, T]`` batch: the batch dim over ``'data'`` (dp, fsdp,
    dp_tp), over ``'expert'`` (ep; jointly ``('data', 'expert')`` when the mesh has
    ``'data'``), or replicated (tp).

    >>> batch_specs({"tokens": np.zeros((8, 16))}, "ep", ("data", "expert"))
    {'tokens': P(('data', 'expert'), None)}
    """
    _check(strategy, mesh_axis_names)
    if strategy == "tp":
        return _map_with_path(lambda path, x: P(), batch)
    if strategy == "ep":
        axis = (DATA_AXIS, EXPERT_AXIS) if DATA_AXIS in tuple(mesh_axis_names) else EXPERT_AXIS
        return _map_with_path(
            lambda path, x: P(axis, *(None,) * (len(x.shape) - 1)) if len(x.shape) else P(),
            batch)
    return _map_with_path(lambda path, x: _split_dim(len(x.shape), 0, DATA_AXIS), batch)
