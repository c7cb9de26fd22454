"""Command line: ``autoshard demo`` and ``autoshard report``.

JAX reads ``XLA_FLAGS`` when its backend starts, so the flags for simulated CPU devices are
set here before anything imports jax (appended to flags already set, never replacing them).
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def _ensure_cpu_devices(n: int) -> None:
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def _mesh_size(text: str) -> int:
    from .compiler.mesh import parse_mesh_shape
    return math.prod(parse_mesh_shape(text).values())


def _setup(args):
    """Model, params, optimizer state, batch, specs and the train step for ``args``."""
    import jax

    from . import make_mesh
    from .models import get_model, presets
    mesh = make_mesh(args.mesh, devices=jax.devices()[:_mesh_size(args.mesh)])
    model = get_model(args.model)
    cfg = model.Config()
    model_def, params = model.init(cfg, seed=0)
    optimizer = model.default_optimizer()
    step = model.make_train_step(model_def, optimizer)
    batch = model.make_batch(cfg, args.batch, seed=0)
    axes = tuple(mesh.axis_names)
    param_specs = presets.param_specs(args.model, params, args.strategy, axes, dict(mesh.shape))
    batch_specs = presets.batch_specs(args.model, batch, args.strategy, axes)
    return mesh, model, cfg, params, optimizer, step, batch, (param_specs, None, batch_specs)


def demo(args) -> int:
    import jax
    import numpy as np

    from . import parallelize
    mesh, model, cfg, params, optimizer, step, batch, in_specs = _setup(args)
    pstep = parallelize(step, mesh=mesh, in_specs=in_specs)
    opt_state = optimizer.init(params)
    print(f"autoshard demo: {args.model} on mesh {dict(mesh.shape)} ({jax.devices()[0].platform}), "
          f"strategy {args.strategy}, {args.steps} steps")
    print(pstep.report(params, opt_state, batch).summary())
    ref_step = jax.jit(step)
    ref_params, ref_state = params, opt_state
    worst = 0.0
    print(f"{'step':>4}  {'autoshard loss':>15}  {'1-device loss':>15}  {'rel diff':>9}")
    for i in range(args.steps):
        batch = model.make_batch(cfg, args.batch, seed=i)
        loss, params, opt_state = pstep(params, opt_state, batch)
        ref_loss, ref_params, ref_state = ref_step(ref_params, ref_state, batch)
        rel = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-12)
        worst = max(worst, rel)
        print(f"{i:>4}  {float(loss):>15.6f}  {float(ref_loss):>15.6f}  {rel:>9.1e}")
    ok = worst <= args.rtol and bool(np.isfinite(worst))
    print(f"{'OK' if ok else 'MISMATCH'}: largest relative loss difference {worst:.1e} (tolerance {args.rtol:g})")
    return 0 if ok else 1


def report(args) -> int:
    from . import parallelize
    mesh, model, cfg, params, optimizer, step, batch, in_specs = _setup(args)
    pstep = parallelize(step, mesh=mesh, in_specs=in_specs)
    rep = pstep.report(params, optimizer.init(params), batch)
    print(rep if args.full else rep.summary())
    if args.json:
        rep.to_json(args.json)
        print(f"wrote {args.json}")
    if args.html:
        rep.to_html(args.html)
        print(f"wrote {args.html}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autoshard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("demo", "train a small model on simulated devices and check it against one device"),
                            ("report", "print the sharding report of a reference model's train step")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default="gpt", choices=("gpt", "mlp"))
        p.add_argument("--mesh", default="data=2,model=4")
        p.add_argument("--strategy", default="dp_tp", choices=("dp", "fsdp", "tp", "dp_tp"))
        p.add_argument("--batch", type=int, default=8)
        if name == "demo":
            p.add_argument("--steps", type=int, default=5)
            p.add_argument("--rtol", type=float, default=1e-4)
        else:
            p.add_argument("--json")
            p.add_argument("--html")
            p.add_argument("--full", action="store_true", help="print every equation and collective")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _ensure_cpu_devices(max(8, _mesh_size(args.mesh)))
    from .errors import ShardingError
    try:
        return {"demo": demo, "report": report}[args.command](args)
    except ShardingError as e:
        print(f"autoshard: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
