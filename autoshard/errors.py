"""Typed, actionable errors.

Every message names what the user wrote (argument path, shape, spec, mesh axes or
primitive and source line) and what to change. Internal invariants use plain
``AssertionError``; anything a user can cause raises one of these.

>>> raise SpecError("unknown mesh axis 'dta'", path="args[0]", shape=(8, 4),
...                 spec="P('dta', None)", mesh_axes=("data", "model"),
...                 fix="use one of the mesh axes")     # doctest: +SKIP
"""
from __future__ import annotations


class ShardingError(ValueError):
    """Base class of autoshard's user-facing errors (a ``ValueError``)."""


class MeshError(ShardingError):
    """The requested mesh does not fit the devices."""


class SpecError(ShardingError):
    """A sharding annotation does not fit its argument or the mesh."""

    def __init__(self, problem: str, *, path: str, shape=None, spec=None,
                 mesh_axes=None, fix: str = ""):
        self.path, self.shape, self.spec, self.mesh_axes = path, shape, spec, mesh_axes
        parts = [f"{problem}", f"  argument: {path}"]
        if shape is not None:
            parts.append(f"  shape:    {tuple(shape)}")
        if spec is not None:
            parts.append(f"  spec:     {spec}")
        if mesh_axes is not None:
            parts.append(f"  mesh axes: {tuple(mesh_axes)}")
        if fix:
            parts.append(f"  fix:      {fix}")
        super().__init__("\n".join(parts))


class ShardingRuleError(ShardingError):
    """A rule given to ``register_rule`` / ``with_rule`` (or a ``custom_partitioning``
    ``sharding_rule``) is malformed or does not fit the op it is applied to."""

    def __init__(self, problem: str, *, rule, where: str = "", fix: str = ""):
        self.rule, self.problem, self.where = rule, problem, where
        parts = [problem, f"  rule:     {rule!r}"]
        if where:
            parts.append(f"  op:       {where}")
        if fix:
            parts.append(f"  fix:      {fix}")
        super().__init__("\n".join(parts))


class NoFeasiblePlanError(ShardingError):
    """The layout search (``auto=True``) found no plan within the constraints given."""

    def __init__(self, problem: str, *, fix: str = ""):
        super().__init__(problem + (f"\n  fix:      {fix}" if fix else ""))


class UnsupportedPrimitiveError(NotImplementedError):
    """An operation has no sharding rule (a ``NotImplementedError``)."""

    def __init__(self, primitive: str, source: str, detail: str = "", workaround: str = ""):
        self.primitive, self.source = primitive, source
        workaround = workaround or (
            "compute this value outside the parallelized function, replace the op with "
            "supported ones, or file an issue asking for a rule for this primitive")
        msg = f"autoshard has no sharding rule for primitive '{primitive}' used at {source}"
        if detail:
            msg += f": {detail}"
        super().__init__(f"{msg}\n  workaround: {workaround}")


class UnsupportedPrimitiveWarning(UserWarning):
    """An operation has no sharding rule and was computed on replicated operands: the result
    is correct, the gathers of its operands cost wire bytes (see the report); teach autoshard
    the primitive with ``ash.register_rule``, or pass ``strict=True`` to make this an error."""


class PlanningOnlyError(ShardingError):
    """A function built on an abstract mesh was called with data."""


class ReshardWarning(UserWarning):
    """An input arrived on another mesh (or other devices) and was copied onto the function's
    mesh: correct, but a transfer on every call; place it with ``pf.input_shardings(...)``."""


class RetraceWarning(UserWarning):
    """A ``ParallelFunction`` was traced again for new input shapes/dtypes more often than expected."""
