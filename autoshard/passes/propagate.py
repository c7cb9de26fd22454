"""Factor-based propagation of dim splits to a fixed point, forward and backward.

Expects: ``layouts`` seeded by ``import_annotations``; closed values never change.
Guarantees: every value has a layout without partials (``layouts``), each with provenance.
Open values only ever become *more* split (a layout is replaced only by one that refines
it), so the sweeps terminate; values no annotation reaches are replicated (``default``).

Each equation takes the cheapest factor assignment given its neighbours' current layouts
(``compiler.factors.choose``): basic Shardy-style merging where the candidates agree, the
alpha-beta cost model where they conflict.
"""
from __future__ import annotations

from ..compiler.factors import Tensor, choose, project_back
from ..compiler.layout import Layout
from ..compiler.ops import get_rule, local_context
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
        changed = False
        for v, t in zip(values, tensors):
            if v in program.closed:
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
    for _ in range(MAX_SWEEPS):
        changed = False
        for eqn in order:
            changed |= visit(eqn)
        for eqn in reversed(order):
            changed |= visit(eqn)
        if not changed:
            break
    for v in graph.values:
        if v not in layouts:
            layouts[v] = Layout.replicated(len(v.shape))
            program.provenance[v] = Provenance("default", "no annotation reaches this value: replicated")
    return program
