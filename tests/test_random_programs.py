"""Differential testing (issue #3): random programs over many primitives, random meshes and
random annotations, run through autoshard and checked against the same program on one
device. A fast profile runs by default; ``-m slow`` runs the long one (2,000 programs).

A failure prints the drawn program (hypothesis shrinks it), so it replays exactly.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import autoshard as ash

MESHES = {"a=8": None, "a=2,b=4": None, "a=4,b=2": None, "a=2,b=2,c=2": None}
DIM_SIZES = [1, 2, 3, 4, 6, 8]

# Ops: name -> (arity, function of arrays + drawn params). All keep values bounded so
# float32 comparisons stay meaningful.
UNARY = {
    "neg": jnp.negative, "tanh": jnp.tanh, "sin": jnp.sin, "abs": jnp.abs, "exp": lambda x: jnp.exp(jnp.tanh(x)),
    "log": lambda x: jnp.log1p(jnp.abs(x)), "sqrt": lambda x: jnp.sqrt(jnp.abs(x) + 1.0),
    "rsqrt": lambda x: jax.lax.rsqrt(jnp.abs(x) + 1.0), "logistic": jax.nn.sigmoid, "square": jnp.square,
    "cube": lambda x: x ** 3, "floor": jnp.floor, "round": jnp.round, "erf": jax.scipy.special.erf,
    "gelu": jax.nn.gelu, "relu": jax.nn.relu, "sign": jnp.sign, "cos": jnp.cos,
    "int_roundtrip": lambda x: (x * 4).astype(jnp.int32).astype(jnp.float32),
    "stop_gradient": jax.lax.stop_gradient,
}
BINARY = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "div": lambda x, y: x / (jnp.abs(y) + 1.0),
    "max": jnp.maximum, "min": jnp.minimum, "where": lambda x, y: jnp.where(x > y, x, y * 2),
    "pow": lambda x, y: jnp.power(jnp.abs(x) + 1.0, jnp.tanh(y)), "atan2": jnp.arctan2,
}


def draw_program(draw):
    mesh_text = draw(st.sampled_from(sorted(MESHES)))
    mesh_sizes = dict((k, int(v)) for k, v in (p.split("=") for p in mesh_text.split(",")))
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.sampled_from(DIM_SIZES)) for _ in range(rank))
    n_inputs = draw(st.integers(1, 3))
    specs = []
    for _ in range(n_inputs):
        axes = list(mesh_sizes)
        entries = []
        for _d in range(rank):
            choice = draw(st.sampled_from([None] + axes))
            if choice is not None:
                axes.remove(choice)
            entries.append(choice)
        specs.append(draw(st.sampled_from([None, P(*entries)])))
    ops = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["unary", "binary", "reduce", "transpose", "reshape", "broadcast",
                                     "slice", "concat", "dot", "cumsum", "sort", "argmax", "pad",
                                     "iota", "scalar", "dynamic_slice", "take", "rev"]))
        ops.append((kind, draw(st.integers(0, 10 ** 6))))
    return mesh_text, shape, specs, ops


def build(shape, n_inputs, ops):
    """The program: a function of the inputs, applying ``ops`` to a growing value pool."""
    def fn(*xs):
        pool = list(xs)
        for kind, seed in ops:
            r = np.random.default_rng(seed)
            x = pool[r.integers(len(pool))]
            same = [v for v in pool if v.shape == x.shape]
            y = same[r.integers(len(same))]
            if kind == "unary":
                out = UNARY[sorted(UNARY)[r.integers(len(UNARY))]](x)
            elif kind == "binary":
                out = BINARY[sorted(BINARY)[r.integers(len(BINARY))]](x, y)
            elif kind == "reduce" and x.ndim:
                axis = int(r.integers(x.ndim))
                out = [jnp.sum, jnp.max, jnp.min, jnp.mean][r.integers(4)](x, axis=axis)
            elif kind == "transpose" and x.ndim > 1:
                out = jnp.transpose(x, r.permutation(x.ndim))
            elif kind == "reshape" and x.ndim > 1:
                d = int(r.integers(x.ndim - 1))
                out = x.reshape(x.shape[:d] + (x.shape[d] * x.shape[d + 1],) + x.shape[d + 2:])
            elif kind == "broadcast" and x.ndim < 3:
                out = jnp.broadcast_to(x[None], (2,) + x.shape) * 1.5
            elif kind == "slice" and x.ndim and x.shape[0] > 1:
                out = x[1:]
            elif kind == "concat" and x.ndim:
                out = jnp.concatenate([x, y], axis=int(r.integers(x.ndim)))
            elif kind == "dot" and x.ndim:
                out = jnp.tensordot(x, y, axes=([x.ndim - 1], [x.ndim - 1])) / 4
            elif kind == "cumsum" and x.ndim:
                out = jnp.cumsum(x, axis=int(r.integers(x.ndim)))
            elif kind == "sort" and x.ndim:
                out = jnp.sort(x, axis=int(r.integers(x.ndim)))
            elif kind == "argmax" and x.ndim:
                out = jnp.argmax(x, axis=int(r.integers(x.ndim))).astype(jnp.float32)
            elif kind == "pad" and x.ndim:
                widths = [(0, 0)] * x.ndim
                widths[int(r.integers(x.ndim))] = (1, 2)
                out = jnp.pad(x, widths)
            elif kind == "iota" and x.ndim:
                out = x + jnp.arange(x.shape[-1], dtype=x.dtype)
            elif kind == "scalar":
                out = x * 0.5 + 1.0
            elif kind == "dynamic_slice" and x.ndim and x.shape[0] > 1:
                out = jax.lax.dynamic_slice_in_dim(x, 1, x.shape[0] - 1, axis=0)
            elif kind == "take" and x.ndim:
                out = jnp.take(x, jnp.array([0, x.shape[0] - 1, 0]), axis=0)
            elif kind == "rev" and x.ndim:
                out = jnp.flip(x, axis=int(r.integers(x.ndim)))
            else:
                out = x + y
            pool.append(out)
        return pool[-1], sum(jnp.sum(v) for v in pool[len(xs):]) if len(pool) > len(xs) else xs[0]
    return fn


def check(program):
    mesh_text, shape, specs, ops = program
    if MESHES[mesh_text] is None:
        MESHES[mesh_text] = ash.make_mesh(mesh_text)
    mesh = MESHES[mesh_text]
    rng = np.random.default_rng(len(ops))
    xs = [rng.normal(size=shape).astype(np.float32) for _ in specs]
    fn = build(shape, len(specs), ops)
    want = jax.jit(fn)(*xs)
    try:
        pf = ash.parallelize(fn, mesh=mesh, in_specs=tuple(specs))
        got = pf(*xs)
    except (ash.ShardingError, ash.UnsupportedPrimitiveError):
        return "typed-error"
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-4,
                                   err_msg=f"mesh {mesh_text} specs {specs} ops {ops}")
    return "ok"


programs = st.composite(lambda draw: draw_program(draw))()
COMMON = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              print_blob=True)


@settings(max_examples=int(os.environ.get("AUTOSHARD_RANDOM_FAST", 25)), **COMMON)
@given(programs)
def test_random_programs_fast(program):
    check(program)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("AUTOSHARD_RANDOM_SLOW", 2000)), **COMMON)
@given(programs)
def test_random_programs_slow(program):
    check(program)


def test_generator_covers_at_least_25_primitives():
    from autoshard.compiler import ir
    seen = set()
    x = jax.ShapeDtypeStruct((4, 6), jnp.float32)
    kinds = ["unary"] * 60 + ["binary"] * 30 + ["reduce", "transpose", "reshape", "broadcast", "slice", "concat",
                                                "dot", "cumsum", "sort", "argmax", "pad", "iota", "scalar",
                                                "dynamic_slice", "take", "rev"]
    for seed, kind in enumerate(kinds):
        graph = ir.trace(lambda a, b: jax.tree.leaves(build((4, 6), 2, [(kind, seed)])(a, b)), [x, x])
        seen |= {e.prim.name for e in graph.all_eqns()}
    assert len(seen) >= 25, sorted(seen)
