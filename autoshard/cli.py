"""Command line: ``autoshard demo``, ``autoshard report`` and ``autoshard launch``.

JAX reads ``XLA_FLAGS`` when its backend starts, so the flags for simulated CPU devices are
set here before anything imports jax (appended to flags already set, never replacing them).

``autoshard report`` has two forms:

* ``autoshard report --model gpt --mesh data=2,model=4 --strategy dp_tp --html out.html --json out.json``:
  a reference model's train step under a preset strategy.
* ``autoshard report path/to/file.py:function --mesh data=2,model=4 --in-specs "P('data',None),P(None,'model')"
  --shapes "f32[8,16],f32[16,32]"``: a user's function, traced on the abstract shapes given
  (``module.path:function`` works too). ``--shapes`` and ``--in-specs`` are Python-literal
  lists with one entry per positional argument; entries may be pytrees
  (``{'w': f32[16,32], 'b': f32[32]}``), shapes are ``DTYPE[d0,d1,...]`` (``f32[]`` is a scalar).
"""
from __future__ import annotations

import argparse
import csv
import ast
import importlib
import importlib.util
import math
import os
import re
import sys


def _ensure_cpu_devices(n: int) -> None:
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def _mesh_size(text: str) -> int:
    from .compiler.mesh import parse_mesh_shape
    return math.prod(parse_mesh_shape(text).values())


class UsageError(ValueError):
    """Bad command-line input; the message says what to write instead."""


# ------------------------------------------------------------------ literal parsing

_DTYPES = {
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "bool": "bool", "pred": "bool",
}
_DTYPES.update({v: v for v in list(_DTYPES.values())})


def _literal(text: str, what: str, allow_shapes: bool):
    """Evaluate a Python literal of tuples/lists/dicts/None/strings, ``P(...)`` calls and (when
    ``allow_shapes``) ``f32[8,16]`` shapes, without ``eval``. Returns a tuple of entries."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    src = re.sub(r"\[\s*\]", "[()]", text) if allow_shapes else text
    try:
        tree = ast.parse(src.strip(), mode="eval").body
    except SyntaxError as e:
        raise UsageError(f"{what} {text!r} is not a Python literal ({e.msg}); write it like "
                         + ("\"f32[8,16],f32[16,32]\"" if allow_shapes else "\"P('data',None),P(None,'model')\"")) from None

    def ev(node):
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int))):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("P", "PartitionSpec") \
                and not node.keywords:
            return PartitionSpec(*(ev(a) for a in node.args))
        if allow_shapes and isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in _DTYPES:
            dims = ev(node.slice)
            dims = dims if isinstance(dims, tuple) else (dims,)
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                raise UsageError(f"{what}: shape {ast.unparse(node)} must list non-negative integers")
            return jax.ShapeDtypeStruct(dims, jnp.dtype(_DTYPES[node.value.id]))
        raise UsageError(f"{what}: {ast.unparse(node)!r} is not allowed here; use P(...), None, strings, "
                         + ("DTYPE[dims] shapes (dtypes: " + ", ".join(sorted(k for k in _DTYPES if len(k) <= 4)) + "), "
                            if allow_shapes else "") + "tuples, lists and dicts")

    value = ev(tree)
    return value if isinstance(value, tuple) else (value,)


_TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}      # divisors (exact for 25us)
_BW_UNITS = {"tb/s": 1e12, "gb/s": 1e9, "mb/s": 1e6, "kb/s": 1e3, "b/s": 1.0}


def parse_link(text: str):
    """``data=25us,12.5GB/s`` -> ``("data", LinkModel(25e-6, 12.5e9))``; bare numbers are us and GB/s."""
    from .compiler.cost_model import LinkModel
    m = re.fullmatch(r"\s*(\w+)\s*=\s*([\d.eE+-]+)\s*([a-z]*)\s*,\s*([\d.eE+-]+)\s*([A-Za-z/]*)\s*", text)
    if not m:
        raise UsageError(f"--link {text!r}: write AXIS=LATENCY,BANDWIDTH, e.g. data=25us,12.5GB/s")
    axis, lat, lat_u, bw, bw_u = m.groups()
    if (lat_u or "us") not in _TIME_UNITS or (bw_u.lower() or "gb/s") not in _BW_UNITS:
        raise UsageError(f"--link {text!r}: latency units are {sorted(_TIME_UNITS)}, bandwidth units "
                         f"{sorted(_BW_UNITS)} (bytes per second)")
    return axis, LinkModel(float(lat) / _TIME_UNITS[lat_u or "us"], float(bw) * _BW_UNITS[bw_u.lower() or "gb/s"])


def parse_roles(text: str) -> dict:
    """``0=parameters,1=optimizer state,2=batch`` -> ``{0: 'parameters', ...}``."""
    from .report import ROLES
    roles = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, role = part.partition("=")
        if not k.strip().isdigit() or role.strip() not in ROLES:
            raise UsageError(f"--roles {text!r}: write INDEX=ROLE pairs, roles one of {ROLES}")
        roles[int(k)] = role.strip()
    return roles


def load_target(target: str):
    """``path/to/file.py:function`` or ``package.module:function`` (dotted attributes allowed)."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"target {target!r}: write path/to/file.py:function or package.module:function")
    if where.endswith(".py") or os.path.sep in where or os.path.exists(where):
        path = os.path.abspath(where)
        if not os.path.exists(path):
            raise UsageError(f"target {target!r}: no file {path}")
        name = "autoshard_target_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        module = importlib.import_module(where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"target {target!r}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"target {target!r} is not callable")
    return obj


# ------------------------------------------------------------------------ commands

def _setup(args):
    """Model, params, optimizer state, batch, specs and the train step for ``args``."""
    import jax

    from . import make_mesh
    from .models import get_model, presets
    mesh = make_mesh(args.mesh, devices=jax.devices()[:_mesh_size(args.mesh)])
    model = get_model(args.model)
    axes = tuple(mesh.axis_names)
    auto = args.strategy == "auto"
    cfg = model.Config() if auto else presets.configure(args.model, model.Config(), args.strategy, axes)
    model_def, params = model.init(cfg, seed=0)
    optimizer = model.default_optimizer()
    step = model.make_train_step(model_def, optimizer)
    batch = model.make_batch(cfg, args.batch, seed=0)
    if auto:   # only the batch is annotated: its leading dim over the mesh's first axis
        batch_specs = jax.tree.map(lambda x: jax.sharding.PartitionSpec(axes[0]), batch)
        return mesh, model, cfg, params, optimizer, step, batch, (None, None, batch_specs)
    param_specs = presets.param_specs(args.model, params, args.strategy, axes, dict(mesh.shape))
    batch_specs = presets.batch_specs(args.model, batch, args.strategy, axes)
    return mesh, model, cfg, params, optimizer, step, batch, (param_specs, None, batch_specs)


def _parallel_options(args) -> dict:
    """``parallelize`` keyword arguments for ``--strategy auto`` (none for presets)."""
    if getattr(args, "strategy", None) != "auto":
        return {}
    options = {"compute_rate": args.compute_rate} if args.compute_rate else {}
    return {"auto": options or True, "memory_budget": args.memory_budget}


def _compare_with_presets(args, rep, mesh, model, step, params, optimizer, batch) -> None:
    """Print the auto plan's estimated step time next to every preset that fits the mesh."""
    from . import parallelize
    from .models import presets
    axes = tuple(mesh.axis_names)
    rate = rep.program.search_compute_rate
    print(f"auto plan against the presets (estimated step: compute at {rate:.3g} points/s per device "
          f"+ collectives under the link models):")
    print(f"  auto: {rep.estimated_step_seconds()['total_s'] * 1e3:.3f} ms, "
          f"{rep.total_wire_bytes / 1024:.1f} KiB on the wire per device")
    for strategy in presets.strategies(args.model):
        if not set(presets.required_axes(strategy)) <= set(axes):
            continue
        cfg = presets.configure(args.model, model.Config(), strategy, axes)
        if cfg != model.Config():
            continue          # sp annotates activations too: not comparable on parameters alone
        specs = (presets.param_specs(args.model, params, strategy, axes, dict(mesh.shape)), None,
                 presets.batch_specs(args.model, batch, strategy, axes))
        other = parallelize(step, mesh=mesh, in_specs=specs).report(params, optimizer.init(params), batch)
        print(f"  {strategy}: {other.estimated_step_seconds(rate)['total_s'] * 1e3:.3f} ms, "
              f"{other.total_wire_bytes / 1024:.1f} KiB")


def demo(args) -> int:
    import jax
    import numpy as np

    from . import parallelize
    from .runtime import distributed
    # Under `autoshard launch` this joins the other processes (before JAX starts its backend);
    # alone it does nothing. The mesh then spans every process's devices.
    multi = distributed.initialize()
    say = print if not multi or jax.process_index() == 0 else (lambda *a, **k: None)
    mesh, model, cfg, params, optimizer, step, batch, in_specs = _setup(args)
    pstep = parallelize(step, mesh=mesh, in_specs=in_specs, **_parallel_options(args))
    opt_state = optimizer.init(params)
    procs = f", {jax.process_count()} processes x {jax.local_device_count()} devices" if multi else ""
    say(f"autoshard demo: {args.model} on mesh {dict(mesh.shape)} ({jax.devices()[0].platform}{procs}), "
        f"strategy {args.strategy}, {args.steps} steps")
    say(pstep.report(params, opt_state, batch).summary())

    def global_batch(b):
        """Each process loads only its rows of the batch (here: sliced from the seeded whole)."""
        if not multi:
            return b
        shardings = pstep.input_shardings(params, opt_state, b)[2]
        return jax.tree.map(lambda x, s: distributed.global_array(distributed.local_slice(x, s), s, x.shape),
                            b, shardings)

    # The 1-device reference runs in every process on its own first device.
    ref_device = jax.local_devices()[0]
    ref_step = jax.jit(step)
    ref_params, ref_state = jax.device_put((params, opt_state), ref_device)
    worst = 0.0
    say(f"{'step':>4}  {'autoshard loss':>15}  {'1-device loss':>15}  {'rel diff':>9}")
    for i in range(args.steps):
        batch = model.make_batch(cfg, args.batch, seed=i)
        loss, params, opt_state = pstep(params, opt_state, global_batch(batch))
        ref_loss, ref_params, ref_state = ref_step(ref_params, ref_state, jax.device_put(batch, ref_device))
        rel = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-12)
        worst = max(worst, rel)
        say(f"{i:>4}  {float(loss):>15.6f}  {float(ref_loss):>15.6f}  {rel:>9.1e}")
    ok = worst <= args.rtol and bool(np.isfinite(worst))
    say(f"{'OK' if ok else 'MISMATCH'}: largest relative loss difference {worst:.1e} (tolerance {args.rtol:g})")
    return 0 if ok else 1


def launch(args) -> int:
    """``autoshard launch --processes N --devices-per-process D -- CMD ...``: CMD as N JAX
    processes on 127.0.0.1 (see ``autoshard.runtime.distributed.launch_local``)."""
    from .runtime.distributed import launch_local
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("autoshard launch: give the command after '--', e.g. "
                         "autoshard launch --processes 2 --devices-per-process 4 -- autoshard demo")
    try:
        return launch_local(cmd, processes=args.processes, devices_per_process=args.devices_per_process,
                            timeout_s=args.timeout, port=args.port, verbose=args.verbose)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _launch_parser(sub):
    la = sub.add_parser("launch", help="run a command as several JAX processes on this machine (127.0.0.1)",
                        description="Run CMD once per process with the coordinator address (127.0.0.1 and a free "
                                    "port), the process id and count in the environment and DEVICES simulated CPU "
                                    "devices each; output lines are prefixed [p<id>]. Exits non-zero (and stops "
                                    "the others) as soon as one process fails.")
    la.add_argument("--processes", type=int, default=2)
    la.add_argument("--devices-per-process", type=int, default=4)
    la.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped (exit 124)")
    la.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    la.add_argument("--verbose", action="store_true",
                    help="also print the transport's log lines (gloo's \"connected to N peer ranks\")")
    la.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...], e.g. -- autoshard demo --steps 5")


def _user_report(args):
    """The report of ``args.target`` traced on ``--shapes`` with ``--in-specs``."""
    import jax

    from . import abstract_mesh, make_mesh, parallelize
    from .runtime.executable import ParallelFunction
    if not args.shapes:
        raise UsageError("a function target needs --shapes, one abstract input per positional argument, "
                         "e.g. --shapes \"f32[8,16],f32[16,32]\"")
    fun = load_target(args.target)
    shapes = _literal(args.shapes, "--shapes", allow_shapes=True)
    in_specs = _literal(args.in_specs, "--in-specs", allow_shapes=False) if args.in_specs else None
    out_specs = _literal(args.out_specs, "--out-specs", allow_shapes=False) if args.out_specs else None
    if isinstance(fun, ParallelFunction):          # an @ash.parallelize'd function: keep its specs
        in_specs = in_specs if in_specs is not None else fun.in_specs
        out_specs = out_specs if out_specs is not None else fun.out_specs
        fun = fun.fun
    if out_specs is not None and len(out_specs) == 1:
        out_specs = out_specs[0]
    if args.abstract:
        mesh = abstract_mesh(args.mesh)
    else:
        mesh = make_mesh(args.mesh, devices=jax.devices()[:_mesh_size(args.mesh)])
    pf = parallelize(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     static_argnums=tuple(args.static_argnums))
    return pf.report(*shapes), {}


def _size_report(args):
    """``--model gpt --size 1t``: plan a large GPT on an abstract mesh (no devices, nothing
    materialized: parameters, optimizer state and batch are ``jax.ShapeDtypeStruct`` trees)."""
    import jax

    from . import abstract_mesh, parallelize
    from .models import gpt, presets
    if args.model != "gpt":
        raise UsageError(f"--size is for --model gpt (sizes {sorted(gpt.SIZES)}), not {args.model!r}")
    if args.size not in gpt.SIZES:
        raise UsageError(f"--size {args.size!r}: sizes are {sorted(gpt.SIZES)}")
    mesh = abstract_mesh(args.mesh)
    axes, shape = tuple(mesh.axis_names), dict(mesh.shape)
    cfg = presets.configure("gpt", gpt.SIZES[args.size], args.strategy, axes)
    model_def, params = gpt.abstract_init(cfg)
    optimizer = gpt.default_optimizer()
    opt_state = jax.eval_shape(optimizer.init, params)
    # Default global batch: one sequence per group of devices that shares a batch shard.
    batch_size = args.batch or max(1, math.prod(shape.values()) // shape.get(presets.MODEL_AXIS, 1))
    batch = gpt.abstract_batch(cfg, batch_size)
    in_specs = (presets.param_specs("gpt", params, args.strategy, axes, shape), None,
                presets.batch_specs("gpt", batch, args.strategy, axes))
    pstep = parallelize(gpt.make_train_step(model_def, optimizer), mesh=mesh, in_specs=in_specs)
    print(f"gpt {args.size}: {gpt.param_count(cfg) / 1e9:.3g}B parameters, batch {batch_size} x "
          f"{cfg.seq_len} tokens, strategy {args.strategy}, abstract mesh {shape} "
          f"({math.prod(shape.values())} devices)")
    return pstep.report(params, opt_state, batch), {0: "parameters", 1: "optimizer state", 2: "batch"}


def _model_report(args):
    from . import parallelize
    if getattr(args, "size", None):
        return _size_report(args)
    mesh, model, cfg, params, optimizer, step, batch, in_specs = _setup(args)
    pstep = parallelize(step, mesh=mesh, in_specs=in_specs, **_parallel_options(args))
    rep = pstep.report(params, optimizer.init(params), batch)
    if args.strategy == "auto":
        _compare_with_presets(args, rep, mesh, model, step, params, optimizer, batch)
    return rep, {0: "parameters", 1: "optimizer state", 2: "batch"}


def report(args) -> int:
    from .report.fmt import fmt_bytes
    rep, roles = _user_report(args) if args.target else _model_report(args)
    links = dict(parse_link(t) for t in args.link)
    roles.update(parse_roles(args.roles) if args.roles else {})
    if links or roles:
        rep = rep.with_options(links=links, roles=roles)
    xla = not (args.no_xla or args.abstract or args.size)
    mem = rep.memory(compiled=xla)
    if args.full:
        print(rep)
    else:
        print(rep.summary())
        line = (f"memory per device: parameters {fmt_bytes(mem['parameters'])}, optimizer state "
                f"{fmt_bytes(mem['optimizer_state'])}, batch {fmt_bytes(mem['batch'])}, other inputs "
                f"{fmt_bytes(mem['other_inputs'])}, activations ~{fmt_bytes(mem['activations_peak'])} (estimated)")
        line += (f"; gradients {fmt_bytes(mem['gradients'])}, activations kept for backward "
                 f"{fmt_bytes(mem['activations_for_backward'])}, largest temporary "
                 f"{fmt_bytes(mem['largest_temporary'])}, temporaries peak {fmt_bytes(mem['temporaries_peak'])}; "
                 f"step total ~{fmt_bytes(mem['step_total'])}")
        if "xla" in mem:
            x = mem["xla"]
            line += (f"; XLA: arguments {fmt_bytes(x['argument_size_in_bytes'])}, outputs "
                     f"{fmt_bytes(x['output_size_in_bytes'])}, temporaries {fmt_bytes(x['temp_size_in_bytes'])}")
        print(line)
        for axes, c in rep.communication().items():
            print(f"communication over {axes}: {c['collectives']} collectives, {c['runs']} runs per step, "
                  f"{fmt_bytes(c['wire_bytes'])} per device per step, ~{c['time_s'] * 1e3:.2f} ms")
        for w in rep.warnings:
            print(f"warning [{w.kind}] {w.message}\n  fix: {w.fix}")
    for name in args.explain:
        print(rep.explain(name))
    if args.json:
        rep.to_json(args.json)
        print(f"wrote {args.json}")
    if args.html:
        rep.to_html(args.html)
        print(f"wrote {args.html}")
    return 0


def _bench_parser(sub):
    b = sub.add_parser("bench", help="autoshard against jax.jit and the analytic minimum; writes "
                                     "benchmarks/RESULTS.md and results.csv")
    b.add_argument("--out", default="benchmarks", help="folder for RESULTS.md and results.csv")
    b.add_argument("--models", nargs="*", help="subset of gpt mlp moe cnn (default: all)")
    b.add_argument("--strategies", nargs="*", help="subset of strategies (default: every one a model has)")
    b.add_argument("--meshes", nargs="*", default=["8", "2x4"], choices=("8", "2x4"))
    b.add_argument("--scaling-layers", type=int, nargs="*", default=[2, 4, 8, 16, 32, 64],
                   help="GPT depths for the pass-time scaling study (none: skip it)")
    b.add_argument("--reference-layers", type=int, default=12,
                   help="GPT depth for passes against XLA compile time (0: skip)")
    b.add_argument("--auto-layers", type=int, nargs="*", default=[12, 24],
                   help="GPT depths for auto=True against the presets and its search time (none: skip)")
    b.add_argument("--zoo", action="store_true",
                   help="only the third-party model zoo (tests/zoo) against jax.jit: replaces the zoo "
                        "section of RESULTS.md and writes zoo.csv")


def bench(args) -> int:
    """Run the benchmark suite; write the markdown and CSV; exit 1 if a check fails."""
    from . import benchmark
    from .benchmark import zoo
    command = "autoshard bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "autoshard bench"
    results_path = os.path.join(args.out, "RESULTS.md")
    previous = open(results_path).read() if os.path.exists(results_path) else ""
    os.makedirs(args.out, exist_ok=True)
    if args.zoo:
        table, records, checks = zoo.zoo_table(progress=lambda line: print(line, flush=True))
        with open(results_path, "w") as f:
            f.write(zoo.with_section(previous, zoo.zoo_section(table, command.strip(), checks)))
        with open(os.path.join(args.out, "zoo.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        print(table)
        for c in checks:
            print(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
        return 0 if all(c.passed for c in checks) else 1
    result = benchmark.run(models=args.models, meshes=tuple(args.meshes), strategies=args.strategies,
                           scaling_layers=tuple(args.scaling_layers),
                           reference_layers=args.reference_layers, auto_layers=tuple(args.auto_layers),
                           progress=lambda line: print(line, flush=True))
    markdown = zoo.with_section(benchmark.results_markdown(result, command.strip()),
                                zoo.existing_section(previous))
    with open(results_path, "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "results.csv"), "w") as f:
        f.write(benchmark.write_csv(result["rows"]))
    print(markdown)
    return 0 if all(c.passed for c in result["checks"]) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autoshard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        # Literal lists: importing autoshard.models would start JAX before XLA_FLAGS is set.
        p.add_argument("--model", default="gpt", choices=("gpt", "mlp", "moe", "cnn"))
        p.add_argument("--mesh", default="data=2,model=4", help="mesh shape, e.g. data=2,model=4")
        p.add_argument("--strategy", default="dp_tp",
                       choices=("dp", "fsdp", "tp", "dp_tp", "sp", "ep", "fsdp_tp", "auto"),
                       help="a preset, or auto: only the batch annotated, the rest chosen by the MILP search")
        p.add_argument("--compute-rate", type=float, default=None,
                       help="auto: per-device work rate of the cost model, points per second (default 1e12)")
        p.add_argument("--memory-budget", type=int, default=None,
                       help="auto: bytes per device for the step's inputs, outputs and "
                            "activations kept for backward")
        p.add_argument("--batch", type=int, default=None, help="global batch (default 8; with --size: "
                                                                "one sequence per batch shard)")

    d = sub.add_parser("demo", help="train a small model on simulated devices and check it against one device")
    common(d)
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--rtol", type=float, default=1e-4)

    r = sub.add_parser("report", help="the sharding report of a reference model's train step or of your function",
                       description="Print the sharding report of a reference model's train step (--model) or of "
                                   "TARGET, a function traced on the abstract shapes given by --shapes.")
    r.add_argument("target", nargs="?", help="path/to/file.py:function or package.module:function")
    common(r)
    r.add_argument("--shapes", help="abstract inputs, one per positional argument: \"f32[8,16],f32[16,32]\"")
    r.add_argument("--in-specs", help="one entry per positional argument: \"P('data',None),P(None,'model')\"")
    r.add_argument("--out-specs", help="output specs, same syntax (default: inferred)")
    r.add_argument("--static-argnums", type=int, nargs="*", default=[])
    r.add_argument("--abstract", action="store_true", help="plan on an abstract mesh (no devices, no XLA)")
    r.add_argument("--link", action="append", default=[], metavar="AXIS=LATENCY,BANDWIDTH",
                   help="link model of a mesh axis for time estimates, e.g. data=25us,12.5GB/s "
                        "(default 5us,100GB/s per axis); repeat per axis")
    r.add_argument("--roles", help="argument roles for the memory table: \"0=parameters,1=optimizer state,2=batch\"")
    r.add_argument("--explain", action="append", default=[], metavar="NAME",
                   help="print where NAME's layout came from (repeatable)")
    r.add_argument("--no-xla", action="store_true", help="skip compiling for XLA's memory_analysis")
    r.add_argument("--size", help="with --model gpt: plan a large preset (test, 1b, 70b, 1t) on an abstract "
                                  "mesh, e.g. --size 1t --mesh data=16,fsdp=16,model=8 --strategy fsdp_tp")
    r.add_argument("--json")
    r.add_argument("--html")
    r.add_argument("--full", action="store_true", help="print every equation and collective")
    _launch_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "batch", 0) is None and not getattr(args, "size", None):
        args.batch = 8
    if args.command == "launch":
        try:
            return launch(args)
        except UsageError as e:
            print(f"autoshard: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from .errors import ShardingError
    try:
        # Planning on an abstract mesh (--size, --abstract) needs no simulated devices.
        planning = getattr(args, "size", None) or getattr(args, "abstract", False)
        _ensure_cpu_devices(8 if planning else max(8, _mesh_size(getattr(args, "mesh", "data=8"))))
        return {"demo": demo, "report": report, "bench": bench}[args.command](args)
    except (ShardingError, UsageError) as e:
        print(f"autoshard: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyError as e:           # report.explain of an unknown name
        print(f"autoshard: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
