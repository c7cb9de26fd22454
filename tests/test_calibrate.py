"""Issue #15, item 3: costs from the hardware.

The table (``compiler/hardware.py``) gives each device kind's link and compute rates with a
source per figure; ``ash.calibrate(mesh)`` measures them on the mesh's devices; both feed
``parallelize(costs=...)``, and the report names the model it priced with. No timing
thresholds here: the simulated CPU devices share two cores with other work, so only signs,
finiteness and the ordering of very different payloads are asserted.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.compiler.cost_model import LinkModel
from autoshard.compiler.hardware import TABLE, costs_for, hardware_for, markdown_table
from autoshard.compiler.cost_model import DEFAULT_POINTS_PER_SECOND

KINDS = {
    "TPU v4": "TPU v4",
    "TPU v5 lite": "TPU v5e",
    "TPU v5p": "TPU v5p",
    "TPU v5": "TPU v5p",
    "TPU v6 lite": "TPU v6e (Trillium)",
    "NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM",
    "NVIDIA H200": "NVIDIA H200 SXM",
    "NVIDIA A100-SXM4-80GB": "NVIDIA A100 SXM4",
    "NVIDIA B200": "NVIDIA B200",
    "cpu": "cpu",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_table_lookup_each_kind_with_a_source_per_figure(kind):
    hw = hardware_for(kind)
    assert hw.name == KINDS[kind] and not hw.fallback and hw.device_kind == kind
    for field, source in hw.sources().items():
        figure = getattr(hw, field)
        assert figure.value > 0 and math.isfinite(figure.value), (field, figure)
        assert len(source) > 20, (field, source)           # a citation or "estimate: why", never empty
    # A point is a multiply-add: points/s = FLOP/s / 2.
    assert hw.compute_rate == hw.bf16_flops.value / 2
    assert hw.source.startswith("table: ")
    assert hw.ici.bandwidth_bytes_per_s >= hw.dcn.bandwidth_bytes_per_s


def test_cpu_keeps_todays_defaults():
    """The CPU default must not move RESULTS.md or the tests: LinkModel() and the search's rate."""
    hw = hardware_for(jax.devices()[0].device_kind)
    assert hw.name == "cpu"
    assert hw.ici == LinkModel() and hw.dcn == LinkModel()
    assert hw.compute_rate == DEFAULT_POINTS_PER_SECOND


@pytest.mark.parametrize("kind", ["Some Future Chip", "NVIDIA H100 PCIe", "NVIDIA GB200", ""])
def test_unknown_kind_falls_back_and_says_so(kind):
    hw = hardware_for(kind)
    assert hw.fallback
    assert hw.source.startswith("fallback: no table entry") and repr(kind) in hw.source
    assert hw.ici == LinkModel() and hw.compute_rate == DEFAULT_POINTS_PER_SECOND
    assert all(s.startswith("estimate") for s in hw.sources().values())


def test_links_for_a_mesh_inter_node_axes_take_the_dcn_link(mesh):
    hw = hardware_for("TPU v5p")
    assert hw.links_for(mesh) == {"data": hw.ici, "model": hw.ici}       # one process, no slices
    assert hw.links_for(mesh, inter_node_axes=("data",)) == {"data": hw.dcn, "model": hw.ici}
    planning = ash.abstract_mesh("data=4,model=512")                      # no devices: local kind
    assert costs_for(planning).source.startswith("table: cpu")
    assert hw.links_for(planning) == {"data": hw.ici, "model": hw.ici}


def test_markdown_table_lists_every_entry():
    text = markdown_table()
    for name in TABLE:
        assert f"| {name} |" in text and f"**{name}**" in text


@pytest.fixture(scope="module")
def mesh():
    return ash.make_mesh("data=2,model=4")


@pytest.fixture(scope="module")
def calib(mesh):
    return ash.calibrate(mesh, sizes=(1 << 12, 1 << 20), repeats=3, iters=4, matmul_size=256)


def test_calibrate_measures_every_axis_and_the_matmul_rate(calib, mesh):
    assert isinstance(calib, ash.Calibration)
    assert calib.device_kind == "cpu" and calib.mesh_shape == dict(mesh.shape)
    assert set(calib.links) == {"data", "model"}
    for fit in calib.fits:
        link = calib.links[fit.axis]
        assert 0 < link.latency_s < math.inf and 0 < link.bandwidth_bytes_per_s < math.inf, fit
        assert fit.group_size == mesh.shape[fit.axis]
        # 256x the payload takes longer (orders of magnitude more bytes than any noise) ...
        assert fit.seconds[-1] > fit.seconds[0], fit
        # ... and the fitted model says so for any payloads.
        assert link.time("all-reduce", fit.group_size, 1 << 20) > link.time("all-reduce", fit.group_size, 1 << 12)
        assert fit.wire_bytes[-1] == pytest.approx(2 * (fit.group_size - 1) / fit.group_size * (1 << 20))
    assert 0 < calib.compute_rate < math.inf
    assert calib.compute_rate == pytest.approx(calib.matmul_flops / 2)
    assert calib.source.startswith("measured on cpu at ")
    assert "data (n=2)" in calib.summary() and "model (n=4)" in calib.summary()


def test_parallelize_prices_with_the_calibration_and_the_report_says_so(calib, mesh):
    def f(x, w):
        return jnp.tanh(x @ w).sum(axis=0)

    x, w = np.ones((8, 16), np.float32), np.ones((16, 32), np.float32)
    specs = (P("data", None), P(None, "model"))
    measured = ash.parallelize(f, mesh=mesh, in_specs=specs, costs=calib)
    rep = measured.report(x, w)
    assert rep.cost_model_source == calib.source
    assert rep.links == calib.links
    assert "cost model: measured on cpu" in rep.summary()
    # auto=True gets the measured compute rate (the search's "points" per second).
    auto = ash.parallelize(f, mesh=mesh, in_specs=specs, auto=True, costs=calib)
    assert auto.auto["compute_rate"] == calib.compute_rate
    assert ash.parallelize(f, mesh=mesh, auto={"compute_rate": 5.0}, costs=calib).auto["compute_rate"] == 5.0
    # Default: the table entry of the mesh's device kind, which on the CPU is today's model.
    default = ash.parallelize(f, mesh=mesh, in_specs=specs).report(x, w)
    assert default.cost_model_source.startswith("table: cpu")
    assert default.links == {"data": LinkModel(), "model": LinkModel()}
    assert [c.wire_bytes for c in default.collectives] == [c.wire_bytes for c in rep.collectives]
    # Links given to the report afterwards are named in the source.
    slow = default.with_links({"data": LinkModel(25e-6, 12.5e9)})
    assert slow.cost_model_source.endswith("links of data given to the report")
    # A table entry by name prices a plan for other hardware (times change, bytes do not).
    h100 = ash.parallelize(f, mesh=mesh, in_specs=specs, costs="NVIDIA H100 80GB HBM3").report(x, w)
    assert h100.cost_model_source.startswith("table: NVIDIA H100 SXM")
    assert h100.links["model"] == hardware_for("NVIDIA H100 80GB HBM3").ici
    assert h100.total_wire_bytes == default.total_wire_bytes
    with pytest.raises(TypeError, match="costs="):
        costs_for(mesh, object())


def _gpt(n_layers):
    from autoshard.models import get_model
    m = get_model("gpt")
    cfg = m.Config(vocab_size=128, d_model=32, n_heads=8, seq_len=16, n_layers=n_layers)
    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    return m.make_train_step(model_def, optimizer), (params, optimizer.init(params), m.make_batch(cfg, 8))


@pytest.mark.slow
def test_auto_on_the_gpt_shards_or_says_in_numbers_why_not(calib, mesh):
    """With the measured CPU costs the search either splits some layer or the summary gives
    the numbers that make replication win; with the default (generic) CPU costs it
    replicates, and says why. (Two MILP solves, ~20 s on two shared cores: -m slow.)"""
    from autoshard.report.strategy import describe_layers, replication_note
    step, args = _gpt(1)
    batch = {"tokens": P("data", None), "labels": P("data", None)}
    for costs in (calib, None):
        pf = ash.parallelize(step, mesh=mesh, in_specs=(None, None, batch), auto=True, costs=costs)
        rep = pf.report(*args)
        split = any(not w.startswith("replicated") for w in describe_layers(rep.program).values())
        note = replication_note(rep.program)
        assert split != (note is not None), (split, note)
        if note:
            assert "why replicated: compute" in rep.summary() and "pays for" in note
        if costs is None:
            assert not split and "at 1e+12 points/s" in note
