"""``auto=True``: choose the layout of every value not annotated by a MILP (Alpa-style).

Expects: ``import_annotations`` has run (user annotations are closed layouts).
Guarantees: every top-level value has a layout, closed, with provenance ``auto``; the
choice minimises the cost model's estimate of the step's resharding time subject to a
per-device memory budget, with the user's annotations as fixed layouts.

The problem:

* **Strategies** per equation: the assignments of mesh axes to the equation's factors (from
  its factor rule), each axis on at most one factor, splits even. A program input the user
  left open is a node too, whose strategies are layouts of it.
* **Costs**: an edge from a producer to a consumer costs the alpha-beta time of resharding the
  value from the layout the producer's strategy makes (partials included: their reduction) to
  the layout the consumer's strategy reads (``planner.reshard_time`` with latency weighed in
  full, as the report's time estimate does). Annotated inputs and outputs fold into the node
  costs. Each strategy's per-device work costs ``points / compute_rate`` seconds, so splitting
  work pays where it saves more compute than it costs communication.
* **Merging**: equations of repeated layers are one node. Each value is labelled with the
  module path of its nearest parameter (``blocks.3.attn.q``); equations with the same
  primitive, shapes, params, source line and label up to layer numbers take the same strategy,
  so the problem does not grow with depth.
* **Solver**: ``scipy.optimize.milp`` (HiGHS). One binary per (node, strategy), one continuous
  per (edge, strategy pair) with transport constraints (exact for one-hot nodes), the
  memory budget as one row; a time limit returns the best plan found.

* **Partials**: an equation linear in an operand may read it partial and pass the partial on
  (``PassPartial``); a result with one such use arrives as made, its reduction priced where it
  happens. **Scans**: the body's equations are nodes priced per iteration, its inputs nodes
  resharded once before the loop, each carry-out priced back into its carry-in layout.
* **Memory**: per strategy, the per-device bytes of program inputs, outputs and activations
  kept for backward; ``memory_budget`` bounds their sum.

``while``, ``cond`` and remat bodies are not searched: such a region takes its bodies'
layouts from propagation around the layouts chosen here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections import defaultdict, deque

import jax
import numpy as np

from ..compiler.factors import (_axis_conflicts, _legalize,
                                compound_factors, project, project_back, result_partial)
from ..compiler.ir import loss_residuals, trip_counts
from ..compiler.layout import Layout
from ..compiler.ops import get_rule
from ..compiler.planner import reshard_time
from ..compiler.program import Provenance
from ..errors import NoFeasiblePlanError

name = "auto_search"

#: Per-device work rate of the cost model, in points per second: a point is one iteration of
#: an equation's factor space (a multiply-add of a matmul, an element of an elementwise op).
#: Without a compute term, replicating everything would always look cheapest.
DEFAULT_POINTS_PER_SECOND = 1e12


@dataclasses.dataclass
class SearchStats:
    nodes: int
    equations: int
    edges: int
    variables: int
    solve_seconds: float
    objective: float
    status: str
    memory_bytes: float | None
    axis_order: tuple = ()
    candidates: tuple = ()     # (axis order, MILP objective) of every plan found


# ------------------------------------------------------------------------ strategies

@dataclasses.dataclass(frozen=True)
class PassPartial:
    """A strategy of an equation linear in some operands (add, sub, mul, dot_general,
    reduce_sum) that reads ``operands`` still partial over ``axes`` and leaves its result
    partial over them: the reduction happens once, further on (the gradients of q, k and v
    summed before one all-reduce, as in Megatron's backward pass)."""
    assignment: tuple
    axes: tuple
    operands: tuple


def _assignment(strategy) -> tuple:
    return strategy.assignment if isinstance(strategy, PassPartial) else strategy


def _passed(strategy, operand=None) -> tuple:
    """The ``(axis, "sum")`` pairs a strategy passes on (to ``operand``, or to its result)."""
    if not isinstance(strategy, PassPartial) or (operand is not None and operand not in strategy.operands):
        return ()
    return tuple((a, "sum") for a in strategy.axes)


def _strategies(fr, axis_sizes, base, axis: str, passing=()) -> list:
    """``base`` (the strategy chosen for the axes searched before) with ``axis`` added to no
    factor or to one (the even, legal ones; the replicated-on-``axis`` choice first), and, where
    the equation passes partials (``passing``: the operand sets it is linear in), each of those
    with the operands read partial over ``axis``."""
    held, reads = (base.axes, base.operands) if isinstance(base, PassPartial) else ((), None)
    plain = [_assignment(base)]
    compound = compound_factors(fr)
    for f in range(len(fr.sizes)):
        if fr.kinds[f] == "replicate":
            continue
        s = tuple(ax + (axis,) if g == f else ax for g, ax in enumerate(plain[0]))
        if fr.sizes[f] % math.prod(axis_sizes[a] for a in s[f]) or _axis_conflicts(s, fr):
            continue
        if f in compound and not all(project_back(s, dims, fr.sizes, axis_sizes) is not None
                                     for dims in (*fr.operands, *fr.results)):
            continue
        plain.append(s)
    out = [PassPartial(s, held, reads) if held else s for s in plain]
    for s in plain:
        if axis not in {a for ax in s for a in ax}:
            out.extend(PassPartial(s, held + (axis,), ops) for ops in ([reads] if held else passing))
    return out


def _passing(e, fr) -> list[tuple]:
    """The operand sets ``e`` may read partial and pass on, as insert_collectives does: all
    operands of a sum (none constant), one operand of a product, and only where the result is
    no larger than a partial operand (a reduction is never made bigger)."""
    live = [i for i, v in enumerate(e.invars) if not v.is_const]
    follower = len(live) == 1 and not any(k in ("sum", "max", "min") for k in fr.kinds)
    if e.subgraphs or len(e.outvars) != 1 or fr.accumulators or follower:
        return []       # (a follower reads its operand as its root node makes it)
    mode = get_rule(e).partial_mode(e)
    fits = lambda i: math.prod(e.outvars[0].shape) <= math.prod(e.invars[i].shape)
    if mode == "same_sum":
        return [tuple(live)] if len(live) == len(e.invars) > 1 and any(fits(i) for i in live) else []
    if mode == "one_sum":
        return [(i,) for i in live if fits(i)]
    if mode in ("first_sum", "unary_sum"):
        return [(0,)] if 0 in live and fits(0) else []
    return []


def _operand_layout(fr, s, i, axis_sizes) -> Layout:
    a = _assignment(s)
    dims = project_back(a, fr.operands[i], fr.sizes, axis_sizes)
    partial = result_partial(a, fr) if i in fr.accumulators else ()
    return Layout(dims, tuple(sorted({*partial, *_passed(s, i)})))


def _result_layout(fr, s, j, axis_sizes) -> Layout:
    a = _assignment(s)
    return Layout(project_back(a, fr.results[j], fr.sizes, axis_sizes),
                  tuple(sorted({*result_partial(a, fr), *_passed(s)})))


def _input_layouts(v, axis_sizes, base: Layout, axis: str) -> list[Layout]:
    """``base`` with ``axis`` added to no dim or to one it divides evenly."""
    out = [base]
    for d in range(len(v.shape)):
        dims = tuple(ax + (axis,) if k == d else ax for k, ax in enumerate(base.dims))
        if v.shape[d] % math.prod(axis_sizes[a] for a in dims[d]) == 0:
            out.append(Layout(dims))
    return out


def _bytes_per_device(v, layout: Layout, axis_sizes) -> float:
    return math.prod(layout.local_shape(v.shape, axis_sizes)) * np.dtype(v.dtype).itemsize


# ------------------------------------------------------------------------ merging

def _labels(program) -> dict:
    """Each value's nearest parameter's module path (breadth-first over equations)."""
    from ..compiler.report import module_path
    graph = program.graph
    label, queue = {}, deque()
    for v, path in zip(graph.invars, program.in_paths):
        mp = module_path(path)
        if mp and jax.dtypes.issubdtype(np.dtype(v.dtype), np.floating):
            label[v] = mp
            queue.append(v)
    users, producer = defaultdict(list), {}
    for e in graph.eqns:
        for v in e.invars:
            users[v].append(e)
        for o in e.outvars:
            producer[o] = e
    while queue:
        v = queue.popleft()
        for e in (*users.get(v, ()), *((producer[v],) if v in producer else ())):
            for w in (*e.invars, *e.outvars):
                if not w.is_const and w not in label:
                    label[w] = label[v]
                    queue.append(w)
    return label


_DIGITS = re.compile(r"(?<![\w])\d+(?![\w])")


@functools.lru_cache(maxsize=1 << 16)
def _normalized(text: str) -> str:
    """Layer numbers out: ``blocks.3.attn.q`` -> ``blocks.#.attn.q``."""
    return re.sub(r"(^|[.\[\]'])\d+(?=$|[.\[\]'])", r"\1#", text)


def _signature(eqn) -> tuple:
    params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()
                          if not hasattr(v, "eqns") and not hasattr(v, "jaxpr")))
    return (eqn.prim.name, tuple((tuple(v.shape), str(v.dtype)) for v in eqn.invars),
            tuple((tuple(v.shape), str(v.dtype)) for v in eqn.outvars), params, eqn.source)


# ------------------------------------------------------------------------ the problem

@dataclasses.dataclass
class _Node:
    key: tuple
    strategies: list                 # assignments (equations) or Layouts (inputs)
    members: list                    # equations or input values
    cost: np.ndarray = None          # per strategy
    memory: np.ndarray = None        # per-device bytes per strategy (inputs, outputs, residuals)


def _follows(e, fr, node_of_value) -> bool:
    """An equation of one non-constant operand and no reduction (a unary elementwise op, a
    reshape, a transpose, a broadcast) follows its operand: its layout is the operand's,
    carried through its factors. Such equations are not nodes of the problem (Alpa merges
    them likewise), which halves it."""
    live = [v for v in e.invars if not v.is_const]
    return (not e.subgraphs and len(e.outvars) == 1 and len(live) == 1 and live[0] in node_of_value
            and not any(k in ("sum", "max", "min") for k in fr.kinds))


def _state_pairs(program) -> dict:
    """``{output value: input value}`` for outputs that return an input argument's state:
    an output subtree with the same leaf paths, shapes and dtypes as a whole argument (a train
    step's new parameters and optimizer state). They leave in the layout they came in, so the
    step can be called again on its own outputs without resharding."""
    def groups(values, paths, head):
        out = defaultdict(dict)
        for v, path in zip(values, paths):
            m = re.match(rf"^{head}\[(\d+)\](.*)$", path)
            if m:
                out[int(m.group(1))][m.group(2)] = v
        return out
    graph = program.graph
    ins = groups(graph.invars, program.in_paths, "args")
    outs = groups(graph.outvars, program.out_paths, "out")
    pairs, used = {}, set()
    for j, leaves in sorted(outs.items()):
        for i, args in sorted(ins.items()):
            if i in used or set(args) != set(leaves):
                continue
            if all(tuple(args[k].shape) == tuple(leaves[k].shape) and args[k].dtype == leaves[k].dtype
                   for k in leaves):
                used.add(i)
                for k, w in leaves.items():
                    if not w.is_const and w not in graph.invars:
                        pairs[w] = args[k]
                break
    return pairs


def _without_axis(strategy, axis):
    """An assignment or input layout with ``axis`` taken out (to search it again)."""
    if isinstance(strategy, PassPartial):
        held = tuple(a for a in strategy.axes if a != axis)
        rest = _without_axis(strategy.assignment, axis)
        return PassPartial(rest, held, strategy.operands) if held else rest
    if isinstance(strategy, Layout):
        return Layout(tuple(tuple(a for a in d if a != axis) for d in strategy.dims))
    return tuple(tuple(a for a in ax if a != axis) for ax in strategy)


def _points(fr, s, axis_sizes) -> float:
    s = _assignment(s)
    return math.prod(float(-(-size // math.prod(axis_sizes[a] for a in ax))) for size, ax in zip(fr.sizes, s))


def _signature_ids(program) -> dict:
    """Each equation's signature as a small int (equal signatures, equal ids)."""
    interned: dict = {}
    return {e: interned.setdefault(_signature(e), len(interned)) for e in program.graph.all_eqns()}


def _build(program, axis_sizes, links, axis, base, compute_rate, labels, sig_ids, passing, deferred,
           residuals):
    """The problem for mesh axis ``axis``, the axes before it fixed as ``base`` (node key ->
    chosen assignment or input layout)."""
    graph = program.graph
    nodes: dict = {}
    node_of_eqn, node_of_input = {}, {}
    # value -> (node key, how to get its layout from that node's strategy index)
    node_of_value: dict = {}
    chain: dict = {}          # value -> how its layout derives from its node (merging key)
    followers: dict = {}
    rank: dict = defaultdict(int)

    def rt(src, dst, v):
        if dst.partial and dst.partial != src.partial:
            # A strategy reading a value partial is only for values that arrive partial
            # alike (insert_collectives passes partials on only then).
            return _UNREACHABLE_SECONDS
        return reshard_time(src, dst, v.shape, np.dtype(v.dtype).itemsize, axis_sizes, links,
                            latency_weight=1.0)

    for v, path in zip(graph.invars, program.in_paths):
        if v in program.closed:
            continue
        key = ("input", _normalized(path), tuple(v.shape), str(v.dtype))
        if key not in nodes:
            start = base.get(key, Layout.replicated(len(v.shape)))
            nodes[key] = _Node(key, _input_layouts(v, axis_sizes, start, axis), [])
        nodes[key].members.append(v)
        node_of_input[v] = key
        node_of_value[v] = (key, lambda k, key=key: nodes[key].strategies[k])
        chain[v] = (key,)
    trips: dict = {}          # equation -> times it runs per step (scan lengths around it)
    region_inputs: dict = {}  # body input of a searched scan -> (scan, operand index)
    carries: list = []        # (body output, carry input it returns to, trips)

    def open_scan(e, mult):
        """A scan's body is searched with the program: each body input is a node (a layout
        per strategy, read by the body every iteration), a carry's result is its carry
        input's layout, and a stacked output is its body value's layout under the loop dim."""
        (body,) = e.subgraphs
        nc, nk = e.params["num_consts"], e.params["num_carry"]
        for i, bv in enumerate(body.invars):
            key = ("region-in", e.index, i)
            start = base.get(key, Layout.replicated(len(bv.shape)))
            nodes[key] = _Node(key, _input_layouts(bv, axis_sizes, start, axis), [bv])
            node_of_value[bv] = (key, lambda k, key=key: nodes[key].strategies[k])
            chain[bv] = (key,)
            region_inputs[bv] = (e, i)
        inner = mult * int(e.params["length"])
        visit(body.eqns, inner)
        for k in range(nk):
            carry = body.invars[nc + k]
            node_of_value[e.outvars[k]], chain[e.outvars[k]] = node_of_value[carry], chain[carry]
            carries.append((body.outvars[k], carry, inner))
        for j in range(nk, len(e.outvars)):
            src, layout_of = node_of_value[body.outvars[j]]
            node_of_value[e.outvars[j]] = (src, lambda k, f=layout_of: _stacked(f(k)))
            chain[e.outvars[j]] = chain[body.outvars[j]] + ("stacked",)

    def visit(eqns, mult):
        for e in eqns:
            trips[e] = mult
            if _searchable_scan(e, program.closed):
                open_scan(e, mult)
            else:
                place(e)

    def place(e):
        fr = program.rules[e.index]
        if _follows(e, fr, node_of_value) and e.outvars[0] not in program.closed:
            i = next(i for i, v in enumerate(e.invars) if not v.is_const)
            root, layout_of_operand = node_of_value[e.invars[i]]
            derive = _follower(fr, i, layout_of_operand, axis_sizes)
            followers[e] = (root, derive, i)
            node_of_value[e.outvars[0]] = (root, lambda k, d=derive: d(k)[1])
            chain[e.outvars[0]] = chain[e.invars[i]] + (sig_ids[e],)
            return
        lab = labels.get(e.outvars[0], "") if e.outvars else ""
        sig = sig_ids[e]
        rank[(lab, sig)] += 1
        key = ("eqn", _normalized(lab), sig, rank[(lab, sig)])
        if key not in nodes:
            start = base.get(key, ((),) * len(fr.sizes))
            if e.subgraphs:
                strategies = [start]
            else:
                strategies = _strategies(fr, axis_sizes, start, axis, passing.get(e, ()))
                if any(o in program.closed for o in e.outvars):
                    keep = [s for s in strategies if all(
                        _result_layout(fr, s, j, axis_sizes).without_partial() == program.layouts[o]
                        for j, o in enumerate(e.outvars) if o in program.closed)]
                    strategies = keep or strategies
            nodes[key] = _Node(key, strategies, [])
        nodes[key].members.append(e)
        node_of_eqn[e] = key
        for j, o in enumerate(e.outvars):
            # Results are materialised reduced (their layout is pinned; see run): a partial
            # is reduced once where it is made (priced below), and every consumer reads that.
            # A result with one use, by an equation that can pass it on partial, arrives as
            # made: its one consumer reduces it or passes it on (priced on the edge).
            later = o in deferred
            node_of_value[o] = (key, lambda k, key=key, fr=fr, j=j, later=later: (
                lambda lay: lay if later else lay.without_partial())(
                _result_layout(fr, nodes[key].strategies[k], j, axis_sizes)))
            chain[o] = (key, j, later)
    visit(graph.eqns, 1)
    for n in nodes.values():
        n.cost = np.zeros(len(n.strategies))
        n.memory = np.zeros(len(n.strategies))

    edges: dict = defaultdict(lambda: 0.0)
    memo: dict = {}       # members of merged nodes repeat the same vectors and matrices

    def once(key, make):
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def reshard_matrix(v, wants):
        """Rows: the strategies of the node ``v``'s layout comes from; columns: ``wants``."""
        src, layout_of = node_of_value[v]
        return np.array([[rt(layout_of(k), w, v) for w in wants] for k in range(len(nodes[src].strategies))])

    for e, (root, derive, i) in followers.items():
        # The follower reads its operand (reduced, if partial) in the layout it derives, and
        # works on the block it makes.
        v, fr = e.invars[i], program.rules[e.index]
        layout_of = node_of_value[v][1]
        work = lambda k: math.prod(float(n) for n in derive(k)[1].local_shape(e.outvars[0].shape, axis_sizes))
        nodes[root].cost += trips[e] * once(("follow", chain[e.outvars[0]]), lambda: np.array(
            [rt(layout_of(k), derive(k)[0], v) + work(k) / compute_rate
             for k in range(len(nodes[root].strategies))]))
    for e, key in node_of_eqn.items():
        fr, node, mult = program.rules[e.index], nodes[key], trips[e]
        if not e.subgraphs:     # a loop's or branch's work is its bodies', not searched here
            node.cost += mult * once(("work", key), lambda: np.array(
                [_points(fr, s, axis_sizes) for s in node.strategies]) / compute_rate)
        for j, o in enumerate(e.outvars):
            if not e.subgraphs and o not in deferred:
                node.cost += mult * once(("reduce", key, j), lambda j=j, o=o: np.array(
                    [rt(m, m.without_partial(), o) for m in
                     (_result_layout(fr, s, j, axis_sizes) for s in node.strategies)]))
        for i, v in enumerate(e.invars):
            if v.is_const:
                continue
            want = lambda i=i: [_operand_layout(fr, s, i, axis_sizes) for s in node.strategies]
            if v in node_of_value:
                matrix = once(("edge", chain[v], key, i), lambda: reshard_matrix(v, want()))
                _add_edge(edges, nodes, node_of_value[v][0], key, mult * matrix)
            else:   # annotated input: a fixed layout
                node.cost += mult * once(("fixed", program.in_paths[program.graph.invars.index(v)]
                                          if v in program.graph.invars else id(v), key, i),
                                         lambda: np.array([rt(program.layouts[v], w, v) for w in want()]))
    for bv, (e, i) in region_inputs.items():
        # A searched scan's operand is resharded once, before the loop, into its body input's
        # layout (stacked under the loop dim for a scanned-over operand).
        key, v, mult = node_of_value[bv][0], e.invars[i], trips[e]
        xs = i >= e.params["num_consts"] + e.params["num_carry"]
        want = [_stacked(lay) if xs else lay for lay in nodes[key].strategies]
        if v.is_const:
            continue
        if v in node_of_value:
            _add_edge(edges, nodes, node_of_value[v][0], key, mult * reshard_matrix(v, want))
        else:
            nodes[key].cost += mult * np.array([rt(program.layouts[v], w, v) for w in want])
    for out, carry, mult in carries:
        # Each iteration's carry-out is resharded into the carry-in layout.
        if out.is_const or out not in node_of_value:
            continue
        key = node_of_value[carry][0]
        _add_edge(edges, nodes, node_of_value[out][0], key, mult * reshard_matrix(out, nodes[key].strategies))
    pairs = _state_pairs(program)
    for k, v in enumerate(graph.outvars):
        if v.is_const or v not in node_of_value or v in node_of_input:
            continue
        spec = program.out_specs[k]
        src, layout_of = node_of_value[v]
        if spec is None and pairs.get(v) in node_of_input:
            # Returned state: it leaves in the layout its input arrives in.
            inode_key = node_of_input[pairs[v]]
            inode = nodes[inode_key]
            matrix = once(("state", chain[v], inode_key), lambda: reshard_matrix(v, inode.strategies))
            _add_edge(edges, nodes, src, inode_key, matrix)
            inode.memory += np.array([_bytes_per_device(v, lay, axis_sizes) for lay in inode.strategies])
            continue
        made = [layout_of(s) for s in range(len(nodes[src].strategies))]
        final = [spec if spec is not None else m.without_partial() for m in made]
        nodes[src].cost += np.array([rt(m, f, v) for m, f in zip(made, final)])
        nodes[src].memory += np.array([_bytes_per_device(v, f, axis_sizes) for f in final])
    for v, key in node_of_input.items():
        nodes[key].memory += np.array([_bytes_per_device(v, lay, axis_sizes) for lay in nodes[key].strategies])
    for v in residuals:
        # Activations kept for the backward pass live through the step: in the budget too.
        if v in node_of_value and v not in node_of_input:
            src, layout_of = node_of_value[v]
            nodes[src].memory += np.array([_bytes_per_device(v, layout_of(k), axis_sizes)
                                           for k in range(len(nodes[src].strategies))])
    return nodes, node_of_eqn, node_of_input, node_of_value, edges, pairs, deferred, region_inputs


def _stacked(layout: Layout) -> Layout:
    """A scan's stacked operand or result: the body's layout under an unsplit loop dim."""
    return Layout(((),) + layout.dims)


def _searchable_scan(e, closed) -> bool:
    """Scans whose body the search places with the program: every body output is a body
    value (no literal), and nothing inside is pinned by an annotation."""
    if e.prim.name != "scan":
        return False
    (body,) = e.subgraphs
    return (not any(v.is_const for v in body.outvars)
            and not any(o in closed for be in body.all_eqns() for o in be.outvars)
            and not any(v in closed for v in body.invars))


#: Cost of reading a value partial that does not arrive so (a choice the plan cannot make).
_UNREACHABLE_SECONDS = 10.0


def _deferrable(program, passing) -> dict:
    """``{value: (consumer, operand index)}`` for top-level results with exactly one use, by an
    equation that may read that operand partial (``passing``: ``_passing`` of each equation
    that has any): their reduction can wait."""
    graph = program.graph
    uses = defaultdict(list)
    for e in graph.eqns:
        for i, v in enumerate(e.invars):
            if not v.is_const:
                uses[v].append((e, i))
    for v in graph.outvars:
        if not v.is_const:
            uses[v].append((None, 0))
    made = {o for e in graph.eqns if not e.subgraphs for o in e.outvars}
    out = {}
    for v in made:
        if len(uses[v]) == 1 and uses[v][0][0] is not None:
            e, i = uses[v][0]
            if any(i in ops for ops in passing.get(e, ())):
                out[v] = (e, i)
    return out


def _follower(fr, i, layout_of_operand, axis_sizes):
    """``k -> (layout read, layout made)`` of a follower, from its root's strategy ``k``."""
    cache = {}

    def derive(k):
        if k not in cache:
            have = layout_of_operand(k).without_partial()
            got = project(fr.operands[i], have, fr.sizes, axis_sizes)
            assignment = tuple(got.get(f, ()) for f in range(len(fr.sizes)))
            legal = _legalize(assignment, fr, axis_sizes, set())
            s = legal[0] if legal else ((),) * len(fr.sizes)
            read = project_back(s, fr.operands[i], fr.sizes, axis_sizes)
            made = project_back(s, fr.results[0], fr.sizes, axis_sizes)
            if read is None or made is None:
                s = ((),) * len(fr.sizes)
                read = project_back(s, fr.operands[i], fr.sizes, axis_sizes)
                made = project_back(s, fr.results[0], fr.sizes, axis_sizes)
            cache[k] = (Layout(read), Layout(made))
        return cache[k]
    return derive


def _add_edge(edges, nodes, a, b, matrix):
    if a == b:   # two members of one node meet: both take the same strategy
        nodes[a].cost += np.diag(matrix)
        return
    if (b, a) in edges:
        edges[(b, a)] = edges[(b, a)] + matrix.T
        return
    edges[(a, b)] = edges[(a, b)] + matrix


def _separable(matrix) -> tuple | None:
    """``(row, col)`` with ``matrix == row[:, None] + col[None, :]``, or None."""
    row, col = matrix[:, 0], matrix[0, :] - matrix[0, 0]
    if np.allclose(matrix, row[:, None] + col[None, :], rtol=1e-9, atol=1e-15):
        return row, col
    return None


def _solve(nodes, edges, memory_budget, time_limit):
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix
    keys = list(nodes)
    offset, n = {}, 0
    for k in keys:
        offset[k] = n
        n += len(nodes[k].strategies)
    c = np.zeros(n)
    for k in keys:
        c[offset[k]:offset[k] + len(nodes[k].strategies)] += nodes[k].cost
    pairs = []
    for (a, b), matrix in edges.items():
        split = _separable(matrix)
        if split is not None:
            c[offset[a]:offset[a] + matrix.shape[0]] += split[0]
            c[offset[b]:offset[b] + matrix.shape[1]] += split[1]
        else:
            pairs.append((a, b, matrix))
    n_x = n
    for a, b, matrix in pairs:
        n += matrix.size
    c = np.concatenate([c, np.zeros(n - n_x)])
    rows, cols, vals, lb, ub = [], [], [], [], []
    r = 0
    for k in keys:                                    # one strategy per node
        for s in range(len(nodes[k].strategies)):
            rows.append(r), cols.append(offset[k] + s), vals.append(1.0)
        lb.append(1.0), ub.append(1.0)
        r += 1
    y = n_x
    for a, b, matrix in pairs:                        # y[s, t] = x_a[s] x_b[t]
        m, k2 = matrix.shape
        c[y:y + m * k2] = matrix.ravel()
        ys = y + np.arange(m * k2).reshape(m, k2)
        # Row s: sum_t y[s, t] - x_a[s] = 0; then column t: sum_s y[s, t] - x_b[t] = 0.
        row_ids = r + np.repeat(np.arange(m), k2)
        col_ids = r + m + np.tile(np.arange(k2), m)
        rows.extend(row_ids.tolist()), cols.extend(ys.ravel().tolist()), vals.extend([1.0] * (m * k2))
        rows.extend(col_ids.tolist()), cols.extend(ys.ravel().tolist()), vals.extend([1.0] * (m * k2))
        rows.extend(range(r, r + m)), cols.extend(range(offset[a], offset[a] + m)), vals.extend([-1.0] * m)
        rows.extend(range(r + m, r + m + k2)), cols.extend(range(offset[b], offset[b] + k2))
        vals.extend([-1.0] * k2)
        lb.extend([0.0] * (m + k2)), ub.extend([0.0] * (m + k2))
        r += m + k2
        y += m * k2
    if memory_budget is not None:
        for k in keys:
            for s, mem in enumerate(nodes[k].memory):
                if mem:
                    rows.append(r), cols.append(offset[k] + s), vals.append(float(mem))
        lb.append(-np.inf), ub.append(float(memory_budget))
        r += 1
    a_matrix = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    integrality = np.concatenate([np.ones(n_x), np.zeros(n - n_x)])
    # Seconds are tiny numbers: scale to microseconds so HiGHS's tolerances mean something.
    result = milp(c * 1e6, constraints=LinearConstraint(a_matrix, lb, ub), integrality=integrality,
                  bounds=(0, 1), options={"time_limit": float(time_limit), "disp": False})
    if result.x is None:
        raise NoFeasiblePlanError(
            f"the layout search found no plan ({result.message.strip()})",
            fix=("raise memory_budget (per-device bytes of the step's inputs, outputs and "
                 "activations kept for backward), use "
                 "a larger mesh, or annotate fewer values" if memory_budget is not None
                 else "report this program: without a budget every node has a feasible strategy"))
    choice = {k: int(np.argmax(result.x[offset[k]:offset[k] + len(nodes[k].strategies)])) for k in keys}
    memory = (sum(nodes[k].memory[choice[k]] for k in keys) if memory_budget is not None else None)
    return choice, float(result.fun) / 1e6, result.message, len(pairs), n, memory


# ------------------------------------------------------------------------ the pass

def run(program, memory_budget=None, time_limit=10.0, compute_rate=DEFAULT_POINTS_PER_SECOND):
    t0 = time.perf_counter()
    mesh = program.mesh
    axis_sizes = {a: s for a, s in program.axis_sizes.items() if s > 1}
    links = {a: mesh.link(a) for a in mesh.axis_names}
    for eqn in program.graph.all_eqns():
        program.rules[eqn.index] = get_rule(eqn).factors(eqn)
    labels = _labels(program)
    sig_ids = _signature_ids(program)
    passing = {e: ops for e in program.graph.eqns if (ops := _passing(e, program.rules[e.index]))}
    context = (labels, sig_ids, passing, _deferrable(program, passing),
               loss_residuals(program.graph)[1] - set(program.graph.outvars))
    solve_limit = time_limit / (4 * max(1, len(axis_sizes)))
    # One MILP per mesh axis, the axes before it fixed: each axis adds "none, or one factor"
    # to every node's strategy, so a problem has a few strategies per node instead of their
    # product. Both axis orders are solved, then each axis again with the others fixed
    # (coordinate descent); every plan found is a candidate.
    orders = [list(axis_sizes)] + ([list(reversed(axis_sizes))] if len(axis_sizes) > 1 else [])
    candidates, failures, stats = [], [], []
    for order in orders:
        base = {}
        try:
            for n, axis in enumerate(order):
                built = _build(program, axis_sizes, links, axis, base, compute_rate, *context)
                # The axes after this one can divide the memory further by at most their size.
                later = math.prod(axis_sizes[a] for a in order[n + 1:])
                budget = None if memory_budget is None else memory_budget * later
                solved = _solve(built[0], built[4], budget, solve_limit)
                base = {k: built[0][k].strategies[c] for k, c in solved[0].items()}
                stats.append(solved[2:5])
        except NoFeasiblePlanError as e:
            failures.append(f"axes in order {order}: {e}")
            continue
        candidates.append((order, built, solved, base))
    if len(axis_sizes) > 1 and candidates:
        order, built, solved, base = min(candidates, key=lambda c: c[2][1])
        objective = solved[1]
        for _ in range(1):
            improved = False
            for axis in order:
                trial_base = {k: _without_axis(v, axis) for k, v in base.items()}
                trial = _build(program, axis_sizes, links, axis, trial_base, compute_rate, *context)
                try:
                    t_solved = _solve(trial[0], trial[4], memory_budget, solve_limit)
                except NoFeasiblePlanError:
                    continue
                stats.append(t_solved[2:5])
                if t_solved[1] < objective * (1 - 1e-9):
                    objective, base, improved = t_solved[1], {
                        k: trial[0][k].strategies[c] for k, c in t_solved[0].items()}, True
                    candidates.append((order, trial, t_solved, base))
            if not improved:
                break
    if not candidates:
        within = f" within memory_budget={memory_budget:,} bytes per device" if memory_budget is not None else ""
        raise NoFeasiblePlanError(
            f"the layout search found no plan{within} (" + "; ".join(f.splitlines()[0] for f in failures) + ")",
            fix="raise memory_budget (per-device bytes of the step's inputs, outputs and activations kept for backward), use a "
                "larger mesh, or annotate fewer values")
    # The cheapest plan by the MILP's own objective (the cost of the executed plan, except
    # that insert_collectives may pass more partials on than the search priced).
    order, built, solved, _ = min(candidates, key=lambda c: c[2][1])
    costs = [(tuple(c[0]), c[2][1]) for c in candidates]
    _materialize(program, built, solved[0], axis_sizes)
    choice, objective, status, n_pairs, n_vars, memory = solved
    program.search_compute_rate = compute_rate
    program.search = SearchStats(
        nodes=len(built[0]), equations=len(built[1]), edges=max(s[1] for s in stats), axis_order=tuple(order),
        variables=max(s[2] for s in stats), solve_seconds=time.perf_counter() - t0,
        objective=objective, status=str(status), memory_bytes=memory, candidates=tuple(costs))
    return program


def _materialize(program, built, choice, axis_sizes):
    """Write the chosen plan into the program: layouts (pinned), provenance, strategies."""
    nodes, node_of_eqn, node_of_input, node_of_value, edges, pairs, deferred, region_inputs = built
    producer = {o: e for e in program.graph.all_eqns() for o in e.outvars}
    # A deferred result stays open: insert_collectives reduces it at its consumer, or passes
    # it on where the consumer's strategy reads it partial, as the search priced it.
    lazy = {v for v in deferred if v in node_of_value
            and node_of_value[v][1](choice[node_of_value[v][0]]).partial}
    for v, (key, layout_of) in node_of_value.items():
        if v in program.closed:
            continue
        program.layouts[v] = layout_of(choice[key]).without_partial()
        if v not in lazy:
            program.closed.add(v)
        n = len(nodes[key].strategies)
        if v in node_of_input:
            detail = f"layout search (MILP): input layout chosen among {n}"
        elif v in region_inputs:
            e = region_inputs[v][0]
            detail = f"layout search (MILP): body input of {e.prim.name} at {e.source}, layout chosen among {n}"
        else:
            e = producer[v]
            detail = (f"layout search (MILP): {e.prim.name} at {e.source} "
                      + (f"takes strategy {_strategy_text(program.rules[e.index], nodes[key].strategies[choice[key]])} "
                         f"among {n}" if e in node_of_eqn else "follows its operand's chosen layout"))
        program.provenance[v] = Provenance("auto", detail)
    for e, key in node_of_eqn.items():
        if not e.subgraphs:
            program.auto_assignments[e.index] = _assignment(nodes[key].strategies[choice[key]])
    for k, w in enumerate(program.graph.outvars):
        if program.out_specs[k] is None and pairs.get(w) in node_of_input:
            program.out_specs[k] = program.layouts[pairs[w]]


def _strategy_text(fr, s) -> str:
    parts = [f"factor {f} ({fr.kinds[f]}, {fr.sizes[f]}) over {','.join(ax)}"
             for f, ax in enumerate(_assignment(s)) if ax]
    if isinstance(s, PassPartial):
        parts.append(f"operands {','.join(map(str, s.operands))} passed on partial over {','.join(s.axes)}")
    return "; ".join(parts) if parts else "nothing split"


def estimated_step_seconds(program, compute_rate=DEFAULT_POINTS_PER_SECOND) -> dict:
    """The search's cost model applied to any placed program (auto or annotated): per-device
    compute (``points / compute_rate``) plus the alpha-beta time of every planned collective
    (latency in full). Compares plans on one scale: ``{"compute_s", "comm_s", "total_s"}``."""
    sizes = program.axis_sizes
    trips = trip_counts(program.graph)
    compute = sum(trips.get(e, 1) * _points(program.rules[e.index], program.assignments[e.index], sizes)
                  for e in program.graph.all_eqns() if e.index in program.assignments
                  and not e.subgraphs)
    comm = 0.0
    for r in program.reshards:
        for t in r.transforms:
            if t.is_collective:
                n = t.group_size(sizes)
                link = min((program.mesh.link(a) for a in t.axes), key=lambda l: l.bandwidth_bytes_per_s)
                comm += trips.get(r.value, 1) * link.time(
                    t.kind, n, math.prod(t.in_shape) * np.dtype(r.value.dtype).itemsize)
    return {"compute_s": compute / compute_rate, "comm_s": comm, "total_s": compute / compute_rate + comm}


def replication_note(program) -> str | None:
    """Why the search left every layer replicated, in the search's own numbers (``None`` when
    some layer is split): the step's compute at ``compute_rate``, the most that splitting all
    of it over the mesh could save, and how many of the cheapest all-reduces that would pay
    for (a split train step needs at least one per gradient it reduces)."""
    if getattr(program, "search", None) is None:
        return None
    words = describe_layers(program)
    if not words or any(not w.startswith("replicated") for w in words.values()):
        return None
    rate = getattr(program, "search_compute_rate", DEFAULT_POINTS_PER_SECOND)
    est = estimated_step_seconds(program, rate)
    sizes = {a: n for a, n in program.axis_sizes.items() if n > 1}
    if not sizes:
        return None
    devices = math.prod(sizes.values())
    saving = est["compute_s"] * (1 - 1 / devices)
    cheapest = min(((program.mesh.link(a).time("all-reduce", n, 0.0), a) for a, n in sizes.items()))
    return (f"why replicated: compute {est['compute_s'] * 1e3:.4g} ms at {rate:.3g} points/s per device; splitting "
            f"all of it over the {devices} devices would save at most {saving * 1e3:.4g} ms, which pays for "
            f"{int(saving // cheapest[0])} all-reduce(s) of the cheapest kind (over {cheapest[1]}: "
            f"{cheapest[0] * 1e3:.4g} ms of latency each); collectives here cost {est['comm_s'] * 1e3:.4g} ms")


def describe_layers(program) -> dict[str, str]:
    """The chosen strategy per layer in words, read off the matmuls that use parameters:
    ``{"blocks.0.attn": "Megatron tensor parallel over model (column q,k,v; row out); batch
    over data"}``. A parameter is a program input with a module path (``params['blocks']...``);
    inside a scan over layers, the body input its stacked slice arrives as."""
    from ..compiler.report import layer_of, module_path
    graph = program.graph
    param = {v: module_path(p) for v, p in zip(graph.invars, program.in_paths)
             if module_path(p) and jax.dtypes.issubdtype(np.dtype(v.dtype), np.floating)
             and not re.search(r"\.(mu|nu|count)\b|\[\d+\]\.", p)}
    stored_as = {v: program.layouts[v] for v in param}
    for e in graph.all_eqns():
        if e.prim.name == "scan":
            (body,) = e.subgraphs
            first_xs = e.params["num_consts"] + e.params["num_carry"]
            for i, (outer, inner) in enumerate(zip(e.invars, body.invars)):
                if outer in param:
                    param[inner] = param[outer]
                    lay = stored_as[outer]
                    stored_as[inner] = Layout(lay.dims[1:]) if i >= first_xs else lay
    phrases: dict = defaultdict(list)
    seen = set()
    for e in graph.all_eqns():
        if e.prim.name != "dot_general" or e.index not in program.assignments:
            continue
        fr, s = program.rules[e.index], program.assignments[e.index]
        for i, v in enumerate(e.invars):
            if v not in param or param[v] in seen:
                continue
            seen.add(param[v])          # its first use: the forward pass
            mp = param[v]
            phrases.setdefault(layer_of(mp), [])
            name = mp.rsplit(".", 1)[-1]
            mine = {f for d in fr.operands[i] for f in d}
            other = {f for d in fr.operands[1 - i] for f in d}
            for f, axes in enumerate(s):
                for a in axes:
                    if fr.kinds[f] == "sum":
                        phrases[layer_of(mp)].append(("row", a, name))
                    elif f in mine and f in other:     # a batch dim of the weight: experts
                        phrases[layer_of(mp)].append(("expert", a, name))
                    elif f in mine:
                        phrases[layer_of(mp)].append(("column", a, name))
                    elif f in other:
                        phrases[layer_of(mp)].append(("batch", a, name))
            stored = stored_as[v]
            read = program.operand_layouts.get((e.index, i))
            for a in {a for d in stored.dims for a in d} - {a for d in (read.dims if read else ()) for a in d}:
                phrases[layer_of(mp)].append(("stored", a, name))
    out = {}
    for layer, items in phrases.items():
        words = []
        by = lambda kind: sorted({(a, n) for k, a, n in items if k == kind})
        cols, rows = by("column"), by("row")
        for a in sorted({a for a, _ in cols} & {a for a, _ in rows}):
            words.append(f"Megatron tensor parallel over {a} (column {','.join(n for b, n in cols if b == a)}; "
                         f"row {','.join(n for b, n in rows if b == a)})")
        for a in sorted({a for a, _ in cols} - {a for a, _ in rows}):
            words.append(f"column-parallel over {a} ({','.join(n for b, n in cols if b == a)})")
        for a in sorted({a for a, _ in rows} - {a for a, _ in cols}):
            words.append(f"row-parallel over {a} ({','.join(n for b, n in rows if b == a)})")
        for a in sorted({a for a, _ in by("expert")}):
            words.append(f"expert parallel over {a} ({','.join(n for b, n in by('expert') if b == a)} "
                         f"split on their expert dim)")
        for a in sorted({a for a, _ in by("batch")}):
            words.append(f"batch over {a}")
        for a in sorted({a for a, _ in by("stored")}):
            words.append(f"parameters stored split over {a}, gathered for use (ZeRO-3)")
        out[layer] = "; ".join(words) if words else "replicated: every device computes the whole layer"
    return out
