"""Default link and compute rates by device kind, each figure with where it comes from.

The cost model prices a collective over a mesh axis with an alpha-beta ``LinkModel``
(``steps * latency_s + wire_bytes / bandwidth_bytes_per_s``, per direction, per device)
and work at ``compute_rate`` *points* per second, where a point is one iteration of an
equation's factor space: a multiply-add of a matmul (2 FLOP), an element of an elementwise
op (``passes/auto_search._points``). So ``points/s = matmul FLOP/s / 2``.

>>> hw = hardware_for("NVIDIA H100 80GB HBM3")
>>> hw.name, hw.ici.bandwidth_bytes_per_s, hw.compute_rate
('NVIDIA H100 SXM', 450000000000.0, 494700000000000.0)
>>> hardware_for("Some New Chip").fallback
True

``hardware_for(device_kind)`` matches ``jax.devices()[0].device_kind`` by substring (case
insensitive, most specific entry first); a kind without an entry gets autoshard's generic
defaults and a ``source`` that says it is a fallback. ``"cpu"`` keeps those same defaults on
purpose (5 us, 100 GB/s per axis, 1e12 points/s): simulated CPU devices share the host's
cores, so no datasheet describes them; ``ash.calibrate(mesh)`` measures them instead.

Conventions of the table:

* ``bf16_flops``: dense (no 2:4 sparsity) peak bfloat16 matmul rate per chip.
* ``f32_flops``: float32 matmuls at JAX's *default* precision, which is what a float32 model
  gets: TF32 tensor cores on NVIDIA Ampere and later, bfloat16 passes on TPU (JAX "Matmul
  precision" docs). ``precision="highest"`` is several times slower on both.
* ``ici``: one mesh axis inside a node / slice (NVLink through NVSwitch, TPU ICI), bytes per
  second each device sends (one direction). On NVSwitch systems every GPU reaches every other
  at its full NVLink rate. On a TPU torus a mesh axis laid along one torus dimension is a ring
  through 2 of the chip's ports (4 on v5e/v6e, 6 on v4/v5p); the documented per-chip
  bidirectional ICI figure is split over the ports accordingly.
* ``dcn``: a mesh axis across nodes / slices (InfiniBand per GPU, TPU data-centre network
  per chip).
* latencies are per ring step (``LinkModel`` multiplies by the steps of the collective).

Everything here is data: the compiler imports nothing from passes/, report/ or runtime/.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from .cost_model import LinkModel

#: autoshard's generic compute rate (= ``passes.auto_search.DEFAULT_POINTS_PER_SECOND``,
#: restated because compiler/ does not import passes/; a test keeps them equal).
GENERIC_POINTS_PER_SECOND = 1e12


@dataclasses.dataclass(frozen=True)
class Figure:
    """One number and where it comes from (a vendor page or paper, or ``estimate: why``)."""
    value: float
    source: str

    @property
    def estimated(self) -> bool:
        return self.source.startswith("estimate")


@dataclasses.dataclass(frozen=True)
class HardwareModel:
    """Peak rates of one device kind. ``links_for(mesh)`` and ``compute_rate`` are what
    ``parallelize(costs=...)`` feeds to the cost model; ``source`` is what the report prints."""
    name: str
    bf16_flops: Figure
    f32_flops: Figure
    ici_bandwidth: Figure
    ici_latency: Figure
    dcn_bandwidth: Figure
    dcn_latency: Figure
    device_kind: str = ""          # the kind looked up (may differ from ``name``)
    fallback: bool = False

    @property
    def ici(self) -> LinkModel:
        return LinkModel(self.ici_latency.value, self.ici_bandwidth.value)

    @property
    def dcn(self) -> LinkModel:
        return LinkModel(self.dcn_latency.value, self.dcn_bandwidth.value)

    def flops(self, dtype="bfloat16") -> float:
        """Peak matmul FLOP/s for ``dtype`` (bfloat16 / float16 / 8-bit: the bf16 rate)."""
        try:
            dt = np.dtype(dtype)
        except TypeError:               # "bfloat16" spelled as a string without ml_dtypes
            return self.bf16_flops.value
        return self.f32_flops.value if dt.name in ("float32", "float64") else self.bf16_flops.value

    def points_per_second(self, dtype="bfloat16") -> float:
        """The auto search's rate: multiply-adds per second (FLOP/s / 2)."""
        return self.flops(dtype) / 2.0

    @property
    def compute_rate(self) -> float:
        """Points per second at the bfloat16 rate (the precision models train in; a float32
        model on a GPU runs at the TF32 rate, ``points_per_second("float32")``)."""
        return self.points_per_second("bfloat16")

    @property
    def source(self) -> str:
        if self.fallback:
            return (f"fallback: no table entry for device kind {self.device_kind!r}; autoshard's generic "
                    f"defaults ({self.ici_latency.value * 1e6:g} us, {self.ici_bandwidth.value / 1e9:g} GB/s per "
                    f"axis, {self.compute_rate:.3g} points/s); ash.calibrate(mesh) measures the real ones")
        if all(f.startswith("not a hardware figure") for f in self.sources().values()):
            return (f"table: {self.name} (autoshard's generic defaults, not hardware figures; "
                    f"ash.calibrate(mesh) measures this machine)")
        estimated = sum(f.startswith("estimate") for f in self.sources().values())
        return (f"table: {self.name} (autoshard/compiler/hardware.py: vendor peak figures"
                + (f", {estimated} of 6 estimated" if estimated else "") + ")")

    def links_for(self, mesh, inter_node_axes=None) -> dict[str, LinkModel]:
        """``{axis: LinkModel}`` for ``mesh``: ``ici`` for axes inside a node / slice, ``dcn``
        for axes that cross nodes. ``inter_node_axes`` names them; by default an axis is
        inter-node when devices along it sit in different TPU slices (``slice_index``) or,
        where every process holds several devices, in different processes."""
        names = tuple(mesh.axis_names)
        crossing = set(inter_node_axes) if inter_node_axes is not None else set(_crossing_axes(mesh))
        return {a: (self.dcn if a in crossing else self.ici) for a in names}

    def table_row(self) -> str:
        """A markdown row: name | bf16 | f32 | ici | dcn (values only)."""
        return (f"| {self.name} | {self.bf16_flops.value / 1e12:g} | {self.f32_flops.value / 1e12:g} | "
                f"{self.ici_bandwidth.value / 1e9:g} GB/s, {self.ici_latency.value * 1e6:g} us | "
                f"{self.dcn_bandwidth.value / 1e9:g} GB/s, {self.dcn_latency.value * 1e6:g} us |")

    def sources(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name).source for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Figure)}


def _crossing_axes(mesh):
    if not isinstance(mesh, Mesh):
        return ()                                   # AbstractMesh: no devices to look at
    grid = np.asarray(mesh.devices)
    flat = list(grid.flat)
    use_slices = all(getattr(d, "slice_index", None) is not None for d in flat)
    procs = [d.process_index for d in flat]
    per_proc = {p: procs.count(p) for p in set(procs)}
    # One process per device (a common GPU launch) says nothing about nodes: not used then.
    use_procs = len(per_proc) > 1 and min(per_proc.values()) > 1
    out = []
    for k, name in enumerate(mesh.axis_names):
        rows = np.moveaxis(grid, k, -1).reshape(-1, grid.shape[k])
        if any((use_slices and len({d.slice_index for d in row}) > 1)
               or (use_procs and len({d.process_index for d in row}) > 1) for row in rows):
            out.append(name)
    return tuple(out)


# ------------------------------------------------------------------------------ the table

_NCCL = "NVIDIA/nccl src/graph/tuning.cc (NCCL 2.19), hwLat"
_NVLINK_LAT = Figure(3.4e-6, f"{_NCCL}[NVLINK][Ring][Simple] = 3.4 us per ring step (NCCL's own cost model; "
                             f"the LL protocol for small messages: 0.6 us)")
_IB_LAT = Figure(14e-6, f"{_NCCL}[NET][Ring][Simple] = 14 us per ring step over the network (NCCL's own "
                        f"cost model; LL protocol: 2.7 us)")
_TPU_ICI_LAT = Figure(5e-6, "estimate: no vendor figure for ICI latency found; autoshard's LinkModel default "
                            "(5 us per step) kept")
_TPU_DCN_LAT = Figure(14e-6, "estimate: no vendor figure for DCN latency found; the order of a data-centre "
                             f"network hop as NCCL models it ({_NCCL}[NET][Ring][Simple] = 14 us)")
_JAX_TPU_F32 = ("JAX docs 'Matmul precision' (docs.jax.dev/en/latest/201/precision.html): float32 dots "
                "on TPU run as bfloat16 by default, so the bf16 rate")

_H100_SPEC = ("NVIDIA H100 Tensor Core GPU datasheet, specifications table (H100 SXM column), as "
              "reproduced at archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html")

_ENTRIES = [
    # (match substrings, must-not-contain substrings, model)
    (("tpu v5 lite", "tpu v5e", "v5litepod"), (), HardwareModel(
        name="TPU v5e",
        bf16_flops=Figure(197e12, "Cloud TPU docs, 'TPU v5e' (cloud.google.com/tpu/docs/v5e), system "
                                  "architecture table: 'Peak compute per chip (bf16) 197 TFLOPs'"),
        f32_flops=Figure(197e12, f"estimate: no vendor float32 figure; {_JAX_TPU_F32}"),
        ici_bandwidth=Figure(100e9, "Cloud TPU docs, 'TPU v5e': 'Bidirectional inter-chip interconnect (ICI) "
                                    "bandwidth (per chip) 400 GBps', 'ICI ports per chip 4' -> 50 GB/s per port "
                                    "per direction; a mesh axis on one torus dimension drives 2 ports: 100 GB/s"),
        ici_latency=_TPU_ICI_LAT,
        dcn_bandwidth=Figure(3.125e9, "Cloud TPU docs, 'TPU v5e': 'Per-host NIC configuration 2 x 100 Gbps NIC', "
                                      "'Chips per host 8' -> 25 Gb/s = 3.125 GB/s per chip"),
        dcn_latency=_TPU_DCN_LAT)),
    (("tpu v6 lite", "tpu v6e", "trillium"), (), HardwareModel(
        name="TPU v6e (Trillium)",
        bf16_flops=Figure(918e12, "Cloud TPU docs, 'TPU v6e' (docs.cloud.google.com/tpu/docs/v6e), specification "
                                  "table: 'Peak compute per chip (bf16) 918 TFLOPs'"),
        f32_flops=Figure(918e12, f"estimate: no vendor float32 figure; {_JAX_TPU_F32}"),
        ici_bandwidth=Figure(200e9, "Cloud TPU docs, 'TPU v6e': 'Bidirectional inter-chip interconnect (ICI) "
                                    "bandwidth (per chip) 800 GBps', 'ICI ports per chip 4' -> 100 GB/s per port "
                                    "per direction; a mesh axis on one torus dimension drives 2 ports: 200 GB/s"),
        ici_latency=_TPU_ICI_LAT,
        dcn_bandwidth=Figure(3.125e9, "estimate: the stored v6e page gives no per-chip DCN figure; v5e's "
                                      "(2 x 100 Gbps NICs per 8-chip host = 3.125 GB/s per chip) taken as a floor"),
        dcn_latency=_TPU_DCN_LAT)),
    (("tpu v5p", "tpu v5"), ("lite",), HardwareModel(
        name="TPU v5p",
        bf16_flops=Figure(459e12, "Cloud TPU docs, 'TPU v5p' (cloud.google.com/tpu/docs/v5p), key specifications: "
                                  "'Peak compute per chip (BF16) 459 TFLOPs'"),
        f32_flops=Figure(459e12, f"estimate: no vendor float32 figure; {_JAX_TPU_F32}"),
        ici_bandwidth=Figure(200e9, "Cloud TPU docs, 'TPU v5p': 'Bidirectional inter-chip interconnect (ICI) "
                                    "bandwidth per chip (GBps) 1200' over a 3D torus (6 ports) -> 100 GB/s per port "
                                    "per direction; a mesh axis on one torus dimension drives 2 ports: 200 GB/s"),
        ici_latency=_TPU_ICI_LAT,
        dcn_bandwidth=Figure(6.25e9, "Cloud TPU docs, 'TPU v5p': 'Data center network (DCN) bandwidth per chip "
                                     "(Gbps) 50' = 6.25 GB/s"),
        dcn_latency=_TPU_DCN_LAT)),
    (("tpu v4",), ("lite",), HardwareModel(
        name="TPU v4",
        bf16_flops=Figure(275e12, "Cloud TPU docs, 'TPU v4' (cloud.google.com/tpu/docs/v4), system architecture "
                                  "table: 'Peak compute per chip 275 teraflops (bf16 or int8)'"),
        f32_flops=Figure(275e12, f"estimate: no vendor float32 figure; {_JAX_TPU_F32}"),
        ici_bandwidth=Figure(100e9, "secondary: glennklockwood.com/garden/processors/TPUv4 summarising Jouppi et al., "
                                    "'TPU v4: An Optically Reconfigurable Supercomputer...' (ISCA 2023): ICI gives "
                                    "'400G bandwidth in each direction' per link = 50 GB/s; 6 ports (3D torus); a "
                                    "mesh axis on one torus dimension drives 2 ports: 100 GB/s"),
        ici_latency=_TPU_ICI_LAT,
        dcn_bandwidth=Figure(6.25e9, "estimate: no v4 per-chip DCN figure found; v5p's documented 50 Gb/s per chip "
                                     "(cloud.google.com/tpu/docs/v5p) taken"),
        dcn_latency=_TPU_DCN_LAT)),
    (("h100",), ("pcie", "nvl"), HardwareModel(
        name="NVIDIA H100 SXM",
        bf16_flops=Figure(989.4e12, f"{_H100_SPEC}: 'BFLOAT16 Tensor Core 1,979 TFLOPS*', '* with sparsity; "
                                    f"1/2 lower without' -> 989.4 dense"),
        f32_flops=Figure(494.7e12, f"{_H100_SPEC}: 'TF32 Tensor Core 989 TFLOPS*' (with sparsity) -> 494.7 dense "
                                   f"(JAX runs float32 dots as TF32 by default; exact FP32 is 67 TFLOPS)"),
        ici_bandwidth=Figure(450e9, f"{_H100_SPEC}: 'NVLink: 900GB/s' (bidirectional: 18 NVLink 4 links x 25 GB/s "
                                    f"each way) -> 450 GB/s per direction, to any GPU through NVSwitch"),
        ici_latency=_NVLINK_LAT,
        dcn_bandwidth=Figure(50e9, "NVIDIA DGX H100 User Guide, 'Network Modules' table: 8 ConnectX-7 ports, one per "
                                   "GPU; ConnectX-7 NDR InfiniBand 400 Gb/s -> 50 GB/s per GPU per direction"),
        dcn_latency=_IB_LAT)),
    (("h200",), ("nvl", "gh200"), HardwareModel(
        name="NVIDIA H200 SXM",
        bf16_flops=Figure(989.4e12, "NVIDIA H200 product page (as quoted by aiwiki.ai/wiki/nvidia_h200): the same "
                                    "GH100 silicon and compute as H100 SXM; 'BF16 Tensor Core 1,979 TFLOPS' with "
                                    "sparsity -> 989.4 dense"),
        f32_flops=Figure(494.7e12, "same GH100 compute as H100 SXM: TF32 Tensor Core 989 TFLOPS with sparsity -> "
                                   "494.7 dense (JAX's default float32 matmul precision on GPU)"),
        ici_bandwidth=Figure(450e9, "NVIDIA H200 product page: 'NVLink 900GB/s' (NVLink 4, bidirectional) -> 450 GB/s "
                                    "per direction"),
        ici_latency=_NVLINK_LAT,
        dcn_bandwidth=Figure(50e9, "estimate: DGX/HGX H200 take the DGX H100 network (one 400 Gb/s ConnectX-7 per "
                                   "GPU, DGX H100 User Guide); a given cluster may differ"),
        dcn_latency=_IB_LAT)),
    (("b200",), ("gb200",), HardwareModel(
        name="NVIDIA B200",
        bf16_flops=Figure(2250e12, "NVIDIA Blackwell datasheet, HGX B200 at 1,000 W (as tabulated at "
                                   "glennklockwood.com/garden/processors/B200): BF16 2,250 TFLOPS dense, 4,500 sparse"),
        f32_flops=Figure(1100e12, "same source: TF32 1,100 TFLOPS dense (JAX's default float32 matmul precision)"),
        ici_bandwidth=Figure(900e9, "NVIDIA DGX B200 page (nvidia.com/en-us/data-center/dgx-b200): fifth-generation "
                                    "NVLink, 1.8 TB/s GPU-to-GPU (bidirectional) -> 900 GB/s per direction"),
        ici_latency=Figure(3.4e-6, f"estimate: NCCL's NVLink figure for earlier generations ({_NCCL}[NVLINK]"
                                   f"[Ring][Simple] = 3.4 us); no Blackwell-specific figure found"),
        dcn_bandwidth=Figure(50e9, "estimate: DGX B200 lists ConnectX-7 networking (nvidia.com/en-us/data-center/"
                                   "dgx-b200); one 400 Gb/s port per GPU assumed as in DGX H100"),
        dcn_latency=_IB_LAT)),
    (("a100",), ("pcie",), HardwareModel(
        name="NVIDIA A100 SXM4",
        bf16_flops=Figure(312e12, "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), "
                                  "spec table: 'BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*' (* sparsity)"),
        f32_flops=Figure(156e12, "same datasheet: 'Tensor Float 32 (TF32) 156 TFLOPS' dense (JAX's default float32 "
                                 "matmul precision on GPU; exact FP32 is 19.5 TFLOPS)"),
        ici_bandwidth=Figure(300e9, "same datasheet: 'NVLink 600GB/s' (12 NVLink 3 links, bidirectional) -> 300 GB/s "
                                    "per direction, to any GPU through NVSwitch"),
        ici_latency=_NVLINK_LAT,
        dcn_bandwidth=Figure(25e9, "Lenovo Press LP1195 'ThinkSystem Mellanox ConnectX-6 HDR/200GbE VPI Adapters': "
                                   "'up to 200 Gb/s' -> 25 GB/s per GPU, one HDR port per GPU as in DGX A100 "
                                   "(layout assumed)"),
        dcn_latency=_IB_LAT)),
]

_GENERIC_LINK = LinkModel()
_CPU = HardwareModel(
    name="cpu",
    bf16_flops=Figure(2 * GENERIC_POINTS_PER_SECOND,
                      "not a hardware figure: autoshard's generic rate (auto_search.DEFAULT_POINTS_PER_SECOND, "
                      "1e12 points/s = 2e12 FLOP/s), kept so CPU plans and benchmarks are unchanged; simulated "
                      "devices share the host's cores: ash.calibrate(mesh) measures them"),
    f32_flops=Figure(2 * GENERIC_POINTS_PER_SECOND, "not a hardware figure: as bf16, autoshard's generic rate"),
    ici_bandwidth=Figure(_GENERIC_LINK.bandwidth_bytes_per_s,
                         "not a hardware figure: autoshard's LinkModel() default, kept for CPU meshes"),
    ici_latency=Figure(_GENERIC_LINK.latency_s, "not a hardware figure: autoshard's LinkModel() default"),
    dcn_bandwidth=Figure(_GENERIC_LINK.bandwidth_bytes_per_s,
                         "not a hardware figure: as ici (LinkModel() default; no second tier on a CPU mesh)"),
    dcn_latency=Figure(_GENERIC_LINK.latency_s, "not a hardware figure: as ici (LinkModel() default)"))

#: Every entry, for listing (``python -m autoshard.compiler.hardware`` prints them).
TABLE = {m.name: m for _, _, m in _ENTRIES} | {"cpu": _CPU}


def hardware_for(device_kind: str) -> HardwareModel:
    """The table's model for ``jax.Device.device_kind`` (substring match, case insensitive,
    most specific entry first), or a fallback with generic figures whose ``source`` says so."""
    kind = str(device_kind)
    low = kind.lower()
    if low.strip() == "cpu" or low.startswith("cpu"):
        return dataclasses.replace(_CPU, device_kind=kind)
    for needles, excluded, model in _ENTRIES:
        if any(n in low for n in needles) and not any(x in low for x in excluded):
            return dataclasses.replace(model, device_kind=kind)
    generic = "estimate: fallback, no table entry for this device kind"
    return HardwareModel(
        name=f"unknown ({kind})",
        bf16_flops=Figure(2 * GENERIC_POINTS_PER_SECOND, generic),
        f32_flops=Figure(2 * GENERIC_POINTS_PER_SECOND, generic),
        ici_bandwidth=Figure(_GENERIC_LINK.bandwidth_bytes_per_s, generic),
        ici_latency=Figure(_GENERIC_LINK.latency_s, generic),
        dcn_bandwidth=Figure(_GENERIC_LINK.bandwidth_bytes_per_s, generic),
        dcn_latency=Figure(_GENERIC_LINK.latency_s, generic),
        device_kind=kind, fallback=True)


def mesh_device_kind(mesh) -> str:
    """The device kind of ``mesh`` (its first device; an ``AbstractMesh`` has none: the local
    backend's kind, which is what a plan made here would run on by default)."""
    if isinstance(mesh, Mesh):
        return next(iter(mesh.devices.flat)).device_kind
    return jax.devices()[0].device_kind


def costs_for(mesh, costs=None):
    """What ``parallelize(costs=...)`` prices with: ``costs`` itself (a ``HardwareModel`` or an
    ``autoshard.runtime.calibrate.Calibration``: anything with ``links_for(mesh)``,
    ``compute_rate`` and ``source``), or by default the table entry of ``mesh``'s device kind."""
    if costs is None:
        return hardware_for(mesh_device_kind(mesh))
    if isinstance(costs, str):
        return hardware_for(costs)
    missing = [a for a in ("links_for", "compute_rate", "source") if not hasattr(costs, a)]
    if missing:
        raise TypeError(f"costs= must be an autoshard HardwareModel (hardware_for(device_kind)), a Calibration "
                        f"(ash.calibrate(mesh)) or a device-kind string; {type(costs).__name__} lacks {missing}")
    return costs


def markdown_table() -> str:
    """The whole table with every figure's source, as markdown."""
    lines = ["| device | bf16 TFLOP/s | f32 TFLOP/s (default precision) | intra-node axis | inter-node axis |",
             "|---|---|---|---|---|"]
    lines += [m.table_row() for m in TABLE.values()]
    lines.append("")
    for m in TABLE.values():
        lines.append(f"**{m.name}**")
        lines += [f"- {k}: {v}" for k, v in m.sources().items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
