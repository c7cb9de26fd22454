"""A small ResNet-style image classifier in flax nnx, with the same pure API as GPT, and its
sharding presets.

The jaxpr exercises what a parallelizer must handle in a CNN: 3x3 convolutions (stride 1
and a strided downsample), a 1x1 strided projection on the skip path, group normalisation
(a reshape of the channels into groups, reductions over height, width and each group),
``relu``, global average pooling, a linear head and a one-hot cross-entropy; the gradient
adds the input-gradient (base-dilated) and weight-gradient convolutions.

Architecture (NHWC)::

    stem       3x3 conv -> group norm -> relu                          [B, H, W, C0]
    stage s    blocks; the first block of stage s > 0 has stride 2:
      block    h = relu(norm1(conv1(x)))        conv1: 3x3, stride
               h = norm2(conv2(h))              conv2: 3x3
               out = relu(h + proj(x))          proj: 1x1 conv with stride and a norm
                                                without bias (norm2's bias serves both)
                                                when the shape changes, else x
    head       mean over (H, W) -> linear                              [B, classes]

Convolutions have no bias (each is followed by a norm, whose bias plays that role). The
norm is ``nnx.GroupNorm``: stateless, so the pure API carries only ``nnx.Param`` (no batch
statistics).

Parameter paths (used by the presets below)::

    stem/conv/kernel                              [3, 3, C_in, C0]
    stem/norm/{scale,bias}                        [C0]
    stages/<s>/<b>/conv1/kernel                   [3, 3, C_prev, C_s]
    stages/<s>/<b>/norm1/{scale,bias}             [C_s]
    stages/<s>/<b>/conv2/kernel                   [3, 3, C_s, C_s]
    stages/<s>/<b>/norm2/{scale,bias}             [C_s]
    stages/<s>/<b>/proj/kernel                    [1, 1, C_prev, C_s]  (shape-changing blocks)
    stages/<s>/<b>/proj_norm/scale                [C_s]                (shape-changing blocks)
    head/{kernel [C_last, classes], bias [classes]}

Presets (mesh axes ``'data'`` and ``'model'``):

======== ================================================== ==========================
strategy params                                             batch (images, labels)
======== ================================================== ==========================
dp       all ``P()``                                        ``P('data', ...)``
fsdp     first dim divisible by ``|data|`` on ``'data'``    ``P('data', ...)``
tp       channel parallelism in Megatron pairs (below)      ``P()``
dp_tp    as tp                                              ``P('data', ...)``
sp       all ``P()`` (spatial parallelism)                  images ``P('data'?, 'model',
                                                            None, None)``, labels
                                                            ``P('data'?)``
======== ================================================== ==========================

tp: in every residual block ``conv1`` splits its output channels over ``'model'``
(``kernel P(None, None, None, 'model')``), and so do the per-channel ``norm1`` scale and bias
that act on them (as Megatron's column-parallel bias); ``conv2`` splits its input channels
(``P(None, None, 'model', None)``), leaving a partial sum that is reduced once per block
before ``norm2``. Group norm on the split channels needs no communication when the groups
split evenly (``norm_groups`` a multiple of ``|model|``). The stem, ``norm2``, the projection
and the head stay replicated.

sp: the image height is split over ``'model'`` (and the batch over ``'data'`` when the mesh
has it); convolutions exchange halo rows with their neighbours (collective-permutes), the
norms' statistics and the global pool are partial sums reduced over ``'model'``.

Example::

    >>> cfg = CNNConfig()
    >>> model_def, params = init(cfg, seed=0)
    >>> opt = default_optimizer()
    >>> step = jax.jit(make_train_step(model_def, opt))
    >>> loss, params, opt_state = step(params, opt.init(params), make_batch(cfg, 8))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from autoshard.models import (ModelDef, adamw, cross_entropy, functional_train_step, merge_params,
                              split_params)
from autoshard.models.presets import (DATA_AXIS, MODEL_AXIS, _axis_size, _check_axes,
                                      _check_strategy, _data_axis_if_present, _fsdp_spec,
                                      _map_with_path, _split_dim)

__all__ = ["CNNConfig", "Config", "CNN", "init", "make_batch", "loss_fn", "make_train_step",
           "default_optimizer", "STRATEGIES", "param_specs", "batch_specs"]


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Hyper-parameters of :class:`CNN`. ``widths[s]`` is the channel count of stage ``s``;
    every stage after the first starts with a stride-2 block.

    >>> CNNConfig().out_size
    8
    """
    image_size: int = 16
    in_channels: int = 3
    widths: tuple[int, ...] = (16, 32)
    blocks_per_stage: int = 1
    num_classes: int = 10
    norm_groups: int = 8
    dtype: Any = jnp.float32

    def __post_init__(self):
        for w in self.widths:
            if w % self.norm_groups:
                raise ValueError(f"width {w} is not divisible by norm_groups={self.norm_groups}")
        if self.image_size % (2 ** (len(self.widths) - 1)):
            raise ValueError(f"image_size={self.image_size} does not halve "
                             f"{len(self.widths) - 1} times")

    @property
    def out_size(self) -> int:
        """Height (and width) of the last stage's feature map."""
        return self.image_size // 2 ** (len(self.widths) - 1)


#: Uniform name used by :func:`autoshard.models.get_model`.
Config = CNNConfig


def _conv(cfg: CNNConfig, c_in: int, c_out: int, size: int, stride: int, rngs) -> nnx.Conv:
    return nnx.Conv(c_in, c_out, (size, size), strides=(stride, stride), padding="SAME",
                    use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


def _norm(cfg: CNNConfig, c: int, rngs, use_bias: bool = True) -> nnx.GroupNorm:
    return nnx.GroupNorm(c, num_groups=cfg.norm_groups, use_bias=use_bias, dtype=cfg.dtype,
                         param_dtype=cfg.dtype, rngs=rngs)


class Stem(nnx.Module):
    def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(cfg, cfg.in_channels, cfg.widths[0], 3, 1, rngs)
        self.norm = _norm(cfg, cfg.widths[0], rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class ResidualBlock(nnx.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + proj(x))``; ``proj`` is a strided 1x1
    conv and a norm when the block changes the shape, the identity otherwise."""

    def __init__(self, cfg: CNNConfig, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv(cfg, c_in, c_out, 3, stride, rngs)
        self.norm1 = _norm(cfg, c_out, rngs)
        self.conv2 = _conv(cfg, c_out, c_out, 3, 1, rngs)
        self.norm2 = _norm(cfg, c_out, rngs)
        if stride != 1 or c_in != c_out:
            self.proj = _conv(cfg, c_in, c_out, 1, stride, rngs)
            # No bias: it would add a per-channel constant to the same sum as norm2's bias
            # (a redundant parameter whose gradient is bit-identical to norm2's).
            self.proj_norm = _norm(cfg, c_out, rngs, use_bias=False)
        else:
            self.proj = self.proj_norm = None

    def __call__(self, x):
        h = nnx.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        skip = x if self.proj is None else self.proj_norm(self.proj(x))
        return nnx.relu(h + skip)


class CNN(nnx.Module):
    """Stem, stages of residual blocks, global average pool, linear head.

    >>> model = CNN(CNNConfig(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16, 16, 3))).shape
    (2, 10)
    """

    def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stem = Stem(cfg, rngs=rngs)
        stages, c_in = [], cfg.widths[0]
        for s, width in enumerate(cfg.widths):
            blocks = []
            for b in range(cfg.blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(ResidualBlock(cfg, c_in, width, stride, rngs=rngs))
                c_in = width
            stages.append(blocks)
        # Plain python lists, unrolled in the jaxpr (nnx.data: pytree data, as in gpt.py).
        self.stages = nnx.data(stages)
        self.head = nnx.Linear(c_in, cfg.num_classes, dtype=cfg.dtype,
                               param_dtype=cfg.dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.stem(images)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.head(x.mean(axis=(1, 2)))        # logits [B, classes]


# ----------------------------------------------------------------- pure API


def init(config: CNNConfig = CNNConfig(), seed: int = 0) -> tuple[ModelDef, dict]:
    """Initialise a CNN; returns ``(model_def, params)`` with pure-dict params.

    >>> model_def, params = init(CNNConfig(), seed=0)
    >>> params["stages"]["1"]["0"]["proj"]["kernel"].shape
    (1, 1, 16, 32)
    """
    return split_params("cnn", config, CNN(config, rngs=nnx.Rngs(seed)))


def make_batch(config: CNNConfig, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable synthetic batch: ``{'images': f32 [B, H, W, C], 'labels': int32 [B]}``.

    Each class has a fixed pattern (the same for every seed); an image is its class's
    pattern plus Gaussian noise, so the loss really goes down.

    >>> b = make_batch(CNNConfig(), 4)
    >>> b["images"].shape, b["labels"].shape
    ((4, 16, 16, 3), (4,))
    """
    h, c = config.image_size, config.in_channels
    patterns = np.random.default_rng(1234).normal(size=(config.num_classes, h, h, c))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, config.num_classes, size=(batch_size,)).astype(np.int32)
    images = patterns[labels] + 0.5 * rng.normal(size=(batch_size, h, h, c))
    return {"images": images.astype(np.float32), "labels": labels}


def loss_fn(model_def: ModelDef, params: dict, batch: dict) -> jax.Array:
    """Mean softmax cross-entropy, via one-hot labels (a dot, not a gather).

    >>> loss_fn(model_def, params, make_batch(CNNConfig(), 2))   # doctest: +SKIP
    Array(2.4, dtype=float32)
    """
    model = merge_params(model_def, params)
    logits = model(batch["images"])
    return cross_entropy(logits, batch["labels"], model_def.config.num_classes)


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation):
    """Pure ``step(params, opt_state, batch) -> (loss, new_params, new_opt_state)``.

    >>> step = make_train_step(model_def, default_optimizer())    # doctest: +SKIP
    """
    return functional_train_step(loss_fn, model_def, optimizer)


def default_optimizer(lr: float = 1e-3) -> optax.GradientTransformation:
    """``optax.adamw(lr, weight_decay=0.01)``."""
    return adamw(lr)


# ----------------------------------------------------------------- presets

#: The strategies of this model (``presets.strategies("cnn")``).
STRATEGIES = ("dp", "fsdp", "tp", "dp_tp", "sp")

# tp: (module, leaf) -> dim split over 'model', for the modules inside residual blocks.
_TP_RULES = {("conv1", "kernel"): 3, ("norm1", "scale"): 0, ("norm1", "bias"): 0,
             ("conv2", "kernel"): 2}


def _tp_spec(path: tuple[str, ...], shape: tuple[int, ...], n_model: int) -> P:
    dim = _TP_RULES.get(tuple(path[-2:])) if path[0] == "stages" else None
    if dim is None:
        return P()
    # conv1/conv2 come in pairs: replicating one half would change the layout, so raise.
    if shape[dim] % n_model:
        raise ValueError(
            f"tp cannot split param {'/'.join(path)} of shape {tuple(shape)} on dim {dim} "
            f"over mesh axis {MODEL_AXIS!r} of size {n_model} (not divisible); use a "
            f"'model' axis size that divides the stage widths")
    return _split_dim(len(shape), dim, MODEL_AXIS)


def param_specs(params: dict, strategy: str, mesh_axis_names: tuple[str, ...],
                mesh_shape: Mapping[str, int]) -> dict:
    """PartitionSpecs for ``params`` under ``strategy`` (see the module docstring).

    >>> _, params = init(CNNConfig())
    >>> param_specs(params, "tp", ("model",), {"model": 4})["stages"]["0"]["0"]["conv2"]
    {'kernel': P(None, None, 'model', None)}
    """
    _check_strategy(strategy, "cnn")
    _check_axes(strategy, mesh_axis_names)
    if strategy in ("dp", "sp"):
        return _map_with_path(lambda path, x: P(), params)
    if strategy == "fsdp":
        n_data = _axis_size(mesh_shape, DATA_AXIS)
        return _map_with_path(lambda path, x: _fsdp_spec(tuple(x.shape), n_data), params)
    n_model = _axis_size(mesh_shape, MODEL_AXIS)
    return _map_with_path(lambda path, x: _tp_spec(path, tuple(x.shape), n_model), params)


def batch_specs(batch: dict, strategy: str, mesh_axis_names: tuple[str, ...]) -> dict:
    """PartitionSpecs for a batch: the batch dim over ``'data'`` (none under tp); under sp
    the image height over ``'model'`` as well.

    >>> batch_specs(make_batch(CNNConfig(), 8), "sp", ("data", "model"))
    {'images': P('data', 'model', None, None), 'labels': P('data',)}
    """
    _check_strategy(strategy, "cnn")
    _check_axes(strategy, mesh_axis_names)
    if strategy == "tp":
        return _map_with_path(lambda path, x: P(), batch)
    data = DATA_AXIS if strategy != "sp" else _data_axis_if_present(mesh_axis_names)

    def spec(path, x):
        if strategy == "sp" and path[-1] == "images":
            return P(data, MODEL_AXIS, None, None)
        return _split_dim(np.ndim(x), 0, data) if data else P()
    return _map_with_path(spec, batch)
