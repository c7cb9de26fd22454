"""Factor-based propagation of dim splits to a fixed point, forward and backward.

Expects: ``layouts`` seeded by ``import_annotations``; closed values never change.
Guarantees: every value has a layout without partials (``layouts``), each with provenance.
Open values only ever become *more* split (a layout is replaced only by one that refines
it), so the sweeps terminate; values no annotation reaches are replicated (``default``).

Each equation takes the cheapest factor assignment given its neighbours' current layouts
(``compiler.factors.choose``): basic Shardy-style merging where the candidates agree, the
alpha-beta cost model where they conflict.

Two phases. First a split passes through a broadcast (``broadcast_in_dim``, or an element-wise
op with an operand of size-1 dims against larger ones) only to tensors no larger than a split
tensor of it: the broadcast result takes its layout from its consumers, not from its small
operand (as Shardy's op-priority propagation lets a ``broadcast_in_dim`` pass splits only
backward until its last phase). Then, to the fixed point again, every equation as above. Taken
forward at first sight, the small operand's split decides the large result before its consumers
speak: a bias split over features (fsdp) broadcast to a batch-split activation's shape came out
split over features and was moved to the batch split in an all-to-all of the activation, where
gathering the bias costs a few bytes; the input gradient of a head whose weight is split over
its input features, broadcast by the mean before it, spread that split over a whole activation
gradient, which met the batch-split forward activations in all-to-alls (more memory and work
than jax.jit); a group norm's per-sample statistics, multiplied by its scale (``[1, 1, 1, C]``,
fsdp-split over channels) before the batch split reached them through the broadcast over the
group's channels, came out split over channels. With the large tensors first, the small operand
meets their layout and the conflict is settled, by cost, on it.
"""
from __future__ import annotations

import math

from ..compiler.factors import Tensor, choose, project_back
from ..compiler.layout import Layout
from ..compiler.ops import get_rule, local_context
from ..compiler.ops.elementwise import elementwise_factors
from ..compiler.planner import LATENCY_WEIGHT_IN_CHOICES, transform_time
from ..compiler.program import Provenance

name = "propagate"
MAX_SWEEPS = 8


def eqn_tensors(program, eqn, layout_of, with_linked=False, refinable=False):
    """The chooser's view of one equation's operands and results. In a loop body, an operand
    the loop does not vary (``ir.hoisted_runs``) is weighted by how much less often it is
    made than the equation runs: its reshard is hoisted out of the loop with it. Priced per
    trip instead, gathering a scan's weight once looks as dear as gathering the activations
    every trip (an LSTM's gates then run column-parallel on gathered activations).
    ``refinable`` (propagation): open results other than outputs with an out_spec may still be
    split further (``Tensor.refinable``); in ``insert_collectives`` every layout is final."""
    fr = program.rules[eqn.index]
    runs, wanted = program.loop_runs, program.wanted_outputs
    here = max((runs.get(o, 1) for o in eqn.outvars), default=1)
    tensors = []
    for i, v in enumerate(eqn.invars):
        lay = layout_of(v)
        tensors.append(Tensor(fr.operands[i], v.shape, v.dtype.itemsize, lay,
                              0 if v in program.closed else 1, accumulator=i in fr.accumulators,
                              weight=min(1.0, runs.get(v, 1) / here)))
    for j, v in enumerate(eqn.outvars):
        tensors.append(Tensor(fr.results[j], v.shape, v.dtype.itemsize, program.layouts.get(v),
                              0 if v in program.closed else 1, is_result=True,
                              refinable=refinable and v not in program.closed and v not in wanted))
    if with_linked:
        for v, dims in fr.linked:
            tensors.append(Tensor(dims, v.shape, v.dtype.itemsize, layout_of(v),
                                  0 if v in program.closed else 1))
    return tensors


def internal_cost(eqn, fr, tensors, sizes, links):
    """``extra`` for ``factors.choose``: seconds of the collectives an ``OpRule.priced`` op's
    own lowering runs under an assignment (None for every other op)."""
    rule = get_rule(eqn)
    if not rule.priced:
        return None
    n_in, n_out = len(eqn.invars), len(eqn.outvars)

    def extra(assignment):
        lays = [project_back(assignment, t.dims, fr.sizes, sizes) for t in tensors[:n_in + n_out]]
        if any(d is None for d in lays):
            return 0.0
        lays = [Layout(d) for d in lays]
        ctx = local_context(eqn, lays[:n_in], lays[n_in:], sizes)
        return sum(transform_time(t, eqn.invars[i].dtype.itemsize, sizes, links, LATENCY_WEIGHT_IN_CHOICES)
                   for i, t, _ in rule.internal(eqn, ctx))
    return extra


def _values(program, eqn):
    return (*eqn.invars, *eqn.outvars, *(v for v, _ in program.rules[eqn.index].linked))


def _sweep_order(graph):
    """Equations in program order, a region equation (loop, branch) once before its bodies and
    once after them: its results then carry what the body decided before their consumers are
    visited. (Visited only before, its first look stamps a loop's outputs replicated, and a
    dot reading them merged in the fsdp split of its weight's contracted dim, spreading it
    over the activations it meets.)"""
    for eqn in graph.eqns:
        yield eqn
        if eqn.subgraphs:
            for sub in eqn.subgraphs:
                yield from _sweep_order(sub)
            yield eqn


def run(program):
    graph, mesh = program.graph, program.mesh
    sizes, links = program.axis_sizes, mesh.link_models
    eqns = list(graph.all_eqns())
    for eqn in eqns:
        program.rules[eqn.index] = get_rule(eqn).factors(eqn)
    layouts = program.layouts
    # Broadcasts: ``broadcast_in_dim`` and element-wise ops with an operand of size-1 dims (or
    # a scalar) against larger ones. A unit dim added is no wider: it passes its operand's split
    # on from the start (a batch split into an embedding lookup).
    widening = {eqn.index for eqn in eqns
                if (eqn.prim.name == "broadcast_in_dim" or get_rule(eqn).factors is elementwise_factors)
                and len({math.prod(v.shape) for v in (*eqn.invars, *eqn.outvars) if not v.is_const}) > 1}
    narrowing_only = True

    def step(eqn) -> bool:
        tensors = eqn_tensors(program, eqn, layouts.get, with_linked=True, refinable=True)
        if all(t.layout is None for t in tensors):
            return False
        fr = program.rules[eqn.index]
        choice = choose(fr, tensors, sizes, links, extra=internal_cost(eqn, fr, tensors, sizes, links))
        best = choice.assignment
        how = (f"; cost-based choice among {choice.candidates} candidates (the layouts around it conflicted)"
               if choice.by_cost else "")
        values = list(eqn.invars) + list(eqn.outvars) + [v for v, _ in fr.linked]
        known = tuple(v for v, t in zip(values, tensors) if t.layout is not None and not v.is_const)
        largest = None
        if narrowing_only and eqn.index in widening:
            # Sizes of the tensors whose splits the choice passes on (a known layout without a
            # split, as one that a constant operand left whole, passes none).
            largest = max((math.prod(v.shape) for v, t in zip(values, tensors)
                           if t.layout is not None and not v.is_const and t.layout.split_axes), default=0)
        changed = False
        for v, t in zip(values, tensors):
            if v in program.closed or (largest is not None and math.prod(v.shape) > largest):
                continue
            dims = project_back(best, t.dims, fr.sizes, sizes)
            if dims is None:
                continue
            new, cur = Layout(dims), layouts.get(v)
            if cur is None or (new != cur and new.refines(cur)):
                layouts[v] = new
                program.provenance[v] = Provenance(
                    "propagated", f"{eqn.prim.name} at {eqn.source}{how}", eqn.index,
                    tuple(k for k in known if k is not v),
                    "forward" if t.is_result else "backward")
                changed = True
        return changed

    # An equation is revisited only when a value it touches changed since its last step:
    # otherwise the step would choose the same again. Same sweeps, far fewer steps.
    touching: dict = {}
    for eqn in eqns:
        for v in _values(program, eqn):
            touching.setdefault(v, []).append(eqn)
    dirty = {eqn.index for eqn in eqns}

    def visit(eqn) -> bool:
        if eqn.index not in dirty:
            return False
        dirty.discard(eqn.index)
        before = {v: layouts.get(v) for v in _values(program, eqn)}
        if not step(eqn):
            return False
        for v, old in before.items():
            if layouts.get(v) != old:
                dirty.update(e.index for e in touching.get(v, ()) if e is not eqn)
        return True

    order = list(_sweep_order(graph))

    def sweeps():
        for _ in range(MAX_SWEEPS):
            changed = False
            for eqn in order:
                changed |= visit(eqn)
            for eqn in reversed(order):
                changed |= visit(eqn)
            if not changed:
                break

    sweeps()
    if widening:
        # Broadcasts now widen splits too: they look again (what they broadcast to may still be
        # undecided, or conflict with what they broadcast).
        narrowing_only = False
        dirty.update(widening)
        sweeps()
    for v in graph.values:
        if v not in layouts:
            layouts[v] = Layout.replicated(len(v.shape))
            program.provenance[v] = Provenance("default", "no annotation reaches this value: replicated")
    return program
