"""Per-device step memory of a plan, modelled on what XLA CPU's compiler does with it.

``ShardingReport.memory()`` is ``MemoryModel(context).memory()`` (plus XLA's own figures when
compiled). Everything is computed from the plan (values, layouts, collectives): no compile, so
it works on abstract meshes. ``step_total`` estimates
``memory_analysis()``'s argument + output + temp - alias; the temporaries follow XLA CPU:

1. Fusion (``MemoryModel.materialized``): an elementwise result all of whose users are elementwise ops
   or reductions is fused into them and never stored, unless it is *expensive* (exp, log,
   tanh, divide, ...) and read by more than one fusion (instruction fusion does not
   duplicate expensive ops). Reductions XLA CPU hands to YNNPACK fuse only the product that
   feeds them; that product's broadcast operands are stored whole (a parameter's broadcast
   from the start of the step). Dots, convolutions, reductions, gathers and collective
   operands are stored; a reshape is a bitcast (what it reads is stored instead); a loop
   body's results are written straight into the loop's carry / stacked output buffers.
2. Canonical layouts: XLA CPU's convolutions take (batch, spatial, feature) operands and
   (spatial, in, out) kernels, its batched matmuls operands whose batch dims lead. Other
   operands are copied first, one copy per (value, layout, order), and an elementwise
   result read only through such copies is fused into them.
3. Schedule (``schedule.Schedule``): XLA CPU orders a computation breadth-first (Kahn's algorithm
   with a FIFO queue, the concurrency-optimized scheduler): an instruction runs as soon as
   its operands exist. So a copy or all-gather of a parameter runs at the start and is kept
   to its last reader. Fused equations take no slot; they run inside the fusion that reads
   them, so their operands live until that fusion runs. Collective results are nodes of
   their own; independent all-reduces over the same axes are one (XLA's all-reduce
   combiner, up to 30 MiB / 256 operands), so every gradient all-reduce of a data-parallel
   step runs after the last gradient, and the parameter updates after it.
4. Buffer assignment (``MemoryModel.temporaries``): each stored value lives from the instruction that
   makes it to the last one that reads it; an elementwise fusion writes in place into an
   operand of its size that dies there. Output buffers (updated parameters and optimizer
   state) are free until they are written, and XLA assigns temporaries there first (largest
   temporary first, each into the smallest output buffer that holds it and is free over its
   whole life); the rest go to the temp heap, whose size is the peak of their live bytes (the
   best-fit heap packs them with little fragmentation).

A loop (scan/while) body is its own computation: its peak is added while the loop runs.
"""
from __future__ import annotations

import re

import jax
import numpy as np

from .. import compat
from ..compiler.ir import loss_residuals
from .context import ROLES
from .schedule import (ABSORB, BITCAST, EXPENSIVE, FUSIBLE, REDUCE, YNN_REDUCE_MIN_ELEMENTS, Schedule,
                       collective_results, operand_copies, pack_into_outputs, peak_bytes)


def _elements(ctx, v):
    p = ctx.program
    return ctx.local_bytes(v, p.final_layout(v)) // max(1, compat.itemsize(v.dtype))


def _expensive(e) -> bool:
    name = e.prim.name
    if name not in EXPENSIVE:
        return False
    if name in ("div", "rem"):
        return any(jax.dtypes.issubdtype(o.dtype, np.floating) for o in e.outvars)
    return True


class MemoryModel:
    """The per-device memory of one plan (a ``ReportContext``), each part computed once.

    >>> mem = MemoryModel(ReportContext(program)).memory()                  # doctest: +SKIP
    >>> mem["parameters"], mem["temporaries_peak"], mem["step_total"]       # doctest: +SKIP
    """

    def __init__(self, context):
        self.context = context
        self._materialized = None
        self._temporaries = None

    def argument_bytes(self) -> dict[str, int]:
        """Per-device bytes of the arguments by role (``ROLES``); uneven inputs arrive in
        their even part (``ShardedProgram.in_boundary``)."""
        ctx, p = self.context, self.context.program
        by_role = dict.fromkeys(ROLES, 0)
        arrive = getattr(p, "in_boundary", {})
        for v, path in zip(p.graph.invars, p.in_paths):
            by_role[ctx.role_of(path)] += ctx.local_bytes(v, arrive.get(v, p.layouts[v]))
        return by_role

    def memory(self) -> dict:
        """Per-device bytes: arguments by role, outputs, the peak of live intermediates in
        program order (no fusion: an upper estimate), and the step's modelled memory
        (:meth:`step_memory`)."""
        ctx, p = self.context, self.context.program
        by_role = self.argument_bytes()
        outs = sum(ctx.local_bytes(v, lay) for v, lay in zip(p.graph.outvars, p.out_layouts))
        inter = [ctx.local_bytes(o, p.final_layout(o)) for e in ctx.eqns for o in e.outvars]
        out = {
            "arguments": sum(by_role.values()),
            "parameters": by_role["parameters"],
            "optimizer_state": by_role["optimizer state"],
            "batch": by_role["batch"],
            "other_inputs": by_role["inputs"],
            "outputs": outs,
            "activations_peak": self.activation_peak(),
            "largest_intermediate": max(inter, default=0),
            "intermediates_total": sum(inter),
        }
        out.update(self.step_memory(out))
        return out

    def materialized(self) -> dict:
        """Per-device bytes of each intermediate XLA is expected to keep in memory (0 for one
        it fuses into its users). Program inputs and outputs count 0 here: their buffers are
        the arguments and outputs."""
        if self._materialized is None:
            self._materialized = _materialized(self.context)
        return self._materialized[0]

    def temporaries(self) -> dict:
        """``{"peak": temp heap bytes, "in_outputs": bytes placed in output buffers}``."""
        if self._temporaries is None:
            self._temporaries = self._assign_buffers()
        return self._temporaries

    def _assign_buffers(self) -> dict:
        ctx = self.context
        p, size = ctx.program, self.materialized()
        broadcasts = self._materialized[1]
        results = collective_results(ctx)

        def graph_peak(graph, top):
            sched = Schedule(ctx, graph, top, size, results, broadcasts)
            ivs = list(sched.intervals)
            for e in graph.eqns:
                inner = max((graph_peak(g, False)[0] for g in e.subgraphs), default=0)
                if inner:
                    at = 2 * sched.run_at[id(e)]
                    ivs.append([inner, at, at, None])
            if not top:
                return peak_bytes(ivs), 0
            outputs, seen = [], set()
            for v, lay in zip(p.graph.outvars, p.out_layouts):
                if id(v) in seen or v not in sched.produced_at:
                    continue
                seen.add(id(v))
                outputs.append((ctx.local_bytes(v, lay), sched.produced_at[v]))
            packable = [iv for iv in ivs if iv[3] is not None]
            left = pack_into_outputs(packable, outputs) + [iv for iv in ivs if iv[3] is None]
            return peak_bytes(left), sum(iv[0] for iv in packable) - sum(iv[0] for iv in left if iv[3] is not None)

        peak, placed = graph_peak(p.graph, True)
        return {"peak": int(peak), "in_outputs": int(placed)}

    def step_memory(self, base: dict) -> dict:
        """The step's memory beyond its arguments: gradients, activations kept for backward,
        the peak of temporaries, and the total XLA's ``memory_analysis()`` reports
        (arguments + outputs + temporaries - aliased)."""
        ctx = self.context
        p, size = ctx.program, self.materialized()
        forward, kept = loss_residuals(p.graph)
        residual = {w for w in kept if size.get(w, 0)}
        # Gradients: one per parameter, in the layout of its updated value (or its own).
        params = {path: (v, p.layouts[v]) for v, path in zip(p.graph.invars, p.in_paths)
                  if ctx.role_of(path) == "parameters"}
        outs = {}
        for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts):
            outs.setdefault(re.sub(r"^out(\[\d+\])?", "", path), lay)
        grads = 0
        if forward:
            for path, (v, lay) in params.items():
                grads += ctx.local_bytes(v, outs.get(re.sub(r"^args\[\d+\]", "", path), lay))
        temp = self.temporaries()
        tuple_table = 8 * len(p.graph.outvars) if len(p.graph.outvars) > 1 else 0
        return {
            "gradients": int(grads),
            "activations_for_backward": int(sum(size[w] for w in residual)),
            "largest_temporary": int(max(size.values(), default=0)),
            "temporaries_peak": temp["peak"],
            "step_total": int(base["arguments"] + base["outputs"] + tuple_table + temp["peak"]),
        }

    def activation_peak(self) -> int:
        """Peak of all intermediates in program order, none fused (an upper bound)."""
        ctx = self.context
        p = ctx.program
        inputs, outputs = set(p.graph.invars), set(p.graph.outvars)
        last = {}
        for e in ctx.eqns:
            for v in e.invars:
                last[v] = e.index
        temps: dict = {}
        for r in p.reshards:
            if r.value in p.post and p.post[r.value] == r.dst:
                continue
            i = ctx.consumer_index(r)
            if i is not None:
                temps[i] = temps.get(i, 0) + ctx.local_bytes(r.value, r.dst)
        live, peak = 0, 0
        free_at: dict = {}
        for e in ctx.eqns:
            for o in e.outvars:
                if o in inputs or o in outputs:
                    continue
                b = ctx.local_bytes(o, p.final_layout(o))
                live += b
                free_at.setdefault(last.get(o, e.index), []).append(b)
            peak = max(peak, live + temps.get(e.index, 0))
            live -= sum(free_at.pop(e.index, ()))
        return int(peak)


def memory_rows(mem: dict, with_total: bool = False) -> list[tuple]:
    """(what, estimate, XLA's figure or None) rows of a ``memory()`` dict, for tables."""
    xla = mem.get("xla") or {}
    rows = [("parameters", mem["parameters"], None), ("optimizer state", mem["optimizer_state"], None),
            ("batch", mem["batch"], None), ("other inputs", mem["other_inputs"], None),
            ("arguments", mem["arguments"], xla.get("argument_size_in_bytes")),
            ("outputs", mem["outputs"], xla.get("output_size_in_bytes")),
            ("activations (peak live, estimated)", mem["activations_peak"], xla.get("temp_size_in_bytes")),
            ("largest intermediate", mem["largest_intermediate"], None),
            ("gradients (estimated)", mem["gradients"], None),
            ("activations kept for backward (estimated)", mem["activations_for_backward"], None),
            ("largest temporary (estimated)", mem["largest_temporary"], None),
            ("temporaries peak (estimated, fused)", mem["temporaries_peak"], xla.get("temp_size_in_bytes")),
            ("step total (estimated)", mem["step_total"], xla.get("total_in_bytes"))]
    if with_total:
        rows.append(("intermediates total", mem["intermediates_total"], None))
    return rows


def _materialized(ctx) -> tuple[dict, dict]:
    """``(bytes kept per value, bytes of parameters broadcast for a big reduction per
    equation id)``: see ``MemoryModel.materialized``."""
    p = ctx.program
    moved = {r.value for r in p.reshards if any(t.is_collective for t in r.transforms)}
    top_io = set(p.graph.invars) | set(p.graph.outvars)
    size: dict = {}
    bcast_inputs: dict = {}

    def visit(graph, top):
        users: dict = {}
        for e in graph.eqns:
            for v in e.invars:
                if not v.is_const and e not in users.setdefault(v, []):
                    users[v].append(e)
        outs = set(graph.outvars)
        # Reductions XLA CPU hands to YNNPACK (operands of YNN_REDUCE_MIN_ELEMENTS or more):
        # they fuse at most the one product that feeds them, so what feeds that product (or
        # the reduction itself) is materialized. Smaller reductions fuse their producers.
        big = {e for e in graph.eqns if e.prim.name in REDUCE and e.invars
               and _elements(ctx, e.invars[0]) >= YNN_REDUCE_MIN_ELEMENTS}
        into_reduce = {e for e in graph.eqns for o in e.outvars
                       if e.prim.name == "mul" and users.get(o) and all(u in big for u in users[o])}
        for e in graph.eqns:
            for o in e.outvars:
                us = users.get(o, ())
                if top and o in top_io:
                    keep = False
                elif o in moved:
                    keep = True          # collective operands
                elif not us:             # unused, or a loop body's result: written straight
                                         # into the loop's carry / stacked output buffer
                    keep = False
                elif e in into_reduce:
                    keep = False        # the one product a big reduction fuses
                else:
                    keep = not (e.prim.name in FUSIBLE and all(
                        u.prim.name in ABSORB and u not in big and u not in into_reduce for u in us))
                size[o] = ctx.local_bytes(o, p.final_layout(o)) if keep else 0
            for sub in e.subgraphs:
                visit(sub, False)
        # A product fused into a reduction takes its operands whole: one broadcast to the
        # product's shape is materialized, and kept as long as the operand it broadcasts.
        made = {o for e in graph.eqns for o in e.outvars}
        for u in into_reduce:
            full = ctx.local_bytes(u.outvars[0], p.final_layout(u.outvars[0]))
            for k, v in enumerate(u.invars):
                if (u.index, k) in p.copies:
                    continue            # its own re-gathered copy: the broadcast is fused
                if not v.is_const and v.shape != u.outvars[0].shape:
                    if v in made:
                        size[v] = max(size.get(v, 0), full)
                    else:               # a parameter's broadcast, made at the start
                        bcast_inputs[id(u)] = bcast_inputs.get(id(u), 0) + full
        # Elementwise results read only by operands copied into a canonical layout are fused
        # into those copies (the copy is what is stored, see _Schedule).
        copied = {(u.index, k) for u in graph.eqns for k, _ in operand_copies(u)}

        def only_copied(o):
            return all((u.index, k) in copied for u in users.get(o, ()) for k, w in enumerate(u.invars)
                       if w is o) and users.get(o) and o not in moved and not (top and o in top_io)
        for e in graph.eqns:
            if e.prim.name in FUSIBLE and e.prim.name != "transpose" and len(e.outvars) == 1 \
                    and only_copied(e.outvars[0]):
                size[e.outvars[0]] = 0
        # A reshape is a bitcast in XLA: what it reads is stored instead, and lives on.
        for e in reversed(graph.eqns):
            if e.prim.name in BITCAST and len(e.outvars) == 1 and e.invars and not e.invars[0].is_const:
                o, v = e.outvars[0], e.invars[0]
                if size.get(o, 0) and size[o] == ctx.local_bytes(o, p.final_layout(o)):
                    size[o] = 0
                    if v in made and not (top and v in top_io):
                        size[v] = max(size.get(v, 0), ctx.local_bytes(v, p.final_layout(v)))
        # An expensive elementwise result read by more than one fusion is computed once and
        # stored (XLA does not duplicate expensive ops into several consumers).
        for _ in range(2):
            roots: dict = {}
            for e in reversed(graph.eqns):
                for o in e.outvars:
                    r = set()
                    for u in users.get(o, ()):
                        if any(size.get(w, 0) or (top and w in top_io) or w in outs for w in u.outvars) \
                                or not u.outvars or u.subgraphs:
                            r.add(id(u))
                        else:
                            for w in u.outvars:
                                r |= roots.get(w, set())
                    roots[o] = r
            changed = False
            for e in graph.eqns:
                if _expensive(e):
                    for o in e.outvars:
                        if not size.get(o, 0) and not (top and o in top_io) and len(roots[o]) > 1:
                            size[o] = ctx.local_bytes(o, p.final_layout(o))
                            changed = True
            if not changed:
                break
    visit(p.graph, True)
    return size, bcast_inputs
