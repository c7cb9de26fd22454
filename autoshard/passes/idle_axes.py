"""Idle mesh axes split the batch (HSDP: annotated sharding over one axis, plain data
parallelism over the axes no annotation uses).

Expects: closed layouts from ``import_annotations``, before ``propagate``.
Guarantees: where it decides to, the batch inputs' split dim is *additionally* split over the
idle axes while propagation runs (``seed``), so activations, the loss and the parameter
gradients' contractions are split over them; ``restore`` (after propagation) gives the batch
inputs back their annotated layouts, so they enter the program as annotated and
``insert_collectives`` slices them locally (``B -> S``, no bytes). Parameter gradients become
partial over the idle axes and are reduced where the annotations want them (reduce-scatter
over the annotated axis, then all-reduce over the idle ones on the scattered shard).

*Idle axis*: a mesh axis of size > 1 that no in_spec, out_spec or sharding constraint names.

*The batch* (the rule): build classes of tensor dims joined by ``pass`` factors (the dims an
op keeps split alike: elementwise operands, the batch dims of a matmul, a layer's rows). A
*parameter gradient* is a contraction (a ``dot_general`` or reduction with a ``sum`` factor)
whose result's dims are, up to a transpose, in the classes of a *parameter*'s dims: an
annotated input the function returns updated (an output in its dims' classes; ``W - lr * dW``
joins them). The factor it sums over is the batch; the batch inputs are the annotated inputs
whose split dim lies in a summed class that holds no parameter dim. A dim made of several
factors (a reshape's ``[b*s]``) joins the class of its major factor, where a split lands.
Nothing is done without such a contraction (an inference function), when a batch input's
split dim does not divide by its axes times the idle axes, under ``auto=True`` (the search
places every axis itself) or in a pipelined program. Data parallelism with replicated
parameters (``dp``) and a replicated batch (``tp``) have no split parameter or no split batch
input, so their plans do not change.

*The decision* (cost model): compute saved, ``(1 - 1/n_idle)`` of the points of every
equation that carries a batch dim, at ``compute_rate`` points per second, against the
all-reduce over the idle axes of the parameter gradients' per-device shards (and an
all-gather of each output that carries the batch, since outputs keep their layouts), priced
as every layout choice is: by bytes, latency only a tie-breaker
(``planner.LATENCY_WEIGHT_IN_CHOICES``; the test models are tiny).
"""
from __future__ import annotations

import math

from ..compiler.cost_model import DEFAULT_POINTS_PER_SECOND, assignment_points, collective_time, group_link
from ..compiler.kinds import FactorKind
from ..compiler.layout import Layout
from ..compiler.microbatch import UnionFind
from ..compiler.ops import get_rule
from ..compiler.planner import LATENCY_WEIGHT_IN_CHOICES
from ..compiler.program import Provenance

name = "idle_axes"
restore_name = "idle_axes_restore"


def _annotated_axes(program) -> set:
    used = set()
    for v in program.closed:
        if not v.is_const:
            lay = program.layouts[v]
            used |= set(lay.split_axes) | set(lay.partial_axes)
    for lay in program.out_specs:
        if lay is not None:
            used |= set(lay.split_axes)
    return used


def find_batch(program, rules):
    """``(batch, batch_classes, classes, grads)`` by the rule of the module docstring: the
    batch inputs as {value: split dim}, the batch's dim classes, the union-find of
    ``(value, dim)`` classes, and ``(equation, parameter)`` per parameter-gradient contraction;
    ``rules``: the FactorRule per top-level equation."""
    graph = program.graph
    classes = UnionFind()
    for eqn in graph.eqns:
        fr = rules[eqn.index]
        tensors = list(zip(eqn.invars, fr.operands)) + list(zip(eqn.outvars, fr.results))
        by_factor: dict = {}
        for v, dims in tensors:
            if v.is_const:
                continue
            for d, fids in enumerate(dims):
                # A dim of several factors joins its major one only: an axis splitting the
                # dim lands there ([b, s] -> [b*s] keeps b's class, not s's).
                if fids and fr.kinds[fids[0]] == FactorKind.PASS:
                    by_factor.setdefault(fids[0], []).append((v, d))
        for nodes in by_factor.values():
            for n in nodes[1:]:
                classes.union(nodes[0], n)
    annotated = [v for v in graph.invars if v in program.closed and program.layouts[v].split_axes]

    def class_set(v):
        return frozenset(classes.find((v, d)) for d in range(len(v.shape)))
    returned = {(class_set(o), tuple(sorted(o.shape))) for o in graph.outvars if not o.is_const and o.shape}
    # Parameters: annotated inputs the step returns updated (an output in their dims' classes).
    params = [v for v in annotated if (class_set(v), tuple(sorted(v.shape))) in returned]
    param_classes: set = set()
    summed: set = set()
    grads = []
    for eqn in graph.eqns:
        fr = rules[eqn.index]
        sums = [f for f, k in enumerate(fr.kinds) if k == FactorKind.SUM]
        if not sums or len(eqn.outvars) != 1 or not eqn.outvars[0].shape:
            continue
        r = eqn.outvars[0]
        rc = [classes.find((r, d)) for d in range(len(r.shape))]
        for p in params:
            if class_set(p) == set(rc) and sorted(p.shape) == sorted(r.shape):
                param_classes |= set(rc)
                grads.append((eqn, p))
                for v, dims in zip(eqn.invars, fr.operands):
                    for d, fids in enumerate(dims):
                        if fids and fids[0] in sums:
                            summed.add(classes.find((v, d)))
                break
    batch_classes = summed - param_classes
    batch = {}
    for v in annotated:
        lay = program.layouts[v]
        split = [d for d, axes in enumerate(lay.dims) if axes]
        if len(split) == 1 and classes.find((v, split[0])) in batch_classes:
            batch[v] = split[0]
    return batch, batch_classes, classes, grads


def seed(program, compute_rate=DEFAULT_POINTS_PER_SECOND):
    """Extend the batch inputs' layouts over the idle axes while propagation runs, where the
    cost model says the compute saved outweighs the extra reduction; record why."""
    program.idle_batch = {}
    sizes, links = program.axis_sizes, program.mesh.link_models
    used = _annotated_axes(program)
    idle = tuple(a for a in program.mesh.axis_names if a not in used and sizes[a] > 1)
    if not idle or any(getattr(e, "pipelined", False) for e in program.graph.eqns):
        return program
    rules = {eqn.index: get_rule(eqn).factors(eqn) for eqn in program.graph.eqns}
    batch, batch_classes, classes, grads = find_batch(program, rules)
    if not batch:
        program.idle_decision = (f"mesh axes {idle} are idle (no annotation uses them) but no batch was "
                                 "recognised (no contraction sums a split input's dim into the gradient "
                                 "of a split parameter the function returns updated): they stay unused")
        return program
    n_idle = math.prod(sizes[a] for a in idle)
    paths = dict(zip(program.graph.invars, program.in_paths))
    for v, d in batch.items():
        lay = program.layouts[v]
        n = math.prod(sizes[a] for a in lay.dims[d]) * n_idle
        if v.shape[d] % n:
            program.idle_decision = (f"idle mesh axes {idle} not used for the batch: dim {d} of "
                                     f"{paths[v]} (shape {v.shape}) does not divide by {n}")
            return program
    # Compute saved: every top-level equation carrying a batch dim runs on 1/n_idle of it.
    points = 0.0
    for eqn in program.graph.eqns:
        fr = rules[eqn.index]
        carries = any(classes.find((v, d)) in batch_classes
                      for v in (*eqn.invars, *eqn.outvars) if not v.is_const for d in range(len(v.shape)))
        if carries:
            points += assignment_points(fr.sizes, tuple(() for _ in fr.sizes), {})
    data_axes = {a for v, d in batch.items() for a in program.layouts[v].dims[d]}
    n_data = math.prod(sizes[a] for a in data_axes) if data_axes else 1
    saved = points / n_data * (1 - 1 / n_idle) / compute_rate
    link = group_link(links, idle)
    params = list({p: None for _, p in grads})
    extra = sum(collective_time("all-reduce", n_idle, math.prod(p.shape) * p.dtype.itemsize / n_data, link,
                                LATENCY_WEIGHT_IN_CHOICES)
                for p in params)
    for o in program.graph.outvars:
        if not o.is_const and any(classes.find((o, d)) in batch_classes for d in range(len(o.shape))):
            extra += collective_time("all-gather", n_idle, math.prod(o.shape) * o.dtype.itemsize / n_data, link,
                                     LATENCY_WEIGHT_IN_CHOICES)
    if saved <= extra:
        program.idle_decision = (f"idle mesh axes {idle} not used for the batch: the compute saved "
                                 f"({saved:.3g} s) does not pay for the gradient reductions ({extra:.3g} s)")
        return program
    why = (f"mesh axes {idle} are idle (no annotation uses them): the batch (the dim the parameter gradients "
           f"sum over: {', '.join(f'{paths[v]} dim {d}' for v, d in batch.items())}) is split over them too, "
           f"data parallel, and the gradients of {len(params)} parameters are all-reduced over them "
           f"(saves {saved:.3g} s of compute per step for {extra:.3g} s of gradient all-reduce)")
    for v, d in batch.items():
        lay = program.layouts[v]
        dims = list(lay.dims)
        dims[d] = tuple(dims[d]) + idle
        program.idle_batch[v] = (lay, program.provenance.get(v))
        program.layouts[v] = Layout(tuple(dims), lay.partial)
        program.provenance[v] = Provenance("idle-axes", why)
    program.idle_decision = why
    return program


def restore(program):
    """After propagation: the batch inputs enter in their annotated layouts (and provenance)
    again; each value propagated from them keeps the idle axes, so the first consumer slices
    locally. ``report.idle_axes`` and ``report.explain`` of a batch input give the reason."""
    for v, (lay, prov) in program.idle_batch.items():
        program.layouts[v] = lay
        if prov is not None:
            program.provenance[v] = prov
    return program
