"""Microbatch analysis of a loop body: which dim of every value is the batch, and whether the
body is separable over it.

A microbatch loop is a mesh axis run in time: cutting the batch into M microbatches and
running the body once per microbatch is the same as splitting the batch factor over a
virtual axis of size M. So the SBP algebra decides what happens to every loop value:

- split on the batch factor (``("batch", d)``): one slice per microbatch, concatenated;
- ``P(sum)`` over it (``"sum"``, a contraction over the batch: parameter gradients):
  accumulated over microbatches;
- batch-free (``None``): the same for every microbatch, computed once.

The batch dim of each value comes from the factor rules: the body's tensor dims are joined
through the factors they share (the major factor of each dim), and the carry's batch dim
names the class. Separability is the partial algebra: a ``replicate`` / ``max`` / ``min``
batch factor, or a batch-partial value reaching an op that is not linear in it (the
``x - mean(x)`` of a batch norm) means the body needs the whole batch: a ``ShardingError``
naming the op and its source line.

Example, the forward body of a scanned transformer block ``x[B,T,D], w_i[D,F]``::

    carry x (batch 0) -> dot_general x @ w_i -> [B,T,F] (batch 0) -> ... -> carry out (batch 0)
    backward body: dW = dot_general(x, dy) contracting B -> "sum" (accumulated)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ShardingError
from .kinds import FactorKind
from .ops import get_rule, partial_passes

SUM = "sum"


class UnionFind:
    """Union-find over hashable nodes (also the dim classes of passes/idle_axes.py)."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclass
class BatchAnalysis:
    """Per loop operand/result of one ``scan``: body-level batch dims and output kinds."""
    const_dims: tuple            # batch dim of each const, or None
    carry_dims: tuple            # batch dim of each carry
    xs_dims: tuple               # body-level (per-iteration) batch dim of each xs, or None
    ys_kinds: tuple              # per ys: "concat", "sum" or "once"
    ys_dims: tuple               # body-level batch dim of each "concat" ys, else None
    batch_dims: dict = field(default_factory=dict)   # body Value (nested too) -> its batch dim


def _not_separable(scan, eqn, why):
    return ShardingError(
        f"the layer loop (scan at {scan.source}) is pipelined, which runs its body on one microbatch "
        f"at a time, but its body is not separable over the batch: {eqn.prim.name} at {eqn.source} "
        f"{why}.\n  fix: compute batch statistics outside the pipelined loop, or leave the stacked "
        f"dim unsplit (no stage axis on the scanned parameters) so the loop is not pipelined")


def _join(graph, rules, uf):
    for e in graph.eqns:
        fr = rules[e.index]
        for tensors, values in ((fr.operands, e.invars), (fr.results, e.outvars)):
            for v, dims in zip(values, tensors):
                if v.is_const:
                    continue
                for d, fids in enumerate(dims):
                    if fids:
                        uf.union((id(v), d), (e.index, fids[0]))
        for v, dims in fr.linked:
            for d, fids in enumerate(dims):
                if fids:
                    uf.union((id(v), d), (e.index, fids[0]))
        for sub in e.subgraphs:
            _join(sub, rules, uf)


def _track(scan, graph, rules, state):
    """Forward: each value's state (("batch", d), SUM or None) from its operands'."""
    for e in graph.eqns:
        ins = [None if v.is_const else state.get(id(v)) for v in e.invars]
        if all(s is None for s in ins):
            continue
        if e.subgraphs:
            if e.prim.name not in ("remat2", "checkpoint"):
                raise _not_separable(scan, e, "is a nested loop or branch over the batch (not supported "
                                              "inside a pipelined layer loop yet)")
            (sub,) = e.subgraphs
            for v, s in zip(sub.invars, ins):
                if s is not None:
                    state[id(v)] = s
            _track(scan, sub, rules, state)
            for o, v in zip(e.outvars, sub.outvars):
                s = None if v.is_const else state.get(id(v))
                if s is not None:
                    state[id(o)] = s
            continue
        fr = rules[e.index]
        if SUM in ins:
            if any(isinstance(s, tuple) for s in ins):
                raise _not_separable(scan, e, "combines a value summed over the batch with per-example "
                                              "values (a batch statistic)")
            parts = [(("__mb", "sum"),) if s == SUM else () for s in ins]
            # A float cast of a sum over microbatches is the sum of the casts up to rounding
            # (the pipeline accumulates low-precision sums in float32, see pipelined_scan).
            cast = e.prim.name == "convert_element_type" and ins == [SUM]
            if not cast and not partial_passes(get_rule(e).partial_mode(e), e, parts):
                raise _not_separable(scan, e, "is not linear in a value summed over the batch (a batch "
                                              "statistic)")
            for o in e.outvars:
                state[id(o)] = SUM
            continue
        factors = set()
        for i, s in enumerate(ins):
            if isinstance(s, tuple):
                fids = fr.operands[i][s[1]]
                if not fids:
                    continue                     # a size-1 batch dim: nothing to split
                factors.add(fids[0])
        if not factors:
            continue
        if len(factors) > 1:
            raise _not_separable(scan, e, "pairs different examples of the batch with each other")
        (f,) = factors
        kind = fr.kinds[f]
        if kind in (FactorKind.REPLICATE, FactorKind.MAX, FactorKind.MIN):
            how = "its rule keeps that dim whole" if kind == FactorKind.REPLICATE else f"reduces it with {kind}"
            raise _not_separable(scan, e, f"needs the whole batch dim ({how})")
        for o, dims in zip(e.outvars, fr.results):
            where = [d for d, fids in enumerate(dims) if f in fids]
            if not where:
                if kind != FactorKind.SUM:
                    raise _not_separable(scan, e, "drops the batch dim without summing over it")
                state[id(o)] = SUM
            elif dims[where[0]][0] != f:
                raise _not_separable(scan, e, "folds the batch into a dim as its minor part")
            else:
                state[id(o)] = ("batch", where[0])


def _values(graph):
    yield from graph.invars
    for e in graph.eqns:
        yield from e.outvars
        for sub in e.subgraphs:
            yield from _values(sub)


def analyse_scan(eqn, rules, carry0_dim: int) -> BatchAnalysis:
    """Batch dims and output kinds of ``scan`` equation ``eqn`` (params normalised to
    num_consts/num_carry), taking dim ``carry0_dim`` of its first carry as the batch."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    (body,) = eqn.subgraphs
    uf = UnionFind()
    _join(body, rules, uf)
    for k in range(nk):                          # a carry is the same value in every iteration
        vi, vo = body.invars[nc + k], body.outvars[k]
        if vo.is_const:
            continue
        for d in range(len(vi.shape)):
            uf.union((id(vi), d), (id(vo), d))
    root = uf.find((id(body.invars[nc]), carry0_dim))

    def batch_dim(v):
        if v.is_const:
            return None
        return next((d for d in range(len(v.shape)) if uf.find((id(v), d)) == root), None)

    const_dims = tuple(batch_dim(v) for v in body.invars[:nc])
    carry_dims = tuple(batch_dim(v) for v in body.invars[nc:nc + nk])
    xs_dims = tuple(batch_dim(v) for v in body.invars[nc + nk:])
    for k, d in enumerate(carry_dims):
        if d is None:
            raise ShardingError(
                f"the layer loop (scan at {eqn.source}) is pipelined, but its loop carry {k} "
                f"{tuple(body.invars[nc + k].shape)} has no batch dim (a counter or an accumulator), so "
                f"it cannot be cut into microbatches.\n  fix: carry only activations through the layer "
                f"loop, or leave the stacked dim unsplit so the loop is not pipelined")
    state: dict = {}
    for v, d in zip(body.invars, const_dims + carry_dims + xs_dims):
        if d is not None:
            state[id(v)] = ("batch", d)
    _track(eqn, body, rules, state)
    for k, d in enumerate(carry_dims):
        s = None if body.outvars[k].is_const else state.get(id(body.outvars[k]))
        if s != ("batch", d):
            raise ShardingError(
                f"the layer loop (scan at {eqn.source}) is pipelined, but its carry {k} leaves the body "
                f"{'summed over' if s == SUM else 'without'} its batch dim {d}; a pipeline carries each "
                f"microbatch's activations through the layers.\n  fix: leave the stacked dim unsplit so "
                f"the loop is not pipelined")
    # Every body value with a dim in the batch class is cut per microbatch, batch-free ones
    # too (a constant broadcast to [B, ...] is made at the microbatch's size).
    batch_dims = {v: d for v in _values(body) if (d := batch_dim(v)) is not None}
    ys_kinds, ys_dims = [], []
    for v in body.outvars[nk:]:
        s = None if v.is_const else state.get(id(v))
        d = batch_dim(v)
        if isinstance(s, tuple) or d is not None:
            ys_kinds.append("concat")
            ys_dims.append(s[1] if isinstance(s, tuple) else d)
        else:
            ys_kinds.append("sum" if s == SUM else "once")
            ys_dims.append(None)
    return BatchAnalysis(const_dims, carry_dims, xs_dims, tuple(ys_kinds), tuple(ys_dims), batch_dims)
