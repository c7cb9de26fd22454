"""Windowed ops (issue #3): convolutions, pooling, the max-pool gradient and ``pad``, split
along batch, feature and spatial dims, compared with the same function on one device.

A split spatial dim is exchanged as halos (collective-permutes of a few rows with the
neighbouring devices), never gathered; the report lists exactly the collective-permutes the
compiled program runs. ``-m slow`` sweeps conv geometries, pads and pools more widely.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import autoshard as ash
from _util import assert_report_matches_hlo, assert_tree_close, count, hlo_collectives
from autoshard.compiler import ir
from autoshard.compiler.ops import conv as conv_rules
from autoshard.compiler.ops import get_rule
from autoshard.models import merge_params, split_params
from autoshard.report.hlo import summarize

RNG = np.random.default_rng(0)
NHWC = ("NHWC", "HWIO", "NHWC")
MESH = "data=2,model=4"


def _normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


X = _normal(4, 16, 16, 8)           # NHWC
W = _normal(3, 3, 8, 8) / 8         # HWIO


def check(fn, args, specs, mesh=MESH, rtol=1e-5, atol=1e-5, report=True):
    """``parallelize(fn)`` equals ``fn`` on one device; with ``report``, the report's
    collectives equal the compiled HLO's. Returns (pf, HLO collectives)."""
    pf = ash.parallelize(fn, mesh=ash.make_mesh(mesh), in_specs=specs)
    assert_tree_close(pf(*args), jax.jit(fn)(*args), rtol=rtol, atol=atol)   # jit: one compile
    if report:
        return pf, assert_report_matches_hlo(pf, *args)[1]
    return pf, hlo_collectives(pf, *args)


def conv(stride=1, padding="SAME", rhs_dilation=1, dn=NHWC, **kw):
    return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                 rhs_dilation=(rhs_dilation,) * 2,
                                                 dimension_numbers=dn, **kw)


def permutes_only(hlo):
    return {c.kind for c in hlo} <= {"collective-permute"}


def gathered(pf, *args):
    """Names of the values the program all-gathers (``args[0]``, ``out[1]``, ...)."""
    return {c.value for c in pf.report(*args).collectives if c.kind == "all-gather"}


# ------------------------------------------------------------------------ convolutions
LAYOUTS = {
    "batch": (P("data"), None),
    "out_features": (None, P(None, None, None, "model")),
    "in_features": (P(None, None, None, "model"), P(None, None, "model")),
    "height": (P(None, "model"), None),
    "batch_height": (P("data", "model"), None),
}
GEOMETRIES = [(1, "SAME", 1), (2, "SAME", 1), (1, "VALID", 2), (2, ((2, 1), (0, 1)), 1)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("stride,padding,rhs_dilation", GEOMETRIES)
def test_conv_nhwc(layout, stride, padding, rhs_dilation):
    f = conv(stride, padding, rhs_dilation)
    pf, hlo = check(f, (X, W), LAYOUTS[layout])
    if layout == "in_features":      # contraction split: the result is P(sum), all-reduced
        assert count(hlo, "all-reduce", ("model",)) == 1
    if layout in ("batch", "out_features"):
        assert not hlo
    if "height" in layout:
        # Halos only; an output of 9 or 14 rows is split unevenly and leaves gathered.
        assert gathered(pf, X, W) <= {"out"}
        assert count(hlo, "collective-permute") > 0


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_nchw(stride):
    x = np.ascontiguousarray(X.transpose(0, 3, 1, 2))          # NCHW
    w = np.ascontiguousarray(W.transpose(3, 2, 0, 1))          # OIHW
    f = conv(stride, "SAME", dn=("NCHW", "OIHW", "NCHW"))
    _, hlo = check(f, (x, w), (P(None, None, "model"), None))
    assert hlo and permutes_only(hlo)
    check(f, (x, w), (P("data", "model"), P(None, "model")))   # in-features split: P(sum)


def test_height_split_moves_halos_not_activations():
    """3x3 SAME on rows split 4 ways: one row from each neighbour, nothing else."""
    pf, hlo = check(conv(), (X, W), (P(None, "model"), None))
    halo = (4, 1, 16, 8)                # per device: batch 4, 1 row, width 16, channels 8
    assert summarize(hlo) == {("collective-permute", ("model",), halo): 2}
    assert not any(c.kind == "all-gather" for c in hlo)
    assert {c.kind for c in pf.report(X, W).collectives} == {"collective-permute"}
    # Stride 2 SAME pads (0, 1): only the rows after each block are needed.
    _, hlo = check(conv(2), (X, W), (P(None, "model"), None))
    assert summarize(hlo) == {("collective-permute", ("model",), halo): 1}


def test_height_over_two_axes_and_width():
    _, hlo = check(conv(), (X, W), (P(None, ("data", "model")), None))
    assert summarize(hlo) == {("collective-permute", ("data", "model"), (4, 1, 16, 8)): 2}
    # Height over data, width over model: the second exchange carries the corners.
    _, hlo = check(conv(), (X, W), (P(None, "data", "model"), None))
    assert summarize(hlo) == {("collective-permute", ("data",), (4, 1, 4, 8)): 2,
                              ("collective-permute", ("model",), (4, 10, 1, 8)): 2}


def test_uneven_height_split():
    x = _normal(2, 18, 12, 8)           # 18 rows over 4 devices: blocks of 5, padded
    _, hlo = check(conv(), (x, W), (P(None, "model"), None))
    # Halos, then the uneven output leaves gathered (a jax.Array cannot be split unevenly).
    assert count(hlo, "collective-permute") == 2
    assert [c.shape for c in hlo if c.kind == "all-gather"] == [(5, 2, 12, 8)]   # rows first


def test_negative_conv_padding():
    """Padding (-1, 2) crops a row and pads two. (XLA CPU's own convolution reads out of
    bounds there -- garbage or NaN in the last row on one device -- so the reference crops
    and pads explicitly, then convolves VALID.)"""
    x = _normal(2, 18, 12, 4)
    w = _normal(3, 3, 4, 4)
    f = conv(3, ((-1, 2), (0, 0)))
    pf = ash.parallelize(f, mesh=ash.make_mesh(MESH), in_specs=(P(None, "model"), None))
    ref = conv(3, "VALID")(jnp.pad(x[:, 1:], ((0, 0), (0, 2), (0, 0), (0, 0))), w)
    np.testing.assert_allclose(pf(x, w), ref, rtol=1e-5, atol=1e-5)
    assert count(assert_report_matches_hlo(pf, x, w)[1], "collective-permute") == 1


def test_feature_groups_split_without_communication():
    wd = _normal(3, 3, 1, 8)            # depthwise: 8 groups of one channel
    f = conv(feature_group_count=8)
    _, hlo = check(f, (X, wd), (P(None, None, None, "model"), P(None, None, None, "model")))
    assert not hlo
    w2 = _normal(3, 3, 2, 8)            # 4 groups of 2 channels, groups split 2 ways
    check(conv(feature_group_count=4), (X, w2), (P(None, None, None, "data"), P(None, None, None, "data")))


def test_flax_conv_model():
    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
            self.c2 = nnx.Conv(16, 8, (3, 3), strides=(2, 2), rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.c1(x)), (3, 3), (1, 1), "SAME")
            return self.c2(x)
    # Abstract init (nnx's initializers take seconds to compile); values from numpy.
    model_def, abstract = split_params("cnn", None, nnx.eval_shape(lambda: CNN(nnx.Rngs(0))))
    params = jax.tree.map(lambda a: _normal(*a.shape) / 4, abstract)

    def fwd(params, x):
        return merge_params(model_def, params)(x)
    tp = {"c1": {"kernel": P(None, None, None, "model"), "bias": P("model")}, "c2": None}
    _, hlo = check(fwd, (params, X), (tp, P("data")), atol=1e-4)
    assert count(hlo, "all-reduce", ("model",)) == 1        # c2 contracts the split features
    _, hlo = check(fwd, (params, X), (None, P("data", "model")), atol=1e-4)
    assert hlo and permutes_only(hlo)


def _argmax_pool(x):
    """Variadic (generic) reduce_window: max and where it is."""
    idx = lax.broadcasted_iota(jnp.int32, x.shape, 1)

    def red(a, b):
        pick = a[0] >= b[0]
        return jnp.where(pick, a[0], b[0]), jnp.where(pick, a[1], b[1])
    return lax.reduce_window((x, idx), (-jnp.inf, 0), red, (1, 3, 1), (1, 2, 1), "SAME")


def _conv1d(x, w):
    return lax.conv_general_dilated(x, w, (2,), "SAME", rhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC"))


def _conv_t(x, w):
    return lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=NHWC)


def _sq_grad(f):
    return jax.grad(lambda w, x: jnp.sum(f(x, w) ** 2), argnums=(0, 1))


MORE = {   # name: (fn, args, in_specs, report == HLO checked)
    "conv1d": (_conv1d, (_normal(4, 32, 4), _normal(5, 4, 6)), (P(None, "model"), None), True),
    "conv_transpose_grad": (_sq_grad(_conv_t), (_normal(3, 3, 4, 6), _normal(2, 8, 8, 4)),
                            (None, P(None, "model")), False),
    "multi_hop": (lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(3, 1),
                                                        dimension_numbers=NHWC),
                  (_normal(2, 16, 4, 2), _normal(7, 1, 2, 2)), (P(None, ("data", "model")), None), True),
    "batch_groups": (lambda x, w: lax.conv_general_dilated(x, w, (1,), "VALID", batch_group_count=4,
                                                           dimension_numbers=("NWC", "WIO", "NWC")),
                     (_normal(8, 10, 3), _normal(3, 3, 4)), (P("model"), P(None, None, "model")), True),
    "variadic_reduce_window": (_argmax_pool, (_normal(2, 16, 3),), (P(None, "model"),), True),
    "int_max_pool": (lambda x: lax.reduce_window(x, jnp.iinfo(jnp.int32).min, lax.max, (1, 3, 1), (1, 1, 1), "SAME"),
                     (RNG.integers(-99, 99, size=(2, 16, 3)).astype(np.int32),), (P(None, "model"),), True),
    "pad_traced_value": (lambda x, v: lax.pad(x, v, [(0, 0, 0), (2, 3, 0), (0, 0, 0)]),
                         (_normal(2, 16, 3), np.float32(7.0)), (P(None, "model"), None), True),
}


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_windowed_programs(name):
    fn, args, specs, report = MORE[name]
    pf, hlo = check(fn, args, specs, rtol=1e-4, atol=1e-4, report=report)
    assert "all-gather" not in {c.kind for c in hlo} or name == "pad_traced_value"   # 21 rows: uneven out
    if name == "batch_groups":          # groups split with the batch: no communication
        assert not hlo


# ------------------------------------------------------------------------- gradients
def _cnn_loss(stride, pool):
    def loss(w, x):
        y = jax.nn.relu(conv(stride)(x, w))
        if pool == "max":
            y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
        elif pool == "nnx_max":
            y = nnx.max_pool(y, (2, 2), (2, 2))
        else:
            y = nnx.avg_pool(y, (3, 3), (1, 1), "SAME")
        return jnp.mean(y ** 2)
    return loss


HEIGHT, BATCH_HEIGHT = (None, P(None, "model")), (None, P("data", "model"))
GRAD_CASES = [(1, "max", HEIGHT), (2, "max", BATCH_HEIGHT), (1, "nnx_max", BATCH_HEIGHT), (2, "avg", HEIGHT)]
SLOW_GRAD_CASES = [(1, "max", BATCH_HEIGHT), (2, "max", HEIGHT), (1, "nnx_max", HEIGHT), (2, "avg", BATCH_HEIGHT),
                   (1, "avg", HEIGHT), (2, "nnx_max", BATCH_HEIGHT)]


@pytest.mark.parametrize("stride,pool,specs", GRAD_CASES + [pytest.param(*c, marks=pytest.mark.slow)
                                                            for c in SLOW_GRAD_CASES])
def test_conv_relu_pool_gradients_with_height_split(stride, pool, specs):
    g = jax.value_and_grad(_cnn_loss(stride, pool), argnums=(0, 1))
    _, hlo = check(g, (W, X), specs, rtol=1e-4, atol=1e-6)
    # The weight-gradient conv contracts over split rows: a partial sum, all-reduced; no
    # activation (nor its gradient) is ever gathered, halos move instead.
    assert count(hlo, "all-gather") == 0
    assert count(hlo, "collective-permute") > 0
    assert count(hlo, "all-reduce") <= 2           # the loss and the weight gradient


def test_gradient_report_matches_hlo():
    g = jax.grad(_cnn_loss(1, "max"), argnums=(0, 1))
    check(g, (W, X), (None, P(None, "model")), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [P(None, "model"), pytest.param(P(None, "data", "model"), marks=pytest.mark.slow)],
                         ids=["uneven", "uneven_2d"])
def test_gradients_uneven_split(spec):
    x = _normal(2, 18, 12, 4)           # 18 rows over 4 devices: blocks of 5, padded
    w = _normal(3, 3, 4, 4) / 4
    g = jax.grad(_cnn_loss(1, "max"), argnums=(0, 1))
    check(g, (w, x), (None, spec), rtol=1e-4, atol=1e-6, report=False)


def test_depthwise_gradients():
    wd = _normal(3, 3, 1, 8)

    def loss(w, x):
        return jnp.sum(jnp.sin(conv(feature_group_count=8)(x, w)))
    g = jax.value_and_grad(loss, argnums=(0, 1))
    # Channels split: the weight-gradient conv (batch_group_count=8) splits its groups too.
    _, hlo = check(g, (wd, X), (P(None, None, None, "model"), P(None, None, None, "model")),
                   rtol=1e-4, atol=1e-5)
    assert summarize(hlo) == {("all-reduce", ("model",), ()): 1}     # the loss only
    check(g, (wd, X), (None, P(None, "model")), rtol=1e-4, atol=1e-5, report=False)


# --------------------------------------------------------------------------- pooling
POOLS = {
    "max": lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"),
    "min": lambda x: lax.reduce_window(x, jnp.inf, lax.min, (1, 3, 1, 1), (1, 1, 1, 1), "SAME"),
    "sum": lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (2, 0), (1, 1), (0, 0))),
    "max2x2": lambda x: nnx.max_pool(x, (2, 2), (2, 2)),
    "prod": lambda x: lax.reduce_window(x, 1.0, lax.mul, (1, 3, 1, 1), (1, 1, 1, 1), "SAME"),
    "dilated": lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 1, 1), (1, 1, 1, 1),
                                           ((0, 0), (2, 2), (0, 0), (0, 0)), window_dilation=(1, 2, 1, 1)),
    "base_dilated": lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 1, 1), (1, 1, 1, 1),   # 16 -> 32
                                                ((0, 0), (1, 1), (0, 0), (0, 0)), base_dilation=(1, 2, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pooling_with_height_split(name):
    x = -np.abs(X)                       # all negative: a zero halo at the edges would show
    _, hlo = check(POOLS[name], (x,), (P(None, "model"),))
    assert permutes_only(hlo)
    if name == "max2x2":                 # windows never cross blocks
        assert not hlo


@pytest.mark.parametrize("pool", ["max", "max_same_stride1"])
def test_max_pool_gradient_scatters_halos_back(pool):
    def f(x):
        if pool == "max":
            return jnp.sum(POOLS["max"](x) ** 2)
        return jnp.sum(lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") ** 2)
    x = -np.abs(X)
    _, hlo = check(jax.grad(f), (x,), (P(None, "model"),), report=False)
    assert permutes_only(hlo)
    if pool == "max_same_stride1":
        # operand halo (1 row each way, shared with the forward max) + result rows sent back
        assert count(hlo, "collective-permute") == 4


def test_max_pool_jvp():
    f = lambda x, t: jax.jvp(POOLS["max"], (x,), (t,))
    _, hlo = check(f, (-np.abs(X), X), (P(None, "model"), P(None, "model")), report=False)
    assert permutes_only(hlo)


# -------------------------------------------------------------------------------- pad
PADS = {
    "lo_hi": [(0, 0, 0), (1, 2, 0), (0, 0, 0), (0, 0, 0)],
    "negative": [(0, 0, 0), (-1, 3, 0), (2, -1, 0), (0, 0, 0)],
    "interior": [(0, 0, 0), (0, 1, 1), (0, 0, 0), (0, 0, 0)],       # 16 -> 32: every block alike
    "interior_crop": [(0, 0, 0), (-2, 3, 2), (0, 0, 0), (0, 0, 0)],  # 16 -> 49: not on this dim
}


@pytest.mark.parametrize("name", sorted(PADS))
def test_pad_split_dims(name):
    f = lambda x: lax.pad(x, 1.5, PADS[name])
    _, hlo = check(f, (X,), (P(None, "model"),))
    if name == "interior":
        assert not hlo                  # output 32 rows: each device pads its own rows
    if name == "interior_crop":
        # The padded dim cannot stay split: the axis moves to another dim (one all-to-all, the
        # pad's work and result stay split) rather than the whole operand being gathered.
        assert [c.kind for c in hlo] == ["all-to-all"]


def test_pad_gradient_and_batch_split():
    f = lambda x: jnp.sum(jnp.pad(x, ((0, 0), (1, 2), (3, 0), (0, 0))) ** 2)
    check(jax.grad(f), (X,), (P("data", "model"),))
    check(lambda x: jnp.pad(x, ((1, 1), (0, 0), (0, 0), (0, 0))), (X,), (P(None, "model"),))


# ------------------------------------------------------------------------------ rules
def _rule(fn, *args):
    graph = ir.trace(fn, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    eqn = graph.eqns[0]
    return get_rule(eqn).factors(eqn)


def _kinds(rule, dims):
    return [tuple(rule.kinds[f] for f in d) for d in dims]


def test_conv_factor_table():
    r = _rule(conv(), X, W)
    lhs, rhs = r.operands
    # N, H, W, C: batch pass; rows and columns shared with the result's (halo factors);
    # features a sum factor shared with the kernel's I; the kernel's window replicated.
    assert _kinds(r, lhs) == [("pass",), ("pass",), ("pass",), ("sum",)]
    assert _kinds(r, rhs) == [("replicate",), ("replicate",), ("sum",), ("pass",)]
    assert lhs[3] == rhs[2] and lhs[1] == r.results[0][1]
    r = _rule(conv(2, "SAME", dn=NHWC), X, W)     # stride 2: 16 rows -> 8, shared factor
    assert r.operands[0][1] == r.results[0][1]


def test_window_modes():
    W_ = conv_rules.Window
    assert W_(16, 16).mode() == "pass"
    assert W_(16, 16, 3, 1, 1, 1).mode() == "out"
    assert W_(16, 14, 3).mode() == "out"                                # VALID: drifting windows
    assert W_(8, 16, 3, 1, 2, 1, base=2).mode() == "out_even"           # input grad of stride 2
    assert W_(9, 16, 2, 1, 0, 0, base=2).mode() == "replicate"          # non-uniform dilation
    assert W_(16, 1, 16).mode() == "replicate"                          # one window: no split


def test_halo_plan():
    sizes = {"m": 4}
    plan = conv_rules._plan
    # 3-row window, stride 1, SAME on 16 rows: rows -1..4 around each block of 4.
    h = plan(1, ("m",), sizes, 16, 1, 1, 4, 6, (2, 4, 8), 4)
    assert (h.block, h.first, h.end, h.rows, h.start, h.step, h.lo, h.hi) == (4, -1, 5, 6, 0, 0, 0, 0)
    # VALID 16 -> 14 (blocks of 4 in and out): block b reads rows 4b..4b+5.
    h = plan(1, ("m",), sizes, 16, 1, 0, 4, 6, (2, 4, 8), 4)
    assert (h.first, h.end, h.start, h.step) == (0, 6, 0, 0)
    # lhs dilation 2, 8 rows -> 16 outputs (blocks of 2 in, 4 out), padding (2, 1): block b
    # reads dilated positions 4b-2..4b+3, i.e. rows 2b-1..2b+1 and one hole after them.
    h = plan(1, ("m",), sizes, 8, 2, 2, 4, 6, (2, 2, 8), 4)
    assert (h.first, h.end, h.rows, h.lo, h.hi) == (-1, 2, 3, 0, 1)
    # Uneven: 18 rows -> 9 (3x3 stride 2, padding (0, 1)) over 4: blocks of 5 in, 3 out;
    # block b reads rows 6b..6b+6 (drifting by one row per block); the fourth block
    # computes nothing real, so the halo is sized for the first three.
    h = plan(1, ("m",), sizes, 18, 1, 0, 6, 7, (2, 5, 8), 3)
    assert (h.block, h.first, h.end, h.start, h.step) == (5, 0, 9, 0, 1)
    # Cropping 5 rows (pad (-5, 0)) of 16 over 8: block b reads rows 2b+5..2b+6 only, from
    # the blocks 3 and 4 after it -- nothing from the blocks in between.
    h = plan(1, ("m",), {"m": 8}, 16, 1, -5, 2, 2, (2, 2, 3), 6)
    assert (h.first, h.end, h.start) == (5, 7, 0)
    from autoshard.compiler import collectives
    assert [p[:3] for p in collectives.window_pieces(("m",), {"m": 8}, 2, 5, 7)] == [(2, 1, 2), (3, 0, 1)]


# ------------------------------------------------------------------------------ slow
# (Negative conv padding is left out: XLA CPU's own convolution with padding (-1, 2) reads
# out of bounds on one device -- garbage or NaN in the last row -- so there is no reference.)
@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((3, 0), (1, 2))])
@pytest.mark.parametrize("rhs_dilation", [1, 2])
@pytest.mark.parametrize("height", [16, 18])
@pytest.mark.parametrize("spec", [P(None, "model"), P(None, ("model", "data")), P("data", None, "model")])
def test_conv_sweep(stride, padding, rhs_dilation, height, spec):
    x = _normal(2, height, 12, 4)
    w = _normal(3, 3, 4, 4)
    f = conv(stride, padding, rhs_dilation)
    check(f, (x, w), (spec, None))
    g = jax.grad(lambda w, x: jnp.sum(jnp.tanh(f(x, w))), argnums=(0, 1))
    check(g, (w, x), (None, spec), rtol=1e-4, atol=1e-5, report=False)


@pytest.mark.slow
@pytest.mark.parametrize("window,stride,padding", [
    (2, 2, "VALID"), (3, 2, "SAME"), (3, 1, "SAME"), (5, 3, "VALID"), (3, 2, ((2, 2), (0, 0))),
    (4, 1, ((0, 3), (1, 1)))])
@pytest.mark.parametrize("height", [16, 15, 24])
@pytest.mark.parametrize("spec", [P(None, "model"), P(None, ("data", "model")), P(None, "data", "model")])
def test_pool_sweep(window, stride, padding, height, spec):
    x = -np.abs(_normal(2, height, 12, 4))
    pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                                       padding if isinstance(padding, str) else ((0, 0),) + padding + ((0, 0),))
    check(pool, (x,), (spec,))
    check(jax.grad(lambda x: jnp.sum(pool(x) ** 3)), (x,), (spec,), report=False)
    check(lambda x, t: jax.jvp(pool, (x,), (t,)), (x, x * 2), (spec, spec), report=False)


@pytest.mark.slow
@pytest.mark.parametrize("config", [(1, 2, 0), (-3, 1, 0), (0, 1, 1), (2, -1, 1), (0, 2, 2), (5, 5, 0), (-5, 0, 0)])
@pytest.mark.parametrize("height", [16, 18])
@pytest.mark.parametrize("spec", [P(None, "model"), P(None, ("data", "model"))])
def test_pad_sweep(config, height, spec):
    x = _normal(2, height, 3)
    f = lambda x: lax.pad(x, -2.0, [(0, 0, 0), config, (1, 0, 0)])
    check(f, (x,), (spec,))
    check(jax.grad(lambda x: jnp.sum(lax.pad(x, 0.0, [(0, 0, 0), config, (1, 0, 0)]) ** 2)), (x,), (spec,))
