"""A primitive autoshard has no rule for: computed on replicated operands, with a warning and its
cost recorded (``program.fallbacks``); ``strict=True`` refuses instead (API.md "Primitives without
a rule").

The primitives here are defined by the test, as a library or a user would: a
``jax.extend.core.Primitive`` with an impl, an abstract eval and a lowering (``mlir.lower_fun``).
"""
from __future__ import annotations

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.compiler.cost_model import wire_bytes
from autoshard.errors import UnsupportedPrimitiveWarning

from _util import mesh


def _center_impl(x):
    """Subtract the column means: every output row depends on every input row."""
    return x - jnp.mean(x, axis=0, keepdims=True)


center_p = Primitive("test_center_columns")
center_p.def_impl(_center_impl)
center_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(center_p, mlir.lower_fun(_center_impl, multiple_results=False))


def _scaled_pair_impl(x, y, *, scale):
    return [x * scale + jnp.sum(y), y.T]


pair_p = Primitive("test_scaled_pair")
pair_p.multiple_results = True
pair_p.def_impl(_scaled_pair_impl)
pair_p.def_abstract_eval(lambda x, y, *, scale: [jax.core.ShapedArray(x.shape, x.dtype),
                                                 jax.core.ShapedArray(y.shape[::-1], y.dtype)])
mlir.register_lowering(pair_p, mlir.lower_fun(_scaled_pair_impl, multiple_results=True))

CENTER_LINE = None


def step(x, w):
    global CENTER_LINE
    h = jnp.sin(x) @ w                              # split over 'model' on the contraction: P(sum)
    CENTER_LINE = inspect.currentframe().f_lineno + 1
    c = center_p.bind(h)                            # no rule: gathered and reduced to B first
    a, b = pair_p.bind(c * 2.0, w, scale=3.0)
    return jnp.tanh(a) + 1.0, b


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32))


SPECS = (P("data", "model"), P("model", None))


def test_unknown_primitive_runs_replicated_and_equals_one_device():
    m = mesh("data=2,model=4")
    x, w = _inputs()
    pf = ash.parallelize(step, mesh=m, in_specs=SPECS)
    with pytest.warns(UserWarning) as record:
        got = pf(x, w)
    want = jax.jit(step)(x, w)
    for g, wv in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wv), rtol=1e-5, atol=1e-5)
    msgs = [str(r.message) for r in record if issubclass(r.category, UnsupportedPrimitiveWarning)]
    assert len(msgs) == 2, msgs
    assert "test_center_columns" in msgs[0] and f"test_fallback.py:{CENTER_LINE}" in msgs[0]
    assert "test_scaled_pair" in msgs[1]
    assert all("replicated operands" in m_ and "register_rule" in m_ for m_ in msgs)
    # A second call hits the cache: no new warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedPrimitiveWarning)
        pf(x, w)


def test_fallbacks_record_the_replication_and_its_wire_bytes():
    m = mesh("data=2,model=4")
    x, w = _inputs()
    pf = ash.parallelize(step, mesh=m, in_specs=SPECS)
    with pytest.warns(UnsupportedPrimitiveWarning):
        program = pf.program(x, w)
    center, pair = program.fallbacks
    assert (center.primitive, pair.primitive) == ("test_center_columns", "test_scaled_pair")
    assert center.source.startswith(f"test_fallback.py:{CENTER_LINE} ")
    # h = sin(x) @ w is [8, 4], split over 'data' on rows and P(sum) over 'model': replicating
    # it is an all-reduce over 'model' of the [4, 4] block and an all-gather over 'data' (in
    # either order; the planner picks one), 64 bytes a block.
    kinds = sorted((t.kind, t.axes) for r in center.reshards for t in r.transforms if t.is_collective)
    assert kinds == [("all-gather", ("data",)), ("all-reduce", ("model",))], kinds
    expected = sum(wire_bytes(t.kind, math.prod(m.shape[a] for a in t.axes), math.prod(t.in_shape) * 4)
                   for r in center.reshards for t in r.transforms if t.is_collective)
    assert center.wire_bytes == pytest.approx(expected) and center.wire_bytes > 0
    assert center.replicated_bytes == 8 * 4 * 4
    # The pair's operands: c * 2 is already replicated (the centred value is B), w is split
    # over 'model' on dim 0: one all-gather of its [4, 4] block over 'model'.
    gathers = [(t.kind, t.axes) for r in pair.reshards for t in r.transforms if t.is_collective]
    assert gathers == [("all-gather", ("model",))]
    assert pair.wire_bytes == pytest.approx(wire_bytes("all-gather", 4, 4 * 4 * 4))
    # Results of a fallback are replicated; the report still builds and counts those bytes.
    center_eqn = program.eqn_of(center.eqn)
    assert program.produced[center_eqn.outvars[0]].is_replicated()
    report = pf.report(x, w)
    assert report.total_wire_bytes >= center.wire_bytes + pair.wire_bytes
    assert "test_center_columns" in str(center) and "register_rule" in center.fix


def test_strict_raises_unsupported_primitive_error_naming_primitive_source_and_workaround():
    m = mesh("data=2,model=4")
    x, w = _inputs()
    pf = ash.parallelize(step, mesh=m, in_specs=SPECS, strict=True)
    with pytest.raises(ash.UnsupportedPrimitiveError) as info:
        pf(x, w)
    err = info.value
    assert isinstance(err, NotImplementedError)
    assert err.primitive == "test_center_columns"
    assert err.source.startswith(f"test_fallback.py:{CENTER_LINE} ")
    text = str(err)
    assert "test_center_columns" in text and f"test_fallback.py:{CENTER_LINE}" in text
    assert "ash.register_rule" in text and "strict=True" in text


def test_strict_accepts_programs_whose_primitives_all_have_rules():
    m = mesh("data=2,model=4")
    x, w = _inputs()
    pf = ash.parallelize(lambda a, b: jnp.tanh(a @ b), mesh=m, in_specs=SPECS, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedPrimitiveWarning)
        np.testing.assert_allclose(np.asarray(pf(x, w)), np.tanh(x @ w), rtol=1e-5, atol=1e-5)
    assert pf.program(x, w).fallbacks == []


def test_unknown_primitive_inside_a_loop_and_under_grad():
    """In a scan body, and differentiated (the primitive's own JVP/transpose are JAX's, as
    lower_fun defines none here: grad of the loss through a linear use of the primitive)."""
    m = mesh("data=2,model=4")
    x, w = _inputs()

    def body(c, wi):
        return center_p.bind(jnp.tanh(c @ wi)), c.sum()

    def loop(x, ws):
        return lax.scan(body, x[:, :4], ws)

    ws = np.stack([np.eye(4, dtype=np.float32) * (k + 1) * 0.3 for k in range(3)])
    pf = ash.parallelize(loop, mesh=m, in_specs=(P("data", None), P(None, None, "model")))
    with pytest.warns(UnsupportedPrimitiveWarning, match="test_center_columns"):
        got = pf(x, ws)
    want = jax.jit(loop)(x, ws)
    for g, wv in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wv), rtol=1e-5, atol=1e-5)
    assert [f.primitive for f in pf.program(x, ws).fallbacks] == ["test_center_columns"]
