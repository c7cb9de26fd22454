"""The compiled-program cache, donation and call-time checks of ``ParallelFunction``.

Every sharded result is compared with the same function run on one device.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import autoshard as ash
from autoshard.errors import ReshardWarning, RetraceWarning, SpecError
from autoshard.runtime import executable

from _util import assert_tree_close


def ffn(x, w1, w2):
    return jax.nn.relu(x @ w1) @ w2


SPECS = (P("data", None), P(None, "model"), P("model", None))


def ffn_args(seed=0, batch=8, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 16)).astype(dtype), rng.standard_normal((16, 32)).astype(dtype),
            rng.standard_normal((32, 16)).astype(dtype))


def test_second_call_with_same_shapes_does_not_retrace():
    traced = []

    def f(x, w1, w2):
        traced.append(1)                  # runs once per trace, never per call
        return ffn(x, w1, w2)

    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=SPECS)
    for seed in range(3):
        a = ffn_args(seed)
        np.testing.assert_allclose(pf(*a), jax.jit(ffn)(*a), rtol=1e-5, atol=1e-5)
    a = ffn_args(3)
    pf(*map(jnp.asarray, a))                            # jax.Arrays of the same shapes
    pf(*(x.astype(np.float64) for x in a))              # float64 NumPy is float32 on the devices
    assert pf.trace_count == 1 and len(traced) == 1
    assert len(pf._cache) == 1
    # The key names the mesh and the annotations as well as the shapes.
    (key,) = pf._cache
    assert pf.mesh in key and executable._spec_key(SPECS) in key


def test_new_shapes_or_dtypes_retrace_and_say_why():
    pf = ash.parallelize(ffn, mesh=ash.make_mesh("data=2,model=4"), in_specs=SPECS)
    pf(*ffn_args())
    a = ffn_args(batch=4)
    np.testing.assert_allclose(pf(*a), ffn(*a), rtol=1e-5, atol=1e-5)
    assert pf.trace_count == 2
    assert pf.last_retrace_reason == "args[0] changed from float32[8, 16] to float32[4, 16]"
    b = ffn_args(dtype=np.float16)
    out = pf(*b)
    assert out.dtype == jnp.float16 and pf.trace_count == 3
    assert "float32[8, 16] to float16[8, 16]" in pf.last_retrace_reason or \
        "float32[4, 16] to float16[8, 16]" in pf.last_retrace_reason
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ffn(*b), np.float32), rtol=2e-2, atol=2e-2)
    pf(*ffn_args())                                     # back to the first shapes: cached
    assert pf.trace_count == 3
    # A shape the annotations cannot describe is a typed error naming the argument.
    with pytest.raises(SpecError, match=r"args\[0\]"):
        pf(np.ones((16,), np.float32), *ffn_args()[1:])


def test_many_retraces_warn(monkeypatch):
    monkeypatch.setattr(executable, "RETRACE_WARN_AT", 2)
    pf = ash.parallelize(lambda x: x * 2, mesh=ash.make_mesh("data=8"), in_specs=(P("data"),))
    pf(np.ones(8, np.float32))
    pf(np.ones(16, np.float32))
    with pytest.warns(RetraceWarning, match=r"traced 3 programs; the latest because args\[0\] changed"):
        pf(np.ones(24, np.float32))


def _mlp_step():
    from autoshard.models import get_model, presets
    model = get_model("mlp")
    cfg = model.Config()
    model_def, params = model.init(cfg, seed=0)
    optimizer = model.default_optimizer()
    step = model.make_train_step(model_def, optimizer)
    batch = model.make_batch(cfg, 8, seed=0)
    mesh = ash.make_mesh("data=2,model=4")
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs("mlp", params, "dp_tp", axes, dict(mesh.shape)), None,
             presets.batch_specs("mlp", batch, "dp_tp", axes))
    return model, cfg, params, optimizer, step, batch, mesh, specs


def _per_device_bytes(tree, shardings):
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def test_donation_updates_parameters_and_optimizer_state_in_place():
    model, cfg, params, optimizer, step, batch, mesh, specs = _mlp_step()
    opt_state = optimizer.init(params)
    donating = ash.parallelize(step, mesh=mesh, in_specs=specs, donate_argnums=(0, 1))
    keeping = ash.parallelize(step, mesh=mesh, in_specs=specs)

    # XLA aliases every parameter and optimizer-state buffer with its updated output.
    shardings = donating.input_shardings(params, opt_state, batch)
    state_bytes = _per_device_bytes((params, opt_state), shardings[:2])
    mem = donating.lower(params, opt_state, batch).compile().memory_analysis()
    assert mem.alias_size_in_bytes == state_bytes > 0
    assert mem.argument_size_in_bytes == state_bytes + _per_device_bytes(batch, shardings[2])
    assert keeping.lower(params, opt_state, batch).compile().memory_analysis().alias_size_in_bytes == 0

    # Calls: results equal one device; the donated inputs are consumed, outputs take their place.
    ref_step = jax.jit(step)
    # Host copies (np.asarray would be a view pinning device 0's buffers, which placing may share).
    ref = jax.tree.map(lambda x: np.array(x, copy=True), (params, opt_state))
    p, s = jax.device_put((params, opt_state), shardings[:2])
    for i in range(3):
        batch = model.make_batch(cfg, 8, seed=i)
        loss, p2, s2 = donating(p, s, batch)
        assert all(x.is_deleted() for x in jax.tree.leaves((p, s))), (i, [(jax.tree_util.keystr(k), x.shape) for k, x in jax.tree_util.tree_flatten_with_path((p, s))[0] if not x.is_deleted()])
        assert donating.last_call_copies == len(jax.tree.leaves(batch))    # only the NumPy batch
        ref_loss, *ref = ref_step(*ref, batch)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        p, s = p2, s2
    assert_tree_close(p, ref[0], rtol=1e-4, atol=1e-4)
    assert donating.trace_count == 1
    with pytest.raises(ValueError, match=r"args\[0\].* has been deleted \(donated"):
        donating(_deleted_like(p), s, batch)


def _deleted_like(tree):
    """A copy of ``tree`` whose first leaf has been deleted."""
    leaves, treedef = jax.tree.flatten(tree)
    first = jnp.copy(leaves[0])
    first.delete()
    return jax.tree.unflatten(treedef, [first] + leaves[1:])


def test_inputs_already_in_layout_are_not_copied(monkeypatch):
    mesh = ash.make_mesh("data=2,model=4")
    pf = ash.parallelize(ffn, mesh=mesh, in_specs=SPECS, donate_argnums=(0,))
    a = ffn_args()
    want = ffn(*a)
    placed = jax.device_put(a, pf.input_shardings(*a))
    # An equivalent spelling of the same layout counts as in place: P('data', None) == P('data').
    placed = (jax.device_put(a[0], NamedSharding(mesh, P("data"))),) + tuple(placed[1:])
    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *xs, **kw: calls.append(1) or real(*xs, **kw))
    np.testing.assert_allclose(pf(*placed), want, rtol=1e-5, atol=1e-5)
    assert calls == [] and pf.last_call_copies == 0
    assert placed[0].is_deleted()          # the very buffer was handed to XLA (donated), not a copy
    assert not placed[1].is_deleted()


def test_arrays_on_another_mesh_are_resharded_with_a_warning():
    devices = jax.devices()
    pf = ash.parallelize(ffn, mesh=ash.make_mesh("data=2,model=4"), in_specs=SPECS)
    a = ffn_args()
    want = ffn(*a)
    # Another mesh over the same devices (fsdp-style (8,)), and arrays outside this mesh.
    other = ash.make_mesh("data=8")
    on_other = (jax.device_put(a[0], NamedSharding(other, P("data"))),) + a[1:]
    with pytest.warns(ReshardWarning, match=r"input args\[0\] float32\[8, 16\] lives on mesh \{'data': 8\}"):
        np.testing.assert_allclose(pf(*on_other), want, rtol=1e-5, atol=1e-5)

    small = ash.parallelize(ffn, mesh=ash.make_mesh("data=2,model=2", devices=devices[:4]), in_specs=SPECS)
    far = (jax.device_put(a[0], devices[6]),) + a[1:]
    with pytest.warns(ReshardWarning, match=r"lives on devices \[6\]"):
        np.testing.assert_allclose(small(*far), want, rtol=1e-5, atol=1e-5)

    # Unsharded arrays on one of the mesh's devices, NumPy data and other layouts on this
    # mesh are ordinary inputs: placed without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReshardWarning)
        mesh = pf.mesh
        np.testing.assert_allclose(pf(jax.device_put(a[0], devices[0]), *a[1:]), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pf(jax.device_put(a[0], NamedSharding(mesh, P("model"))), *a[1:]), want,
                                   rtol=1e-5, atol=1e-5)
