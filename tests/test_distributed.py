"""Multi-process runs: 2 processes x 4 CPU devices on 127.0.0.1 (jax.distributed, gloo) train
GPT under dp_tp with the losses of one process with 8 devices; the local launcher.

The file doubles as the worker the launcher starts: ``python tests/test_distributed.py worker``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def train_losses(steps: int = STEPS, strategy: str = "dp_tp", mesh_shape: str = "data=2,model=4"):
    """GPT trained ``steps`` steps under ``strategy``; the batch enters as process-local rows.
    Returns (autoshard losses, this process's 1-device losses, number of processes)."""
    from autoshard.runtime import distributed
    multi = distributed.initialize()
    import jax
    import numpy as np

    import autoshard as ash
    from autoshard.models import get_model, presets
    model = get_model("gpt")
    cfg = model.Config()
    model_def, params = model.init(cfg, seed=0)
    optimizer = model.default_optimizer()
    step = model.make_train_step(model_def, optimizer)
    mesh = ash.make_mesh(mesh_shape, devices=jax.devices()[:8])
    batch = model.make_batch(cfg, 8, seed=0)
    axes = tuple(mesh.axis_names)
    specs = (presets.param_specs("gpt", params, strategy, axes, dict(mesh.shape)), None,
             presets.batch_specs("gpt", batch, strategy, axes))
    pstep = ash.parallelize(step, mesh=mesh, in_specs=specs, donate_argnums=(0, 1))
    opt_state = optimizer.init(params)
    ref_step = jax.jit(step)
    # A copy: params/opt_state are donated to pstep (on one process the placed params can share
    # device 0's buffer with the originals).
    ref = jax.device_put(jax.tree.map(lambda x: np.array(x, copy=True), (params, opt_state)), jax.local_devices()[0])
    batch_sh = pstep.input_shardings(params, opt_state, batch)[2]
    losses, ref_losses = [], []
    for i in range(steps):
        batch = model.make_batch(cfg, 8, seed=i)
        if multi:    # this process's rows only -> jax.make_array_from_process_local_data
            placed = jax.tree.map(lambda x, s: distributed.global_array(distributed.local_slice(x, s), s, x.shape),
                                  batch, batch_sh)
        else:
            placed = batch
        loss, params, opt_state = pstep(params, opt_state, placed)
        ref_loss, *ref = ref_step(*ref, batch)
        losses.append(float(loss))
        ref_losses.append(float(ref_loss))
    assert pstep.trace_count == 1
    return losses, ref_losses, jax.process_count()


def _worker():
    losses, ref_losses, n = train_losses()
    import jax
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": n, "devices": jax.device_count(),
                                  "local_devices": jax.local_device_count(), "losses": losses,
                                  "ref_losses": ref_losses}), flush=True)


def _small_worker():
    """A small function across 2 processes: process-local rows in, the one-device result out;
    then a call whose shapes differ between the processes is a clear error, not a hang."""
    from autoshard.runtime import distributed
    assert distributed.initialize()
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import autoshard as ash
    f = lambda x, w: jax.nn.relu(x @ w).sum(axis=1)
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=2,model=4"), in_specs=(P("data", None), P(None, "model")))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 32)).astype(np.float32)
    sx = pf.input_shardings(x, w)[0]
    assert distributed.local_index(sx, x.shape) == (slice(4 * jax.process_index(), 4 * jax.process_index() + 4),
                                                    slice(0, 16))
    gx = distributed.global_array(distributed.local_slice(x, sx), sx, x.shape)
    out = pf(gx, w)                                   # w: NumPy every process holds whole
    np.testing.assert_allclose(distributed.to_host(out), jax.jit(f)(x, w), rtol=1e-5, atol=1e-5)
    # Each process runs a program for the first time (the check runs before a program's first
    # run on each process; a process that hits its cache does not communicate).
    fresh = ash.parallelize(f, mesh=pf.mesh, in_specs=pf.in_specs)
    try:
        fresh(np.ones((8 * (1 + jax.process_index()), 16), np.float32), w)
    except ash.ShardingError as e:
        print("MISMATCH " + str(e).splitlines()[0], flush=True)
    print("RESULT " + json.dumps({"process": jax.process_index(), "traces": pf.trace_count}), flush=True)


def _launch(cmd, processes=2, devices=4, timeout=240, extra=()):
    argv = [sys.executable, "-m", "autoshard.cli", "launch", "--processes", str(processes),
            "--devices-per-process", str(devices), "--timeout", str(timeout), *extra, "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)


def _multiprocess_unavailable(out: str) -> str | None:
    """The reason this platform cannot run multi-process JAX, if the output says so."""
    for needle in ("Address family not supported", "Cannot assign requested address", "Permission denied",
                   "Operation not permitted", "gloo is not available", "UNIMPLEMENTED"):
        if needle in out:
            return needle
    return None


def test_two_processes_match_one_process_with_eight_devices():
    t0 = time.perf_counter()
    run = _launch([sys.executable, os.path.abspath(__file__), "worker"])
    out = run.stdout + run.stderr
    if run.returncode != 0 and (why := _multiprocess_unavailable(out)):
        pytest.skip(f"this platform cannot run multi-process JAX on 127.0.0.1 ({why}):\n{out[-2000:]}")
    assert run.returncode == 0, out[-6000:]
    results = {}
    for line in run.stdout.splitlines():
        if "RESULT " in line:
            prefix, payload = line.split("RESULT ", 1)
            r = json.loads(payload)
            assert prefix == f"[p{r['process']}] "            # the launcher's prefix names the process
            results[r["process"]] = r
    assert sorted(results) == [0, 1], run.stdout[-3000:]
    for r in results.values():
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
    multi_seconds = time.perf_counter() - t0

    # The same program in this process, on its 8 simulated devices.
    losses, ref_losses, n = train_losses()
    assert n == 1
    print(f"2x4 processes: {multi_seconds:.1f} s; losses {results[0]['losses']}; 1x8: {losses}")
    # Both processes see the same replicated loss, bit for bit.
    assert results[0]["losses"] == results[1]["losses"]
    # Same program, same device count: equal up to the summation order of gloo's all-reduce
    # (measured: within 1 float32 ulp, ~1e-7 relative, from step 0 on; bit-identical step 0
    # on one install, not on another with the same jax: no bitwise claim).
    for got, want in zip(results[0]["losses"], losses):
        assert abs(got - want) <= 1e-6 * abs(want), (results[0]["losses"], losses)
    # And against one device (float tolerance).
    for got, want in zip(results[0]["losses"], ref_losses):
        assert abs(got - want) <= 1e-5 * abs(want)
    assert results[0]["ref_losses"] == ref_losses


def test_launcher_stops_the_others_and_reports_the_failure():
    code = textwrap.dedent("""
        import os, sys, time
        if os.environ["AUTOSHARD_PROCESS_ID"] == "1":
            print("failing", os.environ["AUTOSHARD_COORDINATOR"], os.environ["AUTOSHARD_NUM_PROCESSES"],
                  os.environ["XLA_FLAGS"], flush=True)
            sys.exit(3)
        time.sleep(120)
    """)
    t0 = time.perf_counter()
    run = _launch([sys.executable, "-c", code], timeout=100)
    assert run.returncode == 3, run.stdout + run.stderr
    assert time.perf_counter() - t0 < 30               # process 0 was stopped, not waited for
    (line,) = [ln for ln in run.stdout.splitlines() if "failing" in ln]
    assert line.startswith("[p1] failing 127.0.0.1:") and " 2 " in line
    assert "--xla_force_host_platform_device_count=4" in line
    assert "process 1 exited with status 3" in run.stderr


def test_launcher_timeout_and_usage():
    run = _launch([sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert run.returncode == 124, run.stdout + run.stderr
    assert "timed out" in run.stderr
    run = subprocess.run([sys.executable, "-m", "autoshard.cli", "launch", "--processes", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "after '--'" in run.stderr


GLOO_LINE = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"


# What runs printed when two gloo communicators opened at once: the line written in pieces by two
# threads, with the rest of one copy pushed onto the next line.
INTERLEAVED_GLOO = ("[Gloo] Rank 0[Gloo] Rank 0 is connected to  is connected to 11 peer ranks.  peer ranks. "
                    "Expected number of connected peer ranks is : Expected number of connected peer ranks is : 1",
                    "1",
                    "[Gloo] Rank [Gloo] Rank 2 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3",
                    "3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3")


def test_transport_log_filter_drops_interleaved_gloo_lines_and_keeps_the_users():
    from autoshard.runtime.distributed import TransportLogFilter
    lines = [GLOO_LINE, *INTERLEAVED_GLOO, "1", "[Gloo] Rank 0[Gloo] Rank 1 said something else", "7", "hello"]
    drops = TransportLogFilter()
    kept = [ln for ln in lines if not drops.drops(ln + "\n")]
    # the user's own "1" after the stray count, a line that only starts like gloo's, and the
    # count after it are kept
    assert kept == ["1", "[Gloo] Rank 0[Gloo] Rank 1 said something else", "7", "hello"]


@pytest.mark.parametrize("verbose", [False, True])
def test_launcher_shows_transport_log_lines_only_when_verbose(verbose):
    code = f"print({GLOO_LINE!r}); print('hello', flush=True)"
    run = _launch([sys.executable, "-c", code], timeout=60, extra=("--verbose",) if verbose else ())
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert sorted(ln for ln in lines if "hello" in ln) == ["[p0] hello", "[p1] hello"]
    assert sorted(ln for ln in lines if "[Gloo]" in ln) == ([f"[p{i}] {GLOO_LINE}" for i in (0, 1)] if verbose else [])


def test_process_local_rows_and_a_shape_mismatch_between_processes():
    run = _launch([sys.executable, os.path.abspath(__file__), "small"], timeout=150)
    out = run.stdout + run.stderr
    if run.returncode != 0 and (why := _multiprocess_unavailable(out)):
        pytest.skip(f"this platform cannot run multi-process JAX on 127.0.0.1 ({why})")
    assert run.returncode == 0, out[-5000:]
    assert "[Gloo]" not in out                        # gloo's connection lines: only with --verbose
    for p in (0, 1):
        (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith(f"[p{p}] MISMATCH ")]
        assert "processes [1] called it with other input shapes, dtypes or structure than process 0" in line
        assert f"this is process {p}: float32[{8 * (1 + p)}, 16]" in line
        assert f'[p{p}] RESULT {{"process": {p}, "traces": 1}}' in run.stdout


@pytest.mark.slow
def test_demo_under_the_launcher():
    run = _launch(["autoshard", "demo", "--steps", "3"], timeout=400)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "[p0] OK: largest relative loss difference" in run.stdout
    assert "2 processes x 4 devices" in run.stdout
    assert not any(line.startswith("[p1] ") and "loss" in line for line in run.stdout.splitlines())


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    {"worker": _worker, "small": _small_worker}[sys.argv[1]]()
