"""Per-device step memory of a plan, modelled on what XLA CPU's compiler does with it.

``ShardingReport.memory()`` delegates here. Everything is computed from the plan (values,
layouts, collectives): no compile, so it works on abstract meshes. ``step_total`` estimates
``memory_analysis()``'s argument + output + temp - alias; the temporaries follow XLA CPU:

1. Fusion (``materialized``): an elementwise result all of whose users are elementwise ops
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
3. Schedule (``_Schedule``): XLA CPU orders a computation breadth-first (Kahn's algorithm
   with a FIFO queue, the concurrency-optimized scheduler): an instruction runs as soon as
   its operands exist. So a copy or all-gather of a parameter runs at the start and is kept
   to its last reader. Fused equations take no slot; they run inside the fusion that reads
   them, so their operands live until that fusion runs. Collective results are nodes of
   their own; independent all-reduces over the same axes are one (XLA's all-reduce
   combiner, up to 30 MiB / 256 operands), so every gradient all-reduce of a data-parallel
   step runs after the last gradient, and the parameter updates after it.
4. Buffer assignment (``temporaries``): each stored value lives from the instruction that
   makes it to the last one that reads it; an elementwise fusion writes in place into an
   operand of its size that dies there. Output buffers (updated parameters and optimizer
   state) are free until they are written, and XLA assigns temporaries there first (largest
   temporary first, each into the smallest output buffer that holds it and is free over its
   whole life); the rest go to the temp heap, whose size is the peak of their live bytes (the
   best-fit heap packs them with little fragmentation).

A loop (scan/while) body is its own computation: its peak is added while the loop runs.
"""
from __future__ import annotations

import bisect
import re
from collections import deque

import jax
import numpy as np

from .ir import loss_residuals

# Results XLA fuses into their users (not kept in memory) when every user is in _ABSORB.
_FUSIBLE = {"neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
            "tanh", "logistic", "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt", "abs", "not", "erf", "erfc",
            "erf_inv", "square", "integer_pow", "reduce_precision", "copy", "copy_p", "stop_gradient",
            "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "and", "or", "xor", "eq",
            "ne", "lt", "le", "gt", "ge", "atan2", "select_n", "clamp", "convert_element_type",
            "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "transpose"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin"}
_ABSORB = _FUSIBLE | _REDUCE
_BITCAST = {"reshape", "squeeze", "expand_dims"}
_YNN_REDUCE_MIN_ELEMENTS = 4096
# XLA's InstructionFusion::IsExpensive (float divide/remainder; integer ones are cheap).
_EXPENSIVE = {"exp", "exp2", "expm1", "log", "log1p", "logistic", "tanh", "tan", "sqrt", "rsqrt",
              "cbrt", "pow", "atan2", "erf", "erfc", "div", "rem"}
# Elementwise fusions whose output may take the buffer of a same-sized operand that dies there.
_IN_PLACE = (_FUSIBLE - {"broadcast_in_dim", "iota", "transpose"}) | {"dynamic_update_slice", "scatter-add",
                                                                      "scatter_add"}


def _elements(rep, v):
    p = rep.program
    return rep._local_bytes(v, p.final_layout(v)) // max(1, np.dtype(v.dtype).itemsize)


def _expensive(e) -> bool:
    name = e.prim.name
    if name not in _EXPENSIVE:
        return False
    if name in ("div", "rem"):
        return any(jax.dtypes.issubdtype(np.dtype(o.dtype), np.floating) for o in e.outvars)
    return True


def materialized(rep) -> dict:
    """Per-device bytes of each intermediate XLA is expected to keep in memory (0 for one it
    fuses into its users). Program inputs and outputs count 0 here: their buffers are the
    arguments and outputs."""
    cached = getattr(rep, "_mat_cache", None)
    if cached is not None:
        return cached
    p = rep.program
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
        # Reductions XLA CPU hands to YNNPACK (operands of _YNN_REDUCE_MIN_ELEMENTS or more):
        # they fuse at most the one product that feeds them, so what feeds that product (or
        # the reduction itself) is materialized. Smaller reductions fuse their producers.
        big = {e for e in graph.eqns if e.prim.name in _REDUCE and e.invars
               and _elements(rep, e.invars[0]) >= _YNN_REDUCE_MIN_ELEMENTS}
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
                    keep = not (e.prim.name in _FUSIBLE and all(
                        u.prim.name in _ABSORB and u not in big and u not in into_reduce for u in us))
                size[o] = rep._local_bytes(o, p.final_layout(o)) if keep else 0
            for sub in e.subgraphs:
                visit(sub, False)
        # A product fused into a reduction takes its operands whole: one broadcast to the
        # product's shape is materialized, and kept as long as the operand it broadcasts.
        made = {o for e in graph.eqns for o in e.outvars}
        for u in into_reduce:
            full = rep._local_bytes(u.outvars[0], p.final_layout(u.outvars[0]))
            for v in u.invars:
                if not v.is_const and v.shape != u.outvars[0].shape:
                    if v in made:
                        size[v] = max(size.get(v, 0), full)
                    else:               # a parameter's broadcast, made at the start
                        bcast_inputs[id(u)] = bcast_inputs.get(id(u), 0) + full
        # Elementwise results read only by operands copied into a canonical layout are fused
        # into those copies (the copy is what is stored, see _Schedule).
        copied = {(u.index, k) for u in graph.eqns for k, _ in _operand_copies(u)}

        def only_copied(o):
            return all((u.index, k) in copied for u in users.get(o, ()) for k, w in enumerate(u.invars)
                       if w is o) and users.get(o) and o not in moved and not (top and o in top_io)
        for e in graph.eqns:
            if e.prim.name in _FUSIBLE and e.prim.name != "transpose" and len(e.outvars) == 1 \
                    and only_copied(e.outvars[0]):
                size[e.outvars[0]] = 0
        # A reshape is a bitcast in XLA: what it reads is stored instead, and lives on.
        for e in reversed(graph.eqns):
            if e.prim.name in _BITCAST and len(e.outvars) == 1 and e.invars and not e.invars[0].is_const:
                o, v = e.outvars[0], e.invars[0]
                if size.get(o, 0) and size[o] == rep._local_bytes(o, p.final_layout(o)):
                    size[o] = 0
                    if v in made and not (top and v in top_io):
                        size[v] = max(size.get(v, 0), rep._local_bytes(v, p.final_layout(v)))
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
                            size[o] = rep._local_bytes(o, p.final_layout(o))
                            changed = True
            if not changed:
                break
    visit(p.graph, True)
    rep._bcast_inputs = bcast_inputs
    rep._mat_cache = size
    return size


class _Schedule:
    """XLA CPU's breadth-first order of one computation (``graph``), with fused equations
    run inside their readers, and the live interval of every stored value in it."""

    def __init__(self, rep, graph, top, size, coll_of, coll_bytes, coll_kind):
        p = rep.program
        eqns = graph.eqns
        produced = {o: e for e in eqns for o in e.outvars}
        outs = set(graph.outvars)
        top_out = set(p.graph.outvars) if top else set()

        def real(e):
            return bool(e.subgraphs) or not e.outvars or any(
                size.get(o, 0) or o in top_out or o in outs for o in e.outvars)

        # Nodes: equations, and collective results (key (id(value), layout)); independent
        # all-reduces over the same axes are one node (XLA's all-reduce combiner).
        coll_nodes: dict = {}
        for e in eqns:
            for k, v in enumerate(e.invars):
                key = None if v.is_const else coll_of.get((e.index, k))
                if key is not None and key not in coll_nodes:
                    coll_nodes[key] = (produced.get(v), e)
        post_keys = getattr(rep, "_post_keys", {})
        out_keys = {}                            # outputs that are a post collective's result
        for v in top_out:
            key = post_keys.get(id(v))
            if key is not None and v in produced:
                out_keys[key] = v
                coll_nodes.setdefault(key, (produced[v], produced[v]))
        node_of = _combine_all_reduces(eqns, produced, coll_of, coll_nodes, coll_kind, coll_bytes)
        # Operands XLA copies into another layout first (convolutions' canonical layouts):
        # the copy is an instruction of its own, run as soon as its operand exists.
        copies: dict = {}
        same: dict = {}                         # one copy per (value, layout, order): CSE
        for e in eqns:
            for k, order in _operand_copies(e):
                v = e.invars[k]
                if not v.is_const and not (v in produced and produced[v].prim.name in ("rev", "transpose")):
                    lay = p.operand_layouts.get((e.index, k)) or p.final_layout(v)
                    c = same.setdefault((id(v), lay, order), ("copy", e.index, k))
                    copies[(e.index, k)] = (c, rep._local_bytes(v, lay))
        users: dict = {}
        deps: dict = {}
        for key, (src, _) in coll_nodes.items():
            n = node_of[key]
            deps.setdefault(n, set())
            if src is not None and id(src) not in deps[n]:
                deps[n].add(id(src))
                users.setdefault(id(src), []).append(n)
        for e in eqns:
            need = set()
            for k, v in enumerate(e.invars):
                if v.is_const:
                    continue
                key = coll_of.get((e.index, k))
                under = node_of[key] if key is not None else id(produced[v]) if v in produced else None
                if (e.index, k) in copies:
                    c = copies[(e.index, k)][0]
                    if c not in deps:
                        deps[c] = 0 if under is None else 1
                        if under is not None:
                            users.setdefault(under, []).append(c)
                    under = c
                if under is not None:
                    need.add(under)
            deps[id(e)] = len(need)
            for n in need:
                lst = users.setdefault(n, [])
                if not lst or lst[-1] is not e:
                    lst.append(e)
        for n in {node_of[key] for key in coll_nodes}:
            deps[n] = len(deps[n])
        order = {id(e): k for k, e in enumerate(eqns)}
        by_index = {e.index: e for e in eqns}
        ready = [(k, e) for k, e in enumerate(eqns) if deps[id(e)] == 0]
        ready += sorted({(order[id(first)] - 0.5, node_of[key]) for key, (src, first) in coll_nodes.items()
                         if deps[node_of[key]] == 0}, key=lambda t: t[0])
        ready += sorted({(order[id(by_index[c[1]])] - 0.5, c) for c, _ in copies.values() if deps[c] == 0})
        ready.sort(key=lambda t: t[0])
        queue = deque(n for _, n in ready)
        pos: dict = {}
        t = 0
        is_real = {id(e): real(e) for e in eqns}

        def node_id(n):
            return n if isinstance(n, tuple) else id(n)

        def run(n):
            nonlocal t
            stack = [n]
            while stack:
                m = stack.pop()
                pos[node_id(m)] = t
                if isinstance(m, tuple) or is_real[id(m)]:
                    t += 1
                for u in users.get(node_id(m), ()):
                    uid = node_id(u)
                    deps[uid] -= 1
                    if deps[uid] == 0:
                        if not isinstance(u, tuple) and not is_real[id(u)]:
                            stack.append(u)      # fused: runs inside its reader, no slot
                        else:
                            queue.append(u)
        while queue:
            run(queue.popleft())
        for e in eqns:                           # unreachable (should not happen): program order
            if id(e) not in pos:
                pos[id(e)] = t
                t += 1
        self.length = t
        # When each equation really runs: a fused one inside the last of its readers.
        readers: dict = {}
        for e in eqns:
            for v in e.invars:
                if not v.is_const:
                    readers.setdefault(v, []).append(e)
        run_at: dict = {}
        for e in reversed(eqns):
            if is_real[id(e)]:
                run_at[id(e)] = pos[id(e)]
            else:                               # read by a copy: when the copy runs
                at = [pos[copies[(u.index, k)][0]] if (u.index, k) in copies else run_at[id(u)]
                      for o in e.outvars for u in readers.get(o, ()) for k, w in enumerate(u.invars) if w is o]
                run_at[id(e)] = max(at, default=pos[id(e)])
        self.run_at = run_at
        # Live intervals (times doubled: an in-place output starts after its operand ends).
        last: dict = {}
        for e in eqns:
            for k, v in enumerate(e.invars):
                if v.is_const:
                    continue
                key = coll_of.get((e.index, k))
                n = key if key is not None else v
                c = copies.get((e.index, k))
                last[n] = max(last.get(n, -1), pos[c[0]] if c else run_at[id(e)])
        for key, (src, _) in coll_nodes.items():
            if src is not None:
                v = rep._value_of_key.get(key)
                if v is not None:
                    last[v] = max(last.get(v, -1), pos[node_of[key]])
        self.intervals = []                     # [bytes, start, end, value-or-key]
        by_end: dict = {}
        for e in eqns:
            for o in e.outvars:
                b = size.get(o, 0)
                if b:
                    s = run_at[id(e)]
                    iv = [b, 2 * s, 2 * max(s, last.get(o, s)), o]
                    self.intervals.append(iv)
                    by_end.setdefault(iv[2], []).append(iv)
        for key, (src, _) in coll_nodes.items():
            if key in out_keys:
                continue                        # written into the output's buffer
            s = pos[node_of[key]]
            iv = [coll_bytes[key], 2 * s, 2 * max(s, last.get(key, s)), key]
            self.intervals.append(iv)
            by_end.setdefault(iv[2], []).append(iv)
        copy_end: dict = {}
        for (i, k), (c, b) in copies.items():
            copy_end[c] = (b, max(copy_end.get(c, (b, pos[c]))[1], run_at[id(by_index[i])]))
        for c, (b, e_at) in copy_end.items():
            self.intervals.append([b, 2 * pos[c], 2 * e_at, c])
        bcast = getattr(rep, "_bcast_inputs", {})
        for e in eqns:                          # parameters broadcast for a big reduction
            if id(e) in bcast:
                self.intervals.append([bcast[id(e)], 0, 2 * run_at[id(e)], ("broadcast", e.index)])
        for e in eqns:                          # a result made in the canonical layout, then copied
            if e.prim.name == "conv_general_dilated" and _canonical_order(e, "out") is not None:
                o = e.outvars[0]
                self.intervals.append([rep._local_bytes(o, p.final_layout(o)), 2 * run_at[id(e)],
                                       2 * run_at[id(e)], ("copy", e.index, -1)])
        # In place: an elementwise fusion writes over a same-sized stored operand that dies there.
        for e in eqns:
            if e.prim.name not in _IN_PLACE or len(e.outvars) != 1 or not is_real[id(e)]:
                continue
            b = size.get(e.outvars[0], 0)
            at = 2 * run_at[id(e)]
            for iv in by_end.get(at, ()):
                if iv[0] == b and iv[1] < at and iv[3] is not e.outvars[0]:
                    iv[2] = at - 1
                    by_end[at].remove(iv)
                    break
        self.produced_at = {o: 2 * run_at[id(e)] for e in eqns for o in e.outvars}
        for key, v in out_keys.items():
            self.produced_at[v] = 2 * pos[node_of[key]]


def _canonical_order(e, which):
    """The dim order XLA CPU's convolution wants for the lhs / rhs / out of conv ``e``
    (batch, spatial..., feature; kernel spatial..., in, out), or None when it already is."""
    dn = e.params.get("dimension_numbers")
    spec = getattr(dn, {"lhs": "lhs_spec", "rhs": "rhs_spec", "out": "out_spec"}[which], None)
    if spec is None:
        return None
    spec = tuple(spec)
    want = (*spec[2:], spec[1], spec[0]) if which == "rhs" else (spec[0], *spec[2:], spec[1])
    return None if want == tuple(range(len(spec))) else want


def _dot_order(e, k):
    """For operand ``k`` of dot ``e``: None when its dims are already (batch, free,
    contracting) or (batch, contracting, free) in order (XLA CPU's matmuls take either),
    else the order XLA copies it into first."""
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    contract, batch = (lc, lb) if k == 0 else (rc, rb)
    rank = len(e.invars[k].shape)
    free = tuple(d for d in range(rank) if d not in contract and d not in batch)
    ident = tuple(range(rank))
    orders = ((*batch, *free, *contract), (*batch, *contract, *free))
    return None if ident in orders else orders[k]


def _operand_copies(e):
    """``[(operand index, order)]``: operands of ``e`` XLA copies into a canonical layout
    before running it (convolutions; batched matmuls whose batch dims do not lead)."""
    if e.prim.name == "conv_general_dilated":
        return [(k, _canonical_order(e, which)) for k, which in enumerate(("lhs", "rhs"))
                if _canonical_order(e, which) is not None]
    if e.prim.name == "dot_general" and len(e.invars) == 2:
        return [(k, _dot_order(e, k)) for k in (0, 1) if _dot_order(e, k) is not None]
    return ()


def _collective_results(rep):
    """``{(eqn index, operand index): key}`` for operands that are collective results, and
    ``{key: per-device bytes}`` (key: ``(id(value), layout)``; one result per key)."""
    p = rep.program
    coll_of, coll_bytes, value_of, coll_kind = {}, {}, {}, {}
    wanted, post = {}, {}
    for r in p.reshards:
        moves = [t for t in r.transforms if t.is_collective]
        if not moves:
            continue
        # A "post" collective runs right after the value is made (e.g. a gradient's
        # all-reduce): every reader, and the output, reads its result.
        key = (id(r.value), r.dst, "post") if p.post.get(r.value) == r.dst else (id(r.value), r.dst)
        if len(key) == 3:
            post[id(r.value)] = key
        wanted[key] = r.value
        coll_bytes[key] = rep._local_bytes(r.value, r.dst)
        value_of[key] = r.value
        if len(moves) == 1 and moves[0].kind == "all-reduce":
            coll_kind[key] = (tuple(sorted(moves[0].axes)), moves[0].op)
    if wanted:
        for e in rep._eqns:
            for k, v in enumerate(e.invars):
                key = (id(v), p.operand_layouts.get((e.index, k)))
                if key in wanted:
                    coll_of[(e.index, k)] = key
                elif id(v) in post and not v.is_const:
                    coll_of[(e.index, k)] = post[id(v)]
    rep._value_of_key = value_of
    rep._post_keys = post
    return coll_of, coll_bytes, coll_kind


_COMBINE_MAX_BYTES = 30 << 20        # XLA's all-reduce combiner thresholds
_COMBINE_MAX_COUNT = 256


def _combine_all_reduces(eqns, produced, coll_of, coll_nodes, coll_kind, coll_bytes):
    """``{collective key: node}``: all-reduces over the same axes with the same op that do
    not depend on each other (the same depth in chains of such all-reduces) share one node,
    in groups of up to 30 MiB / 256 operands, as XLA's all-reduce combiner makes them."""
    node_of = {key: key for key in coll_nodes}
    kinds = {coll_kind[k] for k in coll_nodes if k in coll_kind}
    if not kinds or sum(k in coll_kind for k in coll_nodes) < 2:
        return node_of
    empty: dict = {}
    depth: dict = {}            # node -> {kind: deepest all-reduce chain above and at it}
    level: dict = {}

    def of_key(key):
        got = depth.get(key)
        if got is None:
            src = coll_nodes[key][0]
            base = depth.get(id(src), empty) if src is not None else empty
            kind = coll_kind.get(key)
            if kind is None:
                got = base
            else:
                level[key] = base.get(kind, 0) + 1
                got = {**base, kind: level[key]}
            depth[key] = got
        return got

    for e in eqns:
        acc = empty
        for k, v in enumerate(e.invars):
            if v.is_const:
                continue
            key = coll_of.get((e.index, k))
            d = of_key(key) if key is not None else depth.get(id(produced[v]), empty) if v in produced else empty
            if d is acc or not d:
                continue
            if not acc:
                acc = d
            else:
                acc = {kd: max(acc.get(kd, 0), d.get(kd, 0)) for kd in acc.keys() | d.keys()}
        depth[id(e)] = acc
    groups: dict = {}
    for key in coll_nodes:
        if key in coll_kind:
            of_key(key)
            groups.setdefault((coll_kind[key], level[key]), []).append(key)
    n = 0
    for members in groups.values():
        chunk, total = [], 0
        for key in members + [None]:
            if key is None or len(chunk) >= _COMBINE_MAX_COUNT or (chunk and total + coll_bytes[key] > _COMBINE_MAX_BYTES):
                if len(chunk) > 1:
                    for m in chunk:
                        node_of[m] = ("all-reduce", n)
                    n += 1
                chunk, total = [], 0
            if key is not None:
                chunk.append(key)
                total += coll_bytes[key]
    return node_of


def _peak(intervals) -> int:
    """Peak of the summed bytes of ``[bytes, start, end]`` intervals (ends inclusive)."""
    if not intervals:
        return 0
    ev = []
    for b, s, e, *_ in intervals:
        ev.append((s, 0, b))
        ev.append((e, 1, -b))
    ev.sort()
    live = peak = 0
    for _, kind, d in ev:
        live += d
        if kind == 0 and live > peak:
            peak = live
    return int(peak)


def _pack_into_outputs(temps, outputs):
    """XLA's buffer reuse before the heap: largest temporary first, each into the smallest
    output buffer that holds it and is free over its whole life (before the output is
    written, and not holding another temporary then). Returns the temporaries left over."""
    if not outputs:
        return temps
    outputs = sorted(outputs, key=lambda o: (o[0], -o[1]))       # (bytes, written at)
    sizes = [o[0] for o in outputs]
    busy = [[] for _ in outputs]                                 # sorted (start, end) per buffer
    left = []
    for iv in sorted(temps, key=lambda iv: (-iv[0], iv[1])):
        b, s, e = iv[0], iv[1], iv[2]
        placed = False
        tries = 0
        for i in range(bisect.bisect_left(sizes, b), len(outputs)):
            if outputs[i][1] <= e:
                continue
            tries += 1
            spans = busy[i]
            j = bisect.bisect_left(spans, (s, e))
            if (j == 0 or spans[j - 1][1] < s) and (j == len(spans) or spans[j][0] > e):
                spans.insert(j, (s, e))
                placed = True
                break
            if tries >= 64:
                break
        if not placed:
            left.append(iv)
    return left


def temporaries(rep) -> dict:
    """``{"peak": temp heap bytes, "in_outputs": bytes placed in output buffers}``."""
    cached = getattr(rep, "_temp_cache", None)
    if cached is not None:
        return cached
    p, size = rep.program, materialized(rep)
    coll_of, coll_bytes, coll_kind = _collective_results(rep)

    def graph_peak(graph, top):
        sched = _Schedule(rep, graph, top, size, coll_of, coll_bytes, coll_kind)
        ivs = list(sched.intervals)
        for e in graph.eqns:
            inner = max((graph_peak(g, False)[0] for g in e.subgraphs), default=0)
            if inner:
                at = 2 * sched.run_at[id(e)]
                ivs.append([inner, at, at, None])
        if not top:
            return _peak(ivs), 0
        outputs, seen = [], set()
        for v, lay in zip(p.graph.outvars, p.out_layouts):
            if id(v) in seen or v not in sched.produced_at:
                continue
            seen.add(id(v))
            outputs.append((rep._local_bytes(v, lay), sched.produced_at[v]))
        packable = [iv for iv in ivs if iv[3] is not None]
        left = _pack_into_outputs(packable, outputs) + [iv for iv in ivs if iv[3] is None]
        return _peak(left), sum(iv[0] for iv in packable) - sum(iv[0] for iv in left if iv[3] is not None)

    peak, placed = graph_peak(p.graph, True)
    out = {"peak": int(peak), "in_outputs": int(placed)}
    rep._temp_cache = out
    return out


def step_memory(rep, base: dict) -> dict:
    """The step's memory beyond its arguments: gradients, activations kept for backward,
    the peak of temporaries, and the total XLA's ``memory_analysis()`` reports
    (arguments + outputs + temporaries - aliased)."""
    p, size = rep.program, materialized(rep)
    forward, kept = loss_residuals(p.graph)
    residual = {w for w in kept if size.get(w, 0)}
    # Gradients: one per parameter, in the layout of its updated value (or its own).
    params = {path: (v, p.layouts[v]) for v, path in zip(p.graph.invars, p.in_paths)
              if rep.role_of(path) == "parameters"}
    outs = {}
    for v, path, lay in zip(p.graph.outvars, p.out_paths, p.out_layouts):
        outs.setdefault(re.sub(r"^out(\[\d+\])?", "", path), lay)
    grads = 0
    if forward:
        for path, (v, lay) in params.items():
            grads += rep._local_bytes(v, outs.get(re.sub(r"^args\[\d+\]", "", path), lay))
    temp = temporaries(rep)
    tuple_table = 8 * len(p.graph.outvars) if len(p.graph.outvars) > 1 else 0
    return {
        "gradients": int(grads),
        "activations_for_backward": int(sum(size[w] for w in residual)),
        "largest_temporary": int(max(size.values(), default=0)),
        "temporaries_peak": temp["peak"],
        "step_total": int(base["arguments"] + base["outputs"] + tuple_table + temp["peak"]),
    }


def activation_peak(rep) -> int:
    """Peak of all intermediates in program order, none fused (an upper bound)."""
    p = rep.program
    inputs, outputs = set(p.graph.invars), set(p.graph.outvars)
    last = {}
    for e in rep._eqns:
        for v in e.invars:
            last[v] = e.index
    temps: dict = {}
    for r in p.reshards:
        if r.value in p.post and p.post[r.value] == r.dst:
            continue
        i = rep._consumer_index(r)
        if i is not None:
            temps[i] = temps.get(i, 0) + rep._local_bytes(r.value, r.dst)
    live, peak = 0, 0
    free_at: dict = {}
    for e in rep._eqns:
        for o in e.outvars:
            if o in inputs or o in outputs:
                continue
            b = rep._local_bytes(o, p.final_layout(o))
            live += b
            free_at.setdefault(last.get(o, e.index), []).append(b)
        peak = max(peak, live + temps.get(e.index, 0))
        live -= sum(free_at.pop(e.index, ()))
    return int(peak)
