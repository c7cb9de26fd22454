"""Choose each equation's factor assignment on actual layouts and plan every reshard.

Expects: complete ``layouts`` from ``propagate``.
Guarantees: ``operand_layouts[(eqn, i)]`` is what equation ``eqn`` consumes, ``produced[v]``
what it makes (possibly partial), ``post[v]`` a reshard right after production, and
``out_layouts`` the (never partial) output layouts; ``reshards`` lists every planned layout
change once, with a reason.

Partial values are first-class: ``P(sum)`` flows through ops linear in it (add of partials,
mul by a non-partial, dot_general, reshape, ...) as long as the result is no larger, and is
reduced where a consumer needs ``B`` (all-reduce) or ``S(d)`` (reduce-scatter). Into a
contraction (dot_general, conv) whose result is no smaller, a partial whose own layout splits
its axes is reduce-scattered first: passed through, the contraction would run whole on every
device. A partial
value with several uses, one of which needs it reduced, is reduced once, where it is made
(found by re-running the placement until no new such value appears).
"""
from __future__ import annotations

import dataclasses
import math

from ..compiler.factors import choose, required_layout, result_partial
from ..compiler.kinds import REDUCTION_KINDS
from ..compiler.layout import Layout
from ..compiler.ops import get_rule, local_context, partial_passes
from ..compiler.ops.constraint import constraint_spec
from ..compiler.ops.control_flow import loop_constants, region_boundaries
from ..compiler.planner import Transform, plan
from ..compiler.cost_model import wire_bytes
from ..compiler.ir import trip_counts
from ..compiler.program import Fallback, Reshard
from .propagate import eqn_tensors, internal_cost

_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min"}
_ELEMENTWISE = {"mul", "add", "sub", "div", "max", "min", "add_any", "select_n"}

name = "insert_collectives"
MAX_ROUNDS = 6
#: Equations between two consumers of one gathered copy beyond which the later one may
#: re-gather (``_Placer.regather``): the uses of a forward op are a few equations apart, its
#: backward's hundreds.
REGATHER_GAP = 32


def _fmt(lay: Layout, axes) -> str:
    return lay.to_str(axes)


def run(program):
    """Place collectives; values whose partial is reduced for one of several consumers are
    reduced once where they are made ("eager"), and the reduction is moved up a chain of
    same-size linear ops to a value that has several partial consumers (the gradient of a
    layernorm's output feeds the scale, bias and input gradients: one all-reduce of it
    replaces one per branch)."""
    eager: set = set()
    hoist: dict = {}
    uses = _use_counts(program)
    for _ in range(MAX_ROUNDS):
        placer = _place(program, eager, hoist)
        reduced = placer.reduced_at_consumer | {v for v in eager if placer.made_partial.get(v)}
        new = {v for v in placer.reduced_at_consumer if uses.get(v, 0) > 1}
        new |= {_earliest_shared(v, placer.partial_source, uses) for v in reduced}
        new = {v for v in new if v is not None} - eager
        hoisted = _hoisted(program)
        if not new and hoisted == hoist:
            break
        eager |= new
        hoist = hoisted
    _per_microbatch(program)
    return program


def _per_microbatch(program):
    """Reshards inside a pipelined loop body run on one microbatch: their per-device shapes
    have the batch dim cut M ways (the lowering runs them on the microbatch view)."""
    import dataclasses
    for pipe in program.pipelines.values():
        for k, r in enumerate(program.reshards):
            d = pipe.batch_dims.get(r.value)
            if d is None or r.internal:
                continue
            ts = tuple(dataclasses.replace(t, in_shape=tuple(n // pipe.microbatches if i == d else n
                                                             for i, n in enumerate(t.in_shape)))
                       if t.in_shape else t for t in r.transforms)
            program.reshards[k] = dataclasses.replace(r, transforms=ts)


def _earliest_shared(v, partial_source, uses):
    """The furthest value up ``v``'s chain of same-size partial sources that has several
    uses, or None: reducing there costs what reducing ``v`` costs and serves every use."""
    found = None
    while v in partial_source:
        v = partial_source[v]
        if uses.get(v, 0) > 1:
            found = v
    return found


def _use_counts(program):
    uses: dict = {}

    def count_graph(graph):
        for v in graph.outvars:
            uses[v] = uses.get(v, 0) + 1
        for eqn in graph.eqns:
            for v in set(eqn.invars):
                uses[v] = uses.get(v, 0) + 1
            for sub in eqn.subgraphs:
                count_graph(sub)
    count_graph(program.graph)
    return uses


class _Placer:
    """One placement of the whole program (nested bodies included)."""

    def __init__(self, program, eager, hoist):
        self.p, self.eager, self.hoist = program, eager, hoist
        mesh = program.mesh
        self.axes, self.sizes = mesh.axis_names, program.axis_sizes
        self.links = mesh.link_models
        self.actual: dict = {}
        self.producer: dict = {}
        self.planned: set = set()
        self.reached: dict = {}          # value -> layouts its planned reshards pass through
        self.reduced_at_consumer: set = set()
        self.made_partial: dict = {}     # value -> its partial as produced (before any post)
        self.partial_source: dict = {}   # value -> the one same-size partial input it passed on
        self.copy_use: dict = {}         # (value, layout) -> (copy, last consumer's Eqn.index, its name)
        self.depth = 0                   # > 0 inside a loop/branch body
        self.at = -1                     # Eqn.index of the equation being placed
        self.trips = trip_counts(program.graph)
        self.users: dict = {}            # value -> equations of the program's graph reading it
        for e in program.graph.eqns:
            for w in e.invars:
                self.users.setdefault(w, []).append(e)

    def layout_of(self, v):
        return self.actual[v] if v in self.actual else self.p.layouts[v]

    def canonical(self, v):
        return self.p.layouts[v].without_partial()

    def record(self, v, src, dst, reason, source, consumer):
        key = (v, dst)
        if key in self.planned or src == dst:
            return
        self.planned.add(key)
        if consumer is not None and not src.partial:
            self.copy_use[key] = (0, self.at, consumer)
        steps = plan(src, dst, v.shape, self.sizes)
        # The lowering keeps every layout a value passes through (runtime/lower.py fetch), so
        # a plan that starts like an earlier one of the same value resumes where that one
        # reached: only the rest runs, and only the rest is recorded.
        reached = self.reached.setdefault(v, set())
        start = max((k + 1 for k, t in enumerate(steps) if t.dst in reached), default=0)
        reached.update(t.dst for t in steps)
        if start == len(steps):
            return
        # A loop-invariant value's reshard is hoisted out of the loop with it (XLA's
        # loop-invariant code motion): it runs as often as the value is made, not every trip.
        runs = self.p.loop_runs.get(v, 1)
        hoisted = runs if runs < self.trips.get(v, 1) else 0
        self.p.reshards.append(Reshard(v, steps[start].src, dst, steps[start:], reason, source, consumer,
                                       trips=hoisted))

    def origin(self, v) -> str:
        e = self.producer.get(v)
        return f"{e.prim.name} at {e.source}" if e is not None else "the input"

    def why(self, v, src, dst, consumer) -> str:
        axes = self.axes
        if src.partial and dst.partial != src.partial:
            ops = ",".join(sorted({op for _, op in src.partial}))
            over = ",".join(a for a, _ in src.partial)
            return (f"{self.origin(v)} left it P({ops}) over {over}; {consumer} needs it reduced "
                    f"to {_fmt(dst, axes)}")
        return f"{consumer} needs it as {_fmt(dst, axes)}; it is {_fmt(src, axes)} after {self.origin(v)}"

    def regather(self, eqn, i, v, have, want, consumer) -> bool:
        """Gather ``v`` afresh for this consumer instead of reusing the copy gathered for an
        earlier one (FSDP's reshard after forward), where that copy would otherwise be held
        ``REGATHER_GAP`` or more equations and this consumer broadcasts it to a larger
        result: XLA CPU stores the shared broadcast whole (a reduction it hands to YNNPACK
        does not fuse it) and keeps it from the forward to the backward, while a copy of its
        own is fused into this consumer (one whose result a reduction reads). Taken where the re-gather's wire bytes are below the
        bytes of that broadcast; recorded as a reshard of its own (the report and the HLO
        count it)."""
        prev = self.copy_use.get((v, want))
        if (prev is None or self.depth or have.partial or eqn.index - prev[1] < REGATHER_GAP
                or len(eqn.outvars) != 1 or eqn.prim.name not in _ELEMENTWISE):
            if prev is not None:
                self.copy_use[(v, want)] = (prev[0], eqn.index, consumer)
            return False
        steps = plan(have, want, v.shape, self.sizes)
        if not steps or any(t.kind != "all-gather" for t in steps):
            return False
        out = eqn.outvars[0]
        held = math.prod(self.p.layouts[out].local_shape(out.shape, self.sizes)) * out.dtype.itemsize
        if math.prod(out.shape) <= math.prod(v.shape) or not any(
                u.prim.name in _REDUCTIONS for u in self.users.get(out, ())):
            return False
        cost = sum(wire_bytes(t.kind, t.group_size(self.sizes),
                              math.prod(t.in_shape) * v.dtype.itemsize) for t in steps)
        if cost >= held:
            return False
        k = prev[0] + 1
        self.copy_use[(v, want)] = (k, eqn.index, consumer)
        self.p.copies[(eqn.index, i)] = k
        # lowered with k leading size-1 dims (collectives._all_gather): the HLO's shapes
        steps = tuple(dataclasses.replace(t, in_shape=(1,) * k + tuple(t.in_shape)) for t in steps)
        self.p.reshards.append(Reshard(
            v, have, want, steps,
            f"{consumer} re-gathers it ({cost:,.0f} B on the wire) rather than hold the copy "
            f"gathered for {prev[2]} {eqn.index - prev[1]} equations earlier, whose broadcast to "
            f"{held:,} B would be kept that long", eqn.source, consumer))
        return True

    def require(self, eqn, i, v, want, consumer):
        have = self.layout_of(v)
        self.p.operand_layouts[(eqn.index, i)] = want
        if have != want and self.regather(eqn, i, v, have, want, consumer):
            return
        if have != want:
            if have.partial and not set(have.partial) <= set(want.partial):
                self.reduced_at_consumer.add(v)
            self.record(v, have, want, self.why(v, have, want, consumer), eqn.source, consumer)

    def produce(self, eqn, o, made, where):
        p = self.p
        p.produced[o] = made
        self.producer[o] = eqn
        self.actual[o] = made
        self.made_partial[o] = made.partial
        target = p.layouts[o]
        if (o in p.closed and made != target) or (o in self.eager and made.partial):
            p.post[o] = target
            self.actual[o] = target
            reason = (f"constraint at {eqn.source} pins it to {_fmt(target, self.axes)}" if o in p.closed
                      else f"P result of {where} is used by several consumers, one of which needs it "
                           f"reduced: reduced once here")
            self.record(o, made, target, reason, eqn.source, where)

    def graph(self, graph, out_layouts, out_names):
        for eqn in graph.eqns:
            if eqn.subgraphs:
                self.region(eqn)
            else:
                self.equation(eqn)
        for v, want, name in zip(graph.outvars, out_layouts, out_names):
            have = self.layout_of(v)
            if have != want:
                if have.partial:
                    self.reduced_at_consumer.add(v)
                e = self.producer.get(v)
                self.record(v, have, want, self.why(v, have, want, name),
                            e.source if e is not None else "<input>", name)

    def region(self, eqn):
        pipe = self.p.pipelines.get(eqn.index)
        ins, outs, body_outs = region_boundaries(eqn, self.canonical, _stage_axes(self.p, eqn))
        for i, bv in loop_constants(eqn):
            if bv in self.hoist:          # resharded once at the boundary (_hoisted)
                ins[i] = self.p.produced[bv] = self.hoist[bv]
        self.at = eqn.index
        where = f"{eqn.prim.name} at {eqn.source}"
        self.p.assignments[eqn.index] = ()
        for i, (v, want) in enumerate(zip(eqn.invars, ins)):
            self.require(eqn, i, v, want, f"{where} (loop/branch input {i})")
        for sub, sub_outs in zip(eqn.subgraphs, body_outs):
            for v in sub.invars:
                self.actual[v] = self.hoist.get(v, self.canonical(v))
            self.depth += 1
            self.graph(sub, sub_outs, [f"body output {k} of {where}" for k in range(len(sub_outs))])
            self.depth -= 1
        for o, made in zip(eqn.outvars, outs):
            self.produce(eqn, o, made, where)
        if pipe is not None:
            self.pipeline_collectives(eqn, pipe, ins, where)

    def pipeline_collectives(self, eqn, pipe, ins, where):
        """The collectives a pipelined scan's lowering runs (runtime/pipelined_scan.py): per carry,
        one collective-permute of a microbatch's activations to the next stage (in the tick loop),
        and one all-reduce over the stage axis that hands the finished batch from the last stage
        to every device."""
        nc = eqn.params["num_consts"]
        for k, d in enumerate(pipe.carry_dims):
            v, lay = eqn.invars[nc + k], ins[nc + k]
            local = list(lay.local_shape(v.shape, self.sizes))
            whole = tuple(local)
            local[d] //= pipe.microbatches
            direction = "previous" if pipe.reverse else "next"
            self.p.reshards.append(Reshard(
                v, lay, lay, (Transform("collective-permute", (pipe.axis,), in_shape=tuple(local)),),
                f"{where}: pipeline over {pipe.axis!r}: each tick shifts a microbatch's activations to the "
                f"{direction} stage", eqn.source, where, internal=True, trips=pipe.ticks))
            self.p.reshards.append(Reshard(
                v, lay, lay, (Transform("all-reduce", (pipe.axis,), in_shape=whole),),
                f"{where}: pipeline over {pipe.axis!r}: the {'first' if pipe.reverse else 'last'} stage hands "
                f"the finished batch to every stage", eqn.source, where, internal=True))

    def split_first(self, eqn, fr, parts, out_elems, in_elems) -> bool:
        """Reduce a partial operand before a contraction (dot_general, conv) rather than pass the
        partial through it, where the operand's own layout splits the partial's axes and the
        result is no smaller: kept partial, the operand is whole on every device and the
        contraction runs on it whole (the partial's axes are reserved), so every device does
        the full op; reduced first, it is a reduce-scatter of this operand (never more bytes
        than reducing the result, which is no smaller) and the contraction is split."""
        if out_elems < in_elems or not any(k in REDUCTION_KINDS for k in fr.kinds):
            return False
        return any(q and {a for a, _ in q} & set(self.canonical(v).split_axes)
                   for v, q in zip(eqn.invars, parts))

    def annotated_axes(self) -> frozenset:
        """Mesh axes the annotations name (in_specs, out_specs, constraints): the axes an
        equation may split where none of its tensors does (``factors.with_spare_axes``)."""
        if getattr(self, "_annotated", None) is None:
            p, used = self.p, set()
            for v in p.closed:
                if not v.is_const:
                    used |= set(p.layouts[v].split_axes) | set(p.layouts[v].partial_axes)
            for lay in p.out_specs:
                if lay is not None:
                    used |= set(lay.split_axes)
            self._annotated = frozenset(used)
        return self._annotated

    def equation(self, eqn):
        p = self.p
        self.at = eqn.index
        fr = p.rules[eqn.index]
        rule = get_rule(eqn)
        ins = [self.layout_of(v) for v in eqn.invars]
        parts = [lay.partial for lay in ins]
        keep = False
        if any(parts) and constraint_spec(eqn) is None and partial_passes(rule.partial_mode(eqn), eqn, parts):
            out_elems = sum(math.prod(o.shape) for o in eqn.outvars)
            in_elems = max(math.prod(v.shape) for v, q in zip(eqn.invars, parts) if q)
            keep = out_elems <= in_elems and not self.split_first(eqn, fr, parts, out_elems, in_elems)
        passed = tuple(sorted({q for qs in parts for q in qs})) if keep else ()
        partial_inputs = [v for v, q in zip(eqn.invars, parts) if q]
        if (passed and len(partial_inputs) == 1 and len(eqn.outvars) == 1
                and math.prod(partial_inputs[0].shape) == math.prod(eqn.outvars[0].shape)):
            self.partial_source[eqn.outvars[0]] = partial_inputs[0]
        tensors = eqn_tensors(p, eqn, self.layout_of)
        for t, q in zip(tensors, parts):
            t.keep_partial = q if keep else ()
        best = p.auto_assignments.get(eqn.index)          # the layout search's strategy
        if best is not None and {a for ax in best for a in ax} & {a for a, _ in passed}:
            best = None                                    # it splits an axis the partial holds
        if best is None:
            best = choose(fr, tensors, self.sizes, self.links, reserved={a for a, _ in passed},
                          passed_partial=passed, spare=self.annotated_axes(),
                          extra=internal_cost(eqn, fr, tensors, self.sizes, self.links)).assignment
        p.assignments[eqn.index] = best
        reduced = result_partial(best, fr)
        where = f"{eqn.prim.name} at {eqn.source}"
        first_reshard = len(p.reshards)
        for i, (v, t) in enumerate(zip(eqn.invars, tensors)):
            want = required_layout(t, best, fr, self.sizes, reduced)
            assert want is not None, f"chosen assignment not expressible on operand {i} of {where}"
            self.require(eqn, i, v, want, where)
        if rule.fallback:
            self.fallback(eqn, tuple(p.reshards[first_reshard:]))
        made = []
        for j, o in enumerate(eqn.outvars):
            base = required_layout(tensors[len(eqn.invars) + j], best, fr, self.sizes, reduced)
            made.append(base.with_partial(set(reduced) | set(passed)))
            self.produce(eqn, o, made[-1], where)
        if rule.internal is not None:
            ins_now = [p.operand_layouts[(eqn.index, i)] for i in range(len(eqn.invars))]
            ctx = local_context(eqn, ins_now, made, self.sizes)
            for i, t, reason in rule.internal(eqn, ctx):
                v = eqn.invars[i]
                key = (v, ins_now[i], t)     # same rows of the same value: XLA runs it once
                if key in self.planned:
                    continue
                self.planned.add(key)
                p.reshards.append(Reshard(v, ins_now[i], ins_now[i], (t,), f"{where}: {reason}",
                                          eqn.source, where, internal=True))


    def fallback(self, eqn, reshards):
        """Record an equation without a rule and what replicating its operands costs."""
        wire = 0.0
        for r in reshards:
            for t in r.transforms:
                if t.is_collective:
                    payload = math.prod(t.in_shape) * r.value.dtype.itemsize
                    wire += wire_bytes(t.kind, t.group_size(self.sizes), payload)
        whole = sum(v.nbytes for v in eqn.invars)
        self.p.fallbacks.append(Fallback(eqn.prim.name, eqn.source, eqn.index, reshards, wire, whole))


def _hoisted(program) -> dict:
    """Loop constants to reshard at the loop's boundary: body input -> the one layout every
    consumer in the body takes it in, where that is not the layout it enters with. Done in the
    loop, that reshard would run on every trip (XLA's loop-invariant code motion hoists it on
    CPU, but nothing promises it); at the boundary it runs once, and loops reading the same
    weight (a scan's forward and its transpose) share the copy."""
    out = {}
    for eqn in program.graph.all_eqns():
        if eqn.index in program.pipelines:
            continue
        for _, bv in loop_constants(eqn):
            graph = next(g for g in eqn.subgraphs if bv in g.invars)
            if bv in graph.outvars:
                continue
            wants = {program.operand_layouts[(e.index, k)] for e in graph.eqns
                     for k, w in enumerate(e.invars) if w is bv}
            if len(wants) == 1:
                (want,) = wants
                if not want.partial and want != program.layouts[bv]:
                    out[bv] = want
    return out


def _place(program, eager, hoist) -> set:
    program.assignments.clear()
    program.operand_layouts.clear()
    program.produced.clear()
    program.post.clear()
    program.reshards.clear()
    program.copies.clear()
    program.fallbacks.clear()
    program.region_outputs.clear()
    placer = _Placer(program, eager, hoist)
    graph = program.graph
    sizes = program.axis_sizes
    program.in_boundary.clear()
    for v in graph.invars:
        arrive = _on_user_mesh(program, program.layouts[v]).even_part(v.shape, sizes)
        if arrive != program.layouts[v]:
            program.in_boundary[v] = arrive      # sliced into its layout on arrival (free)
        placer.actual[v] = program.layouts[v]
    # An output nobody annotated leaves in its planned layout, less what the caller's arrays
    # cannot hold: that part is gathered here, a reshard the plan's cost counts.
    program.out_layouts = [program.out_specs[k] if program.out_specs[k] is not None
                           else _on_user_mesh(program, program.layouts[v].without_partial()).even_part(v.shape, sizes)
                           for k, v in enumerate(graph.outvars)]
    placer.graph(graph, program.out_layouts, [f"output {path}" for path in program.out_paths])
    for eqn in graph.all_eqns():
        if eqn.subgraphs:
            _, _, body_outs = region_boundaries(eqn, placer.canonical, _stage_axes(program, eqn))
            for sub, outs in zip(eqn.subgraphs, body_outs):
                program.region_outputs[id(sub)] = outs
    return placer


def _on_user_mesh(program, layout: Layout) -> Layout:
    """``layout`` as the caller's arrays can hold it: on a refined mesh
    (passes/refine_mesh.py) a dim split over a refined axis only in part (``model:(1)2`` of
    ``model``) keeps only the part the user's mesh can write. Inputs arrive that way and are
    sliced on arrival; outputs leave that way. So a train step's state leaves in the layout it
    arrives in (the next call takes it as it is), and the caller never sees a sub-axis."""
    if not program.mesh.parents:
        return layout
    return Layout(tuple(program.mesh.writable(axes) for axes in layout.dims), layout.partial)


def _stage_axes(program, eqn) -> tuple:
    """Mesh axes a scan's stacked dim is split over: the pipeline's stage axis, or for a scan
    without a carry (independent layers) whatever axes split its stacked inputs."""
    pipe = program.pipelines.get(eqn.index)
    if pipe is not None:
        return (pipe.axis,)
    if eqn.prim.name != "scan" or not eqn.pipelined:
        return ()
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    for v in list(eqn.invars[nc + nk:]) + list(eqn.outvars[nk:]):
        lay = program.layouts.get(v)
        if lay is not None and lay.dims and lay.dims[0]:
            return tuple(lay.dims[0])
    return ()
