"""A small residual MLP regressor in flax nnx, with the same pure API as GPT.

Each block is ``x + down(gelu(up(x)))``; the loss is mean squared error. It is
the simplest model worth parallelizing: two matmuls per block, an elementwise
non-linearity, a residual add and a mean reduction.

Parameter paths (used by ``presets.py``)::

    blocks/<i>/up/{kernel [D, H], bias [H]}
    blocks/<i>/down/{kernel [H, D], bias [D]}

Example::

    >>> cfg = MLPConfig()
    >>> model_def, params = init(cfg, seed=0)
    >>> opt = default_optimizer()
    >>> step = jax.jit(make_train_step(model_def, opt))
    >>> loss, params, opt_state = step(params, opt.init(params), make_batch(cfg, 8))
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from autoshard.models import ModelDef, functional_train_step, merge_params, split_params

__all__ = ["MLPConfig", "Config", "MLP", "init", "make_batch", "loss_fn",
           "make_train_step", "default_optimizer"]


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Hyper-parameters of :class:`MLP`; ``d_hidden=None`` means ``4 * d_model``.

    >>> MLPConfig(d_model=8).hidden_dim
    32
    """
    d_model: int = 16
    d_hidden: int | None = None
    n_layers: int = 2
    dtype: Any = jnp.float32

    @property
    def hidden_dim(self) -> int:
        return self.d_hidden if self.d_hidden is not None else 4 * self.d_model


#: Uniform name used by :func:`autoshard.models.get_model`.
Config = MLPConfig


class MLPBlock(nnx.Module):
    """``x + down(gelu(up(x)))``."""

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(cfg.d_model, cfg.hidden_dim, dtype=cfg.dtype,
                             param_dtype=cfg.dtype, rngs=rngs)
        self.down = nnx.Linear(cfg.hidden_dim, cfg.d_model, dtype=cfg.dtype,
                               param_dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(x)))


class MLP(nnx.Module):
    """A stack of residual MLP blocks mapping ``[B, D] -> [B, D]``.

    >>> MLP(MLPConfig(), rngs=nnx.Rngs(0))(jnp.zeros((4, 16))).shape
    (4, 16)
    """

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        # Plain python list (unrolled); nnx.data marks it as pytree data.
        self.blocks = nnx.data([MLPBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


# ----------------------------------------------------------------- pure API


def init(config: MLPConfig = MLPConfig(), seed: int = 0) -> tuple[ModelDef, dict]:
    """Initialise an MLP; returns ``(model_def, params)`` with pure-dict params.

    >>> model_def, params = init(MLPConfig(), seed=0)
    >>> params["blocks"]["0"]["up"]["kernel"].shape
    (16, 64)
    """
    return split_params("mlp", config, MLP(config, rngs=nnx.Rngs(seed)))


def make_batch(config: MLPConfig, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic regression batch ``{'x', 'y'}``, float32 ``[B, D]``.

    ``y = tanh(x @ W)`` for a fixed random ``W`` (independent of ``seed``), so
    batches with different seeds describe the same function.

    >>> make_batch(MLPConfig(), 4)["y"].shape
    (4, 16)
    """
    d = config.d_model
    w = np.random.default_rng(12345).normal(size=(d, d)) / np.sqrt(d)
    x = np.random.default_rng(seed).normal(size=(batch_size, d))
    return {"x": x.astype(np.float32), "y": np.tanh(x @ w).astype(np.float32)}


def loss_fn(model_def: ModelDef, params: dict, batch: dict) -> jax.Array:
    """Mean squared error of the MLP's prediction of ``batch['y']``.

    >>> loss_fn(model_def, params, make_batch(MLPConfig(), 4))   # doctest: +SKIP
    Array(1.3, dtype=float32)
    """
    model = merge_params(model_def, params)
    err = model(batch["x"]).astype(jnp.float32) - batch["y"]
    return jnp.mean(err * err)


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation):
    """Pure ``step(params, opt_state, batch) -> (loss, new_params, new_opt_state)``.

    >>> step = make_train_step(model_def, default_optimizer())    # doctest: +SKIP
    """
    return functional_train_step(loss_fn, model_def, optimizer)


def default_optimizer(lr: float = 0.1) -> optax.GradientTransformation:
    """``optax.sgd(lr)``: plain SGD keeps the MLP's optimizer state trivial."""
    return optax.sgd(lr)
