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

    @property
    def link_models(self) -> dict[str, LinkModel]:
        """``{axis: LinkModel}`` of every mesh axis, in mesh order (what ``cost_model.group_link``
        and the planner's costs read)."""
        return {a: self.link(a) for a in self.axis_names}
