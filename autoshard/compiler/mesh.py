"""Mesh parsing and the compiler's view of a mesh (axis names, sizes, link models).

>>> parse_mesh_shape("data=2,model=4")
{'data': 2, 'model': 4}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from ..errors import MeshError
from .cost_model import LinkModel


def parse_mesh_shape(shape) -> dict[str, int]:
    """Accept ``{"data": 2, "model": 4}``, ``"data=2,model=4"`` or a sequence of pairs."""
    if isinstance(shape, str):
        pairs = []
        for part in filter(None, (p.strip() for p in shape.split(","))):
            if "=" not in part:
                raise MeshError(f"mesh shape {shape!r}: entry {part!r} is not NAME=SIZE; "
                                f"write it like 'data=2,model=4'")
            name, size = part.split("=", 1)
            pairs.append((name.strip(), size.strip()))
    elif isinstance(shape, dict):
        pairs = list(shape.items())
    else:
        try:
            pairs = list(shape)
        except TypeError:
            raise MeshError(f"mesh shape {shape!r} is not a dict or 'name=size,...' string") from None
    out: dict[str, int] = {}
    for name, size in pairs:
        if not isinstance(name, str) or not name.isidentifier():
            raise MeshError(f"mesh shape {shape!r}: axis name {name!r} must be an identifier")
        if name in out:
            raise MeshError(f"mesh shape {shape!r}: axis {name!r} appears twice")
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise MeshError(f"mesh shape {shape!r}: size of axis {name!r} is {size!r}, not an integer") from None
        if size < 1:
            raise MeshError(f"mesh shape {shape!r}: axis {name!r} has size {size}; sizes must be >= 1")
        out[name] = size
    if not out:
        raise MeshError(f"mesh shape {shape!r} names no axes; write it like 'data=2,model=4'")
    return out


def make_mesh(shape, devices=None) -> Mesh:
    """A ``jax.sharding.Mesh`` with ``Auto`` axis types over ``devices`` (default: all)."""
    sizes = parse_mesh_shape(shape)
    devices = list(jax.devices() if devices is None else devices)
    want = math.prod(sizes.values())
    if want != len(devices):
        raise MeshError(
            f"mesh shape {sizes} needs {want} devices but {len(devices)} are available; "
            f"change the shape so the sizes multiply to {len(devices)}, or pass devices= "
            f"(for simulated CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count={want} "
            f"before JAX starts)")
    grid = np.array(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def sub_axis_name(axis: str, before: int, size: int) -> str:
    """Shardy's name of a sub-axis: ``model:(4)2`` is the size-2 part of ``model`` that follows
    (is minor to) a part of size 4; ``model:(1)4`` is its major part."""
    return f"{axis}:({before}){size}"


def refined_mesh(mesh, info: "MeshInfo"):
    """The JAX mesh of ``info`` (``mesh`` itself unless ``info`` refines some of its axes):
    same devices in the same order, each refined axis reshaped into its sub-axes."""
    if not info.parents:
        return mesh
    parent = {s: p for p, subs in info.parents for s in subs}
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axis_types = tuple(types[parent.get(a, a)] for a in info.axis_names)
    if isinstance(mesh, AbstractMesh):
        return AbstractMesh(info.axis_sizes, info.axis_names, axis_types=axis_types)
    return Mesh(np.asarray(mesh.devices).reshape(info.axis_sizes), info.axis_names, axis_types=axis_types)


def abstract_mesh(shape) -> AbstractMesh:
    sizes = parse_mesh_shape(shape)
    return AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


@dataclass(frozen=True)
class MeshInfo:
    """What the compiler needs of a mesh: ordered axis names and sizes, link models, and
    where those models come from (``cost_source``: a table entry, a calibration, defaults)."""
    axis_names: tuple[str, ...]
    axis_sizes: tuple[int, ...]
    links: tuple[LinkModel, ...] = field(default=())
    cost_source: str = "defaults: LinkModel() on every axis"
    # Axes replaced by sub-axes (``refine``): ``(axis, (major sub-axis, minor sub-axis))`` pairs.
    parents: tuple = ()

    @staticmethod
    def of(mesh, links: dict[str, LinkModel] | None = None, source: str | None = None) -> "MeshInfo":
        if not isinstance(mesh, (Mesh, AbstractMesh)):
            raise MeshError(f"mesh must be a jax.sharding.Mesh or AbstractMesh (see autoshard.make_mesh), got {type(mesh).__name__}")
        names = tuple(mesh.axis_names)
        sizes = tuple(int(mesh.shape[n]) for n in names)
        links = links or {}
        return MeshInfo(names, sizes, tuple(links.get(n, LinkModel()) for n in names),
                        source or "defaults: LinkModel() on every axis")

    @property
    def size(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.axis_sizes))

    def link(self, axis: str) -> LinkModel:
        return self.links[self.axis_names.index(axis)] if self.links else LinkModel()

    # -- sub-axes ----------------------------------------------------------------------------
    def refine(self, axis: str, major: int) -> "MeshInfo":
        """This mesh with ``axis`` (size n) replaced by two sub-axes of sizes ``major`` and
        n / major, major first, over the same devices in the same order: named as Shardy
        writes them, ``model:(1)4`` and ``model:(4)2`` for model=8 refined 4 x 2."""
        i = self.axis_names.index(axis)
        n = self.axis_sizes[i]
        subs = (sub_axis_name(axis, 1, major), sub_axis_name(axis, major, n // major))
        links = self.links[:i] + (self.links[i],) * 2 + self.links[i + 1:] if self.links else ()
        return MeshInfo(self.axis_names[:i] + subs + self.axis_names[i + 1:],
                        self.axis_sizes[:i] + (major, n // major) + self.axis_sizes[i + 1:],
                        links, self.cost_source, self.parents + ((axis, subs),))

    @property
    def user_axis_names(self) -> tuple[str, ...]:
        """The mesh axes as the user named them (each refined axis once, in place of its sub-axes)."""
        parent = {s: p for p, subs in self.parents for s in subs}
        out: list[str] = []
        for a in self.axis_names:
            name = parent.get(a, a)
            if name not in out:
                out.append(name)
        return tuple(out)

    def expand(self, axes) -> tuple[str, ...]:
        """User axis names -> this mesh's axes (a refined axis -> its sub-axes, major first)."""
        subs = dict(self.parents)
        return tuple(s for a in axes for s in subs.get(a, (a,)))

    def coarsen(self, axes) -> tuple[str, ...] | None:
        """This mesh's axes -> user axis names, or None where a refined axis is split only in part
        (or its sub-axes out of order): such a placement exists on the refined mesh only."""
        out, axes = [], tuple(axes)
        parent = {s: (p, subs) for p, subs in self.parents for s in subs}
        i = 0
        while i < len(axes):
            if axes[i] not in parent:
                out.append(axes[i])
                i += 1
                continue
            p, subs = parent[axes[i]]
            if axes[i:i + len(subs)] != subs:
                return None
            out.append(p)
            i += len(subs)
        return tuple(out)

    def writable(self, axes) -> tuple[str, ...]:
        """The longest leading part of ``axes`` (one dim's split, major first) that the user's
        mesh can write (``coarsen`` is not None): each refined axis there split whole."""
        axes = tuple(axes)
        for n in range(len(axes), -1, -1):
            if self.coarsen(axes[:n]) is not None:
                return axes[:n]
        return ()

    @property
    def link_models(self) -> dict[str, LinkModel]:
        """``{axis: LinkModel}`` of every mesh axis, in mesh order (what ``cost_model.group_link``
        and the planner's costs read)."""
        return {a: self.link(a) for a in self.axis_names}
