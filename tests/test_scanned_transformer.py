"""Issue #3 must-show 4: an 8-layer transformer with scan over layers (flax nnx.scan,
stacked weights), tensor parallel on hidden dims, equals one device, and its compiled program
keeps one loop per scan rather than unrolling it."""
import jax
import numpy as np
import pytest

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close
from autoshard.models import get_model, presets

GPT = get_model("gpt")


@pytest.mark.parametrize("strategy,mesh_text", [("dp_tp", "data=2,model=4"), ("fsdp", "data=8")])
def test_scanned_gpt_step(strategy, mesh_text):
    mesh = ash.make_mesh(mesh_text)
    cfg = GPT.Config(n_layers=8, scan_layers=True)
    model_def, params = GPT.init(cfg, seed=0)
    assert params["blocks"]["attn"]["q"]["kernel"].shape == (8, 32, 32)
    batch = GPT.make_batch(cfg, 8, seed=0)

    def grads(params, batch):
        return jax.value_and_grad(lambda p: GPT.loss_fn(model_def, p, batch))(params)
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs("gpt", params, strategy, axes, dict(mesh.shape)),
             presets.batch_specs("gpt", batch, strategy, axes))
    if strategy == "dp_tp":
        assert specs[0]["blocks"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec(None, None, "model")
    pf = ash.parallelize(grads, mesh=mesh, in_specs=specs)
    loss, g = pf(params, batch)
    ref_loss, ref_g = jax.jit(grads)(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(ref_g))
    assert_tree_close(g, ref_g, rtol=1e-4, atol=1e-6 * scale)
    text = pf.lower(params, batch).compile().as_text()
    # One loop for the forward scan and one for the backward scan: not unrolled.
    assert text.count(" while(") == 2
    assert_report_matches_hlo(pf, params, batch)
