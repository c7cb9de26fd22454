"""Control flow and rematerialisation: ``scan``, ``while``, ``cond``, ``remat2``.

Their bodies stay regions of the program (``Eqn.subgraphs``): every body value gets a layout
like any other value, and the equation's rule *links* the region boundary to its operands
and results, so propagation flows in and out of loops and branches. For ``scan`` over
layers with stacked weights ``w[L, D, F]``::

    operands   w (l!)(d)(f)     carry x (b)(d)
    body       w_i (d)(f)       carry_in (b)(d)  carry_out (b)(d)
    results    carry (b)(d)

The scanned dim ``l`` is one factor shared by every xs and ys. It is never split (each
iteration reads one slice), except in a loop whose stacked inputs carry an annotated split
(``Eqn.pipelined``): there it is a ``pass`` factor and the loop is a *pipeline* over that axis
(``passes/stages.py`` plans it, ``runtime/pipelined_scan.py`` runs it). The loop carry has
one layout in every iteration: init, carry-in, carry-out and the final carry share factors,
and ``insert_collectives`` reshards the body's carry-out back into the carry-in layout.
Lowering rebuilds the loop around the per-device body (``lax.scan`` / ``while_loop`` /
``switch`` / ``checkpoint``), so loops stay loops and remat stays remat.
"""
from __future__ import annotations

from . import FactorBuilder, register
from ..kinds import FactorKind


def _same_dims(fb, shape):
    return [fb.new(s) for s in shape]


@register("scan")
def scan_factors(eqn):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    (body,) = eqn.subgraphs
    fb = FactorBuilder()
    operands, results, linked = [None] * len(eqn.invars), [None] * len(eqn.outvars), []
    for i in range(nc):                                        # consts
        dims = _same_dims(fb, eqn.invars[i].shape)
        operands[i] = dims
        linked.append((body.invars[i], dims))
    for k in range(nk):                                        # carries
        dims = _same_dims(fb, eqn.invars[nc + k].shape)
        operands[nc + k] = dims
        results[k] = dims
        linked += [(body.invars[nc + k], dims), (body.outvars[k], dims)]
    # The stacked dim: one factor for every xs and ys (they are iterated together). In a loop
    # whose stacked inputs carry an annotated split (``eqn.pipelined``), it may be split: the
    # loop becomes a pipeline over that axis. Otherwise each iteration reads one whole slice.
    kind = FactorKind.PASS if getattr(eqn, "pipelined", False) else FactorKind.REPLICATE
    layer = fb.new(p["length"], kind) if len(eqn.invars) > nc + nk or len(eqn.outvars) > nk else ()
    for i in range(nc + nk, len(eqn.invars)):                  # xs: slice i of dim 0 per step
        shape = eqn.invars[i].shape
        inner = _same_dims(fb, shape[1:])
        operands[i] = [layer] + inner
        linked.append((body.invars[i], inner))
    for j in range(nk, len(eqn.outvars)):                      # ys: stacked along dim 0
        shape = eqn.outvars[j].shape
        inner = _same_dims(fb, shape[1:])
        results[j] = [layer] + inner
        linked.append((body.outvars[j], inner))
    return fb.build(operands, results, linked=linked)


@register("while")
def while_factors(eqn):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, body = eqn.subgraphs
    fb = FactorBuilder()
    operands, linked = [], []
    for i in range(cn):
        dims = _same_dims(fb, eqn.invars[i].shape)
        operands.append(dims)
        linked.append((cond.invars[i], dims))
    for i in range(bn):
        dims = _same_dims(fb, eqn.invars[cn + i].shape)
        operands.append(dims)
        linked.append((body.invars[i], dims))
    results = []
    for k, v in enumerate(eqn.invars[cn + bn:]):
        dims = _same_dims(fb, v.shape)
        operands.append(dims)
        results.append(dims)
        linked += [(cond.invars[cn + k], dims), (body.invars[bn + k], dims), (body.outvars[k], dims)]
    return fb.build(operands, results, linked=linked)


@register("cond")
def cond_factors(eqn):
    fb = FactorBuilder()
    operands, linked = [[()] * len(eqn.invars[0].shape)], []
    for i, v in enumerate(eqn.invars[1:]):
        dims = _same_dims(fb, v.shape)
        operands.append(dims)
        linked += [(branch.invars[i], dims) for branch in eqn.subgraphs]
    results = []
    for j, v in enumerate(eqn.outvars):
        dims = _same_dims(fb, v.shape)
        results.append(dims)
        linked += [(branch.outvars[j], dims) for branch in eqn.subgraphs]
    return fb.build(operands, results, linked=linked)


@register("remat2", "checkpoint")
def remat_factors(eqn):
    (body,) = eqn.subgraphs
    fb = FactorBuilder()
    operands, results, linked = [], [], []
    for i, v in enumerate(eqn.invars):
        dims = _same_dims(fb, v.shape)
        operands.append(dims)
        linked.append((body.invars[i], dims))
    for j, v in enumerate(eqn.outvars):
        dims = _same_dims(fb, v.shape)
        results.append(dims)
        linked.append((body.outvars[j], dims))
    return fb.build(operands, results, linked=linked)


# -- region boundary layouts (used by insert_collectives and lower) -------------------------
def region_boundaries(eqn, layout_of, stage_axes=()):
    """For a region equation: the layouts its operands must have, the layouts its results
    get, and for each body graph the layouts its outputs must have. All canonical (no
    partials): a loop carries one fixed layout. ``stage_axes``: the mesh axes a pipelined
    scan's stacked dim is split over (its xs and ys are split over them on dim 0)."""
    from ..layout import Layout
    name = eqn.prim.name

    def stacked(lay):
        return Layout((tuple(stage_axes),) + lay.dims)
    if name == "scan":
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        (body,) = eqn.subgraphs
        carry = [layout_of(body.invars[nc + k]) for k in range(nk)]
        ins = [layout_of(body.invars[i]) for i in range(nc)] + carry + [
            stacked(layout_of(body.invars[i])) for i in range(nc + nk, len(eqn.invars))]
        ys = [layout_of(body.outvars[j]) for j in range(nk, len(eqn.outvars))]
        return ins, carry + [stacked(l) for l in ys], [carry + ys]
    if name == "while":
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond, body = eqn.subgraphs
        carry = [layout_of(v) for v in body.invars[bn:]]
        ins = [layout_of(v) for v in cond.invars[:cn]] + [layout_of(v) for v in body.invars[:bn]] + carry
        return ins, carry, [[Layout(())], carry]
    if name == "cond":
        outs = [layout_of(v) for v in eqn.outvars]
        ins = [Layout.replicated(len(eqn.invars[0].shape))] + [
            layout_of(v) for v in eqn.subgraphs[0].invars]
        return ins, outs, [outs] * len(eqn.subgraphs)
    (body,) = eqn.subgraphs                                   # remat
    outs = [layout_of(v) for v in eqn.outvars]
    return [layout_of(v) for v in body.invars], outs, [outs]


def loop_constants(eqn) -> list:
    """``(operand index, body input)`` for each loop constant of a ``scan`` or ``while``
    (every trip reads the same value); none for branches and remat, whose inputs are read
    once."""
    p = eqn.params
    if eqn.prim.name == "scan":
        (body,) = eqn.subgraphs
        return [(i, body.invars[i]) for i in range(p["num_consts"])]
    if eqn.prim.name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond, body = eqn.subgraphs
        return [(i, cond.invars[i]) for i in range(cn)] + [(cn + i, body.invars[i]) for i in range(bn)]
    return []


def region_input_layouts(eqn, layout_of):
    """Layouts the body graphs' inputs have (their canonical layouts), per body."""
    return [[layout_of(v) for v in sub.invars] for sub in eqn.subgraphs]


def lower_region(eqn, args, run_graph):
    """Rebuild the control flow around per-device bodies; ``run_graph(graph, args)`` runs one
    body in the per-device program."""
    import jax
    from jax import lax
    name, p = eqn.prim.name, eqn.params
    if name == "scan":
        nc, nk = p["num_consts"], p["num_carry"]
        (body,) = eqn.subgraphs
        consts, init, xs = args[:nc], args[nc:nc + nk], args[nc + nk:]

        def step(carry, x):
            outs = run_graph(body, list(consts) + list(carry) + list(x))
            return outs[:nk], outs[nk:]
        # A stacked dim split over a mesh axis with no carry: each device runs its own layers.
        length = xs[0].shape[0] if xs else p["length"]
        carry, ys = lax.scan(step, list(init), list(xs), length=length, reverse=p["reverse"],
                             unroll=p["unroll"])
        return list(carry) + list(ys)
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond, body = eqn.subgraphs
        cconsts, bconsts, init = args[:cn], args[cn:cn + bn], args[cn + bn:]
        out = lax.while_loop(lambda c: run_graph(cond, list(cconsts) + list(c))[0],
                             lambda c: run_graph(body, list(bconsts) + list(c)), list(init))
        return list(out)
    if name == "cond":
        index, ops = args[0], args[1:]
        branches = [lambda *a, g=g: run_graph(g, list(a)) for g in eqn.subgraphs]
        return list(lax.switch(index, branches, *ops))
    (body,) = eqn.subgraphs
    if p.get("differentiated") and p.get("prevent_cse", True):
        # As JAX lowers remat: the recomputation's inputs pass an optimization barrier so
        # XLA cannot CSE it with the forward pass (rematerialisation survives).
        args = lax.optimization_barrier(list(args))
        return list(run_graph(body, list(args)))
    if p.get("differentiated"):
        return list(run_graph(body, list(args)))
    # Not differentiated yet (the function is differentiated after parallelize traced it):
    # keep it a checkpoint so a later jax.grad still rematerialises.
    fn = jax.checkpoint(lambda *a: run_graph(body, list(a)), prevent_cse=p.get("prevent_cse", True),
                        policy=p.get("policy"))
    return list(fn(*args))


# -- dead loop inputs ------------------------------------------------------------------------
def _reads(graph) -> set:
    """ids of the values ``graph`` reads: operands of its equations (nested bodies read
    through their equation's operands) and its outputs."""
    out = {id(v) for v in graph.outvars}
    for e in graph.eqns:
        out.update(id(v) for v in e.invars)
    return out


def _dce_closed(closed, keep):
    """``closed`` without the inputs ``keep`` drops (they must be unused), or None when JAX's
    own DCE finds a dropped input used."""
    from ... import compat
    body, used = compat.dce_closed_jaxpr(closed, keep)
    return body if list(used) == list(keep) else None


def drop_dead_loop_inputs(graph) -> bool:
    """Drop loop operands their body never reads: ``scan`` consts and xs, ``while`` consts.

    Differentiating a scan hoists its loop-invariant residuals out of the loop (JAX's
    ``_scan_partial_eval``): the attention mask's ``where`` leaves ``[B, H, T, T]`` broadcasts
    outside the layer loop that only some of the loops read. An operand no body reads has no
    user whose layout it could take, so it would stay replicated and be counted whole on every
    device (jit's own DCE drops it, as XLA would). Inner loops first; returns whether anything
    was dropped (``ir.dce`` then removes what fed only those operands)."""
    changed = False
    for eqn in graph.eqns:
        for sub in eqn.subgraphs:
            changed |= drop_dead_loop_inputs(sub)
        name, p = eqn.prim.name, eqn.params
        if name == "scan":
            nc, nk = p["num_consts"], p["num_carry"]
            (body,) = eqn.subgraphs
            read = _reads(body)
            keep = [nc <= i < nc + nk or id(v) in read for i, v in enumerate(body.invars)]
            if all(keep):
                continue
            closed = _dce_closed(p["jaxpr"], keep)
            if closed is None:
                continue
            eqn.params = {**p, "jaxpr": closed, "num_consts": sum(keep[:nc])}
            if "linear" in p:
                eqn.params["linear"] = tuple(l for l, k in zip(p["linear"], keep) if k)
        elif name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            cond, body = eqn.subgraphs
            cread, bread = _reads(cond), _reads(body)
            ckeep = [id(v) in cread for v in cond.invars[:cn]]
            bkeep = [id(v) in bread for v in body.invars[:bn]]
            if all(ckeep) and all(bkeep):
                continue
            n_carry = len(eqn.invars) - cn - bn
            cj = _dce_closed(p["cond_jaxpr"], ckeep + [True] * n_carry)
            bj = _dce_closed(p["body_jaxpr"], bkeep + [True] * n_carry)
            if cj is None or bj is None:
                continue
            keep = ckeep + bkeep + [True] * n_carry
            cond.invars = [v for v, k in zip(cond.invars, ckeep + [True] * n_carry) if k]
            body.invars = [v for v, k in zip(body.invars, bkeep + [True] * n_carry) if k]
            eqn.invars = [v for v, k in zip(eqn.invars, keep) if k]
            eqn.params = {**p, "cond_jaxpr": cj, "body_jaxpr": bj,
                          "cond_nconsts": sum(ckeep), "body_nconsts": sum(bkeep)}
            changed = True
            continue
        else:
            continue
        body.invars = [v for v, k in zip(body.invars, keep) if k]
        eqn.invars = [v for v, k in zip(eqn.invars, keep) if k]
        changed = True
    return changed
