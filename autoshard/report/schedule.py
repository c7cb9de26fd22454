"""What XLA CPU does with one computation of the step, as the memory model needs it: which
ops fuse into their users, which operands it copies into a canonical layout first, the order
it runs instructions in (breadth first), and each stored value's live interval.

``memory.MemoryModel`` drives it; see its module docstring for the behaviours modelled.

>>> sched = Schedule(ctx, ctx.program.graph, True, sizes, collective_results(ctx), {})  # doctest: +SKIP
>>> peak_bytes(sched.intervals)            # bytes live at once, in program time   # doctest: +SKIP
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

# Results XLA fuses into their users (not kept in memory) when every user is in ABSORB.
FUSIBLE = {"neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
            "tanh", "logistic", "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt", "abs", "not", "erf", "erfc",
            "erf_inv", "square", "integer_pow", "reduce_precision", "copy", "copy_p", "stop_gradient",
            "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "and", "or", "xor", "eq",
            "ne", "lt", "le", "gt", "ge", "atan2", "select_n", "clamp", "convert_element_type",
            "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "transpose"}
REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin"}
ABSORB = FUSIBLE | REDUCE
BITCAST = {"reshape", "squeeze", "expand_dims"}
YNN_REDUCE_MIN_ELEMENTS = 4096
# XLA's InstructionFusion::IsExpensive (float divide/remainder; integer ones are cheap).
EXPENSIVE = {"exp", "exp2", "expm1", "log", "log1p", "logistic", "tanh", "tan", "sqrt", "rsqrt",
              "cbrt", "pow", "atan2", "erf", "erfc", "div", "rem"}
# Elementwise fusions whose output may take the buffer of a same-sized operand that dies there.
IN_PLACE = (FUSIBLE - {"broadcast_in_dim", "iota", "transpose"}) | {"dynamic_update_slice", "scatter-add",
                                                                      "scatter_add"}


@dataclass
class CollectiveResults:
    """The collectives of a plan as the schedule sees them: ``coll_of`` maps ``(eqn index,
    operand index)`` to the key of the collective result that operand reads, ``coll_bytes``
    each key's per-device bytes, ``coll_kind`` an all-reduce's ``(axes, op)`` (combinable
    ones), ``value_of_key`` the value each key moves, ``post_keys`` the keys of collectives
    run right after their value is made (a gradient's all-reduce), by ``id(value)``. A key is
    ``(id(value), layout)``, or ``(id(value), layout, "post")``."""
    coll_of: dict
    coll_bytes: dict
    coll_kind: dict
    value_of_key: dict
    post_keys: dict


class Schedule:
    """XLA CPU's breadth-first order of one computation (``graph``), with fused equations
    run inside their readers, and the live interval of every stored value in it."""

    def __init__(self, ctx, graph, top, size, results: "CollectiveResults", broadcasts: dict):
        p = ctx.program
        coll_of, coll_bytes, coll_kind = results.coll_of, results.coll_bytes, results.coll_kind
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
        post_keys = results.post_keys
        out_keys = {}                            # outputs that are a post collective's result
        for v in top_out:
            key = post_keys.get(id(v))
            if key is not None and v in produced:
                out_keys[key] = v
                coll_nodes.setdefault(key, (produced[v], produced[v]))
        node_of = combine_all_reduces(eqns, produced, coll_of, coll_nodes, coll_kind, coll_bytes)
        # Operands XLA copies into another layout first (convolutions' canonical layouts):
        # the copy is an instruction of its own, run as soon as its operand exists.
        copies: dict = {}
        same: dict = {}                         # one copy per (value, layout, order): CSE
        for e in eqns:
            for k, order in operand_copies(e):
                v = e.invars[k]
                if not v.is_const and not (v in produced and produced[v].prim.name in ("rev", "transpose")):
                    lay = p.operand_layouts.get((e.index, k)) or p.final_layout(v)
                    c = same.setdefault((id(v), lay, order), ("copy", e.index, k))
                    copies[(e.index, k)] = (c, ctx.local_bytes(v, lay))
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
                v = results.value_of_key.get(key)
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
        bcast = broadcasts
        for e in eqns:                          # parameters broadcast for a big reduction
            if id(e) in bcast:
                self.intervals.append([bcast[id(e)], 0, 2 * run_at[id(e)], ("broadcast", e.index)])
        for e in eqns:                          # a result made in the canonical layout, then copied
            if e.prim.name == "conv_general_dilated" and canonical_order(e, "out") is not None:
                o = e.outvars[0]
                self.intervals.append([ctx.local_bytes(o, p.final_layout(o)), 2 * run_at[id(e)],
                                       2 * run_at[id(e)], ("copy", e.index, -1)])
        # In place: an elementwise fusion writes over a same-sized stored operand that dies there.
        for e in eqns:
            if e.prim.name not in IN_PLACE or len(e.outvars) != 1 or not is_real[id(e)]:
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


def canonical_order(e, which):
    """The dim order XLA CPU's convolution wants for the lhs / rhs / out of conv ``e``
    (batch, spatial..., feature; kernel spatial..., in, out), or None when it already is."""
    dn = e.params.get("dimension_numbers")
    spec = getattr(dn, {"lhs": "lhs_spec", "rhs": "rhs_spec", "out": "out_spec"}[which], None)
    if spec is None:
        return None
    spec = tuple(spec)
    want = (*spec[2:], spec[1], spec[0]) if which == "rhs" else (spec[0], *spec[2:], spec[1])
    return None if want == tuple(range(len(spec))) else want


def dot_order(e, k):
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


def operand_copies(e):
    """``[(operand index, order)]``: operands of ``e`` XLA copies into a canonical layout
    before running it (convolutions; batched matmuls whose batch dims do not lead)."""
    if e.prim.name == "conv_general_dilated":
        return [(k, canonical_order(e, which)) for k, which in enumerate(("lhs", "rhs"))
                if canonical_order(e, which) is not None]
    if e.prim.name == "dot_general" and len(e.invars) == 2:
        return [(k, dot_order(e, k)) for k in (0, 1) if dot_order(e, k) is not None]
    return ()


def collective_results(ctx) -> CollectiveResults:
    """Which operands read a collective's result, and how big each result is."""
    p = ctx.program
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
        coll_bytes[key] = ctx.local_bytes(r.value, r.dst)
        value_of[key] = r.value
        if len(moves) == 1 and moves[0].kind == "all-reduce":
            coll_kind[key] = (tuple(sorted(moves[0].axes)), moves[0].op)
    if wanted:
        for e in ctx.eqns:
            for k, v in enumerate(e.invars):
                key = (id(v), p.operand_layouts.get((e.index, k)))
                if key in wanted:
                    coll_of[(e.index, k)] = key
                elif id(v) in post and not v.is_const:
                    coll_of[(e.index, k)] = post[id(v)]
    return CollectiveResults(coll_of, coll_bytes, coll_kind, value_of, post)


_COMBINE_MAX_BYTES = 30 << 20        # XLA's all-reduce combiner thresholds
_COMBINE_MAX_COUNT = 256


def combine_all_reduces(eqns, produced, coll_of, coll_nodes, coll_kind, coll_bytes):
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


def peak_bytes(intervals) -> int:
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


def pack_into_outputs(temps, outputs):
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

