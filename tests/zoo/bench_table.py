"""The zoo table for ``autoshard bench --zoo``: every zoo model x strategy, its train step
(value_and_grad + one adamw step) compiled through autoshard and through ``jax.jit`` with the
same annotations as ``NamedSharding``s (XLA's own propagation), measured from the compiled
executables with ``autoshard.benchmark``'s own functions (collectives parsed from the HLO
with the ring model, ``memory_analysis()``, ``cost_analysis()`` flops).

As in ``autoshard/benchmark.py`` the optimizer state is not annotated; both programs get the
layout autoshard infers for it. A pair autoshard cannot compile yet (an xfail of the zoo)
still gets its jit numbers and the error in ``note``.

    import sys; sys.path.insert(0, "tests/zoo")
    import bench_table
    print(bench_table.zoo_markdown(bench_table.zoo_rows()))
"""
from __future__ import annotations

import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import autoshard as ash  # noqa: E402
from autoshard.benchmark.measure import _compiled_numbers, ratio_text as _ratio, yardstick_checks  # noqa: E402
from autoshard.benchmark.tables import _counts_text, _kib  # noqa: E402
from harness import MESHES, load_all, make_train_step, param_count, setup  # noqa: E402
from partition_rules import STRATEGIES  # noqa: E402


def _named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, PartitionSpec))


def measure(name: str, strategy: str) -> dict:
    """One row: autoshard's and jax.jit's compiled train step for (model, strategy)."""
    model = load_all()[name]
    mesh, _, args, (pspecs, _, bspecs) = setup(model, strategy)
    step = make_train_step(model.build().loss)
    row = {"model": name, "library": model.library, "strategy": strategy,
           "mesh": ",".join(f"{k}={v}" for k, v in MESHES[strategy].items()),
           "params": param_count(args[0]), "ours": None, "jit": None, "note": ""}
    pf = ash.parallelize(step, mesh=mesh, in_specs=(pspecs, None, bspecs))
    try:
        t0 = time.perf_counter()
        compiled = pf.lower(*args).compile()
        row["ours"] = _compiled_numbers(compiled, mesh, time.perf_counter() - t0, None, repeats=0)
        opt_shardings = pf.input_shardings(*args)[1]
    except Exception as e:                                   # an engine gap: keep the jit row
        row["note"] = f"autoshard: {type(e).__name__}: {str(e).splitlines()[0]}"
        opt_shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), args[1])
    in_shardings = (_named(mesh, pspecs), opt_shardings, _named(mesh, bspecs))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        jit_compiled = jax.jit(step, in_shardings=in_shardings).lower(*args).compile()
    row["jit"] = _compiled_numbers(jit_compiled, mesh, time.perf_counter() - t0, None, repeats=0)
    return row


def zoo_rows(models=None, strategies=STRATEGIES, progress=None) -> list[dict]:
    """Rows for every zoo model (or those named) x strategy."""
    rows = []
    for name in sorted(load_all()):
        if models and name not in models:
            continue
        for strategy in strategies:
            if progress:
                progress(f"  zoo {name} {strategy} ...")
            rows.append(measure(name, strategy))
    return rows


def _cell(m, attr, fmt):
    return "-" if m is None else fmt(getattr(m, attr))


def zoo_markdown(rows: list[dict]) -> str:
    """The zoo table: per device and per step, autoshard against jax.jit (ratios ours/jit)."""
    head = ("| model | strategy | mesh | params | wire KiB | jit wire KiB | wire ours/jit "
            "| collectives | jit collectives | GFLOP | jit GFLOP | flops ours/jit "
            "| mem KiB | jit mem KiB | mem ours/jit | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o, j = r["ours"], r["jit"]
        ratio = (lambda attr: "-" if o is None else _ratio(getattr(o, attr), getattr(j, attr)))
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['mesh']} | {r['params']:,} "
            f"| {_cell(o, 'wire_bytes', _kib)} | {_kib(j.wire_bytes)} | {ratio('wire_bytes')} "
            f"| {_cell(o, 'counts', _counts_text)} | {_counts_text(j.counts)} "
            f"| {_cell(o, 'flops', lambda f: f'{f / 1e9:.4f}')} | {j.flops / 1e9:.4f} | {ratio('flops')} "
            f"| {_cell(o, 'memory_bytes', _kib)} | {_kib(j.memory_bytes)} | {ratio('memory_bytes')} "
            f"| {r['note'].replace('|', '/')} |")
    return "\n".join(lines)


def zoo_checks(rows: list[dict]):
    """The three yardsticks (wire bytes, flops, memory against jax.jit) over every zoo row."""
    return yardstick_checks([(f"{r['model']} {r['strategy']} on {r['mesh']}", r["ours"], r["jit"]) for r in rows])


def zoo_records(rows: list[dict]) -> list[dict]:
    """JSON/CSV-ready rows (bytes, flops, memory per device; ratios ours/jit)."""
    out = []
    for r in rows:
        o, j = r["ours"], r["jit"]
        rec = {k: r[k] for k in ("model", "library", "strategy", "mesh", "params", "note")}
        for attr in ("wire_bytes", "flops", "memory_bytes"):
            rec[attr] = None if o is None else getattr(o, attr)
            rec["jit_" + attr] = getattr(j, attr)
            rec[attr + "_ratio"] = (None if o is None or not getattr(j, attr)
                                    else getattr(o, attr) / getattr(j, attr))
        rec["counts"] = None if o is None else _counts_text(o.counts)
        rec["jit_counts"] = _counts_text(j.counts)
        out.append(rec)
    return out


if __name__ == "__main__":
    flag = "--xla_force_host_platform_device_count=8"
    assert flag in os.environ.get("XLA_FLAGS", ""), f"set XLA_FLAGS={flag} before running"
    assert math.prod(MESHES["tp"].values()) <= len(jax.devices())
    print(zoo_markdown(zoo_rows(progress=lambda m: print(m, file=sys.stderr))))
