"""Windowed ops: ``conv_general_dilated``, ``reduce_window_{sum,max,min}``, ``reduce_window``,
``select_and_gather_add``, ``select_and_scatter_add`` and ``pad``.

Non-spatial dims are ordinary factors: a convolution's batch dims pass through, its
input-feature contraction is a ``sum`` factor, its output features pass through::

    conv x[N,H,W,C] (NHWC) * w[3,3,C,O] (HWIO), stride 1, SAME
    factors n:pass  h:pass  w:pass  c:sum  o:pass  kh,kw:replicate
    operands x (n)(h)(w)(c)   w (kh)(kw)(c)(o)   ->   result (n)(h)(w)(o)

A *windowed* dim (result row ``y`` reads operand rows ``y*stride - lo + k*dilation``) may be
split too: the operand dim and the result dim share one factor, and the lowering gives each
device the rows its windows read -- its own rows plus *halos* from the blocks around it, one
collective-permute per neighbouring block it needs rows of -- then runs the op locally with
its own block's padding. Rows beyond the dim read as the op's padding value (zeros arrive
from devices that have no neighbour; ``-inf`` for max pooling, the init value of a generic
``reduce_window``, the padding value of ``pad``), which is exactly the op's padding. The
rule's ``internal`` lists these collective-permutes from the same plan the lowering runs.

Which windowed dims may split (everything else is a ``replicate`` factor, gathered first):

- without base (lhs / interior) dilation: any window size, stride, window dilation and
  padding, also unevenly (the padding rows of an uneven block read as padding). When
  ``in != stride * out`` (``VALID``, cropping pads) a device's windows drift from its block:
  every device fetches the rows the furthest-drifting one needs and slices at its offset;
- with base dilation ``d > 1``: only when ``out * stride == in * d`` (the input-gradient conv
  of a strided conv; ``pad`` with interior ``d - 1`` and ``lo + hi == d - 1``), where every
  device has the same local padding, and only evenly (a size-1 ``replicate`` factor in the
  dim, ``_even``, makes it compound);
- a convolution whose *kernel* spatial dim is larger than its output (the weight-gradient
  conv: "kernel" = output gradient, "output" = kernel) splits lhs and kernel spatial dims
  together as a ``sum`` factor instead: each device convolves its rows (plus halo) with its
  block of the output gradient, leaving ``P(sum)``; unevenly only where both have one size;
- ``feature_group_count = G > 1``: the groups are a pass factor shared by the lhs features
  ``(G)(C/G)`` and the output features ``(G)(O/G)`` (a depthwise conv splits its channels
  without communication); ``batch_group_count = G > 1`` (a grouped conv's weight gradient)
  likewise over lhs batch ``(G)(N/G)`` and output features. Both split evenly only.

``select_and_scatter_add`` (max-pool gradient) fetches operand halos (``-inf`` beyond the
ends: jax lowers it on CPU and GPU by padding the operand with ``-inf``, so the selection is
the same), scatters its own windows' sources locally and sends the halo rows of its result
back to their owners, where they are added.

Example: 3x3 SAME conv of ``x[4,16,16,8]`` with rows split over ``model=4`` -- each device
holds 4 rows and receives 1 row from the block before and 1 from the block after::

    collective-permute (model) f32[4,1,16,8] x2     (no all-gather of x)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from jax import lax

from . import FactorBuilder, extreme_value, register
from .. import collectives, reindex
from ..kinds import FactorKind, PartialMode
from ..planner import Transform


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Window:
    """One dim of a windowed op: result row ``y`` reads positions ``y*stride - lo +
    k*dilation`` (``k < size``) of the operand dilated by ``base`` (row ``i`` at ``i*base``,
    holes and padding hold the op's padding value)."""
    in_size: int
    out_size: int
    size: int = 1
    stride: int = 1
    lo: int = 0
    hi: int = 0
    base: int = 1
    dilation: int = 1

    @property
    def trivial(self) -> bool:
        """Row ``y`` of the result reads row ``y`` of the operand only."""
        return (self.size, self.stride, self.lo, self.hi, self.base) == (1, 1, 0, 0, 1)

    @property
    def uniform(self) -> bool:
        """Every device's windows start at the same offset from its block."""
        return self.out_size * self.stride == self.in_size * self.base

    def mode(self) -> str:
        """``pass``; ``out``: operand and result split together, with halos (``out_even``:
        evenly only); ``replicate``."""
        if self.trivial:
            return "pass"
        if self.base == 1 and self.in_size > 1 and self.out_size > 1:
            return "out"
        if self.uniform and math.gcd(self.in_size, self.out_size) > 1:
            return "out_even"
        return "replicate"


def _even(fb: FactorBuilder, dims: tuple) -> tuple:
    """Make a one-factor dim compound with a size-1 ``replicate`` factor, so that the factor
    is only split evenly (``factors.compound_factors``)."""
    if len(dims) != 1:
        return dims
    return dims + fb.add(1, FactorKind.REPLICATE)


def _window_dims(fb: FactorBuilder, w: Window):
    """Factors of (operand dim, result dim) for one window."""
    mode = w.mode()
    if mode == "pass":
        f = fb.new(w.in_size)
        return f, f
    if mode == "out":
        f = fb.new(max(w.in_size, w.out_size))
        return f, f
    if mode == "out_even":
        f = _even(fb, fb.new(math.gcd(w.in_size, w.out_size)))
        return f, f
    return fb.new(w.in_size, FactorKind.REPLICATE), fb.new(w.out_size, FactorKind.REPLICATE)


# --------------------------------------------------------------------------- halo plans
@dataclass(frozen=True)
class Halo:
    """How one split dim of one operand is extended on every device: fetch the rows
    ``[first, end)`` relative to its block (own rows and halos), keep ``rows`` of them from
    ``start + b*step`` (block ``b``), run the op with local padding ``(lo, hi)`` on this dim.
    ``size``: the dim's true size (an uneven split pads the last blocks); ``shape``: local
    operand shape before."""
    dim: int
    axes: tuple
    block: int
    size: int
    first: int
    end: int
    rows: int
    start: int
    step: int
    lo: int
    hi: int
    shape: tuple


def _plan(dim, axes, sizes, in_size, base, lo, advance, span, shape, n_real) -> Halo:
    """Block ``b`` of ``n`` (``ceil(in_size / n)`` rows each) reads dilated positions
    ``[b*advance - lo, ... + span)``. Only the first ``n_real`` blocks compute anything real
    (an uneven split can leave the last ones all padding): the halos are sized for them,
    the others read clamped garbage (``dynamic_slice`` clamps) and make padding rows."""
    n = math.prod(sizes[a] for a in axes)
    block = -(-in_size // n)

    def rows_read(b):                 # first and last row read, relative to the block
        p = b * advance - lo
        return -(-p // base) - b * block, (p + span - 1) // base - b * block
    first0, last0 = rows_read(0)
    first1, last1 = rows_read(n_real - 1)
    assert base == 1 or advance == block * base, "non-uniform halo with base dilation"
    rows = last0 - first0 + 1
    assert rows >= 1, f"window reads no operand row (dim {dim})"
    first, end = min(first0, first1), max(last0, last1) + 1
    p0 = -lo
    return Halo(dim, tuple(axes), block, in_size, first, end, rows, first0 - first,
                (first1 - first0) // (n_real - 1) if n_real > 1 else 0,
                (first0 * base) - p0, p0 + span - (last0 * base + 1), tuple(shape))


def _halos(layout, shape, windows, sizes) -> list[Halo]:
    """Plans for the split dims among ``windows`` = [(dim, Window, mode)], in order; each
    exchange sees the rows added by the previous ones (corners come along)."""
    out, shape = [], list(shape)
    for dim, w, mode in windows:
        axes = layout.dims[dim]
        if not axes or mode not in ("out", "out_even", "kernel"):
            continue
        n = math.prod(sizes[a] for a in axes)
        if mode == "kernel":
            kb = -(-w.size // n)
            adv, span = kb * w.dilation, (w.out_size - 1) * w.stride + (kb - 1) * w.dilation + 1
            n_real = -(-w.size // kb)
        else:
            ob = -(-w.out_size // n)
            adv, span = ob * w.stride, (ob - 1) * w.stride + (w.size - 1) * w.dilation + 1
            n_real = -(-w.out_size // ob)
        h = _plan(dim, axes, sizes, w.in_size, w.base, w.lo, adv, span, shape, n_real)
        out.append(h)
        shape[dim] = h.rows
    return out


def _n(h, sizes):
    return math.prod(sizes[a] for a in h.axes)


def _extend(x, halos, sizes, fill=None):
    """Each device's rows plus halos, sliced to what its windows read. Rows outside the
    dim read ``fill`` (zeros when None: what devices with no neighbour receive)."""
    for h in halos:
        # The padding rows of an uneven split hold anything: they must read as ``fill`` too.
        f = 0 if fill is None and h.size != h.block * _n(h, sizes) else fill
        x = collectives.window_rows(x, h.dim, h.axes, sizes, h.first, h.end, f, h.size)
        x = collectives.dynamic_rows(x, h.dim, h.axes, sizes, h.start, h.step, h.rows)
    return x


def _give_back(y, halos, sizes):
    """Transpose of ``_extend``: halo rows of ``y`` are added into their owners' blocks."""
    for h in reversed(halos):
        y = collectives.dynamic_place(y, h.dim, h.axes, sizes, h.start, h.step, h.end - h.first)
        y = collectives.window_return(y, h.dim, h.axes, sizes, h.block, h.first, h.end)
    return y


def _content(h: Halo) -> tuple:
    """What an array extended by ``h`` holds (the local padding is not part of it)."""
    return (h.dim, h.axes, h.block, h.size, h.first, h.end, h.rows, h.start, h.step)


@dataclass(frozen=True)
class HaloTransform(Transform):
    """A collective-permute of a halo exchange. ``key`` names the rows it moves (the plans
    applied before it and its hop), so two ops exchanging the same rows of the same value
    -- one program-wide collective once XLA's CSE has merged them -- compare equal."""
    key: tuple = ()


def _transforms(halos, sizes, what, tag=(), fill=None):
    """``(Transform, reason)`` per collective-permute ``_extend`` runs. ``fill`` names the
    value rows beyond the ends get (it changes the rows a later dim's exchange moves)."""
    out = []
    for j, h in enumerate(halos):
        for k, start, stop, pairs, moved in collectives.window_pieces(h.axes, sizes, h.block, h.first, h.end):
            if not pairs:
                continue
            slab = list(h.shape)
            slab[h.dim] = stop - start
            where = f"{k} after" if k > 0 else f"{-k} before"
            # What the slab holds: this hop's rows of the array the earlier exchanges made.
            key = tag + (tuple(_content(g) for g in halos[:j]), fill if j else None,
                         h.dim, h.axes, k, start, stop)
            out.append((HaloTransform("collective-permute", moved, dim=h.dim, in_shape=tuple(slab), key=key),
                        f"{what}: {stop - start} rows of dim {h.dim} from the block {where}"))
    return out


def _with_padding(padding, halos):
    padding = [tuple(p) for p in padding]
    for h in halos:
        padding[h.dim] = (h.lo, h.hi)
    return tuple(padding)


def _clean(params):
    params = dict(params)
    for key in ("sharding", "out_sharding"):
        if params.get(key) is not None:
            params[key] = None
    return params


def _fill_tag(v):
    """What rows beyond the ends are filled with, as a hashable: None for zeros (what the
    collective-permute delivers anyway), a constant's value, or the traced value itself."""
    if v.is_const:
        c = np.asarray(v.const)
        return None if not np.any(c) else ("const", c.item())
    return ("value", v)


# -------------------------------------------------------------------- conv_general_dilated
def _conv_windows(eqn):
    """Per spatial dim: (lhs dim, rhs dim, out dim, Window, mode)."""
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs, out = eqn.invars[0].shape, eqn.invars[1].shape, eqn.outvars[0].shape
    res = []
    for i in range(len(dn.lhs_spec) - 2):
        ld, rd, od = dn.lhs_spec[2 + i], dn.rhs_spec[2 + i], dn.out_spec[2 + i]
        lo, hi = p["padding"][i]
        w = Window(lhs[ld], out[od], rhs[rd], p["window_strides"][i], lo, hi,
                   p["lhs_dilation"][i], p["rhs_dilation"][i])
        mode = w.mode()
        # The weight-gradient conv: its "kernel" (the output gradient) is the big operand.
        # With base dilation only where every kernel block reads alike (as ``out_even``).
        if (mode != "pass" and w.size > w.out_size and math.gcd(w.in_size, w.size) > 1
                and (w.base == 1 or w.size * w.dilation == w.in_size * w.base)):
            mode = "kernel"
        res.append((ld, rd, od, w, mode))
    return res


def _conv_halos(eqn, ctx):
    windows = [(ld, w, mode) for ld, _, _, w, mode in _conv_windows(eqn)]
    return _halos(ctx.in_layouts[0], ctx.in_shapes[0], windows, ctx.axis_sizes)


def _conv_params(eqn, ctx, halos):
    p = _clean(eqn.params)
    dn = p["dimension_numbers"]
    if p["feature_group_count"] > 1:
        p["feature_group_count"] = ctx.in_shapes[0][dn.lhs_spec[1]] // ctx.in_shapes[1][dn.rhs_spec[1]]
    if p["batch_group_count"] > 1:
        p["batch_group_count"] = ctx.in_shapes[0][dn.lhs_spec[0]] // ctx.out_shapes[0][dn.out_spec[0]]
    if halos:
        spatial = {ld: i for i, ld in enumerate(dn.lhs_spec[2:])}
        padding = [tuple(q) for q in p["padding"]]
        for h in halos:
            padding[spatial[h.dim]] = (h.lo, h.hi)
        p["padding"] = tuple(padding)
    return p


def _lower_conv(eqn, ctx, args):
    lhs, rhs = args
    halos = _conv_halos(eqn, ctx)
    lhs = _extend(lhs, halos, ctx.axis_sizes)
    return [eqn.prim.bind(lhs, rhs, **_conv_params(eqn, ctx, halos))]


def _masked_lhs_dims(eqn, ctx):
    """Lhs dims of uneven ``sum`` factors: ``runtime.lower`` zeroes their padding rows before
    the rule runs, so this conv's halos move other data than another op's halos of the same
    value (XLA cannot merge them)."""
    dn = eqn.params["dimension_numbers"]
    sums = [dn.lhs_spec[1]] if eqn.params["feature_group_count"] == 1 else []
    sums += [ld for ld, _, _, w, mode in _conv_windows(eqn)
             if mode == "kernel" and w.in_size == w.size and w.base == 1]
    shape, layout = eqn.invars[0].shape, ctx.in_layouts[0]
    return tuple(d for d in sums if layout.dims[d]
                 and shape[d] % math.prod(ctx.axis_sizes[a] for a in layout.dims[d]))


def _conv_internal(eqn, ctx):
    masked = _masked_lhs_dims(eqn, ctx)
    return [(0, t, r) for t, r in _transforms(_conv_halos(eqn, ctx), ctx.axis_sizes, "conv halo",
                                              tag=("masked", masked) if masked else ())]


@register(lax.conv_general_dilated_p, partial=PartialMode.ONE_SUM, lower=_lower_conv,
          internal=_conv_internal)
def conv_factors(eqn):
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs, out = eqn.invars[0].shape, eqn.invars[1].shape, eqn.outvars[0].shape
    fgc, bgc = p["feature_group_count"], p["batch_group_count"]
    (lb, lf), (ro, ri), (ob, of) = dn.lhs_spec[:2], dn.rhs_spec[:2], dn.out_spec[:2]
    fb = FactorBuilder()
    L, R, O = [()] * len(lhs), [()] * len(rhs), [()] * len(out)
    if fgc == 1 and bgc == 1:
        L[lb] = O[ob] = fb.new(lhs[lb])
        L[lf] = R[ri] = fb.new(lhs[lf], FactorKind.SUM)
        R[ro] = O[of] = fb.new(rhs[ro])
    elif bgc == 1:
        # Feature groups (major in lhs features and in output features): a pass factor.
        g = fb.new(fgc)
        cin = fb.new(lhs[lf] // fgc, FactorKind.SUM)
        cout = fb.new(rhs[ro] // fgc)
        L[lb] = O[ob] = fb.new(lhs[lb])
        L[lf] = _even(fb, g + cin)
        R[ri] = cin
        R[ro] = O[of] = _even(fb, g + cout)
    elif fgc == 1:
        # Batch groups (major in lhs batch and in output features): a pass factor.
        g = fb.new(bgc)
        nb = fb.new(lhs[lb] // bgc)
        cout = fb.new(rhs[ro] // bgc)
        L[lb] = _even(fb, g + nb)
        O[ob] = nb
        L[lf] = R[ri] = fb.new(lhs[lf], FactorKind.SUM)
        R[ro] = O[of] = _even(fb, g + cout)
    else:
        L[lb], L[lf] = fb.new(lhs[lb], FactorKind.REPLICATE), fb.new(lhs[lf], FactorKind.REPLICATE)
        R[ro], R[ri] = fb.new(rhs[ro], FactorKind.REPLICATE), fb.new(rhs[ri], FactorKind.REPLICATE)
        O[ob], O[of] = fb.new(out[ob], FactorKind.REPLICATE), fb.new(out[of], FactorKind.REPLICATE)
    for ld, rd, od, w, mode in _conv_windows(eqn):
        if mode == "kernel":
            # Uneven splits only where both dims have the factor's size: lower.py zeroes the
            # padding rows of an uneven sum factor by the factor's size.
            f = fb.new(math.gcd(w.in_size, w.size), FactorKind.SUM)
            L[ld] = R[rd] = f if w.in_size == w.size and w.base == 1 else _even(fb, f)
            O[od] = fb.new(w.out_size, FactorKind.REPLICATE)
        else:
            L[ld], O[od] = _window_dims(fb, w)
            R[rd] = fb.new(w.size, FactorKind.REPLICATE)     # size 1 (pass mode): no factor
    return fb.build([L, R], [O])


# ------------------------------------------------------------------------- reduce_window
def _rw_windows(eqn, in_shape, out_shape):
    p = eqn.params
    rank = len(in_shape)
    base = p.get("base_dilation") or (1,) * rank          # select_and_scatter_add has none
    dil = p.get("window_dilation") or (1,) * rank
    return [Window(in_shape[d], out_shape[d], p["window_dimensions"][d], p["window_strides"][d],
                   p["padding"][d][0], p["padding"][d][1], base[d], dil[d]) for d in range(rank)]


def _window_halos(windows, ctx, index):
    return _halos(ctx.in_layouts[index], ctx.in_shapes[index],
                  [(d, w, w.mode()) for d, w in enumerate(windows)], ctx.axis_sizes)


def _simple_windows(eqn):
    return _rw_windows(eqn, eqn.invars[0].shape, eqn.outvars[0].shape)


def _simple_factors(eqn):
    fb = FactorBuilder()
    dims = [_window_dims(fb, w) for w in _simple_windows(eqn)]
    return fb.build([[d[0] for d in dims]], [[d[1] for d in dims]])


_RW_FILL = {"reduce_window_sum": None, "reduce_window_max": True, "reduce_window_min": False}


def _lower_simple(eqn, ctx, args):
    halos = _window_halos(_simple_windows(eqn), ctx, 0)
    x = args[0]
    low = _RW_FILL[eqn.prim.name]
    x = _extend(x, halos, ctx.axis_sizes, None if low is None else extreme_value(x.dtype, low))
    params = _clean(eqn.params)
    params["padding"] = _with_padding(params["padding"], halos)
    return [eqn.prim.bind(x, **params)]


def _simple_internal(eqn, ctx):
    halos = _window_halos(_simple_windows(eqn), ctx, 0)
    low = _RW_FILL[eqn.prim.name]
    return [(0, t, r) for t, r in _transforms(halos, ctx.axis_sizes, f"{eqn.prim.name} halo",
                                              fill=None if low is None else ("identity", low))]


for _name, _partial in (("reduce_window_sum", PartialMode.UNARY_SUM),
                        ("reduce_window_max", PartialMode.UNARY_MAX),
                        ("reduce_window_min", PartialMode.UNARY_MIN)):
    register(_name, partial=_partial, lower=_lower_simple, internal=_simple_internal)(_simple_factors)


# Generic reduce_window: operands then as many init values (the padding values).
def _generic_windows(eqn):
    return _rw_windows(eqn, eqn.invars[0].shape, eqn.outvars[0].shape)


def _lower_generic(eqn, ctx, args):
    n = len(eqn.outvars)
    halos = _window_halos(_generic_windows(eqn), ctx, 0)
    xs = [_extend(x, halos, ctx.axis_sizes, None if _fill_tag(v) is None else init)
          for x, init, v in zip(args[:n], args[n:], eqn.invars[n:])]
    params = _clean(eqn.params)
    params["padding"] = _with_padding(params["padding"], halos)
    return eqn.prim.bind(*xs, *args[n:], **params)


def _generic_internal(eqn, ctx):
    halos = _window_halos(_generic_windows(eqn), ctx, 0)
    n = len(eqn.outvars)
    return [(k, t, r) for k in range(n)
            for t, r in _transforms(halos, ctx.axis_sizes, "reduce_window halo",
                                    fill=_fill_tag(eqn.invars[n + k]))]


@register(lax.reduce_window_p, lower=_lower_generic, internal=_generic_internal)
def reduce_window_factors(eqn):
    n = len(eqn.outvars)
    fb = FactorBuilder()
    dims = [_window_dims(fb, w) for w in _generic_windows(eqn)]
    op, res = [d[0] for d in dims], [d[1] for d in dims]
    return fb.build([op] * n + [()] * n, [res] * n)


# ----------------------------------------------------------- max-pool JVP and gradient
def _select_low(eqn):
    return eqn.params["select_prim"] is lax.ge_p       # ge: max pooling, padding is -inf


def _gather_windows(eqn):
    return _rw_windows(eqn, eqn.invars[1].shape, eqn.outvars[0].shape)


def _lower_gather(eqn, ctx, args):
    tangents, operand = args
    halos = _window_halos(_gather_windows(eqn), ctx, 1)
    tangents = _extend(tangents, halos, ctx.axis_sizes)
    operand = _extend(operand, halos, ctx.axis_sizes, extreme_value(operand.dtype, _select_low(eqn)))
    params = _clean(eqn.params)
    params["padding"] = _with_padding(params["padding"], halos)
    return [eqn.prim.bind(tangents, operand, **params)]


def _gather_internal(eqn, ctx):
    halos = _window_halos(_gather_windows(eqn), ctx, 1)
    fills = (None, ("identity", _select_low(eqn)))
    return [(i, t, r) for i in (0, 1)
            for t, r in _transforms(halos, ctx.axis_sizes, "select_and_gather_add halo", fill=fills[i])]


@register("select_and_gather_add", partial=PartialMode.UNARY_SUM, lower=_lower_gather,
          internal=_gather_internal)
def select_and_gather_factors(eqn):
    fb = FactorBuilder()
    dims = [_window_dims(fb, w) for w in _gather_windows(eqn)]
    op = [d[0] for d in dims]
    return fb.build([op, op], [[d[1] for d in dims]])


def _scatter_windows(eqn):
    # Operand (and result) rows are the windowed input, source rows the windows.
    return _rw_windows(eqn, eqn.invars[1].shape, eqn.invars[0].shape)


def _lower_scatter(eqn, ctx, args):
    source, operand = args
    windows = _scatter_windows(eqn)
    halos = _window_halos(windows, ctx, 1)
    # The padding rows of an unevenly split source are windows that do not exist: they
    # must scatter nothing.
    sizes = ctx.axis_sizes
    for d, (w, axes) in enumerate(zip(windows, ctx.in_layouts[0].dims)):
        if axes and w.out_size % math.prod(sizes[a] for a in axes):
            source = collectives.mask_padding(source, d, axes, sizes, w.out_size, 0)
    # On XLA CPU/GPU the op pads the operand with the select identity (-inf for ge) and
    # selects over the padded array: edge halos filled alike select the same elements.
    operand = _extend(operand, halos, ctx.axis_sizes, extreme_value(operand.dtype, _select_low(eqn)))
    params = _clean(eqn.params)
    params["padding"] = _with_padding(params["padding"], halos)
    out = eqn.prim.bind(source, operand, **params)
    return [_give_back(out, halos, ctx.axis_sizes)]


def _scatter_internal(eqn, ctx):
    halos = _window_halos(_scatter_windows(eqn), ctx, 1)
    sizes = ctx.axis_sizes
    fwd = [(1, t, r) for t, r in _transforms(halos, sizes, "select_and_scatter_add operand halo",
                                             fill=("identity", _select_low(eqn)))]
    back = [(0, t, r) for t, r in _transforms(list(reversed(halos)), sizes,
                                              "select_and_scatter_add result halo, added back",
                                              tag=("added back", eqn.index))]
    return fwd + back


@register("select_and_scatter_add", partial=PartialMode.UNARY_SUM, lower=_lower_scatter,
          internal=_scatter_internal)
def select_and_scatter_factors(eqn):
    fb = FactorBuilder()
    dims = [_window_dims(fb, w) for w in _scatter_windows(eqn)]
    operand, source = [d[0] for d in dims], [d[1] for d in dims]
    return fb.build([source, operand], [operand])


# ------------------------------------------------------------------------------------ pad
def _pad_windows(eqn):
    shape, out = eqn.invars[0].shape, eqn.outvars[0].shape
    return [Window(shape[d], out[d], 1, 1, lo, hi, interior + 1)
            for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"])]


def _pad_partial(eqn):
    # Linear in the operand when the padding value is a literal zero (grads of slices).
    v = eqn.invars[1]
    return PartialMode.UNARY_SUM if v.is_const and not np.any(np.asarray(v.const)) else PartialMode.NONE


def _pad_crossing(eqn, ctx):
    """``[(dim, axes, reindex plan)]`` when every split padded dim has no interior padding and
    lengths that split evenly: only the rows that cross device blocks move
    (``compiler/reindex.py``), where halos sized for the furthest-drifting block would move
    many more. None otherwise (halos)."""
    out = []
    for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        axes = ctx.in_layouts[0].dims[d]
        if not axes or (lo, hi, interior) == (0, 0, 0):
            continue
        n = math.prod(ctx.axis_sizes[a] for a in axes)
        i, o = eqn.invars[0].shape[d], eqn.outvars[0].shape[d]
        if interior or i % n or o % n:
            return None
        out.append((d, axes, reindex.plan((i,), (o,), reindex.pad_segments(i, lo, hi), n)))
    return out or None


def _pad_locally(eqn, crossing):
    """The padding config of the local pad that runs before the re-indexing."""
    moved = {d for d, _, _ in crossing}
    return tuple((0, 0, 0) if d in moved else tuple(c) for d, c in enumerate(eqn.params["padding_config"]))


def _lower_pad(eqn, ctx, args):
    x, value = args
    crossing = _pad_crossing(eqn, ctx)
    if crossing:
        x = eqn.prim.bind(x, value, padding_config=_pad_locally(eqn, crossing))
        for d, axes, p in crossing:
            (x,) = reindex.apply([x], d, axes, ctx.axis_sizes, p, fill=value)
        return [x]
    halos = _window_halos(_pad_windows(eqn), ctx, 0)
    x = _extend(x, halos, ctx.axis_sizes, None if _fill_tag(eqn.invars[1]) is None else value)
    config = [tuple(c) for c in eqn.params["padding_config"]]
    for h in halos:
        config[h.dim] = (h.lo, h.hi, config[h.dim][2])
    return [eqn.prim.bind(x, value, padding_config=tuple(config))]


def _pad_internal(eqn, ctx):
    crossing = _pad_crossing(eqn, ctx)
    if crossing:
        shape = [o if not lay else i for i, o, lay in
                 zip(ctx.in_shapes[0], ctx.out_shapes[0], ctx.in_layouts[0].dims)]
        out = []
        for d, axes, p in crossing:
            out += [(0, t, r) for t, r in reindex.transforms(p, d, axes, ctx.axis_sizes, shape, "pad")]
            shape[d] = ctx.out_shapes[0][d]
        return out
    halos = _window_halos(_pad_windows(eqn), ctx, 0)
    return [(0, t, r) for t, r in _transforms(halos, ctx.axis_sizes, "pad halo",
                                              fill=_fill_tag(eqn.invars[1]))]


@register(lax.pad_p, partial=_pad_partial, lower=_lower_pad, internal=_pad_internal, priced=True)
def pad_factors(eqn):
    fb = FactorBuilder()
    dims = [_window_dims(fb, w) for w in _pad_windows(eqn)]
    return fb.build([[d[0] for d in dims], [()] * len(eqn.invars[1].shape)], [[d[1] for d in dims]])
