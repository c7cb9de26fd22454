"""Choose each equation's factor assignment on actual layouts and plan every reshard.

Expects: complete ``layouts`` from ``propagate``.
Guarantees: ``operand_layouts[(eqn, i)]`` is what equation ``eqn`` consumes, ``produced[v]``
what it makes (possibly partial), ``post[v]`` a reshard right after production, and
``out_layouts`` the (never partial) output layouts; ``reshards`` lists every planned layout
change once, with a reason.

Partial values are first-class: ``P(sum)`` flows through ops linear in it (add of partials,
mul by a non-partial, dot_general, reshape, ...) as long as the result is no larger, and is
reduced where a consumer needs ``B`` (all-reduce) or ``S(d)`` (reduce-scatter). A partial
value with several uses, one of which needs it reduced, is reduced once, where it is made
(found by re-running the placement until no new such value appears).
"""
from __future__ import annotations

import math

from ..compiler.factors import choose, required_layout, result_partial
from ..compiler.layout import Layout
from ..compiler.ops import get_rule, partial_passes
from ..compiler.ops.constraint import constraint_spec
from ..compiler.planner import plan
from ..compiler.program import Reshard
from .propagate import eqn_tensors

name = "insert_collectives"
MAX_ROUNDS = 6


def _fmt(lay: Layout, axes) -> str:
    return lay.to_str(axes)


def run(program):
    eager: set = set()
    for _ in range(MAX_ROUNDS):
        reduced_at_consumer = _place(program, eager)
        uses = _use_counts(program)
        new = {v for v in reduced_at_consumer if uses.get(v, 0) > 1} - eager
        if not new:
            break
        eager |= new
    return program


def _use_counts(program):
    uses: dict = {}
    for eqn in program.graph.eqns:
        for v in set(eqn.invars):
            uses[v] = uses.get(v, 0) + 1
    for v in program.graph.outvars:
        uses[v] = uses.get(v, 0) + 1
    return uses


def _place(program, eager) -> set:
    graph, mesh = program.graph, program.mesh
    axes, sizes = mesh.axis_names, program.axis_sizes
    links = {a: mesh.link(a) for a in axes}
    program.assignments.clear()
    program.operand_layouts.clear()
    program.produced.clear()
    program.post.clear()
    program.reshards.clear()
    program.out_layouts = []
    actual: dict = {v: program.layouts[v] for v in graph.invars}
    producer: dict = {}
    planned: set = set()
    reduced_at_consumer: set = set()

    def layout_of(v):
        return actual.get(v) if v in actual else program.layouts[v]

    def record(v, src, dst, reason, source, consumer):
        key = (v, dst)
        if key in planned or src == dst:
            return
        planned.add(key)
        program.reshards.append(Reshard(v, src, dst, plan(src, dst, v.shape, sizes),
                                        reason, source, consumer))

    def origin(v) -> str:
        e = producer.get(v)
        return f"{e.prim.name} at {e.source}" if e is not None else "the input"

    def why(v, src, dst, eqn_name) -> str:
        if src.partial and dst.partial != src.partial:
            ops = ",".join(sorted({op for _, op in src.partial}))
            over = ",".join(a for a, _ in src.partial)
            return (f"{origin(v)} left it P({ops}) over {over}; {eqn_name} needs it reduced "
                    f"to {_fmt(dst, axes)}")
        return f"{eqn_name} needs it as {_fmt(dst, axes)}; it is {_fmt(src, axes)} after {origin(v)}"

    for eqn in graph.eqns:
        fr = program.rules[eqn.index]
        rule = get_rule(eqn)
        ins = [layout_of(v) for v in eqn.invars]
        parts = [lay.partial for lay in ins]
        keep = False
        if any(parts) and constraint_spec(eqn) is None and partial_passes(rule.partial_mode(eqn), eqn, parts):
            out_elems = sum(math.prod(o.shape) for o in eqn.outvars)
            in_elems = max(math.prod(v.shape) for v, p in zip(eqn.invars, parts) if p)
            keep = out_elems <= in_elems
        passed = tuple(sorted({p for ps in parts for p in ps})) if keep else ()
        tensors = eqn_tensors(program, eqn, layout_of)
        for t, p in zip(tensors, parts):
            t.keep_partial = p if keep else ()
        best, _ = choose(fr, tensors, sizes, links, reserved={a for a, _ in passed}, passed_partial=passed)
        program.assignments[eqn.index] = best
        reduced = result_partial(best, fr)
        where = f"{eqn.prim.name} at {eqn.source}"
        for i, (v, t) in enumerate(zip(eqn.invars, tensors)):
            want = required_layout(t, best, fr, sizes, reduced)
            assert want is not None, f"chosen assignment not expressible on operand {i} of {where}"
            program.operand_layouts[(eqn.index, i)] = want
            if ins[i] != want:
                if ins[i].partial and not set(ins[i].partial) <= set(want.partial):
                    reduced_at_consumer.add(v)
                record(v, ins[i], want, why(v, ins[i], want, where), eqn.source, where)
        for j, o in enumerate(eqn.outvars):
            t = tensors[len(eqn.invars) + j]
            base = required_layout(t, best, fr, sizes, reduced)
            made = base.with_partial(set(reduced) | set(passed))
            program.produced[o] = made
            producer[o] = eqn
            actual[o] = made
            target = program.layouts[o]
            if (o in program.closed and made != target) or (o in eager and made.partial):
                program.post[o] = target
                actual[o] = target
                reason = (f"constraint at {eqn.source} pins it to {_fmt(target, axes)}" if o in program.closed
                          else f"P result of {where} is used by several consumers, one of which needs it "
                               f"reduced: reduced once here")
                record(o, made, target, reason, eqn.source, where)
    for k, v in enumerate(graph.outvars):
        want = program.out_specs[k] if program.out_specs[k] is not None else program.layouts[v].without_partial()
        program.out_layouts.append(want)
        have = layout_of(v)
        if have != want:
            if have.partial:
                reduced_at_consumer.add(v)
            record(v, have, want, why(v, have, want, f"output {program.out_paths[k]}"),
                   producer[v].source if v in producer else "<input>", f"output {program.out_paths[k]}")
    return reduced_at_consumer
