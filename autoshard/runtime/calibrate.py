"""``calibrate(mesh)``: measure the cost model's figures on the devices of a mesh.

Per mesh axis (of size > 1) it times an all-reduce over that axis -- the runtime's own
collective (``runtime/collectives.apply``) inside ``jax.shard_map`` over the whole mesh, so
every group of the axis communicates at once, as in a real step -- for a few payload sizes,
and fits the alpha-beta model by least squares::

    seconds = intercept + slope * wire_bytes(kind, n, payload)
    LinkModel(latency_s = intercept / steps(kind, n), bandwidth_bytes_per_s = 1 / slope)

(``steps`` is the ring step count ``LinkModel.time`` multiplies the latency by: 2(n-1) for an
all-reduce; so ``LinkModel.time`` reproduces the fitted line exactly.) Each timed program runs
``iters`` dependent collectives in a loop, so the call's dispatch is spread over them.

The compute rate is the per-device matmul rate with every device multiplying at once (on
simulated CPU devices they share the host's cores, which is what a step there gets), as the
auto search counts work: *points* per second, a point being one multiply-add (FLOP / 2).

>>> calib = calibrate(ash.make_mesh("data=2,model=4"))                  # doctest: +SKIP
>>> calib.links["model"], calib.compute_rate                             # doctest: +SKIP
(LinkModel(latency_s=4.1e-05, bandwidth_bytes_per_s=2.3e+09), 3.2e+09)
>>> pf = ash.parallelize(step, mesh=mesh, auto=True, costs=calib)       # doctest: +SKIP
>>> pf.report(*args).cost_model_source                                   # doctest: +SKIP
'measured on cpu at 2026-12-01 10:00:00 UTC (...)'
"""
from __future__ import annotations

import dataclasses
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..compiler import collectives
from ..compiler.cost_model import LinkModel, wire_bytes
from ..compiler.hardware import hardware_for
from ..compiler.planner import Transform

#: Payload bytes per device timed by default, per platform (small enough for simulated CPU
#: devices on two cores, large enough on an accelerator to reach its bandwidth).
DEFAULT_SIZES = {"cpu": (1 << 12, 1 << 16, 1 << 20), "other": (1 << 16, 1 << 22, 1 << 26)}
#: Side of the square matmul timed per device.
DEFAULT_MATMUL = {"cpu": 384, "other": 8192}


def _ring_steps(kind: str, n: int) -> int:
    """The step count ``LinkModel.time`` charges latency for (kept equal to it)."""
    return 2 * (n - 1) if kind == "all-reduce" else (1 if kind == "collective-permute" else n - 1)


@dataclasses.dataclass(frozen=True)
class AxisFit:
    """What was timed over one mesh axis and the line fitted through it."""
    axis: str
    kind: str
    group_size: int
    payload_bytes: tuple[int, ...]       # per device
    wire_bytes: tuple[float, ...]        # per device, cost_model.wire_bytes
    seconds: tuple[float, ...]           # median per collective
    intercept_s: float                   # the fit, before any bound below
    slope_s_per_byte: float
    r_squared: float
    link: LinkModel
    note: str = ""                       # set when a fitted value was not usable as is


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured costs of a mesh's devices; pass it as ``parallelize(..., costs=calib)``."""
    device_kind: str
    platform: str
    mesh_shape: dict
    links: dict                          # {axis: LinkModel}; axes of size 1 are not measured
    compute_rate: float                  # points (multiply-adds) per second per device
    matmul_flops: float                  # FLOP/s per device
    matmul_dtype: str
    matmul_size: int
    fits: tuple[AxisFit, ...]
    measured_at: str
    seconds_taken: float

    @property
    def source(self) -> str:
        axes = ", ".join(f"{f.axis} (n={f.group_size}): {f.link.latency_s * 1e6:.3g} us, "
                         f"{f.link.bandwidth_bytes_per_s / 1e9:.3g} GB/s" for f in self.fits) or "no axis > 1"
        return (f"measured on {self.device_kind} at {self.measured_at} (mesh {self.mesh_shape}; all-reduce per "
                f"axis: {axes}; matmul {self.matmul_size}^3 {self.matmul_dtype}: {self.matmul_flops / 1e9:.3g} "
                f"GFLOP/s = {self.compute_rate:.3g} points/s per device)")

    def links_for(self, mesh, inter_node_axes=None) -> dict[str, LinkModel]:
        """The measured link of each of ``mesh``'s axes (an axis not measured: the table's
        link for this device kind)."""
        table = hardware_for(self.device_kind)
        return {a: self.links.get(a, table.ici) for a in mesh.axis_names}

    def summary(self) -> str:
        lines = [self.source]
        for f in self.fits:
            pts = ", ".join(f"{p / 1024:g} KiB: {s * 1e6:.1f} us" for p, s in zip(f.payload_bytes, f.seconds))
            lines.append(f"  {f.axis}: {f.kind} over {f.group_size} devices, {pts}; fit r^2 {f.r_squared:.3f}"
                         + (f" ({f.note})" if f.note else ""))
        return "\n".join(lines)


def _median_seconds(fn, args, repeats: int) -> float:
    for _ in range(2):                            # compile, then warm up (thread pools, caches)
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spec(mesh):
    return PartitionSpec(tuple(mesh.axis_names))


def _all_reduce_program(mesh, axis: str, iters: int):
    sizes = dict(mesh.shape)
    plan = (Transform("all-reduce", (axis,)),)

    def local(x):
        # Dependent collectives in a loop: one dispatch for ``iters`` all-reduces, none of
        # which XLA can merge with another.
        return lax.fori_loop(0, iters, lambda i, y: collectives.apply(y, plan, sizes), x)

    body = jax.shard_map(local, mesh=mesh, in_specs=_spec(mesh), out_specs=_spec(mesh), check_vma=False)
    return jax.jit(body)


def _matmul_program(mesh, iters: int):
    def local(a, b):
        return lax.fori_loop(0, iters, lambda i, y: jnp.dot(y, b, preferred_element_type=y.dtype), a)

    body = jax.shard_map(local, mesh=mesh, in_specs=(_spec(mesh), PartitionSpec()), out_specs=_spec(mesh),
                         check_vma=False)
    return jax.jit(body)


def _fit(axis, kind, n, payloads, seconds) -> AxisFit:
    wires = [wire_bytes(kind, n, p) for p in payloads]
    x = np.asarray(wires, dtype=float)
    y = np.asarray(seconds, dtype=float)
    a = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = a @ np.array([intercept, slope])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0
    steps = _ring_steps(kind, n)
    notes = []
    # Noise can tip a fitted value below zero; then bound it by what was measured instead
    # (the model needs positive numbers) and say so.
    if slope > 0:
        bandwidth = 1.0 / slope
    else:
        bandwidth = max(w / s for w, s in zip(wires, seconds))
        notes.append("slope not positive: bandwidth bounded by the largest bytes/second measured")
    if intercept > 0:
        latency = intercept / steps
    else:
        latency = min(seconds) / steps
        notes.append("intercept not positive: latency bounded by the smallest time per step")
    return AxisFit(axis, kind, n, tuple(int(p) for p in payloads), tuple(wires), tuple(float(s) for s in seconds),
                   float(intercept), float(slope), r2, LinkModel(float(latency), float(bandwidth)), "; ".join(notes))


def calibrate(mesh: Mesh, *, sizes=None, repeats: int = 5, iters: int | None = None,
              matmul_size: int | None = None, matmul_dtype=None) -> Calibration:
    """Measure per-axis latency and bandwidth, and the per-device matmul rate, on ``mesh``.

    ``sizes``: payload bytes per device to time (at least two; default per platform in
    ``DEFAULT_SIZES``); ``repeats``: timed calls per point (the median is kept); ``iters``:
    collectives or matmuls per call; ``matmul_size``/``matmul_dtype``: the square matmul
    timed (default 384 float32 on CPU, 8192 bfloat16 elsewhere)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"calibrate needs a mesh of real devices (ash.make_mesh), got {type(mesh).__name__}")
    t_start = time.perf_counter()
    device = next(iter(mesh.devices.flat))
    platform = device.platform
    key = "cpu" if platform == "cpu" else "other"
    sizes = tuple(sorted({int(s) for s in (sizes or DEFAULT_SIZES[key])}))
    if len(sizes) < 2:
        raise ValueError(f"calibrate needs at least two payload sizes to fit latency and bandwidth, got {sizes}")
    iters = iters or (8 if platform == "cpu" else 20)
    n_dev = mesh.devices.size
    sharding = NamedSharding(mesh, _spec(mesh))
    fits = []
    for axis in mesh.axis_names:
        n = int(mesh.shape[axis])
        if n == 1:
            continue
        program = _all_reduce_program(mesh, axis, iters)
        seconds = []
        for size in sizes:
            elems = max(1, size // 4)
            x = jax.device_put(jnp.zeros((n_dev * elems,), jnp.float32), sharding)
            seconds.append(_median_seconds(program, (x,), repeats) / iters)
        fits.append(_fit(axis, "all-reduce", n, [4 * max(1, s // 4) for s in sizes], seconds))

    side = matmul_size or DEFAULT_MATMUL[key]
    dtype = jnp.dtype(matmul_dtype or (jnp.float32 if platform == "cpu" else jnp.bfloat16))
    mm_iters = 4
    a = jax.device_put(jnp.zeros((n_dev * side, side), dtype), NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None)))
    b = jax.device_put(jnp.zeros((side, side), dtype), NamedSharding(mesh, PartitionSpec()))
    mm_seconds = _median_seconds(_matmul_program(mesh, mm_iters), (a, b), repeats) / mm_iters
    flops = 2.0 * side ** 3 / mm_seconds
    return Calibration(
        device_kind=device.device_kind, platform=platform, mesh_shape=dict(mesh.shape),
        links={f.axis: f.link for f in fits}, compute_rate=flops / 2.0, matmul_flops=flops,
        matmul_dtype=str(dtype), matmul_size=side, fits=tuple(fits),
        measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        seconds_taken=time.perf_counter() - t_start)

