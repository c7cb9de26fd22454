"""The reference GPT train step on one device: ``ash.parallelize`` against ``jax.jit``.

Issue #15, item 4. Runs the bf16 GPT step (adamw, parameters and optimizer state donated)
on a 1-device mesh through ``autoshard.parallelize`` and through ``jax.jit``; checks that one
step from the same state gives the same loss and parameters (within bf16 rounding); times
both, interleaved (warm-up, then rounds alternating the two, median per step with
``block_until_ready``); asserts that parallelize's median is within ``--tolerance`` (2%) of
jit's; prints a markdown row for benchmarks/RESULTS.md (``--append`` writes it there).

The size fills the device: ``d_model`` 2048, 16 layers, 16 heads, sequence 2048, vocabulary
32768 (0.94 B parameters) and the largest batch the memory formulas below allow, checked
against XLA's ``memory_analysis()`` of the compiled step before anything runs (the batch
shrinks until it fits).

Usage::

    python benchmarks/gpu_step.py                     # on a GPU: the full size
    python benchmarks/gpu_step.py --append benchmarks/RESULTS.md
    python benchmarks/gpu_step.py --small             # tiny, anywhere (CPU: a smoke test)
    python benchmarks/gpu_step.py --d-model 4096 --layers 24 --seq 2048 --batch 4

Memory per device (bytes), P parameters, bf16 everything, batch B, sequence T, width D,
H heads, L layers, vocabulary V:

* state, donated in place: parameters + adam mu + nu = 6P; gradients and updates: 4P; a
  second copy of the state (the two paths are timed interleaved): 6P.
* activations kept for backward: L * (34 T D + 5 H T^2) per sequence (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1, 16-bit
  activations without recomputation: a slight overestimate here, the GPT has no dropout);
  logits: T V (2 bf16 + 4 f32 upcast + 4 log-softmax + 4 one-hot) = 14 T V per sequence.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
# Let XLA take most of the GPU (its default preallocation is 75%); read before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import autoshard as ash  # noqa: E402
from autoshard.compiler.hardware import hardware_for  # noqa: E402
from autoshard.models import get_model  # noqa: E402

GiB = 1024 ** 3
FULL = dict(d_model=2048, layers=16, heads=16, seq=2048, vocab=32768)
SMALL = dict(d_model=64, layers=2, heads=4, seq=32, vocab=128, batch=4)
HEADER = ("| device | jax | model (D, L, H, T, V) | params | batch x seq | loss jit | loss ours | max abs param diff "
          "| jit ms | ours ms | ours/jit | TFLOP/s (MFU) | date |")


def memory_model(cfg, params: int, batch: int) -> dict:
    d, L, h, t, v = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len, cfg.vocab_size
    per_seq = L * (34 * t * d + 5 * h * t * t) + 14 * t * v
    return {"state (params + mu + nu)": 6 * params, "gradients + updates": 4 * params,
            "second state (interleaved timing)": 6 * params, "activations + logits": batch * per_seq,
            "per sequence": per_seq}


def step_flops(cfg, params: int, batch: int) -> float:
    """Model FLOPs of one train step: 6 per parameter per token, plus attention's
    ``QK^T`` and ``PV`` (4 B T^2 D per layer forward, x3 with backward)."""
    tokens = batch * cfg.seq_len
    return 6.0 * params * tokens + 12.0 * cfg.n_layers * batch * cfg.seq_len ** 2 * cfg.d_model


def device_memory(device, small: bool) -> tuple[int, str]:
    stats = {}
    try:
        stats = device.memory_stats() or {}
    except Exception:                       # noqa: BLE001 - CPU devices may not report
        pass
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    return (1 * GiB, "assumed 1 GiB (--small)") if small else (78 * GiB, "assumed 78 GiB (no memory_stats)")


def analysed_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:                       # noqa: BLE001 - not every backend reports it
        return None


def tree_max_abs_diff(a, b) -> float:
    diffs = [float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(diffs) if diffs else 0.0


def assert_params_close(got, want, lr: float):
    """bf16 parameters: one rounding step of the parameter's own size (2^-7 relative) plus the
    Adam noise allowance of the design notes (0.1 lr absolute)."""
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=2 ** -7, atol=0.1 * lr + 1e-6)


def timed_steps(fn, state, batch, n: int) -> tuple[list[float], tuple]:
    params, opt_state = state
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss, params, opt_state = fn(params, opt_state, batch)
        jax.block_until_ready((loss, params, opt_state))
        times.append(time.perf_counter() - t0)
    return times, (params, opt_state)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model: a smoke test on any device (CPU included)")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--batch", type=int, help="default: the largest that fits (formulas, then memory_analysis)")
    ap.add_argument("--unrolled", action="store_true", help="unroll the layers instead of one scan over them")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per path after compiling")
    ap.add_argument("--rounds", type=int, default=4, help="timing rounds, alternating jit and parallelize")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path per round")
    ap.add_argument("--tolerance", type=float, default=0.02, help="allowed |ours/jit - 1| of the medians")
    ap.add_argument("--no-assert", action="store_true", help="report the timing ratio without asserting it")
    ap.add_argument("--append", metavar="RESULTS.md", help="append the markdown row to this file")
    ap.add_argument("--memory-gib", type=float, help="device memory to size for (default: the device's own)")
    ap.add_argument("--dry-run", action="store_true", help="print the size and memory plan, run nothing")
    args = ap.parse_args(argv)

    device = jax.devices()[0]
    kind = device.device_kind
    base = SMALL if args.small else FULL
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else base[key]
    m = get_model("gpt")
    cfg = m.Config(vocab_size=pick("vocab", "vocab"), d_model=pick("d_model", "d_model"),
                   n_heads=pick("heads", "heads"), n_layers=pick("layers", "layers"), seq_len=pick("seq", "seq"),
                   dtype=jnp.bfloat16, scan_layers=not args.unrolled)
    from autoshard.models.gpt import param_count
    n_params = param_count(cfg)
    limit, limit_from = device_memory(device, args.small)
    if args.memory_gib:
        limit, limit_from = int(args.memory_gib * GiB), "--memory-gib"
    budget = int(0.9 * limit)
    mem1 = memory_model(cfg, n_params, 1)
    fixed = sum(v for k, v in mem1.items() if k not in ("activations + logits", "per sequence"))
    if args.batch is not None:
        batch = args.batch
    elif args.small:
        batch = SMALL["batch"]
    else:
        batch = max(1, (budget - fixed) // mem1["per sequence"])
    hw = hardware_for(kind)
    print(f"device: {kind} ({device.platform}); memory {limit / GiB:.1f} GiB ({limit_from}), budget 90%: "
          f"{budget / GiB:.1f} GiB; table: {hw.name}{' (fallback)' if hw.fallback else ''}, bf16 peak "
          f"{hw.bf16_flops.value / 1e12:g} TFLOP/s")
    print(f"model: GPT d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} seq={cfg.seq_len} "
          f"vocab={cfg.vocab_size} bf16, {'scanned' if cfg.scan_layers else 'unrolled'} layers: "
          f"{n_params / 1e6:.3f} M parameters")
    for k, v in memory_model(cfg, n_params, batch).items():
        print(f"  {k:36s} {v / GiB:10.4f} GiB")
    print(f"  batch {batch} x seq {cfg.seq_len}: estimated {(fixed + batch * mem1['per sequence']) / GiB:.2f} GiB; "
          f"{step_flops(cfg, n_params, batch) / 1e12:.1f} TFLOP per step")
    if args.dry_run:
        return 0

    mesh = ash.make_mesh({"data": 1}, devices=[device])
    calib = ash.calibrate(mesh, repeats=3)        # one device: the matmul rate only
    print(f"calibrate: {calib.matmul_size}^3 {calib.matmul_dtype} matmul at {calib.matmul_flops / 1e12:.3g} TFLOP/s "
          f"({calib.matmul_flops / hw.bf16_flops.value:.0%} of the table's bf16 peak) in {calib.seconds_taken:.1f} s")

    model_def, params = m.init(cfg, seed=0)
    optimizer = m.default_optimizer()
    lr = 1e-3
    step = m.make_train_step(model_def, optimizer)
    host_params = jax.device_get(params)
    host_opt = jax.device_get(optimizer.init(params))
    del params

    placement = {"jit": (device, device)}

    def fresh(path):
        """A new device copy of the initial state, placed as ``path`` takes it."""
        params_at, opt_at = placement[path]
        return jax.device_put(host_params, params_at), jax.device_put(host_opt, opt_at)

    jitted = jax.jit(step, donate_argnums=(0, 1))
    ours = ash.parallelize(step, mesh=mesh, in_specs=(None, None, None), donate_argnums=(0, 1))

    # The batch from the formulas, checked against what XLA will allocate (shrunk until it fits).
    while True:
        batch_arrays = m.make_batch(cfg, batch, seed=0)
        abstract = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_params),
                    jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host_opt),
                    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch_arrays))
        t0 = time.perf_counter()
        jit_compiled = jitted.lower(*abstract).compile()
        jit_compile_s = time.perf_counter() - t0
        need = analysed_bytes(jit_compiled)
        extra = 6 * n_params                    # the second state, alive while timing interleaved
        print(f"  XLA memory_analysis (jit, batch {batch}): "
              + (f"{need / GiB:.2f} GiB + second state {extra / GiB:.2f} GiB" if need is not None else "n/a")
              + f"; compiled in {jit_compile_s:.1f} s")
        if need is None or need + extra <= budget or batch == 1 or args.batch is not None or args.small:
            break
        batch = max(1, int(batch * (budget - extra) / need))
        print(f"  does not fit: batch -> {batch}")
    batch_arrays = jax.device_put(batch_arrays, device)
    # jit's path runs the executable just compiled (what jax.jit would run: compiling it twice
    # costs a minute at the full size); parallelize's path is the ordinary call, its state
    # placed where it wants it (a single-device array is accepted as is, but jax.jit inside
    # then compiles once for it and once more for the mesh-placed outputs fed back).
    fns = {"jit": jit_compiled, "ours": ours}
    t0 = time.perf_counter()
    placement["ours"] = ours.input_shardings(*abstract)[:2]
    print(f"  parallelize: traced and planned in {time.perf_counter() - t0:.1f} s")

    # 1. Equal results: one step from the same state through each path.
    ref_loss, ref_params, _ = fns["jit"](*fresh("jit"), batch_arrays)
    ref_loss, ref_params = float(ref_loss), jax.device_get(ref_params)
    t0 = time.perf_counter()
    got_loss, got_params, _ = ours(*fresh("ours"), batch_arrays)
    got_loss, got_params = float(got_loss), jax.device_get(got_params)
    print(f"  parallelize: first call (compile, run) {time.perf_counter() - t0:.1f} s")
    diff = tree_max_abs_diff(got_params, ref_params)
    print(f"one step: loss jit {ref_loss:.6f}, parallelize {got_loss:.6f}; max |param diff| {diff:.3g}")
    np.testing.assert_allclose(got_loss, ref_loss, rtol=2e-3)
    assert_params_close(got_params, ref_params, lr)
    del ref_params, got_params

    # 2. Step times, interleaved so drift (clocks, other load) hits both alike.
    states = {"jit": fresh("jit"), "ours": fresh("ours")}
    times = {"jit": [], "ours": []}
    for name in ("jit", "ours"):
        _, states[name] = timed_steps(fns[name], states[name], batch_arrays, args.warmup)
    for r in range(args.rounds):
        for name in (("jit", "ours") if r % 2 == 0 else ("ours", "jit")):
            t, states[name] = timed_steps(fns[name], states[name], batch_arrays, args.steps)
            times[name] += t
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["jit"]
    flops = step_flops(cfg, n_params, batch)
    tflops = flops / med["ours"] / 1e12
    mfu = flops / med["ours"] / hw.bf16_flops.value
    print(f"median step over {len(times['jit'])} steps each: jit {med['jit'] * 1e3:.2f} ms, parallelize "
          f"{med['ours'] * 1e3:.2f} ms, ratio {ratio:.4f}; {flops / 1e12:.1f} TFLOP per step -> "
          f"{tflops:.1f} TFLOP/s ({100 * mfu:.1f}% of the table's bf16 peak)")

    row = (f"| {kind} | {jax.__version__} | {cfg.d_model}, {cfg.n_layers}, {cfg.n_heads}, {cfg.seq_len}, "
           f"{cfg.vocab_size} | {n_params / 1e9:.3f} B | {batch} x {cfg.seq_len} | {ref_loss:.5f} | {got_loss:.5f} | "
           f"{diff:.2g} | {med['jit'] * 1e3:.2f} | {med['ours'] * 1e3:.2f} | {ratio:.4f} | {tflops:.1f} "
           f"({100 * mfu:.1f}%) | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} |")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    print(row)
    if args.append:
        with open(args.append, "a+") as f:
            f.seek(0)
            text = f.read()
            if HEADER not in text:
                f.write("\n## One device: parallelize against jax.jit (benchmarks/gpu_step.py)\n\n"
                        "GPT train step, bf16, adamw, state donated; median step of interleaved rounds. "
                        "Command: `python benchmarks/gpu_step.py --append benchmarks/RESULTS.md`.\n\n"
                        + HEADER + "\n|" + "---|" * (HEADER.count(" | ") + 1) + "\n")
            f.write(row + "\n")
    if args.small or args.no_assert:
        print(f"timing ratio not asserted ({'--small: a smoke test' if args.small else '--no-assert'})")
        return 0
    if abs(ratio - 1.0) > args.tolerance:
        print(f"FAIL: parallelize's step is {ratio:.4f}x jit's, outside {args.tolerance:.0%}")
        return 1
    print(f"OK: within {args.tolerance:.0%} of jit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
