"""Checkpoints: saved under dp_tp on (2, 4) by one process, restored by fresh processes under
fsdp on (8,) and on one device with identical values and the same next-step loss; a save
killed midway leaves the previous step restorable.

The file doubles as the worker those processes run: ``python tests/test_checkpoint.py MODE DIR``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_STEP = 2


# ------------------------------------------------------------------------ worker side

def _gpt():
    import jax

    from autoshard.models import get_model
    model = get_model("gpt")
    cfg = model.Config(n_layers=1)          # one block: the same ops, half the compile time
    model_def, params = model.init(cfg, seed=0)
    optimizer = model.default_optimizer()
    step = model.make_train_step(model_def, optimizer)
    abstract = {"params": jax.eval_shape(lambda: params),
                "opt_state": jax.eval_shape(optimizer.init, params)}
    return model, cfg, params, optimizer, step, abstract


def _parallel_step(step, params, batch, strategy, mesh_shape):
    import autoshard as ash
    from autoshard.models import presets
    mesh = ash.make_mesh(mesh_shape)
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs("gpt", params, strategy, axes, dict(mesh.shape)), None,
             presets.batch_specs("gpt", batch, strategy, axes))
    return ash.parallelize(step, mesh=mesh, in_specs=specs, donate_argnums=(0, 1))


def _flat(tree) -> dict:
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def worker_save(directory):
    """dp_tp on (2, 4): two steps, save, then the next step's loss as the reference."""
    import jax

    from autoshard.runtime.checkpoint import Checkpointer
    model, cfg, params, optimizer, step, _ = _gpt()
    pstep = _parallel_step(step, params, model.make_batch(cfg, 8), "dp_tp", "data=2,model=4")
    opt_state = optimizer.init(params)
    for i in range(SAVED_STEP):
        loss, params, opt_state = pstep(params, opt_state, model.make_batch(cfg, 8, seed=i))
    state = {"params": params, "opt_state": opt_state}
    Checkpointer(directory).save(SAVED_STEP, state)
    np.savez(os.path.join(directory, "..", "saved.npz"), **_flat(state))
    next_loss, _, _ = pstep(params, opt_state, model.make_batch(cfg, 8, seed=SAVED_STEP))
    return {"next_loss": float(next_loss), "devices": jax.device_count()}


def worker_restore(directory, target):
    """A fresh process: restore under ``target`` ('fsdp8' or 'one_device'), compare, step."""
    import jax

    from autoshard.runtime.checkpoint import Checkpointer
    model, cfg, params, optimizer, step, abstract = _gpt()
    batch = model.make_batch(cfg, 8, seed=SAVED_STEP)
    ckpt = Checkpointer(directory)
    copies = None
    if target == "fsdp8":
        pstep = _parallel_step(step, params, batch, "fsdp", "data=8")
        shardings = pstep.input_shardings(abstract["params"], abstract["opt_state"], batch)
        want = {"params": shardings[0], "opt_state": shardings[1]}
        state = ckpt.restore(target=abstract, shardings=want)
        placed = all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(want)))
        restored = _flat(state)                     # before the step donates them
        loss, _, _ = pstep(state["params"], state["opt_state"], batch)
        copies = pstep.last_call_copies             # only the two NumPy batch leaves
        saved_by = "fsdp on (8,)"
    else:
        # Every value whole on one device (the default target: this process's first device).
        state = ckpt.restore(target=abstract)
        placed = all(x.sharding.device_set == {jax.local_devices()[0]} for x in jax.tree.leaves(state))
        restored = _flat(state)
        loss, _, _ = jax.jit(step)(state["params"], state["opt_state"], batch)
        saved_by = "one device"
    saved = np.load(os.path.join(directory, "..", "saved.npz"))
    identical = sorted(restored) == sorted(saved.files) and all(
        restored[k].dtype == saved[k].dtype and np.array_equal(restored[k], saved[k]) for k in saved.files)
    layouts = ckpt.layouts()
    return {"identical": bool(identical), "placed": bool(placed), "loss": float(loss), "copies": copies,
            "under": saved_by, "saved_mesh": layouts["mesh"],
            "kernel_sbp": layouts["leaves"]["['params']['blocks']['0']['attn']['q']['kernel']"]["sbp"],
            "opt_state_type": type(state["opt_state"][0]).__name__, "steps": ckpt.all_steps()}


def _small_state(seed):
    """A few MB of sharded values on a (2, 4) mesh: slow enough to kill a save midway."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import autoshard as ash
    mesh = ash.make_mesh("data=2,model=4")
    rng = np.random.default_rng(seed)
    specs = [P("data", "model"), P(None, "model"), P("data"), P()]
    return {f"w{i}": jax.device_put(rng.standard_normal((256, 512)).astype(np.float32),
                                    NamedSharding(mesh, specs[i % 4]))
            for i in range(24)}


def worker_crash(directory, where):
    """Save step 1, then die (SIGKILL from the test) while saving step 2."""
    from autoshard.runtime.checkpoint import Checkpointer
    ckpt = Checkpointer(directory)
    first = _small_state(1)
    ckpt.save(1, first)
    np.savez(os.path.join(directory, "..", "step1.npz"), **_flat(first))
    if where == "before_commit":
        # Every shard of step 2 written, the atomic rename not yet done: hold here to be killed.
        from orbax.checkpoint._src.path import atomicity

        async def hold(self):
            print("HOLDING_BEFORE_COMMIT", flush=True)
            time.sleep(600)
        atomicity.AtomicRenameTemporaryPath.finalize = hold
    second = _small_state(2)
    np.savez(os.path.join(directory, "..", "step2.npz"), **_flat(second))
    print("SAVING_STEP_2", flush=True)
    ckpt.save(2, second)
    print("STEP_2_COMMITTED", flush=True)
    time.sleep(600)


def worker_multiprocess_save(directory):
    """One of two processes (under ``autoshard launch``): each writes only its own shards."""
    from autoshard.runtime import distributed
    assert distributed.initialize()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import autoshard as ash
    from autoshard.runtime.checkpoint import Checkpointer
    mesh = ash.make_mesh("data=2,model=4")
    rng = np.random.default_rng(0)
    full = {"w": rng.standard_normal((64, 32)).astype(np.float32),
            "b": rng.standard_normal((32,)).astype(np.float32)}
    specs = {"w": P("data", "model"), "b": P("model")}
    state = {k: distributed.global_array(distributed.local_slice(v, NamedSharding(mesh, specs[k])),
                                         NamedSharding(mesh, specs[k]), v.shape) for k, v in full.items()}
    Checkpointer(directory).save(1, state)
    if jax.process_index() == 0:
        np.savez(os.path.join(directory, "..", "mp.npz"), **full)
    return {"process": jax.process_index(), "local_devices": jax.local_device_count()}


# ------------------------------------------------------------------------ test side

def _run_worker(args, devices, timeout=300):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint written by a process that has ended (dp_tp on (2, 4), 8 devices)."""
    root = tmp_path_factory.mktemp("ckpt")
    directory = str(root / "run")
    info = _run_worker(["save", directory], devices=8)
    assert info["devices"] == 8
    return directory, info


def _check_restored(result, info, under):
    assert result["under"] == under
    assert result["identical"], "restored values differ from the saved ones"
    assert result["placed"], "restored values are not in the layouts asked for"
    assert result["saved_mesh"] == {"axis_names": ["data", "model"], "shape": [2, 4]}
    assert result["kernel_sbp"] == "[B, S(1)]"                  # column-parallel q under dp_tp
    assert result["opt_state_type"] == "ScaleByAdamState"       # optax's structure, not dicts
    assert result["steps"] == [SAVED_STEP]
    # The next step's loss is the one the saving process computed under dp_tp, up to the float
    # rounding of another reduction order (measured: equal, or 1 ulp apart).
    assert abs(result["loss"] - info["next_loss"]) <= 1e-6 * abs(info["next_loss"])


# The saving process has ended; the restores run in this (fresh) process: its 8 devices for
# fsdp, its first device alone for the one-device run. `python tests/test_checkpoint.py restore
# DIR one_device` with XLA_FLAGS=--xla_force_host_platform_device_count=1 does the same in a
# process that has one device only (test_restore_in_a_one_device_process, slow).

def test_restore_under_fsdp_on_eight_devices(saved):
    directory, info = saved
    result = worker_restore(directory, "fsdp8")
    _check_restored(result, info, "fsdp on (8,)")
    assert result["copies"] == 2                                 # restored state passed as is


def test_restore_on_one_device(saved):
    directory, info = saved
    result = worker_restore(directory, "one_device")
    _check_restored(result, info, "one device")


@pytest.mark.slow
def test_restore_in_a_one_device_process(saved):
    directory, info = saved
    result = _run_worker(["restore", directory, "one_device"], devices=1)
    _check_restored(result, info, "one device")


def _tmp_bytes(directory) -> int | None:
    """Bytes written so far into an unfinished save's temporary directory (None: there is none)."""
    tmp = [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n]
    if not tmp:
        return None
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(directory, tmp[0]))
               for f in fs if os.path.exists(os.path.join(r, f)))


@pytest.mark.parametrize("where", ["before_commit", "during_write"])
def test_killed_save_leaves_previous_checkpoint_restorable(tmp_path, where):
    """SIGKILL while step 2 is being saved: step 1 stays the latest and restores exactly.
    ``before_commit``: every shard written, the commit (atomic rename) not done — deterministic.
    ``during_write``: killed once 1 MB of the ~12 MB of shards is on disk (a save takes ~0.25 s
    here); should the save win the race, the invariant checked is that the latest committed
    step restores exactly."""
    import jax

    from autoshard.runtime.checkpoint import Checkpointer
    directory = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "crash", directory, where], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, written = [], None
    try:
        marker = "HOLDING_BEFORE_COMMIT" if where == "before_commit" else "SAVING_STEP_2"
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                break
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        else:
            pytest.fail("worker ended early:\n" + "".join(lines)[-3000:])
        while where == "during_write" and time.monotonic() < deadline and "2" not in os.listdir(directory):
            if (_tmp_bytes(directory) or 0) >= 1_000_000:
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        written = _tmp_bytes(directory)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(directory)
    committed_2 = "2" in names
    if where == "before_commit" or not committed_2:
        assert "1" in names and not committed_2 and written is not None, (names, "".join(lines)[-2000:])
    print(f"{where}: killed with {written} bytes of step 2 in its temporary directory; committed: {sorted(names)}")

    ckpt = Checkpointer(directory)              # opening it clears the interrupted save's leftovers
    latest = 2 if committed_2 else 1
    assert ckpt.all_steps() == list(range(1, latest + 1)) and ckpt.latest_step() == latest
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory))
    want = np.load(str(tmp_path / f"step{latest}.npz"))
    target = {k[2:-2]: jax.ShapeDtypeStruct(want[k].shape, want[k].dtype) for k in want.files}
    state = ckpt.restore(target=target)
    for k, x in state.items():
        np.testing.assert_array_equal(np.asarray(x), want[f"['{k}']"])
    assert ckpt.layouts(latest)["leaves"]["['w0']"]["sbp"] == "[S(0), S(1)]"
    # Saving goes on after the crash.
    ckpt.save(3, state)
    assert ckpt.all_steps() == list(range(1, latest + 1)) + [3]
    ckpt.close()


def test_checkpoint_saved_by_two_processes_restores_in_one(tmp_path):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import autoshard as ash
    from autoshard.runtime.checkpoint import Checkpointer
    directory = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "autoshard.cli", "launch", "--processes", "2",
                          "--devices-per-process", "4", "--timeout", "200", "--",
                          sys.executable, os.path.abspath(__file__), "mpsave", directory],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=260)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert sum("RESULT " in ln for ln in run.stdout.splitlines()) == 2
    assert {f"ocdbt.process_{i}" for i in range(2)} <= set(os.listdir(os.path.join(directory, "1", "state")))
    want = np.load(str(tmp_path / "mp.npz"))
    ckpt = Checkpointer(directory)
    meta = ckpt.layouts()
    assert meta["process_count"] == 2 and meta["leaves"]["['w']"]["sbp"] == "[S(0), S(1)]"
    target = {k: jax.ShapeDtypeStruct(want[k].shape, want[k].dtype) for k in want.files}
    eight = ckpt.restore(target=target, shardings=NamedSharding(ash.make_mesh("data=8"), P("data")))
    one = ckpt.restore(target=target)
    # The saved specs on a (2, 4) mesh of this one process.
    same = ckpt.restore(target=target, mesh=ash.make_mesh("data=2,model=4"))
    for k in want.files:
        assert eight[k].sharding.spec == P("data") and len(one[k].sharding.device_set) == 1
        assert same[k].sharding.spec == {"w": P("data", "model"), "b": P("model")}[k]
        for restored in (eight, one, same):
            np.testing.assert_array_equal(np.asarray(restored[k]), want[k])
    with pytest.raises(ValueError, match=r"names mesh axes \['model'\] that the mesh \{'data': 8\} lacks"):
        ckpt.restore(target=target, mesh=ash.make_mesh("data=8"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    mode, directory, *rest = sys.argv[1:]
    if mode == "mpsave":
        out = worker_multiprocess_save(directory)
    elif mode == "save":
        out = worker_save(directory)
    elif mode == "restore":
        out = worker_restore(directory, rest[0])
    elif mode == "crash":
        out = worker_crash(directory, rest[0])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(out), flush=True)
