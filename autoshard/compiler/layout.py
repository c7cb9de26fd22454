"""Layouts: how one tensor is placed on a mesh, in split / broadcast / partial (SBP) terms.

A ``Layout`` stores, per tensor dim, the mesh axes that dim is split over (major to minor),
and the mesh axes over which the value is a *partial* result awaiting a reduction. Per mesh
axis that reads as one SBP placement:

>>> lay = Layout(dims=(("data",), ()), partial=(("model", "sum"),))
>>> lay.sbp(("data", "model"))
(Split(dim=0), Partial(op='sum'))
>>> str(lay.to_str(("data", "model")))
'[S(0), P(sum)]'
>>> lay.spec()
PartitionSpec('data', None)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from jax.sharding import PartitionSpec

REDUCTION_OPS = ("sum", "max", "min")


@dataclass(frozen=True)
class Split:
    """The tensor is split along ``dim`` over this mesh axis (SBP ``S(dim)``)."""
    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Broadcast:
    """Every device along this mesh axis holds the same values (SBP ``B``)."""

    def __str__(self) -> str:
        return "B"


@dataclass(frozen=True)
class Partial:
    """Devices along this mesh axis hold partial values to be combined with ``op``."""
    op: str = "sum"

    def __str__(self) -> str:
        return f"P({self.op})"


@dataclass(frozen=True)
class Layout:
    """Placement of one tensor: ``dims[d]`` = mesh axes splitting dim ``d`` (major first);
    ``partial`` = sorted ``(mesh_axis, op)`` pairs of pending reductions."""
    dims: tuple[tuple[str, ...], ...]
    partial: tuple[tuple[str, str], ...] = ()

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def replicated(rank: int) -> "Layout":
        return Layout(dims=((),) * rank)

    @staticmethod
    def from_spec(spec: PartitionSpec, rank: int) -> "Layout":
        """``P('data', None)`` on a rank-2 value -> ``dims=(('data',), ())``. Assumes a
        validated spec (see ``passes.import_annotations``)."""
        dims = []
        for entry in tuple(spec) + (None,) * (rank - len(spec)):
            if entry is None:
                dims.append(())
            elif isinstance(entry, str):
                dims.append((entry,))
            else:
                dims.append(tuple(entry))
        return Layout(dims=tuple(dims))

    def with_partial(self, partial) -> "Layout":
        return Layout(self.dims, tuple(sorted(partial)))

    def without_partial(self) -> "Layout":
        return Layout(self.dims)

    # -- queries ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def split_axes(self) -> tuple[str, ...]:
        return tuple(a for axes in self.dims for a in axes)

    @property
    def partial_axes(self) -> dict[str, str]:
        return dict(self.partial)

    def is_replicated(self) -> bool:
        return not self.split_axes and not self.partial

    def local_shape(self, shape, axis_sizes: dict[str, int]) -> tuple[int, ...]:
        """Per-device block shape. A dim that does not divide by its axes is padded at the
        end to a multiple of them: every block has ``ceil(size / n)`` rows."""
        return tuple(-(-size // math.prod(axis_sizes[a] for a in axes))
                     for size, axes in zip(shape, self.dims))

    def uneven_dims(self, shape, axis_sizes: dict[str, int]) -> tuple[int, ...]:
        """Dims split over axes that do not divide them (padded per device)."""
        return tuple(d for d, (size, axes) in enumerate(zip(shape, self.dims))
                     if axes and size % math.prod(axis_sizes[a] for a in axes))

    def even_part(self, shape, axis_sizes: dict[str, int]) -> "Layout":
        """This layout with uneven dims unsplit: what a ``jax.Array`` can hold (JAX arrays
        cannot be split unevenly), so inputs arrive and outputs leave this way."""
        bad = set(self.uneven_dims(shape, axis_sizes))
        return Layout(tuple(() if d in bad else axes for d, axes in enumerate(self.dims)), self.partial)

    def refines(self, other: "Layout") -> bool:
        """True if ``self`` is ``other`` with more axes appended on some dims."""
        return self.rank == other.rank and all(
            mine[:len(theirs)] == theirs for mine, theirs in zip(self.dims, other.dims))

    def spec(self) -> PartitionSpec:
        entries = [None if not axes else (axes[0] if len(axes) == 1 else axes) for axes in self.dims]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def sbp(self, mesh_axes) -> tuple:
        """One placement per mesh axis, in mesh order. A dim split over several axes shows
        ``S(d)`` on each of them."""
        where = {a: d for d, axes in enumerate(self.dims) for a in axes}
        partial = self.partial_axes
        out = []
        for axis in mesh_axes:
            if axis in where:
                out.append(Split(where[axis]))
            elif axis in partial:
                out.append(Partial(partial[axis]))
            else:
                out.append(Broadcast())
        return tuple(out)

    def to_str(self, mesh_axes) -> str:
        text = "[" + ", ".join(str(p) for p in self.sbp(mesh_axes)) + "]"
        multi = [f"{d}:{'>'.join(axes)}" for d, axes in enumerate(self.dims) if len(axes) > 1]
        return text + (" (" + ", ".join(multi) + ")" if multi else "")

    def __repr__(self) -> str:
        return f"Layout(dims={self.dims!r}, partial={self.partial!r})"
