"""``auto=True``: choose the layout of every value not annotated by a MILP (Alpa-style).

Expects: ``import_annotations`` has run (user annotations are closed layouts).
Guarantees: every top-level value has a layout, closed, with provenance ``auto``; the
choice minimises the cost model's estimate of the step's resharding time subject to a
per-device memory budget, with the user's annotations as fixed layouts.

The problem:

* **Strategies** per equation (``compiler/strategies.py``): the assignments of mesh axes to
  the equation's factors (from its factor rule), each axis on at most one factor, splits even.
  A program input the user left open is a node too, whose strategies are layouts of it.
* **Costs**: an edge from a producer to a consumer costs the alpha-beta time of resharding the
  value from the layout the producer's strategy makes (partials included: their reduction) to
  the layout the consumer's strategy reads (``planner.reshard_time`` with latency weighed in
  full, as the report's time estimate does). Annotated inputs and outputs fold into the node
  costs. Each strategy's per-device work costs ``points / compute_rate`` seconds
  (``cost_model.assignment_points``), so splitting work pays where it saves more compute than
  it costs communication. The report applies the same model to any plan
  (``report/strategy.estimated_step_seconds``).
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
from collections import defaultdict

import jax
import numpy as np

from .. import compat
from ..compiler.cost_model import DEFAULT_POINTS_PER_SECOND, assignment_points
from ..compiler.ir import loss_residuals
from ..compiler.layout import Layout
from ..compiler.naming import module_path, spread_labels
from ..compiler.ops import get_rule
from ..compiler.planner import reshard_time
from ..compiler.program import Provenance
from ..compiler.strategies import (assignment_of, axis_strategies, bytes_per_device, follower,
                                   follows, input_layouts, operand_layout, partial_operand_sets, result_layout,
                                   stacked, strategy_text, without_axis)
from ..errors import NoFeasiblePlanError

name = "auto_search"


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


# ------------------------------------------------------------------------ merging

def _labels(program) -> dict:
    """Each value's nearest parameter's module path (in top-level equations, either way)."""
    graph = program.graph
    return spread_labels([(v, module_path(path)) for v, path in zip(graph.invars, program.in_paths)
                          if jax.dtypes.issubdtype(v.dtype, np.floating)], graph.eqns)


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


def _signature_ids(program) -> dict:
    """Each equation's signature as a small int (equal signatures, equal ids)."""
    interned: dict = {}
    return {e: interned.setdefault(_signature(e), len(interned)) for e in program.graph.all_eqns()}


@dataclasses.dataclass
class _Problem:
    """The MILP of one mesh axis, before solving."""
    nodes: dict               # key -> _Node (strategies, members, cost and memory per strategy)
    node_of_eqn: dict         # searched equation -> its node's key
    node_of_input: dict       # open program input -> its node's key
    node_of_value: dict       # value -> (node key, strategy index -> the value's layout)
    edges: dict               # (key a, key b) -> cost matrix over their strategy pairs
    pairs: dict               # returned state: output value -> the input it leaves as
    deferred: dict            # results whose reduction waits for their one consumer
    region_inputs: dict       # body input of a searched scan -> (scan, operand index)

    def chosen(self, choice: dict) -> dict:
        """``{node key: strategy}`` of a solution's ``{node key: strategy index}``."""
        return {k: self.nodes[k].strategies[c] for k, c in choice.items()}


@dataclasses.dataclass
class _Solution:
    choice: dict              # node key -> strategy index
    objective: float          # seconds
    status: str               # the solver's message
    pairs: int                # edges priced per strategy pair (not separable)
    variables: int
    memory: float | None      # per-device bytes of the choice, when a budget was given


@dataclasses.dataclass
class _Candidate:
    order: list               # mesh axes in the order searched
    problem: _Problem
    solution: _Solution
    base: dict                # node key -> chosen strategy


def _build(program, axis_sizes, links, axis, base, compute_rate, labels, sig_ids, passing, deferred,
           residuals) -> _Problem:
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
        return reshard_time(src, dst, v.shape, compat.itemsize(v.dtype), axis_sizes, links,
                            latency_weight=1.0)

    for v, path in zip(graph.invars, program.in_paths):
        if v in program.closed:
            continue
        key = ("input", _normalized(path), tuple(v.shape), str(v.dtype))
        if key not in nodes:
            start = base.get(key, Layout.replicated(len(v.shape)))
            nodes[key] = _Node(key, input_layouts(v, axis_sizes, start, axis), [])
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
            nodes[key] = _Node(key, input_layouts(bv, axis_sizes, start, axis), [bv])
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
            node_of_value[e.outvars[j]] = (src, lambda k, f=layout_of: stacked(f(k)))
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
        if follows(e, fr, node_of_value) and e.outvars[0] not in program.closed:
            i = next(i for i, v in enumerate(e.invars) if not v.is_const)
            root, layout_of_operand = node_of_value[e.invars[i]]
            derive = follower(fr, i, layout_of_operand, axis_sizes)
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
                strategies = axis_strategies(fr, axis_sizes, start, axis, passing.get(e, ()))
                if any(o in program.closed for o in e.outvars):
                    keep = [s for s in strategies if all(
                        result_layout(fr, s, j, axis_sizes).without_partial() == program.layouts[o]
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
                result_layout(fr, nodes[key].strategies[k], j, axis_sizes)))
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
                [assignment_points(fr.sizes, assignment_of(s), axis_sizes) for s in node.strategies]) / compute_rate)
        for j, o in enumerate(e.outvars):
            if not e.subgraphs and o not in deferred:
                node.cost += mult * once(("reduce", key, j), lambda j=j, o=o: np.array(
                    [rt(m, m.without_partial(), o) for m in
                     (result_layout(fr, s, j, axis_sizes) for s in node.strategies)]))
        for i, v in enumerate(e.invars):
            if v.is_const:
                continue
            want = lambda i=i: [operand_layout(fr, s, i, axis_sizes) for s in node.strategies]
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
        want = [stacked(lay) if xs else lay for lay in nodes[key].strategies]
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
            inode.memory += np.array([bytes_per_device(v, lay, axis_sizes) for lay in inode.strategies])
            continue
        made = [layout_of(s) for s in range(len(nodes[src].strategies))]
        final = [spec if spec is not None else m.without_partial() for m in made]
        nodes[src].cost += np.array([rt(m, f, v) for m, f in zip(made, final)])
        nodes[src].memory += np.array([bytes_per_device(v, f, axis_sizes) for f in final])
    for v, key in node_of_input.items():
        nodes[key].memory += np.array([bytes_per_device(v, lay, axis_sizes) for lay in nodes[key].strategies])
    for v in residuals:
        # Activations kept for the backward pass live through the step: in the budget too.
        if v in node_of_value and v not in node_of_input:
            src, layout_of = node_of_value[v]
            nodes[src].memory += np.array([bytes_per_device(v, layout_of(k), axis_sizes)
                                           for k in range(len(nodes[src].strategies))])
    return _Problem(nodes, node_of_eqn, node_of_input, node_of_value, edges, pairs, deferred, region_inputs)


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
    equation that may read that operand partial (``passing``: ``partial_operand_sets`` of each equation
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
    return _Solution(choice, float(result.fun) / 1e6, result.message, len(pairs), n, memory)


# ------------------------------------------------------------------------ the pass

def run(program, memory_budget=None, time_limit=10.0, compute_rate=DEFAULT_POINTS_PER_SECOND):
    t0 = time.perf_counter()
    mesh = program.mesh
    axis_sizes = {a: s for a, s in program.axis_sizes.items() if s > 1}
    links = mesh.link_models
    for eqn in program.graph.all_eqns():
        program.rules[eqn.index] = get_rule(eqn).factors(eqn)
    labels = _labels(program)
    sig_ids = _signature_ids(program)
    passing = {e: ops for e in program.graph.eqns if (ops := partial_operand_sets(e, program.rules[e.index]))}
    context = (labels, sig_ids, passing, _deferrable(program, passing),
               loss_residuals(program.graph)[1] - set(program.graph.outvars))
    solve_limit = time_limit / (4 * max(1, len(axis_sizes)))
    # One MILP per mesh axis, the axes before it fixed: each axis adds "none, or one factor"
    # to every node's strategy, so a problem has a few strategies per node instead of their
    # product. Both axis orders are solved, then each axis again with the others fixed
    # (coordinate descent); every plan found is a candidate.
    orders = [list(axis_sizes)] + ([list(reversed(axis_sizes))] if len(axis_sizes) > 1 else [])
    candidates: list[_Candidate] = []
    failures, solutions = [], []
    for order in orders:
        base = {}
        try:
            for n, axis in enumerate(order):
                problem = _build(program, axis_sizes, links, axis, base, compute_rate, *context)
                # The axes after this one can divide the memory further by at most their size.
                later = math.prod(axis_sizes[a] for a in order[n + 1:])
                budget = None if memory_budget is None else memory_budget * later
                solution = _solve(problem.nodes, problem.edges, budget, solve_limit)
                base = problem.chosen(solution.choice)
                solutions.append(solution)
        except NoFeasiblePlanError as e:
            failures.append(f"axes in order {order}: {e}")
            continue
        candidates.append(_Candidate(order, problem, solution, base))
    if len(axis_sizes) > 1 and candidates:
        # One round of coordinate descent from the better order: each axis searched again
        # with the others fixed as chosen so far.
        best = min(candidates, key=lambda c: c.solution.objective)
        order, base, objective = best.order, best.base, best.solution.objective
        for axis in order:
            trial_base = {k: without_axis(v, axis) for k, v in base.items()}
            problem = _build(program, axis_sizes, links, axis, trial_base, compute_rate, *context)
            try:
                solution = _solve(problem.nodes, problem.edges, memory_budget, solve_limit)
            except NoFeasiblePlanError:
                continue
            solutions.append(solution)
            if solution.objective < objective * (1 - 1e-9):
                objective, base = solution.objective, problem.chosen(solution.choice)
                candidates.append(_Candidate(order, problem, solution, base))
    if not candidates:
        within = f" within memory_budget={memory_budget:,} bytes per device" if memory_budget is not None else ""
        raise NoFeasiblePlanError(
            f"the layout search found no plan{within} (" + "; ".join(f.splitlines()[0] for f in failures) + ")",
            fix="raise memory_budget (per-device bytes of the step's inputs, outputs and activations kept for backward), use a "
                "larger mesh, or annotate fewer values")
    # The cheapest plan by the MILP's own objective (the cost of the executed plan, except
    # that insert_collectives may pass more partials on than the search priced).
    best = min(candidates, key=lambda c: c.solution.objective)
    _materialize(program, best.problem, best.solution.choice)
    program.search_compute_rate = compute_rate
    program.search = SearchStats(
        nodes=len(best.problem.nodes), equations=len(best.problem.node_of_eqn),
        edges=max(s.pairs for s in solutions), axis_order=tuple(best.order),
        variables=max(s.variables for s in solutions), solve_seconds=time.perf_counter() - t0,
        objective=best.solution.objective, status=str(best.solution.status), memory_bytes=best.solution.memory,
        candidates=tuple((tuple(c.order), c.solution.objective) for c in candidates))
    return program


def _materialize(program, problem: _Problem, choice: dict):
    """Write the chosen plan into the program: layouts (pinned), provenance, strategies."""
    nodes, node_of_value, node_of_input = problem.nodes, problem.node_of_value, problem.node_of_input
    node_of_eqn, region_inputs, pairs = problem.node_of_eqn, problem.region_inputs, problem.pairs
    deferred = problem.deferred
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
                      + (f"takes strategy {strategy_text(program.rules[e.index], nodes[key].strategies[choice[key]])} "
                         f"among {n}" if e in node_of_eqn else "follows its operand's chosen layout"))
        program.provenance[v] = Provenance("auto", detail)
    for e, key in node_of_eqn.items():
        if not e.subgraphs:
            program.auto_assignments[e.index] = assignment_of(nodes[key].strategies[choice[key]])
    for k, w in enumerate(program.graph.outvars):
        if program.out_specs[k] is None and pairs.get(w) in node_of_input:
            program.out_specs[k] = program.layouts[pairs[w]]
