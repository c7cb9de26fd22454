"""The zoo's model registry and its one check: a train step under autoshard equals one device.

Each library module (``zoo_<library>.py``) registers its models with :func:`register`. A model
is built lazily (tiny config, random init, no download) into :class:`Built`: parameters, a
batch, a scalar ``loss(params, batch)`` and the model's Megatron tp rules. The step checked is

    loss, grads = jax.value_and_grad(loss)(params, batch)
    params, opt_state = one optax.adamw step

under ``autoshard.parallelize`` with the strategy's specs on the parameters and the batch
(the optimizer state is left to propagation), against ``jax.jit`` of the same step on one
device.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
import pytest

import autoshard as ash
from partition_rules import STRATEGIES, Rule, batch_specs, specs_from_rules, strategy_rules

LR = 1e-3
LIBRARY_MODULES = ("zoo_transformers", "zoo_keras_hub", "zoo_haiku", "zoo_equinox", "zoo_penzai",
                   "zoo_flax", "zoo_recurrentgemma")
#: Meshes of 8 simulated CPU devices; tp splits the batch over ``data`` too.
MESHES = {"dp": {"data": 8}, "fsdp": {"data": 8}, "tp": {"data": 2, "model": 4}}


@dataclasses.dataclass
class Built:
    params: Any
    batch: Any
    loss: Callable[[Any, Any], jax.Array]


@dataclasses.dataclass
class ZooModel:
    name: str                   # "<library>/<model>"
    library: str
    config: str                 # the tiny config, in words
    build: Callable[[], Built]
    tp_rules: list[Rule]
    slow: bool = False


REGISTRY: dict[str, ZooModel] = {}


def register(name, library, config, tp_rules, slow=False):
    """Decorator for a build function ``() -> Built``."""
    def deco(build):
        REGISTRY[name] = ZooModel(name, library, config, functools.cache(build), list(tp_rules), slow)
        return build
    return deco


def load_all() -> dict[str, ZooModel]:
    """Import every library module (an ImportError is a failure, never a skip)."""
    for mod in LIBRARY_MODULES:
        importlib.import_module(mod)
    return REGISTRY


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- the step

def optimizer():
    return optax.adamw(LR)


def make_step(loss):
    """The checked step: ``(loss, grads, new params, new optimizer state)``."""
    opt = optimizer()

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return value, grads, optax.apply_updates(params, updates), opt_state
    return step


def make_train_step(loss):
    """The benchmarked train step: ``(loss, new params, new optimizer state)``."""
    step = make_step(loss)

    def train_step(params, opt_state, batch):
        value, _, params, opt_state = step(params, opt_state, batch)
        return value, params, opt_state
    return train_step


def setup(model: ZooModel, strategy: str):
    """``(mesh, step, args, in_specs)`` for one (model, strategy)."""
    built = model.build()
    shape = MESHES[strategy]
    mesh = ash.make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])
    pspecs = specs_from_rules(built.params, strategy_rules(strategy, model.tp_rules), shape)
    bspecs = batch_specs(built.batch, shape)
    args = (built.params, optimizer().init(built.params), built.batch)
    return mesh, make_step(built.loss), args, (pspecs, None, bspecs)


@functools.cache
def reference(name: str):
    """The step on one device (cached per model: every strategy compares with it). Compiled
    without LLVM's optimizations: ~40% less compile time on these tiny programs, the same
    IEEE float semantics (XLA CPU enables no fast-math either way)."""
    built = REGISTRY[name].build()
    args = (built.params, optimizer().init(built.params), built.batch)
    lowered = jax.jit(make_step(built.loss)).lower(*args)
    return jax.device_get(lowered.compile({"xla_backend_optimization_level": 0})(*args))


def assert_step_close(got, want, lr=LR):
    """Loss and gradients within rtol 1e-5 (atol 1e-6 of the largest gradient, for entries
    that cancel to ~0); updated parameters within 0.1 lr.

    Adam's first step moves a parameter by about lr*sign(g). Where the exact gradient is zero
    (an attention key bias: softmax is shift invariant) g is rounding noise whose sign is
    arbitrary, on one device as on eight; there (|g| <= 1e-6 of the largest gradient) the
    update may differ by up to 2 lr, and such entries must stay under 1% of all parameters.
    """
    loss, grads, params, _ = got
    ref_loss, ref_grads, ref_params, _ = want
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5, err_msg="loss")
    scale = max((float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)), default=0.0)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref_grads)[0]]
    assert len(jax.tree.leaves(grads)) == len(paths) == len(jax.tree.leaves(params))
    for path, g, w in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"grad {path}")
    exempt = 0
    for path, p, w, g in zip(paths, jax.tree.leaves(params), jax.tree.leaves(ref_params),
                             jax.tree.leaves(ref_grads)):
        p, noise = np.asarray(p), np.abs(g) <= 1e-6 * scale
        off = np.abs(p - w) > 0.1 * lr
        exempt += int(off.sum())
        np.testing.assert_allclose(np.where(noise, w, p), w, rtol=0, atol=0.1 * lr,
                                   err_msg=f"param {path}")
        assert np.all(np.abs(p - w)[noise] <= 2.05 * lr), f"param {path} (zero gradient)"
    assert exempt <= 0.01 * param_count(ref_params), "zero-gradient exemption must stay tiny"


def run_case(name: str, strategy: str):
    model = REGISTRY[name]
    mesh, step, args, in_specs = setup(model, strategy)
    pf = ash.parallelize(step, mesh=mesh, in_specs=in_specs)
    got = pf(*args)
    assert_step_close(got, reference(name))
    return pf, got


def cases():
    """``pytest.param(name, strategy)`` for every model x strategy, with its slow mark."""
    out = []
    for name, model in sorted(load_all().items()):
        for strategy in STRATEGIES:
            marks = [pytest.mark.slow] if model.slow else []
            out.append(pytest.param(name, strategy, marks=marks, id=f"{name}-{strategy}"))
    return out
