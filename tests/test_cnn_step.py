"""Issue #3 must-show 3: a CNN training step (convolutions, max pooling, a normalisation
layer, adamw) with the batch over `data` and the image height over `model` equals one device,
and the compiled program moves halos with collective-permutes, not all-gathers of whole
activations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close
from autoshard.report.hlo import parse_collectives


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)           # normalises channels per pixel
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):                                 # x: [B, H, W, C]
        x = nnx.relu(self.norm(self.conv1(x)))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


def test_cnn_train_step_with_height_split():
    graphdef, params = nnx.split(CNN(nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=(4,)).astype(np.int32)

    def loss_fn(params, images, labels):
        state = nnx.State(jax.tree.map(lambda x: x, params))
        model = nnx.merge(graphdef, state)
        logits = model(images)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 10), -1))

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state, grads

    mesh = ash.make_mesh("data=2,model=4")
    pf = ash.parallelize(step, mesh=mesh, in_specs=(None, None, P("data", "model", None, None), P("data")))
    got = pf(params, opt_state, images, labels)
    want = jax.jit(step)(params, opt_state, images, labels)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want[3]))
    assert_tree_close(got[3], want[3], rtol=1e-4, atol=1e-6 * scale)      # gradients
    hlo = parse_collectives(pf.lower(params, opt_state, images, labels).compile().as_text(), mesh)
    assert any(c.kind == "collective-permute" and c.mesh_axes == ("model",) for c in hlo)
    # No activation is gathered whole: every all-gather is smaller than one device's block of
    # the first conv's output (4 x 16 x 16 x 8 floats split 2 x 4 ways).
    block = 4 * 16 * 16 * 8 // 8
    assert all(np.prod(c.shape) * mesh.shape[c.mesh_axes[0]] < block for c in hlo if c.kind == "all-gather"), hlo
    assert_report_matches_hlo(pf, params, opt_state, images, labels)
