"""Hand-written sharding strategies for the reference models.

These presets are the *baselines* the automatic pass is compared with, and a
convenient source of input annotations in tests. They are allowed to know the
models' parameter paths (see the module docstrings of ``gpt.py``/``mlp.py``).

Mesh axis conventions: the data-parallel axis is ``'data'`` and the
tensor-parallel axis is ``'model'``.

======== ============================================== ======================
strategy params                                          batch
======== ============================================== ======================
dp       all ``P()``                                    ``P('data', None..)``
fsdp     first dim divisible by ``|data|`` on ``'data'`` ``P('data', None..)``
tp       Megatron column/row split on ``'model'``       ``P()``
dp_tp    as tp                                          ``P('data', None..)``
sp       as tp; GPT's residual stream split on sequence ``P('data'?, 'model')``
fsdp_tp  as tp, plus one other dim over ``'fsdp'``       ``P(('data', 'fsdp'), ..)``
         (``'data'`` when the mesh has no ``'fsdp'``)
pp       scanned GPT: stacked layer dim on ``'stage'``;   ``P(('data', 'fsdp')?, ..)``
         tp on ``'model'`` and one dim on ``'fsdp'`` when
         the mesh has them
======== ============================================== ======================

``pp`` is pipeline parallelism (GPipe): the layer loop of the scanned GPT
(``GPTConfig(scan_layers=True)``, set by :func:`configure`) runs as a pipeline over
``'stage'``; the mesh's ``'data'``, ``'fsdp'`` and ``'model'`` axes, when present, work as in
dp, fsdp_tp and tp. It needs the ``'stage'`` axis, so it is not among the strategies the
validation loops enumerate (:data:`PIPELINE_STRATEGIES`).

``fsdp_tp`` (ZeRO-3 with Megatron) fits 3-axis meshes such as ``data=16,fsdp=16,model=8``:
``'data'`` replicates parameters (pure data parallelism), ``'fsdp'`` shards them and the
batch, ``'model'`` splits the layers as tp. On a ``data x model`` mesh it shards parameters
over ``'data'``.

``sp`` is Megatron sequence parallelism: outside attention and the MLP (layernorms,
residual adds) activations are split along the sequence over ``'model'``; the model pins
its residual stream there (``GPTConfig.residual_spec``, set by :func:`configure`). The
``moe`` and ``cnn`` models define their own presets (``ep``: experts over ``'expert'``).

Megatron (tp): q/k/v and ``up`` kernels are column-parallel
(``P(None, 'model')``, bias ``P('model')``); attention ``out`` and ``down``
kernels are row-parallel (``P('model', None)``, bias ``P()``); embeddings,
layernorms and the lm head stay replicated.

Example::

    >>> from autoshard.models import get_model
    >>> m = get_model("gpt")
    >>> _, params = m.init(m.Config())
    >>> specs = param_specs("gpt", params, "dp_tp", ("data", "model"),
    ...                     {"data": 2, "model": 4})
    >>> specs["blocks"]["0"]["attn"]["q"]["kernel"]
    P(None, 'model')
"""
from __future__ import annotations

from typing import Any, Mapping

from jax.sharding import PartitionSpec as P

from autoshard.models import MODEL_NAMES

__all__ = ["STRATEGIES", "DATA_AXIS", "MODEL_AXIS", "EXPERT_AXIS", "required_axes",
           "FSDP_AXIS", "strategies", "param_specs", "batch_specs", "configure", "describe"]

#: Every strategy name some reference model accepts; :func:`strategies` says which a model has.
STRATEGIES = ("dp", "fsdp", "tp", "dp_tp", "sp", "ep", "fsdp_tp")
#: Pipeline strategies (a 'stage' mesh axis and scanned layers); not in ``strategies(model)``.
PIPELINE_STRATEGIES = {"gpt": ("pp",)}
STAGE_AXIS = "stage"
DATA_AXIS = "data"
MODEL_AXIS = "model"
EXPERT_AXIS = "expert"
FSDP_AXIS = "fsdp"           # optional axis of fsdp_tp (parameters and batch split over it)

# Strategies of the models whose specs are computed here. Other models (moe, cnn) own their
# presets: their module defines STRATEGIES, param_specs, batch_specs (same signatures as the
# functions below, without the model name) and optionally configure.
_OWN_STRATEGIES = {"gpt": ("dp", "fsdp", "tp", "dp_tp", "sp", "fsdp_tp"),
                   "mlp": ("dp", "fsdp", "tp", "dp_tp")}

# Mesh axes each strategy shards over.
_REQUIRED_AXES = {
    "dp": (DATA_AXIS,),
    "fsdp": (DATA_AXIS,),
    "tp": (MODEL_AXIS,),
    "dp_tp": (DATA_AXIS, MODEL_AXIS),
    "sp": (MODEL_AXIS,),          # 'data', when the mesh has it, carries the batch
    "ep": (EXPERT_AXIS,),
    "fsdp_tp": (DATA_AXIS, MODEL_AXIS),   # and FSDP_AXIS when the mesh has it
    "pp": ("stage",),                     # and 'data', 'fsdp', 'model' when the mesh has them
}

# Megatron rules keyed by (module name, leaf name), i.e. the last two keys of a
# param path. The value is the index of the dim split over 'model' (None for
# replicated). Column-parallel layers split their output features (kernel dim
# 1, bias dim 0) so no communication is needed until the row-parallel layer,
# which splits its input features (kernel dim 0) and keeps its bias whole
# because the bias is added after the partial-sum reduction.
_COLUMN = {"kernel": 1, "bias": 0}
_ROW = {"kernel": 0, "bias": None}
_TP_RULES = {
    "gpt": {"q": _COLUMN, "k": _COLUMN, "v": _COLUMN, "out": _ROW,
            "up": _COLUMN, "down": _ROW},
    "mlp": {"up": _COLUMN, "down": _ROW},
}


def required_axes(strategy: str) -> tuple[str, ...]:
    """Mesh axes a strategy needs, e.g. ``required_axes("dp_tp") == ('data', 'model')``."""
    _check_strategy(strategy)
    return _REQUIRED_AXES[strategy]


def _check_strategy(strategy: str, model_name: str | None = None) -> None:
    pipelines = {s for names in PIPELINE_STRATEGIES.values() for s in names}
    if strategy not in STRATEGIES and strategy not in pipelines:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES + tuple(sorted(pipelines))}")
    if strategy in pipelines:
        if model_name is not None and strategy not in PIPELINE_STRATEGIES.get(model_name, ()):
            raise ValueError(f"model {model_name!r} has no strategy {strategy!r}; pipelines are "
                             f"available for {sorted(PIPELINE_STRATEGIES)}")
        return
    if model_name is not None and strategy not in strategies(model_name):
        raise ValueError(f"model {model_name!r} has no strategy {strategy!r}; its strategies "
                         f"are {strategies(model_name)}")


def _check_model(model_name: str) -> None:
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")


def _module(model_name: str):
    """The model's module when it owns its presets (see ``_OWN_STRATEGIES``), else None."""
    if model_name in _OWN_STRATEGIES:
        return None
    import importlib
    return importlib.import_module(f"autoshard.models.{model_name}")


def strategies(model_name: str) -> tuple[str, ...]:
    """The strategy names ``model_name`` supports, e.g. ``strategies("mlp")``."""
    _check_model(model_name)
    module = _module(model_name)
    return tuple(module.STRATEGIES) if module is not None else _OWN_STRATEGIES[model_name]


def _data_axis_if_present(mesh_axis_names) -> str | None:
    return DATA_AXIS if DATA_AXIS in tuple(mesh_axis_names) else None


def configure(model_name: str, config: Any, strategy: str, mesh_axis_names) -> Any:
    """The model config to trace under ``strategy``: the same config, except where a strategy
    annotates activations as well (``sp`` pins GPT's residual stream to the sequence split)."""
    _check_model(model_name)
    _check_strategy(strategy, model_name)
    _check_axes(strategy, mesh_axis_names)
    module = _module(model_name)
    if module is not None:
        return module.configure(config, strategy, mesh_axis_names) \
            if hasattr(module, "configure") else config
    if strategy == "pp":
        import dataclasses
        return dataclasses.replace(config, scan_layers=True)
    if strategy == "sp":
        import dataclasses
        return dataclasses.replace(
            config, residual_spec=(_data_axis_if_present(mesh_axis_names), MODEL_AXIS, None))
    return config


def _check_axes(strategy: str, mesh_axis_names) -> None:
    """Raise a ValueError naming the strategy and its axes if any is missing."""
    need = _REQUIRED_AXES[strategy]
    missing = [a for a in need if a not in tuple(mesh_axis_names)]
    if missing:
        raise ValueError(
            f"strategy {strategy!r} needs mesh axes {need}, but the mesh has axes "
            f"{tuple(mesh_axis_names)} (missing {tuple(missing)}); rename or add "
            f"the mesh axes, or pick another strategy from {STRATEGIES}")


def _axis_size(mesh_shape: Mapping[str, int], axis: str) -> int:
    if axis not in mesh_shape:
        raise ValueError(f"mesh_shape {dict(mesh_shape)} has no size for axis {axis!r}")
    return int(mesh_shape[axis])


def _split_dim(rank: int, dim: int | None, axis: str) -> P:
    """``P`` of length ``rank`` with ``axis`` at ``dim`` (``P()`` if dim is None)."""
    if dim is None or rank == 0:
        return P()
    return P(*(axis if i == dim else None for i in range(rank)))


def _map_with_path(fn, tree, path=()):
    """Map ``fn(path, leaf)`` over a nested dict, returning a dict of the same shape.

    Hand-rolled instead of ``jax.tree.map_with_path`` so the result is built
    from the dict structure itself, never by flattening ``P`` leaves.
    """
    if isinstance(tree, Mapping):
        return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


def _stacked(path: tuple[str, ...]) -> bool:
    """Params of scanned layers (``GPTConfig(scan_layers=True)``) carry a leading layer dim:
    ``blocks/attn/q/kernel`` instead of ``blocks/<i>/attn/q/kernel``."""
    return len(path) > 1 and path[0] == "blocks" and not path[1].isdigit()


def _fsdp_spec(shape: tuple[int, ...], n_data: int, skip_first: bool = False) -> P:
    # First dim that divides evenly; uneven shards would need padding. The layer dim of
    # stacked params is skipped: the scan reads one layer per step.
    for i, size in enumerate(shape):
        if skip_first and i == 0:
            continue
        if size > 0 and size % n_data == 0:
            return _split_dim(len(shape), i, DATA_AXIS)
    return P()


def _tp_spec(model_name: str, path: tuple[str, ...], shape: tuple[int, ...],
             n_model: int) -> P:
    rule = _TP_RULES[model_name].get(path[-2]) if len(path) >= 2 else None
    dim = rule.get(path[-1]) if rule is not None else None
    if dim is None:
        return P()
    if _stacked(path):
        dim += 1
    # Raise rather than silently replicate: Megatron layers come in
    # column/row pairs, and replicating one half would change the layout.
    if dim >= len(shape) or shape[dim] % n_model:
        raise ValueError(
            f"tp cannot split param {'/'.join(path)} of shape {tuple(shape)} on dim "
            f"{dim} over mesh axis {MODEL_AXIS!r} of size {n_model} (not divisible); "
            f"use a 'model' axis size that divides the layer width")
    return _split_dim(len(shape), dim, MODEL_AXIS)


def param_specs(model_name: str, params: dict, strategy: str,
                mesh_axis_names: tuple[str, ...],
                mesh_shape: Mapping[str, int]) -> dict:
    """PartitionSpecs for ``params`` (same nested-dict structure) under ``strategy``.

    ``mesh_shape`` maps axis name to size; fsdp uses it to pick a divisible dim
    and tp to check divisibility. Raises ``ValueError`` if the mesh lacks an
    axis the strategy needs.

    >>> param_specs("mlp", {"blocks": {"0": {"up": {"kernel": np.zeros((16, 64))}}}},
    ...             "tp", ("model",), {"model": 4})          # doctest: +SKIP
    {'blocks': {'0': {'up': {'kernel': P(None, 'model')}}}}
    """
    _check_model(model_name)
    _check_strategy(strategy, model_name)
    _check_axes(strategy, mesh_axis_names)
    module = _module(model_name)
    if module is not None:
        return module.param_specs(params, strategy, tuple(mesh_axis_names), dict(mesh_shape))

    if strategy == "dp":
        return _map_with_path(lambda path, x: P(), params)
    if strategy == "fsdp":
        n_data = _axis_size(mesh_shape, DATA_AXIS)
        return _map_with_path(lambda path, x: _fsdp_spec(tuple(x.shape), n_data, _stacked(path)), params)
    if strategy == "fsdp_tp":
        return _fsdp_tp_specs(model_name, params, tuple(mesh_axis_names), mesh_shape)
    if strategy == "pp":
        return _pp_specs(model_name, params, tuple(mesh_axis_names), mesh_shape)
    # tp, dp_tp and sp share the Megatron parameter layout.
    n_model = _axis_size(mesh_shape, MODEL_AXIS)
    return _map_with_path(
        lambda path, x: _tp_spec(model_name, path, tuple(x.shape), n_model), params)


def batch_specs(model_name: str, batch: dict, strategy: str,
                mesh_axis_names: tuple[str, ...]) -> dict:
    """PartitionSpecs for a batch dict: leading (batch) dim on ``'data'``, or ``P()`` under tp.

    >>> batch_specs("gpt", {"tokens": np.zeros((8, 16))}, "dp", ("data",))   # doctest: +SKIP
    {'tokens': P('data', None)}
    """
    _check_model(model_name)
    _check_strategy(strategy, model_name)
    _check_axes(strategy, mesh_axis_names)
    module = _module(model_name)
    if module is not None:
        return module.batch_specs(batch, strategy, tuple(mesh_axis_names))
    if strategy == "tp":
        return _map_with_path(lambda path, x: P(), batch)
    if strategy == "fsdp_tp":
        axes = _fsdp_tp_batch_axes(tuple(mesh_axis_names))
        return _map_with_path(lambda path, x: _split_dim(len(x.shape), 0, axes), batch)
    if strategy == "pp":
        axes = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in tuple(mesh_axis_names))
        if not axes:
            return _map_with_path(lambda path, x: P(), batch)
        return _map_with_path(lambda path, x: _split_dim(len(x.shape), 0, axes if len(axes) > 1 else axes[0]),
                              batch)
    if strategy == "sp":   # [B, T] tokens: batch over 'data' (if any), sequence over 'model'
        data = _data_axis_if_present(mesh_axis_names)
        return _map_with_path(lambda path, x: P(data, MODEL_AXIS), batch)
    return _map_with_path(lambda path, x: _split_dim(len(x.shape), 0, DATA_AXIS), batch)


def describe(specs: Any) -> str:
    """One ``path: spec`` line per leaf, for logs and error messages."""
    lines = []
    _map_with_path(lambda path, s: lines.append(f"{'/'.join(path)}: {s}"), specs)
    return "\n".join(lines)


def _fsdp_tp_batch_axes(mesh_axis_names: tuple[str, ...]):
    """``('data', 'fsdp')`` on a mesh with both, else ``'data'``."""
    return (DATA_AXIS, FSDP_AXIS) if FSDP_AXIS in mesh_axis_names else DATA_AXIS


def _fsdp_tp_specs(model_name: str, params: dict, mesh_axis_names: tuple[str, ...],
                   mesh_shape: Mapping[str, int]) -> dict:
    """Megatron over ``'model'`` plus, on the first other dim that divides (the layer dim of
    stacked params skipped), a split over ``'fsdp'`` (``'data'`` on a mesh without it).

    >>> _fsdp_tp_specs("gpt", {"blocks": {"0": {"attn": {"q": {"kernel": np.zeros((32, 32))}}}}},
    ...                ("data", "fsdp", "model"), {"data": 2, "fsdp": 2, "model": 2})  # doctest: +SKIP
    {'blocks': {'0': {'attn': {'q': {'kernel': P('fsdp', 'model')}}}}}
    """
    n_model = _axis_size(mesh_shape, MODEL_AXIS)
    shard = FSDP_AXIS if FSDP_AXIS in mesh_axis_names else DATA_AXIS
    n_shard = _axis_size(mesh_shape, shard)

    def spec(path, x):
        shape = tuple(x.shape)
        tp = tuple(_tp_spec(model_name, path, shape, n_model))
        entries = list(tp) + [None] * (len(shape) - len(tp))
        for i, size in enumerate(shape):
            if (i == 0 and _stacked(path)) or entries[i] is not None:
                continue
            if size > 0 and size % n_shard == 0:
                entries[i] = shard
                break
        return P(*entries) if any(e is not None for e in entries) else P()

    return _map_with_path(spec, params)


def _pp_specs(model_name: str, params: dict, mesh_axis_names: tuple[str, ...],
              mesh_shape: Mapping[str, int]) -> dict:
    """Pipeline: the stacked layer dim over ``'stage'``; Megatron over ``'model'`` and one other
    divisible dim over ``'fsdp'`` when the mesh has those axes.

    >>> _pp_specs("gpt", {"blocks": {"mlp": {"up": {"kernel": np.zeros((8, 32, 128))}}}},
    ...           ("stage", "model"), {"stage": 4, "model": 2})           # doctest: +SKIP
    {'blocks': {'mlp': {'up': {'kernel': P('stage', None, 'model')}}}}
    """
    has_model, has_fsdp = MODEL_AXIS in mesh_axis_names, FSDP_AXIS in mesh_axis_names
    n_stage = _axis_size(mesh_shape, STAGE_AXIS)

    def spec(path, x):
        shape = tuple(x.shape)
        tp = tuple(_tp_spec(model_name, path, shape, _axis_size(mesh_shape, MODEL_AXIS))) if has_model else ()
        entries = list(tp) + [None] * (len(shape) - len(tp))
        if _stacked(path):
            if shape[0] % n_stage:
                raise ValueError(f"pp cannot cut the {shape[0]} stacked layers of {'/'.join(path)} into "
                                 f"{n_stage} stages; use a 'stage' axis size that divides the layer count")
            entries[0] = STAGE_AXIS
        if has_fsdp:
            n_fsdp = _axis_size(mesh_shape, FSDP_AXIS)
            for i, size in enumerate(shape):
                if entries[i] is None and size > 0 and size % n_fsdp == 0:
                    entries[i] = FSDP_AXIS
                    break
        return P(*entries) if any(e is not None for e in entries) else P()

    return _map_with_path(spec, params)
