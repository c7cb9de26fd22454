"""Sharded checkpoints that restore onto another mesh or strategy (orbax-checkpoint).

Each process writes only its own shards (orbax, OCDBT/zarr via tensorstore); the layouts the
values had when saved (spec, SBP string, mesh axes and sizes, per leaf) are stored next to
them as JSON metadata. Restoring reads each value straight into the layout asked for — a
different mesh, another strategy, or one device — with the values unchanged bit for bit.

Saving is atomic: orbax writes a step into a temporary directory and renames it into place
only once every shard and the metadata are written, so a save killed midway leaves the
previous step as the latest restorable one (the leftover temporary directory is ignored and
removed when the next ``Checkpointer`` opens the directory).

>>> from autoshard.runtime import checkpoint
>>> ckpt = checkpoint.Checkpointer("/tmp/run1")                                 # doctest: +SKIP
>>> ckpt.save(100, {"params": params, "opt_state": opt_state})                # doctest: +SKIP
>>> ckpt.layouts()["leaves"]["['params']['lm_head']['kernel']"]["sbp"]         # doctest: +SKIP
'[B, B]'

Restore under another strategy: ask the new ``ParallelFunction`` where its inputs go.

>>> abstract = {"params": params_abs, "opt_state": jax.eval_shape(opt.init, params_abs)}  # doctest: +SKIP
>>> sh = fsdp_step.input_shardings(abstract["params"], abstract["opt_state"], batch_abs)  # doctest: +SKIP
>>> state = ckpt.restore(target=abstract, shardings={"params": sh[0], "opt_state": sh[1]})  # doctest: +SKIP
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

FORMAT = "autoshard-checkpoint/1"
_STATE, _LAYOUTS = "state", "layouts"


def _ocp():
    import orbax.checkpoint as ocp      # imported lazily: orbax is heavy and only needed here
    return ocp


# ------------------------------------------------------------------------ layout metadata

def _spec_to_json(spec: PartitionSpec) -> list:
    return [e if e is None or isinstance(e, str) else list(e) for e in spec]


def _spec_from_json(entries) -> PartitionSpec:
    return PartitionSpec(*(e if e is None or isinstance(e, str) else tuple(e) for e in entries))


def _sbp(spec: PartitionSpec, rank: int, axis_names) -> str:
    from ..compiler.layout import Layout
    return Layout.from_spec(spec, rank).to_str(tuple(axis_names))


def layout_metadata(state) -> dict:
    """JSON-safe description of where every leaf of ``state`` lives.

    ``{"format", "process_count", "mesh": {"axis_names", "shape"} | None, "leaves": {path:
    {"shape", "dtype", "spec", "sbp", "mesh"}}}``; ``spec`` is a list (``None``, an axis name,
    or a list of axis names per dim) and ``mesh`` a ``{axis: size}`` dict, or both ``None`` for
    leaves not on a named mesh (host values, single-device arrays).
    """
    leaves = {}
    first_mesh = None
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        shape = tuple(np.shape(x))
        dtype = str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
        entry = {"shape": list(shape), "dtype": dtype, "spec": None, "sbp": None, "mesh": None}
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
            entry.update(spec=_spec_to_json(sharding.spec), sbp=_sbp(sharding.spec, len(shape), mesh.axis_names),
                         mesh={str(a): int(s) for a, s in mesh.shape.items()})
            if first_mesh is None:
                first_mesh = {"axis_names": [str(a) for a in mesh.axis_names],
                              "shape": [int(s) for s in mesh.devices.shape]}
        leaves[jax.tree_util.keystr(path)] = entry
    return {"format": FORMAT, "process_count": jax.process_count(), "mesh": first_mesh, "leaves": leaves}


def abstract_state(tree, shardings=None):
    """``jax.ShapeDtypeStruct`` leaves (with ``sharding``) for ``tree``'s leaves: the target
    of :meth:`Checkpointer.restore`. ``shardings`` is a pytree of ``Sharding`` with the same
    structure (or a prefix of it, or one sharding for all); without it each leaf keeps its own
    ``.sharding`` when it has one."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=getattr(x, "sharding", None)), tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                                    sub),
                        shardings, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


# ------------------------------------------------------------------------ checkpointer

class Checkpointer:
    """Numbered, sharded, atomic checkpoints in ``directory`` (an orbax ``CheckpointManager``).

    ``max_to_keep`` keeps only the newest steps; ``async_save=True`` returns from
    :meth:`save` once the device data is copied to host memory and writes in the background
    (call :meth:`wait` before relying on it). Every process of a multi-process run must call
    :meth:`save` and :meth:`restore` with the same arguments.
    """

    def __init__(self, directory, *, max_to_keep: int | None = None, async_save: bool = False):
        ocp = _ocp()
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _LAYOUTS))
        # orbax removes an interrupted save's temporary directory in the background; finish that
        # now so the directory holds committed steps only once this returns.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.async_save = async_save

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state, *, metadata: dict | None = None) -> str:
        """Save ``state`` (a pytree of arrays: parameters, optimizer state, ...) as ``step``;
        returns the step's directory. ``metadata`` (JSON-safe) is stored with the layouts."""
        ocp = _ocp()
        meta = layout_metadata(state)
        if metadata:
            meta["user"] = metadata
        self._manager.save(int(step), args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _LAYOUTS: ocp.args.JsonSave(meta)}), force=True)
        if not self.async_save:
            self._manager.wait_until_finished()
        return os.path.join(self.directory, str(int(step)))

    def wait(self) -> None:
        """Block until a background save has been committed."""
        self._manager.wait_until_finished()

    # -- reading --------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (an interrupted save is not among them)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; "
                                    f"committed steps: {self.all_steps()}")
        return int(step)

    def layouts(self, step: int | None = None) -> dict:
        """The layout metadata saved with ``step`` (default: the latest); see :func:`layout_metadata`."""
        ocp = _ocp()
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{_LAYOUTS: ocp.args.JsonRestore()}))[_LAYOUTS]

    def restore(self, step: int | None = None, *, target=None, shardings=None, mesh=None):
        """Read ``step`` (default: the latest) into the layouts asked for.

        - ``target``: a pytree like the saved one (arrays or ``jax.ShapeDtypeStruct``,
          e.g. ``jax.eval_shape(opt.init, params)``) giving the structure (optax's named
          tuples come back as such) and, through each leaf's ``.sharding``, where it goes;
        - ``shardings``: a pytree of ``Sharding`` (a prefix of ``target`` works, e.g.
          ``{"params": sh[0], "opt_state": sh[1]}`` from ``pf.input_shardings``) overriding them;
        - ``mesh`` without shardings: the saved specs on this mesh (same axis names needed);
        - none of these: every value whole on this process's first device.

        The values are the saved ones, bit for bit, whatever the layout.
        """
        ocp = _ocp()
        step = self._step(step)
        if target is None:
            target = self._saved_tree(step)
        if shardings is not None:
            abstract = abstract_state(target, shardings)
        elif mesh is not None:
            abstract = self._on_mesh(step, target, mesh)
        else:
            local = SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) or local),
                target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}))
        return restored[_STATE]

    def _saved_tree(self, step):
        """Abstract leaves (shape, dtype) in the saved structure."""
        meta = self._manager.item_metadata(step)[_STATE]
        tree = getattr(meta, "tree", meta)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

    def _on_mesh(self, step, target, mesh):
        leaves = self.layouts(step)["leaves"]
        out = []
        for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
            key = jax.tree_util.keystr(path)
            saved = leaves.get(key)
            spec = _spec_from_json(saved["spec"]) if saved and saved["spec"] is not None else PartitionSpec()
            missing = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)} \
                - set(mesh.axis_names)
            if missing:
                raise ValueError(f"checkpoint leaf {key} was saved with spec {spec}, which names mesh axes "
                                 f"{sorted(missing)} that the mesh {dict(mesh.shape)} lacks; pass shardings= "
                                 f"(e.g. from pf.input_shardings(...)) to restore it in another layout")
            out.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, spec)))
        return jax.tree.unflatten(jax.tree.structure(target), out)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save(directory, step: int, state, **kwargs) -> str:
    """One-shot :meth:`Checkpointer.save` (waits until the step is committed)."""
    with Checkpointer(directory) as ckpt:
        return ckpt.save(step, state, **kwargs)


def restore(directory, step: int | None = None, **kwargs):
    """One-shot :meth:`Checkpointer.restore`."""
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(step, **kwargs)


def layouts(directory, step: int | None = None) -> dict:
    """The layout metadata of ``step`` (default: the latest) in ``directory``."""
    with Checkpointer(directory) as ckpt:
        return ckpt.layouts(step)


def latest_step(directory) -> int | None:
    with Checkpointer(directory) as ckpt:
        return ckpt.latest_step()
