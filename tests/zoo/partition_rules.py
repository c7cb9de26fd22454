"""Path-pattern partitioning rules, as users write them for third-party models.

A rule is ``(regex, PartitionSpec)``. A parameter's path is its pytree key path written with
``/`` between keys (``transformer/h/0/attn/c_attn/kernel``, ``layers/0/mlp/up/weight``); the
first rule whose regex matches the whole path (``re.fullmatch``) and whose spec fits the leaf
gives its spec. A spec fits when it is no longer than the leaf's rank and every dimension it
splits divides by the size of its mesh axes (so that ``jax.jit`` takes the same specs as
``NamedSharding``s); a rule that does not fit is passed over, as in MaxText-style rule lists.
Leaves that no rule gives a spec are replicated (``P()``).

The three strategies of the zoo:

* ``dp``: parameters replicated, the batch split over ``data``;
* ``fsdp``: the batch and every parameter split over ``data`` (dim 0, else dim 1, else whole);
* ``tp``: Megatron-style tensor parallelism over ``model`` from each model's own rules
  (column-parallel in-projections, row-parallel out-projections), the batch over ``data``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import jax
from jax.sharding import PartitionSpec as P

Rule = tuple[str, P]

DP_RULES: list[Rule] = [(r".*", P())]
FSDP_RULES: list[Rule] = [(r".*", P("data")), (r".*", P(None, "data"))]
STRATEGIES = ("dp", "fsdp", "tp")


def _key_text(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k).strip(".[]'\"")


def path_text(path) -> str:
    """``jax.tree_util`` key path -> ``a/b/0/c``."""
    return "/".join(_key_text(k) for k in path)


def _fits(spec: P, shape: Sequence[int], mesh_shape: dict) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        if any(a not in mesh_shape for a in axes):
            return False
        if dim % math.prod(mesh_shape[a] for a in axes):
            return False
    return True


def spec_for(path: str, shape: Sequence[int], rules: Iterable[Rule], mesh_shape: dict) -> P:
    for pattern, spec in rules:
        if re.fullmatch(pattern, path) and _fits(spec, shape, mesh_shape):
            return spec
    return P()


def specs_from_rules(tree, rules: Iterable[Rule], mesh_shape: dict):
    """A pytree of ``PartitionSpec``s with the structure of ``tree``."""
    rules = list(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_text(path), x.shape, rules, mesh_shape), tree)


def batch_specs(batch, mesh_shape: dict):
    """Leading (batch) dim over ``data`` where the mesh has it, else replicated."""
    spec = P("data") if "data" in mesh_shape else P()
    return jax.tree.map(lambda x: spec if x.ndim and _fits(spec, x.shape, mesh_shape) else P(), batch)


def strategy_rules(strategy: str, tp_rules: Sequence[Rule]) -> list[Rule]:
    if strategy == "dp":
        return DP_RULES
    if strategy == "fsdp":
        return FSDP_RULES
    if strategy == "tp":
        return list(tp_rules)
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")
