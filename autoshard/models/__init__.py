"""Reference models (a GPT-style decoder and a residual MLP) with a pure API.

The models are written with ``flax.nnx`` but exposed through a *pure* functional
interface so that the parallelization pass only ever sees plain pytrees:

* ``init(config, seed) -> (model_def, params)``: ``params`` is a nested dict of
  plain python dicts with string keys and ``jax.Array`` leaves;
* ``make_batch(config, batch_size, seed) -> dict`` of numpy arrays;
* ``loss_fn(model_def, params, batch) -> scalar``;
* ``make_train_step(model_def, optimizer) -> step`` with
  ``step(params, opt_state, batch) -> (loss, new_params, new_opt_state)``.

``step`` closes over nothing but static structure, so both ``jax.jit(step)`` and
``jax.make_jaxpr(step)`` work on it directly.

Example::

    >>> from autoshard.models import get_model
    >>> gpt = get_model("gpt")
    >>> model_def, params = gpt.init(gpt.Config(), seed=0)
    >>> opt = gpt.default_optimizer()
    >>> step = jax.jit(gpt.make_train_step(model_def, opt))       # doctest: +SKIP
    >>> loss, params, opt_state = step(params, opt.init(params),
    ...                                gpt.make_batch(gpt.Config(), 8))  # doctest: +SKIP

This module also holds the shared nnx <-> pure-dict plumbing used by ``gpt.py``
and ``mlp.py``. It deliberately does not import those submodules at import time
(``get_model`` imports lazily) so that they can import the helpers from here
without a circular import.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Callable

import jax
import optax
from flax import nnx

__all__ = ["MODEL_NAMES", "ModelDef", "get_model", "model_registry",
           "split_params", "merge_params", "functional_train_step", "cross_entropy", "adamw"]

#: Names accepted by :func:`get_model` and by the presets.
MODEL_NAMES = ("gpt", "mlp", "moe", "cnn")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """Everything needed to rebuild an nnx model from a pure param dict.

    ``graphdef`` is nnx's static description of the module graph and
    ``template`` is an abstract (``ShapeDtypeStruct``-leaved) ``nnx.State`` with
    the real key types (list indices are ints there, strings in ``params``).
    ``eq=False`` keeps identity hashing, so a ``ModelDef`` can be a static
    argument of ``jax.jit`` even though ``State`` itself is not hashable.
    """
    name: str
    config: Any
    graphdef: Any
    template: Any


def _str_keys(tree):
    """Recursively turn dict keys into strings (nnx uses ints for list items)."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def split_params(name: str, config: Any, module: nnx.Module) -> tuple[ModelDef, dict]:
    """Split a concrete nnx module into ``(ModelDef, pure param dict)``.

    Only ``nnx.Param`` variables are supported: the reference models have no
    batch statistics or RNG state, and a single filter makes ``nnx.split`` fail
    loudly if that ever changes.

    >>> model_def, params = split_params("mlp", cfg, MLP(cfg, rngs=nnx.Rngs(0)))  # doctest: +SKIP
    """
    graphdef, state = nnx.split(module, nnx.Param)
    # nnx.to_pure_dict is the non-deprecated spelling of State.to_pure_dict().
    params = _str_keys(nnx.to_pure_dict(state))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return ModelDef(name, config, graphdef, template), params


def merge_params(model_def: ModelDef, params: dict) -> nnx.Module:
    """Rebuild the nnx module from ``params``; safe to call inside a trace.

    The template is copied first because ``nnx.replace_by_pure_dict`` mutates
    the state in place, and the ``ModelDef`` is shared between traces.
    ``replace_by_pure_dict`` maps the string list indices back to ints.

    >>> module = merge_params(model_def, params)        # doctest: +SKIP
    """
    state = jax.tree.map(lambda x: x, model_def.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(model_def.graphdef, state)


def functional_train_step(loss_fn: Callable[[ModelDef, dict, dict], jax.Array],
                          model_def: ModelDef,
                          optimizer: optax.GradientTransformation):
    """Build a pure ``step(params, opt_state, batch) -> (loss, params, opt_state)``.

    Every input and output is a plain pytree, so the result can be handed to
    ``jax.jit``, ``jax.make_jaxpr`` or the autoshard pass unchanged.

    >>> step = functional_train_step(gpt.loss_fn, model_def, optax.sgd(0.1))  # doctest: +SKIP
    """

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(model_def, p, batch))(params)
        # Passing params lets decoupled-weight-decay optimizers (adamw) see them.
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return loss, new_params, new_opt_state

    return step


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Mean softmax cross-entropy in f32, via one-hot labels: a dot rather than a gather, which
    shards over the class (vocabulary) dim like any contraction."""
    import jax.numpy as jnp
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logp.dtype)
    return -jnp.mean(jnp.sum(onehot * logp, axis=-1))


def adamw(lr: float = 1e-3) -> optax.GradientTransformation:
    """The reference models' optimizer: ``optax.adamw(lr, weight_decay=0.01)``."""
    return optax.adamw(lr, weight_decay=0.01)


def get_model(name: str) -> types.SimpleNamespace:
    """Return the pure API of one reference model as a namespace.

    Fields: ``name``, ``Config``, ``init``, ``make_batch``, ``loss_fn``,
    ``make_train_step``, ``default_optimizer``.

    >>> m = get_model("mlp")
    >>> model_def, params = m.init(m.Config())
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    mod = importlib.import_module(f"{__name__}.{name}")
    return types.SimpleNamespace(
        name=name,
        Config=mod.Config,
        init=mod.init,
        make_batch=mod.make_batch,
        loss_fn=mod.loss_fn,
        make_train_step=mod.make_train_step,
        default_optimizer=mod.default_optimizer,
    )


def model_registry() -> dict[str, types.SimpleNamespace]:
    """All reference models by name: ``{"gpt": get_model("gpt"), ...}``."""
    return {name: get_model(name) for name in MODEL_NAMES}
