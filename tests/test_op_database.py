"""Op database: every primitive with a sharding rule, run sharded and compared with one device.

In the style of PyTorch DTensor's ``test_dtensor_ops``: for each primitive name in
``autoshard.compiler.ops.RULES`` there are one or more small *samples* (a function that emits
the primitive in its jaxpr, plus input shapes and value domains; samples of one rule family
are merged where they can be, as XLA compiles dominate the run). Each sample runs on the
meshes ``a=8``, ``a=2,b=4`` and ``a=2,b=2,c=2`` under a seeded sample of ``in_specs`` (every
dim ``None``, one mesh axis or two, each axis once per spec and only where it divides the dim;
always also the all-``None`` specs and the unannotated ``None``), and

- ``pf(*args)`` must equal ``fn(*args)`` (floats to 1e-5, ints and bools exactly);
- every output must be a ``NamedSharding`` on the mesh.

Differentiable samples also run forward+backward: ``jax.grad`` of the sum of the float
outputs with respect to the float inputs, parallelized as one function.

``XFAIL`` lists primitives that cannot pass yet (strict: they must fail), ``SKIP_NOT_REACHABLE``
registered names that no public JAX API emits; every other registered name needs a sample
(``test_registry_is_covered``). One check is shared per (sample, variant, mesh, specs), and one
compile and run per distinct lowered program (the all-None specs and the unannotated ``None``
usually lower alike). The number of (primitive, layout) cases is printed at the end
(``pytest -s``) and asserted by the last test. ``-m slow`` runs many more layouts per mesh.
"""
from __future__ import annotations

import collections
import functools
import itertools
import zlib
from dataclasses import dataclass
from typing import Callable

import jax
import jax.ad_checkpoint
import jax.extend.random
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.compiler import ir
from autoshard.compiler import ops as ops_registry

ops_registry._load_families()
RULES = ops_registry.RULES

MESHES = ("a=8", "a=2,b=4", "a=2,b=2,c=2")
BASE_MESH = "a=2,b=4"        # where the all-None / unannotated specs run
# Seeded random in_specs per mesh in the default run (XLA compiles dominate: ~0.15 s a case).
FWD_RANDOM_PER_MESH = {"a=8": 1, "a=2,b=4": 1, "a=2,b=2,c=2": 1}
SLOW_RANDOM_PER_MESH = 12    # @slow, every mesh


# ------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class Sample:
    name: str                          # unique
    fn: Callable                       # fn(*args), or fn(mesh) -> callable when mesh_fn
    args: tuple                        # ((shape, kind), ...), kinds: see _make_arg
    grad: bool = False                 # also run forward+backward
    mesh_fn: bool = False
    grad_argnums: tuple | None = None  # default: every float input
    fixed: tuple = ()                  # in_specs tuples run on every mesh (axis 'a' only)

    def bind(self, mesh):
        return self.fn(mesh) if self.mesh_fn else self.fn


SAMPLES: dict[str, list[Sample]] = collections.defaultdict(list)
_BY_NAME: dict[str, Sample] = {}


def add(prim, name, fn, *args, grad=False, mesh_fn=False, grad_argnums=None, fixed=()):
    s = Sample(name, fn, tuple(args), grad, mesh_fn, grad_argnums, tuple(fixed))
    assert name not in _BY_NAME, name
    _BY_NAME[name] = s
    SAMPLES[prim].append(s)
    return s


# Registered primitives the installed JAX never emits (rules for another JAX release's
# primitives): name -> why. Their samples are dropped by ``add_if_emitted``.
NOT_EMITTED: dict[str, str] = {}


def _emitted(fn, args):
    avals = [jax.ShapeDtypeStruct(shape, _make_arg(np.random.default_rng(0), shape, kind).dtype)
             for shape, kind in args]
    graph = ir.trace(lambda *a: jax.tree.leaves(fn(*a)), avals)

    def prims(g):
        return {n for e in g.eqns for n in (e.prim.name, *(m for sub in e.subgraphs for m in prims(sub)))}
    return prims(graph)


def add_if_emitted(prims, name, fn, *args, **kw):
    """``add`` for every primitive of ``prims`` the sample emits under the installed JAX; the
    others go to NOT_EMITTED (e.g. ``one_minus_square`` exists from jax 0.12 on)."""
    emitted = _emitted(fn, args)
    here = [p for p in prims if p in emitted]
    for p in prims:
        if p not in emitted:
            NOT_EMITTED[p] = f"jax {jax.__version__} does not emit it ({name} emits {sorted(emitted)})"
    if not here:
        return None
    s = add(here[0], name, fn, *args, **kw)
    for p in here[1:]:
        SAMPLES[p].append(s)
    return s


def A(shape, kind="f"):
    return (tuple(shape), kind)


def _make_arg(rng, shape, kind):
    """Value domains: f normal, small normal/4, pos [0.5,2], unit (-.9,.9), gt1 [1.2,3], near1 [.9,1.1],
    lo [-1.5,-.5], i [-20,20), ipos [1,10), nonpos [-3,0], ibig full int32, shift [0,32), b bool,
    idxN ints in [0,N), permN distinct ints in [0,N)."""
    f32 = np.float32
    if kind == "f":
        return rng.standard_normal(shape).astype(f32)
    if kind == "small":
        return (0.25 * rng.standard_normal(shape)).astype(f32)
    if kind == "pos":
        return rng.uniform(0.5, 2.0, shape).astype(f32)
    if kind == "unit":
        return rng.uniform(-0.9, 0.9, shape).astype(f32)
    if kind == "gt1":
        return rng.uniform(1.2, 3.0, shape).astype(f32)
    if kind == "near1":
        return rng.uniform(0.9, 1.1, shape).astype(f32)
    if kind == "lo":
        return rng.uniform(-1.5, -0.5, shape).astype(f32)
    if kind == "i":
        return rng.integers(-20, 20, shape).astype(np.int32)
    if kind == "ipos":
        return rng.integers(1, 10, shape).astype(np.int32)
    if kind == "nonpos":
        return rng.integers(-3, 1, shape).astype(np.int32)
    if kind == "ibig":
        return rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32)
    if kind == "shift":
        return rng.integers(0, 32, shape).astype(np.int32)
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind.startswith("idx"):
        return rng.integers(0, int(kind[3:]), shape).astype(np.int32)
    if kind.startswith("perm"):
        n = int(kind[4:])
        return rng.permutation(n)[:int(np.prod(shape))].reshape(shape).astype(np.int32)
    raise ValueError(kind)


def _is_float_kind(kind):
    return kind in ("f", "small", "pos", "unit", "gt1", "near1", "lo")


# Samples are merged where they share a rule family: every sample costs XLA compiles, which
# dominate the run, while one more output in a sample is nearly free.

# -- elementwise unary: op of x f32[8,1,16] (a size-1 dim) and of s rank 0 ------------------
def _unary(op):
    return lambda x, s: (op(x), op(s))


def _unary_int(op):   # also of an int32 operand
    return lambda x, s, i: (op(x), op(s), op(i))


UNARY = {  # prim: (op, domain, differentiable)
    "neg": (jnp.negative, "f", True),
    "sign": (jnp.sign, "f", False),
    "floor": (jnp.floor, "f", False),
    "ceil": (jnp.ceil, "f", False),
    "round": (lambda x: (jnp.round(x), lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO)), "f", False),
    "is_finite": (jnp.isfinite, "f", False),
    "exp": (jnp.exp, "f", True),
    "exp2": (jnp.exp2, "f", True),
    "log": (jnp.log, "pos", True),
    "log1p": (jnp.log1p, "pos", True),
    "expm1": (jnp.expm1, "f", True),
    "tanh": (jnp.tanh, "f", True),
    "logistic": (jax.nn.sigmoid, "f", True),
    "sin": (jnp.sin, "f", True),
    "cos": (jnp.cos, "f", True),
    "tan": (jnp.tan, "unit", True),
    "asin": (jnp.arcsin, "unit", True),
    "acos": (jnp.arccos, "unit", True),
    "atan": (jnp.arctan, "f", True),
    "sinh": (jnp.sinh, "f", True),
    "cosh": (jnp.cosh, "f", True),
    "asinh": (jnp.arcsinh, "f", True),
    "acosh": (jnp.arccosh, "gt1", True),
    "atanh": (jnp.arctanh, "unit", True),
    "sqrt": (jnp.sqrt, "pos", True),
    "rsqrt": (lax.rsqrt, "pos", True),
    "cbrt": (jnp.cbrt, "pos", True),
    "abs": (jnp.abs, "f", True),
    "erf": (jsp.erf, "f", True),
    "erfc": (jsp.erfc, "f", True),
    "erf_inv": (jsp.erfinv, "unit", True),
    "lgamma": (jsp.gammaln, "pos", True),
    "digamma": (jsp.digamma, "pos", True),
    "square": (jnp.square, "f", True),
    "integer_pow": (lambda x: x ** 3, "f", True),
    "reduce_precision": (lambda x: lax.reduce_precision(x, 5, 10), "f", True),
    "bessel_i0e": (jsp.i0e, "f", True),
    "bessel_i1e": (jsp.i1e, "f", True),
    "copy": (lambda x: jnp.array(x, copy=True), "f", True),
    "stop_gradient": (lambda x: x * lax.stop_gradient(x), "f", True),
    "polygamma": (lambda x: jsp.polygamma(1, x), "pos", False),
}
UNARY_INT = {"neg", "abs", "sign"}      # also on int32
for _p, (_op, _kind, _diff) in UNARY.items():
    if _p in UNARY_INT:
        add(_p, _p, _unary_int(_op), A((8, 1, 16), _kind), A((), _kind), A((16, 8), "i"), grad=_diff)
    else:
        add(_p, _p, _unary(_op), A((8, 1, 16), _kind), A((), _kind), grad=_diff)

add("not", "not_bool_int", lambda b, i, s: (~b, ~i, ~s), A((8, 1, 16), "b"), A((16, 8), "i"), A((), "b"))
add("population_count", "popcount", _unary(lax.population_count), A((8, 1, 16), "ibig"), A((), "ibig"))
add("clz", "clz", _unary(lax.clz), A((8, 1, 16), "ibig"), A((), "ibig"))
add("integer_pow", "integer_pow_neg", _unary(lambda x: x ** -2), A((8, 16), "pos"), A((), "pos"), grad=True)

# complex numbers: built from float inputs, never an input themselves
add("complex", "complex", lambda x, w, y, s: (lax.complex(x, w), lax.complex(x, y), lax.complex(s, x)),
    A((8, 16)), A((8, 16)), A((1, 16)), A(()))


def _real_imag_conj(x, y):
    c = lax.complex(x, y) * 2
    return jnp.real(c), jnp.imag(c), jnp.imag(jnp.conj(c))


_s = add("real", "real_imag_conj", _real_imag_conj, A((8, 16)), A((8, 16)), grad=True)
SAMPLES["imag"].append(_s)
SAMPLES["conj"].append(_s)


# -- elementwise binary: x, y f32[8,16] (independent layouts), z f32[1,16] (size-1 dim against a
#    full dim: implicit broadcast) and s rank 0, in both operand positions; some also on a pair
#    of int32 operands i, j ------------------------------------------------------------------
def _binary(op, int_op=None):
    if int_op is None:
        return lambda x, y, z, s: (op(x, y), op(x, z), op(s, x), op(z, s))
    return lambda x, y, z, s, i, j: (op(x, y), op(x, z), op(s, x), op(z, s), int_op(i, j))


BINARY = {  # prim: (op, lhs domain, rhs domain, differentiable)
    "add": (jnp.add, "f", "f", True),
    "sub": (jnp.subtract, "f", "f", True),
    "mul": (jnp.multiply, "f", "f", True),
    "div": (jnp.divide, "f", "pos", True),
    "rem": (lax.rem, "f", "pos", True),
    "pow": (lax.pow, "pos", "f", True),
    "max": (jnp.maximum, "f", "f", True),
    "min": (jnp.minimum, "f", "f", True),
    "atan2": (jnp.arctan2, "f", "f", True),
    "nextafter": (jnp.nextafter, "f", "f", False),
    "eq": (lax.eq, "f", "f", False),
    "ne": (lax.ne, "i", "i", False),
    "lt": (jnp.less, "f", "f", False),
    "le": (jnp.less_equal, "f", "f", False),
    "gt": (jnp.greater, "f", "f", False),
    "ge": (jnp.greater_equal, "f", "f", False),
    "and": (jnp.logical_and, "b", "b", False),
    "or": (jnp.logical_or, "b", "b", False),
    "xor": (jnp.logical_xor, "b", "b", False),
    "shift_left": (lax.shift_left, "i", "shift", False),
    "shift_right_logical": (lax.shift_right_logical, "ibig", "shift", False),
    "shift_right_arithmetic": (lax.shift_right_arithmetic, "ibig", "shift", False),
    "mulhi": (lax.mulhi, "ibig", "ibig", False),
    "igamma": (jsp.gammainc, "pos", "pos", True),
    "igammac": (jsp.gammaincc, "pos", "pos", True),
    "zeta": (jsp.zeta, "gt1", "pos", False),
}
BINARY_INT = {  # prim: (int op, lhs domain, rhs domain)
    "add": (jnp.add, "i", "i"),
    "mul": (jnp.multiply, "i", "i"),
    "max": (jnp.maximum, "i", "i"),
    "rem": (lax.rem, "i", "ipos"),
    "eq": (lax.eq, "i", "i"),
    "lt": (lax.lt, "i", "i"),
    "and": (lax.bitwise_and, "ibig", "ibig"),
    "or": (lax.bitwise_or, "ibig", "ibig"),
    "xor": (lax.bitwise_xor, "ibig", "ibig"),
}
# Special functions whose XLA compile takes ~1 s per application: two applications only.
_LIGHT = {"igamma", "igammac", "zeta"}
for _p, (_op, _l, _r, _diff) in BINARY.items():
    _args4 = (A((8, 16), _l), A((8, 16), _r), A((1, 16), _r), A((), _r))
    if _p in _LIGHT:
        add(_p, _p, (lambda op: lambda x, y, z, s: (op(x, y), op(s, z)))(_op), *_args4, grad=_diff)
    elif _p in BINARY_INT:
        _iop, _il, _ir = BINARY_INT[_p]
        add(_p, _p, _binary(_op, _iop), *_args4, A((16, 8), _il), A((16, 8), _ir), grad=_diff)
    else:
        add(_p, _p, _binary(_op), *_args4, grad=_diff)

add("pow", "pow_int_exp", lambda x, n: x ** n, A((8, 16), "pos"), A((8, 16), "idx4"), grad=True)
add("mul", "mul_chain", lambda x, y: (x * y) * (y * 2.0) * 3.0, A((16, 8)), A((16, 8)), grad=True)

# select_n: jnp.where (bool predicate, also rank 0) and an int32 case index over 3 cases
add("select_n", "where", lambda c, x, y, s: (jnp.where(c, x, y), jnp.where(c, x, s), lax.select_n(s > 0, x, y)),
    A((8, 16), "b"), A((8, 16)), A((8, 16)), A(()), grad=True)
add("select_n", "select_n_int", lambda i, x, y, z: lax.select_n(i, x, y, z),
    A((8, 16), "idx3"), A((8, 16)), A((8, 16)), A((8, 16)), grad=True)
# clamp: rank-0 bounds and full bounds (jax.grad of clamp wrt rank-0 bounds fails in jax
# itself: not differentiated wrt those)
add("clamp", "clamp", lambda lo, x, hi, lo2, hi2: (lax.clamp(lo, x, hi), lax.clamp(lo2, x, hi2)),
    A((), "lo"), A((8, 16)), A((), "pos"), A((8, 16), "lo"), A((8, 16), "pos"), grad=True, grad_argnums=(1, 3, 4))

# convert_element_type
add("convert_element_type", "convert",
    lambda x, i, b: (x.astype(jnp.int32), i.astype(jnp.float32), b.astype(jnp.int32), x > 0,
                     x.astype(jnp.bfloat16).astype(jnp.float32) * x),
    A((8, 16)), A((16, 8), "i"), A((8, 1, 16), "b"), grad=True)

# gradient-only primitives
add("add_any", "add_any_grad", jax.grad(lambda x, y: jnp.sum(jnp.sin(x) * x + x * y)),
    A((8, 16)), A((8, 16)))
add("igamma_grad_a", "igamma_grad_a",
    jax.grad(lambda a, x: jnp.sum(jsp.gammainc(a, x))), A((8, 16), "pos"), A((8, 16), "pos"))


# -- dot_general -------------------------------------------------------------------------
add("dot_general", "matmul", lambda x, w, i, j: (x @ w, i @ j), A((8, 16)), A((16, 8)), A((8, 16), "i"),
    A((16, 8), "i"), grad=True)
add("dot_general", "bmm", lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y), A((8, 4, 16)), A((8, 16, 8)),
    grad=True)
add("dot_general", "dot_misc",   # matrix-vector, vector-vector, scalar, two contracting dims, outer
    lambda x, v, s, a, b, u: (x @ v, v @ v, jnp.dot(x, s), jnp.einsum("ijk,jkl->il", a, b), jnp.outer(u, v)),
    A((8, 16)), A((16,)), A(()), A((8, 2, 8)), A((2, 8, 16)), A((8,)), grad=True)


# -- reductions --------------------------------------------------------------------------
add("reduce_sum", "sum", lambda x, i: (x.sum(1), x.sum(), x.sum((0, 2)), i.sum(0)), A((8, 4, 16)),
    A((16, 8), "i"), grad=True)
add("reduce_max", "reduce_max", lambda x, i: (x.max(1), x.max(), i.max((0, 2))), A((8, 16)), A((8, 1, 16), "i"),
    grad=True)
add("reduce_min", "reduce_min", lambda x: (x.min(0), x.min((1, 2))), A((8, 4, 16)), grad=True)
add("reduce_prod", "prod", lambda x: (x.prod(1), x.prod(0)), A((8, 16), "near1"), grad=True)
_s = add("reduce_and", "all_any", lambda b: (jnp.all(b, 1), jnp.all(b), jnp.any(b, 0), jnp.any(b)), A((8, 16), "b"))
SAMPLES["reduce_or"].append(_s)
add("reduce_xor", "reduce_xor", lambda i: (lax.reduce_xor(i, (1,)), lax.reduce_xor(i, (0, 1))),
    A((8, 16), "ibig"))
_s = add("argmax", "argmax_argmin", lambda x: (jnp.argmax(x, 1), jnp.argmax(x, 0), jnp.argmin(x, 1),
                                               jnp.argmin(x, 0)), A((8, 16)))
SAMPLES["argmin"].append(_s)
add("cumsum", "cumsum", lambda x: (lax.cumsum(x, 1), lax.cumsum(x, 0, reverse=True)), A((8, 16)), grad=True)
add("cumprod", "cumprod", lambda x: lax.cumprod(x, 1), A((8, 16), "near1"), grad=True)
add("cummax", "cummax", lambda x: (lax.cummax(x, 1), lax.cummax(x, 0, reverse=True)), A((8, 16)), grad=True)
add("cummin", "cummin", lambda x: lax.cummin(x, 0), A((8, 16)), grad=True)
add("cumlogsumexp", "cumlogsumexp", lambda x: lax.cumlogsumexp(x, 1), A((8, 16)), grad=True)
add("sort", "sort", lambda x: (jnp.sort(x, 1), jnp.sort(x, 0)), A((8, 16)), grad=True)
add("top_k", "top_k", lambda x: (lax.top_k(x, 3), lax.top_k(x, 2, axis=0)), A((8, 16)), grad=True)
add("approx_top_k", "approx_max_k", lambda x: (lax.approx_max_k(x, 3), lax.approx_min_k(x, 2)), A((8, 16)))
add("sort", "argsort_kv", lambda x, k, v: (jnp.argsort(x, axis=0), lax.sort((k, v), dimension=1, num_keys=1)),
    A((8, 16)), A((8, 16)), A((8, 16), "i"))


# -- shape / data movement ---------------------------------------------------------------
add("broadcast_in_dim", "broadcast",
    lambda x, v, s, y: (jnp.broadcast_to(x, (8, 16)), jnp.broadcast_to(v, (8, 16)), jnp.broadcast_to(s, (8, 16)),
                        lax.broadcast_in_dim(y, (8, 4, 16), (0, 2))),
    A((1, 16)), A((16,)), A(()), A((8, 16)), grad=True)
add("reshape", "reshape_split",   # split dims, coprime sizes, unit dims
    lambda x, y, z: (x.reshape(8, 4, 8), y.reshape(6, 8), z.reshape(8, 1, 16, 1)),
    A((8, 32)), A((8, 6)), A((8, 16)), grad=True)
add("reshape", "reshape_merge",   # merged dims; reshape[dimensions=...] (transpose, then reshape)
    lambda x, y, z: (x.reshape(128), x.reshape(4, 32), lax.reshape(y, (16, 8), dimensions=(1, 0)),
                     lax.reshape(z, (4, 128), dimensions=(1, 0, 2))),
    A((16, 8)), A((8, 16)), A((8, 4, 16)), grad=True)
add("transpose", "transpose", lambda x, y: (x.T, jnp.transpose(y, (2, 0, 1))), A((8, 16)), A((8, 4, 16)),
    grad=True)
add("squeeze", "squeeze", lambda x: (jnp.squeeze(x, 1), jnp.squeeze(x)), A((8, 1, 16)), grad=True)
add("rev", "rev", lambda x: (jnp.flip(x, 0), jnp.flip(x, (0, 1))), A((8, 16)), grad=True)
add("iota", "iota", lambda x, i: (x + lax.iota(jnp.float32, 16), i + lax.broadcasted_iota(jnp.int32, (8, 16), 0),
                                  i * lax.broadcasted_iota(jnp.int32, (8, 16), 1)),
    A((8, 16)), A((8, 16), "i"))
add("concatenate", "concat",
    lambda x, y, w: (jnp.concatenate([x, y], 0), jnp.concatenate([x, y, x], 1), jnp.concatenate([x, w], 1)),
    A((8, 16)), A((8, 16)), A((8, 8)), grad=True)
add("slice", "slice", lambda x: (x[2:6], x[:, ::2], x[1:, 3:11:2]), A((8, 16)), grad=True)
add("split", "split", lambda x: (*jnp.split(x, 2, axis=1), *jnp.split(x, [3, 5], axis=0)), A((8, 16)), grad=True)
add("pad", "pad",   # edge, interior and negative padding
    lambda x: (jnp.pad(x, ((1, 2), (0, 0))), lax.pad(x, 0.0, [(1, 1, 1), (0, 0, 0)]),
               lax.pad(x, 1.0, [(0, 0, 0), (-2, 3, 0)])),
    A((8, 16)), grad=True)
add("dynamic_slice", "dynamic_slice",
    lambda x, i: (lax.dynamic_slice(x, (i, 0), (4, 16)), lax.dynamic_slice_in_dim(x, i, 8, axis=1)),
    A((8, 16)), A((), "idx12"), grad=True)
add("dynamic_update_slice", "dynamic_update_slice",
    lambda x, u, v, i: (lax.dynamic_update_slice(x, u, (i, 0)), lax.dynamic_update_slice_in_dim(x, v, i, axis=1)),
    A((8, 16)), A((4, 16)), A((8, 8)), A((), "idx12"), grad=True)


# stack (jnp.stack since jax 0.10.1), unstack (jnp.unstack; list(x) in jax 0.12), tile
_s = add("stack", "stack_unstack_tile",
         lambda x, y, z: (jnp.stack([x, y], 1), jnp.stack([x, y]), *jnp.unstack(z, axis=1), jnp.tile(x, (2, 1)),
                          jnp.tile(y, (1, 3))),
         A((8, 16)), A((8, 16)), A((8, 4, 16)), grad=True)
SAMPLES["unstack"].append(_s)
SAMPLES["tile"].append(_s)
# identities: jax.device_put inside the function, optimization barriers, checkpoint names
_s = add("device_put", "identities",
         lambda x, y: (jax.device_put(x) * 2, *lax.optimization_barrier((x, y + 1)),
                       jax.ad_checkpoint.checkpoint_name(x * y, "h")),
         A((8, 16)), A((8, 16)), grad=True)
SAMPLES["optimization_barrier"].append(_s)
SAMPLES["name"].append(_s)


# -- gather / scatter --------------------------------------------------------------------
add("gather", "take", lambda x, idx, idx2: (x[idx], x[:, idx2]), A((8, 16)), A((4,), "idx8"), A((8,), "idx16"),
    grad=True)
add("gather", "embedding",   # also ids past the table's end in fill mode
    lambda table, ids, x, idx, oob: (jnp.take(table, ids, axis=0), jnp.take_along_axis(x, idx, axis=1),
                                     jnp.take(table, oob, axis=0, mode="fill", fill_value=2.0)),
    A((16, 8)), A((8, 4), "idx16"), A((8, 16)), A((8, 4), "idx16"), A((8, 4), "idx24"), grad=True)
add("scatter", "scatter_set", lambda x, idx, u, idx2, u2: (x.at[idx].set(u), x.at[:, idx2].set(u2)),
    A((8, 16)), A((4,), "perm8"), A((4, 16)), A((8,), "perm16"), A((8, 8)), grad=True)
add("scatter-add", "scatter_add", lambda x, idx, u: x.at[idx].add(u), A((8, 16)), A((8,), "idx8"), A((8, 16)),
    grad=True)
add("scatter-add", "embedding_grad", lambda ids, u: jnp.zeros((16, 8), jnp.float32).at[ids].add(u),
    A((8, 4), "idx16"), A((8, 4, 8)), grad=True)
# traced with the mesh in context (as parallelize traces), jnp's scatter reshards its updates
SAMPLES["reshard"].append(_BY_NAME["embedding_grad"])
_s = add("scatter-mul", "scatter_mul_min_max",
         lambda x, idx, u, v, idx2, w: (x.at[idx].multiply(u), x.at[idx].min(v), x.at[:, idx2].max(w)),
         A((8, 16)), A((8,), "idx8"), A((8, 16), "near1"), A((8, 16)), A((8,), "idx16"), A((8, 8)))
SAMPLES["scatter-min"].append(_s)
SAMPLES["scatter-max"].append(_s)


# -- partial values: fixed layouts split the reduced dim over 'a', so the ops below receive
#    P(sum) / P(max) / P(min) operands and must either pass them on correctly or reduce first
def _partial_sums(x, w, y, ids):
    p = [x @ w[k] for k in range(17)]            # each P(sum) over a, one consumer each
    return (-p[0], p[1] * 2.0, p[2] * y, p[3] / 3.0, p[4] + p[5], p[6] - p[7], jnp.concatenate([p[8], p[9]], 1),
            jnp.array(p[10], copy=True), lax.stop_gradient(p[11]), p[12].sum(0), p[13].T.reshape(64),
            p[14].astype(jnp.bfloat16).astype(jnp.float32), lax.reduce_precision(p[15], 5, 10),
            jnp.take(p[16], ids, axis=0, mode="fill", fill_value=1.0))   # out-of-bounds ids read the fill


def _partial_extrema(x, i, n):
    m = [x[k].max(1) for k in range(8)]          # each P(max) over a, one consumer each
    k = [x[k].min(1) for k in range(8, 10)]      # P(min)
    im = [i[j].max(1) for j in range(3)]
    return (-m[0], -k[0], jnp.maximum(m[1], 0.5), jnp.minimum(k[1], -0.5), jnp.floor(m[2]).astype(jnp.int32),
            m[3].astype(jnp.bfloat16).astype(jnp.float32), lax.reduce_precision(m[4], 5, 10), m[5] * 2.0,
            im[0].astype(jnp.uint32), im[1].astype(jnp.int8), im[2].astype(jnp.float32),
            lax.convert_element_type(n.max(1), jnp.bool_), lax.convert_element_type(jnp.floor(m[6]), jnp.bool_))


_s = add("neg", "partial_sums", _partial_sums, A((8, 16)), A((17, 16, 8)), A((8, 8)), A((8,), "idx12"),
         fixed=[(P(None, "a"), P(None, "a", None), None, None)])
for _p in ("mul", "div", "add", "sub", "concatenate", "copy", "stop_gradient", "reduce_sum", "convert_element_type",
           "reduce_precision", "gather"):
    SAMPLES[_p].append(_s)
_s = add("neg", "partial_extrema", _partial_extrema, A((10, 8, 16)), A((3, 8, 16), "ibig"), A((8, 16), "nonpos"),
         fixed=[(P(None, None, "a"), P(None, None, "a"), P(None, "a"))])
for _p in ("max", "min", "convert_element_type", "reduce_precision", "reduce_max", "reduce_min", "floor"):
    SAMPLES[_p].append(_s)


# jax 0.12's new primitives: one_minus_square (gelu's and tanh's derivative), log2, and
# polynomial (erf's derivative)
add_if_emitted(("one_minus_square", "log2", "polynomial"), "jax012_unary",
               lambda x, p: (jax.grad(lambda a: jnp.sum(jax.nn.gelu(a)))(x), jnp.log2(p),
                             jax.grad(lambda a: jnp.sum(jsp.erf(a)))(x)),
               A((8, 1, 16)), A((8, 16), "pos"), grad=True)
# jax 0.12.1's new elementwise primitives (the version has them or not: no version check)
_JAX0121 = ("sinpi", "cospi", "tanpi", "asinpi", "acospi", "atanpi", "exp2m1", "log2p1", "atan2pi", "fma",
            "fmuladd")
if all(hasattr(lax, p) for p in _JAX0121):
    add_if_emitted(_JAX0121, "jax0121_elementwise",
                   lambda x, u, y: (lax.sinpi(x), lax.cospi(x), lax.tanpi(u / 4), lax.asinpi(u), lax.acospi(u),
                                    lax.atanpi(x), lax.exp2m1(u), lax.log2p1(u), lax.atan2pi(x, y),
                                    lax.fma(x, y, u), lax.fmuladd(x, y, u)),
                   A((8, 16)), A((8, 16), "unit"), A((8, 16), "pos"), grad=True)
else:
    NOT_EMITTED.update(dict.fromkeys(_JAX0121, f"jax {jax.__version__} has no such primitive (new in 0.12.1)"))
add("regularized_incomplete_beta", "betainc", lambda a, b, x: jsp.betainc(a, b, x), A((8, 16), "pos"),
    A((8, 16), "pos"), A((8, 16), "unit"))
HEAVY_NEW = {"betainc"}
add("scatter-sub", "scatter_sub", lambda x, idx, u: x.at[idx].subtract(u), A((8, 16)), A((8,), "idx8"), A((8, 16)),
    grad=True)
add("reduce", "reduce_variadic",   # lax.reduce of a pair with a computation of its own
    lambda x, y: (lax.reduce((x, y), (0.0, 1.0), lambda p, q: (p[0] + q[0], p[1] * q[1]), (1,)),
                  lax.reduce((x, y), (0.0, 1.0), lambda p, q: (p[0] + q[0], p[1] * q[1]), (0, 1))),
    A((8, 16)), A((8, 16), "near1"))


# -- linear algebra and FFTs: batched over leading dims (a [8,4,4] batch of matrices) ---------
def _spd(x):
    return x @ jnp.swapaxes(x, -1, -2) + 4.0 * jnp.eye(x.shape[-1])


def _linalg(x, b, d):
    from jax.lax import linalg as la
    a = _spd(x)
    low = jnp.linalg.cholesky(a)
    w, v = jnp.linalg.eigh(a)
    lu, piv, perm = la.lu(a)
    q, r = jnp.linalg.qr(x)     # (eigenvectors and QR factors compared up to sign)
    return (low, w, (v * w[..., None, :]) @ jnp.swapaxes(v, -1, -2), lu, piv, perm, la.lu_pivots_to_permutation(piv, 4), jnp.abs(q), jnp.abs(r),
            jnp.linalg.svd(x, compute_uv=False),
            la.triangular_solve(low, b, left_side=True, lower=True),
            la.tridiagonal_solve(d[..., 0], d[..., 1] + 4.0, d[..., 2], b),
            la.symmetric_product(x, a), la.householder_product(x, d[..., 0]),
            la.ormqr(x, d[..., 0], a), la.cholesky_update(a[0], d[0, :, 1]))


_s = add("cholesky", "linalg", _linalg, A((8, 4, 4), "small"), A((8, 4, 2)), A((8, 4, 3), "small"))
for _p in ("eigh", "lu", "lu_pivots_to_permutation", "qr", "svd", "triangular_solve", "tridiagonal_solve",
           "symmetric_product", "householder_product", "ormqr", "cholesky_update"):
    SAMPLES[_p].append(_s)


def _linalg_cpu(x):
    from jax.lax import linalg as la
    t = la.schur(x)[0]
    h = la.hessenberg(x)[0]
    s = _spd(x)
    diag = la.tridiagonal(s)[1]
    return jnp.abs(la.eig(s, compute_left_eigenvectors=False, compute_right_eigenvectors=False)[0]), \
        jnp.abs(jnp.diagonal(t, axis1=-2, axis2=-1)), jnp.abs(h), jnp.abs(diag)


_s = add("eig", "linalg_nonsymmetric", _linalg_cpu, A((8, 4, 4), "small"))
for _p in ("schur", "hessenberg", "tridiagonal"):
    SAMPLES[_p].append(_s)
add("fft", "fft", lambda x, y: (jnp.fft.fft(x), jnp.fft.rfft(x), jnp.fft.irfft(jnp.fft.rfft(x)), jnp.fft.fft2(y)),
    A((8, 16)), A((8, 4, 8)))


# -- control flow and remat -------------------------------------------------------------
def _scan(w, x, c):
    def step(h, wi):
        return jnp.tanh(h @ wi) * c + h, h.sum(0)
    return lax.scan(step, x, w), lax.scan(lambda h, wi: (h * 0.5 + wi[0], h), x, w, reverse=True)


def _while(x, y, k):
    n, z = lax.while_loop(lambda s: s[1].sum() < 1e3, lambda s: (s[0] + 1, s[1] * 2 + y), (0, jnp.abs(x) + 1))
    return n, z, lax.fori_loop(0, k, lambda i, c: c * 0.5 + jnp.sin(c) * i, x)   # traced bound: a while


def _cond(p, x, y):
    return (lax.cond(p > 0, lambda a, b: (a * 2 + b, b), lambda a, b: (a - b, b * 3), x, y),
            lax.cond(p <= 0, lambda a, b: (a * 2 + b, b), lambda a, b: (a - b, b * 3), x, y),
            lax.switch(jnp.clip(p, 0, 2), [jnp.sin, jnp.cos, jnp.tanh], x))


add("scan", "scan", _scan, A((4, 16, 16), "small"), A((8, 16)), A((16,)), grad=True)
add("while", "while", _while, A((8, 16)), A((8, 16), "pos"), A((), "idx4"))
add("cond", "cond", _cond, A((), "i"), A((8, 16)), A((8, 16)), grad=True)
# jax.grad of a cond fills the residuals a branch does not make with empty2
add("empty2", "cond_grad", jax.grad(lambda p, x, y: jnp.sum(lax.cond(p > 0, jnp.sin, lambda a: a * y, x)),
                                    argnums=(1, 2)), A((), "i"), A((8, 16)), A((8, 16)))
add("remat2", "checkpoint", lambda x, w: jax.checkpoint(lambda a, b: jnp.tanh(a @ b) * a.sum())(x, w),
    A((8, 16), "small"), A((16, 16), "small"), grad=True)


# -- random numbers (int32 seeds and data, converted inside) ---------------------------------
def _random(seed, x):
    key = jax.random.key(seed)
    return (jax.random.normal(key, (8, 16)) + x, jax.random.bernoulli(key, 0.3, (16, 8)),
            jax.random.uniform(jax.random.PRNGKey(seed), (8, 16)) * x)   # raw uint32 key: wrap/unwrap


def _random_split_fold_in(seed, i, ids, x):
    key = jax.random.key(seed)
    keys = jax.random.split(key, 8)
    return (jax.random.key_data(jax.random.split(key, 4)),
            jax.vmap(lambda k: jax.random.normal(k, (16,)))(keys) + x,      # batched keys
            jax.random.normal(jax.random.fold_in(key, i), (8, 16)) * x,
            jax.random.key_data(jax.vmap(lambda j: jax.random.fold_in(key, j))(ids)))


_s = add("random_seed", "random", _random, A((), "i"), A((8, 16)))
for _p in ("random_bits", "random_wrap", "random_unwrap"):
    SAMPLES[_p].append(_s)
_s = add("random_split", "random_split_fold_in", _random_split_fold_in, A((), "i"), A((), "i"), A((8,), "i"),
         A((8, 16)))
SAMPLES["random_fold_in"].append(_s)
add("threefry2x32", "threefry2x32",
    lambda k, c: jax.extend.random.threefry_2x32(k.astype(jnp.uint32), c.astype(jnp.uint32)),
    A((2,), "ibig"), A((8, 16), "ibig"))
# random_clone copies keys; random_gamma samples per (key, alpha); rng_bit_generator (XLA's
# own generator, replicated) gives the same bits on every device for the same key
_s = add("random_clone", "random_clone_gamma",
         lambda seed, a: (jax.random.key_data(jax.random.clone(jax.random.key(seed))),
                          jax.random.gamma(jax.random.key(seed), a)),
         A((), "i"), A((8, 16), "pos"))
SAMPLES["random_gamma"].append(_s)
add("rng_bit_generator", "rng_bit_generator",
    lambda k, x: (lax.rng_bit_generator(k.astype(jnp.uint32), (8, 16))[1], x * 2),
    A((4,), "ibig"), A((8, 16)))
add("bitcast_convert_type", "bitcast",   # same width, narrower (adds a dim), wider (drops it)
    lambda x: (lax.bitcast_convert_type(x, jnp.int32),
               lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int16) + 1, jnp.float32)),
    A((8, 16)))


# -- windowed: convolutions, pooling (NHWC) --------------------------------------------------
def _conv(x, w, stride=(1, 1), padding="SAME", rhs_dilation=None, groups=1):
    return lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _max_pool(x):
    return (lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
            lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"))


add("conv_general_dilated", "conv",   # SAME; strided VALID; dilated kernel; depthwise (4 groups)
    lambda x, w, wd: (_conv(x, w), _conv(x, w, (2, 2), "VALID"), _conv(x, w, rhs_dilation=(2, 1)),
                      _conv(x, wd, groups=4)),
    A((4, 16, 8, 4), "small"), A((3, 3, 4, 8), "small"), A((3, 3, 1, 8), "small"), grad=True)
add("reduce_window_max", "max_pool", _max_pool, A((8, 16, 8, 4)))
add("select_and_scatter_add", "max_pool_grad", jax.grad(lambda x: sum(jnp.sum(o) for o in _max_pool(x))),
    A((8, 16, 8, 4)))
add("select_and_gather_add", "max_pool_jvp", lambda x, t: jax.jvp(_max_pool, (x,), (t,))[1],
    A((8, 16, 8, 4)), A((8, 16, 8, 4)))
_s = add("reduce_window_sum", "avg_min_pool",
         lambda x: (lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME") / 9,
                    lax.reduce_window(x, jnp.inf, lax.min, (1, 3, 1, 1), (1, 1, 1, 1), "SAME")),
         A((8, 16, 8, 4)), grad=True)
SAMPLES["reduce_window_min"].append(_s)
add("reduce_window", "prod_pool", lambda x: lax.reduce_window(x, 1.0, lax.mul, (1, 2, 2, 1), (1, 1, 1, 1), "VALID"),
    A((8, 16, 8, 4), "near1"))


# -- sharding constraints ----------------------------------------------------------------
add("autoshard_constrain", "constrain",
    lambda x, w: (ash.constrain(jnp.sin(x), P("a", None)) * 2, ash.constrain(x @ w, P(None, "a"))),
    A((8, 16)), A((16, 8)), grad=True)
add("sharding_constraint", "with_sharding_constraint",
    lambda mesh: (lambda x: lax.with_sharding_constraint(jnp.sin(x), NamedSharding(mesh, P("a", None))) * 2),
    A((8, 16)), grad=True, mesh_fn=True)


# -- rules of your own (tests/test_register_rule.py): with_rule and a partition callback, Pallas
def _pl_matmul_kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]


def _pl_rows_kernel(x_ref, o_ref):
    o_ref[...] = jnp.tanh(x_ref[...]) * 2.0


def _pl_rows(x):            # one row per grid step: grid and blocks from x's (local) shape
    spec = pl.BlockSpec((1, x.shape[1]), lambda i: (i, 0))
    return pl.pallas_call(_pl_rows_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(x.shape[0],), in_specs=[spec], out_specs=spec, interpret=True)(x)


_pl_matmul = ash.with_rule(
    lambda x, w: pl.pallas_call(_pl_matmul_kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
                                interpret=True)(x, w), "i j, j k -> i k")
ash.register_rule(_pl_rows_kernel, "r c -> r c", need_replication_factors=("c",), lower=_pl_rows)


@custom_partitioning
def _cp_softmax(x):
    return jax.nn.softmax(x, -1)


_cp_softmax.def_partition(
    lambda mesh, a, r: (mesh, lambda x: jax.nn.softmax(x, -1), a[0].sharding, (a[0].sharding,)),
    sharding_rule="... d -> ... d", need_replication_factors=("d",))
add("custom_partitioning", "with_rule_and_partition_callback",
    lambda x, w, y: (_pl_matmul(x, w), _cp_softmax(y)), A((8, 16)), A((16, 8)), A((4, 8, 16)))
add("pallas_call", "registered_row_kernel", _pl_rows, A((8, 16)))

SKIP_NOT_REACHABLE = {
    "checkpoint": "registered alias; jax.checkpoint / jax.remat emit 'remat2'",
    "copy_p": "registered alias: lax.copy_p is named 'copy' in jaxprs",
    "bitcast_convert_type_same_width": "no public API emits it; lax.bitcast_convert_type emits "
                                       "'bitcast_convert_type'",
    "random_gamma_grad": "jax.lax.random_gamma_grad expands to a while loop, no primitive of that name",
    "scatter_add": "underscore alias; jax names the primitive 'scatter-add'",
    "scatter_mul": "underscore alias; jax names the primitive 'scatter-mul'",
    "scatter_min": "underscore alias; jax names the primitive 'scatter-min'",
    "scatter_max": "underscore alias; jax names the primitive 'scatter-max'",
}

def _mulhi_compiles_under_shard_map() -> bool:
    """XLA before JAX 0.12.1 cannot legalize ``chlo.mulhi`` under manual sharding (plain
    ``jax.shard_map`` fails too): asked of the installed JAX, not its version number."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("a",))
    f = jax.shard_map(lax.mulhi, mesh=mesh, in_specs=(P("a"), P("a")), out_specs=P("a"), check_vma=False)
    x = np.arange(4, dtype=np.int32)
    try:
        jax.jit(f).lower(x, x).compile()
        return True
    except Exception:       # noqa: BLE001 (XLA's JaxRuntimeError: 'Unable to convert MHLO to StableHLO')
        return False


# Primitives whose samples cannot pass yet: strict xfail, reason names the missing feature.
XFAIL: dict[str, str] = {} if _mulhi_compiles_under_shard_map() else {
    "mulhi": "lowering inside shard_map: this JAX lowers mulhi to chlo.mulhi, which its XLA fails to "
             "legalize under manual sharding ('Unable to convert MHLO to StableHLO'; plain "
             "jax.shard_map fails too; fixed in JAX 0.12.1); needs a decomposed local lowering in the "
             "mulhi rule",
}
# Same, for the forward+backward variant only.
XFAIL_GRAD: dict[str, str] = {}
# Samples whose XLA compile takes ~1 s or more: one layout per variant in the default run, the
# full set under -m slow.
HEAVY = {"igamma", "igammac", "igamma_grad_a", "zeta"} | HEAVY_NEW
HEAVY_GRAD = {"cumprod", "cummin", "scan", "prod"}
# Forward+backward of these compiles for 2-5 s a layout: under -m slow only.
SLOW_ONLY_GRAD = {"igamma", "igammac", "cummax", "cumlogsumexp"}


# ------------------------------------------------------------------------------ layouts
@functools.lru_cache(maxsize=None)
def _mesh(key):
    return ash.make_mesh(key)


def _axis_sizes(key):
    return {n: int(s) for n, s in (p.split("=") for p in key.split(","))}


def _random_spec(rng, shape, sizes):
    """Per dim: None, one axis or an ordered pair, each axis at most once, only where it divides."""
    used, entries = set(), [None] * len(shape)
    for d in rng.permutation(len(shape)):
        free = [a for a in sizes if a not in used]
        opts = [None] + [a for a in free if shape[d] % sizes[a] == 0]
        opts += [(a, b) for a, b in itertools.permutations(free, 2) if shape[d] % (sizes[a] * sizes[b]) == 0]
        pick = opts[rng.integers(len(opts))]
        entries[d] = pick
        if pick is not None:
            used.update((pick,) if isinstance(pick, str) else pick)
    return P(*entries)


def _spec_key(specs):
    return tuple(None if s is None else tuple(s) for s in specs)


def layouts(sample, mesh_key, n_random, base):
    """Seeded in_specs tuples for one sample on one mesh; with ``base``, first the all-None
    specs and the unannotated ``None`` per input."""
    shapes = [shape for shape, _ in sample.args]
    out = []
    if base:
        out.append(tuple(P(*[None] * len(s)) for s in shapes))
        out.append(tuple(None for _ in shapes))
    seen = {_spec_key(s) for s in out}
    sizes = _axis_sizes(mesh_key)
    rng = np.random.default_rng(zlib.crc32(f"{sample.name}|{mesh_key}".encode()))
    made = 0
    for _ in range(20 * n_random):
        if made == n_random:
            break
        specs = tuple(None if (len(shapes) > 1 and rng.random() < 0.15) else _random_spec(rng, s, sizes)
                      for s in shapes)
        k = _spec_key(specs)
        if k in seen:
            continue
        seen.add(k)
        out.append(specs)
        made += 1
    return out


# ------------------------------------------------------------------------------ checking
@functools.lru_cache(maxsize=None)
def _args(name):
    s = _BY_NAME[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return tuple(_make_arg(rng, shape, kind) for shape, kind in s.args)


def _float_argnums(sample):
    if sample.grad_argnums is not None:
        return sample.grad_argnums
    return tuple(i for i, (_, kind) in enumerate(sample.args) if _is_float_kind(kind))


def _variant_fn(sample, variant, mesh):
    fn = sample.bind(mesh)
    if variant == "fwd":
        return fn

    def loss(*a):
        leaves = [o for o in jax.tree.leaves(fn(*a)) if jnp.issubdtype(o.dtype, jnp.floating)]
        return sum(jnp.sum(o) for o in leaves)
    return jax.grad(loss, argnums=_float_argnums(sample))


_REFERENCE: dict = {}


def _reference(sample, variant, mesh_key):
    """``fn(*args)`` on one device, jitted: one XLA compile, not one per op, and for
    differentiable samples one compile for both variants."""
    where = mesh_key if sample.mesh_fn else None
    key = (sample.name, variant, where)
    if key not in _REFERENCE:
        mesh = _mesh(mesh_key)
        variants = ("fwd", "grad") if sample.grad and sample.name not in SLOW_ONLY_GRAD else (variant,)
        fns = [_variant_fn(sample, v, mesh) for v in variants]
        outs = jax.jit(lambda *a: [f(*a) for f in fns])(*_args(sample.name))
        for v, out in zip(variants, outs):
            _REFERENCE[(sample.name, v, where)] = jax.tree.map(np.asarray, out)
    return _REFERENCE[key]


def _compare(got, want, mesh):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), f"{len(got_leaves)} outputs, expected {len(want_leaves)}"
    for k, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        assert isinstance(g, jax.Array), f"out[{k}] is {type(g).__name__}, not a jax.Array"
        sh = g.sharding
        assert isinstance(sh, NamedSharding), f"out[{k}] sharding {sh!r} is not a NamedSharding"
        assert sh.mesh.shape == mesh.shape and np.array_equal(sh.mesh.devices, mesh.devices), \
            f"out[{k}] sharding is on {sh.mesh}, not the mesh"
        g = np.asarray(g)
        assert g.shape == w.shape and g.dtype == w.dtype, \
            f"out[{k}] {g.dtype}{list(g.shape)} expected {w.dtype}{list(w.shape)}"
        if np.issubdtype(w.dtype, np.inexact):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=f"out[{k}]")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"out[{k}]")


_RESULTS: dict = {}                                   # shared check per (sample, variant, mesh, specs)
_PROGRAMS: dict = {}                                  # ... and per distinct lowered program
CASES: dict[str, set] = collections.defaultdict(set)  # primitive -> cases run


def check_case(sample, variant, mesh_key, specs):
    """None if ``parallelize`` matches one device for this layout, else a one-line error."""
    key = (sample.name, variant, mesh_key, _spec_key(specs))
    if key not in _RESULTS:
        mesh = _mesh(mesh_key)
        try:
            want = _reference(sample, variant, mesh_key)
            pf = ash.parallelize(_variant_fn(sample, variant, mesh), mesh=mesh, in_specs=specs)
            # Specs that lower to the very same program (the all-None specs and the
            # unannotated None, typically) share one XLA compile and run: compiles dominate.
            text = pf.lower(*_args(sample.name)).as_text()
            program_key = (sample.name, variant, mesh_key, text)
            if program_key not in _PROGRAMS:
                _compare(pf(*_args(sample.name)), want, mesh)
                _PROGRAMS[program_key] = None
            _RESULTS[key] = _PROGRAMS[program_key]
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            msg = " ".join(str(e).split())
            _RESULTS[key] = f"{type(e).__name__}: {msg[:600]}"
    return _RESULTS[key]


def case_plan(sample, variant, slow=False):
    """(mesh, in_specs) pairs for one sample.

    Forward: seeded random layouts on every mesh, and on BASE_MESH the all-None specs and the
    unannotated ``None``; samples with ``fixed`` layouts run those on every mesh plus one
    random layout. Forward+backward: one random layout on BASE_MESH and one on another mesh
    (which one alternates by sample). HEAVY samples, and forward+backward of unary elementwise
    ops: one layout; SLOW_ONLY_GRAD: none. ``slow``: also SLOW_RANDOM_PER_MESH random layouts
    on every mesh (a superset of the default ones: same seeds).
    """
    fixed = [(m, specs) for m in MESHES for specs in sample.fixed] if variant == "fwd" else []
    if slow:
        n = SLOW_RANDOM_PER_MESH // (2 if variant == "grad" else 1)
        return fixed + [(m, specs) for m in MESHES for specs in layouts(sample, m, n, m == BASE_MESH)]
    if variant == "grad" and sample.name in SLOW_ONLY_GRAD:
        return []
    first = [(BASE_MESH, layouts(sample, BASE_MESH, 1, False)[0])]
    if sample.name in HEAVY or (variant == "grad" and (sample.name in HEAVY_GRAD or sample.name in UNARY)):
        return first
    if fixed:
        return fixed + first
    if variant == "grad":
        other = [m for m in MESHES if m != BASE_MESH][zlib.crc32(sample.name.encode()) % 2]
        return first + [(other, layouts(sample, other, 1, False)[0])]
    return [(m, specs) for m in MESHES
            for specs in layouts(sample, m, FWD_RANDOM_PER_MESH[m], m == BASE_MESH)]


def run_cases(prim, sample, variant, slow=False):
    failures = []
    plan = case_plan(sample, variant, slow)
    if not plan:
        pytest.skip(f"{sample.name} ({variant}) compiles slowly: runs under -m slow")
    for mesh_key, specs in plan:
        err = check_case(sample, variant, mesh_key, specs)
        CASES[prim].add((sample.name, variant, mesh_key, _spec_key(specs)))
        if err is not None:
            failures.append(f"  [{mesh_key}] in_specs={specs}: {err}")
    if failures:
        pytest.fail(f"{prim} / {sample.name} ({variant}): {len(failures)} layouts fail\n"
                    + "\n".join(failures[:8]), pytrace=False)


def _params(variant):
    out = []
    for prim in sorted(SAMPLES):
        for s in SAMPLES[prim]:
            if variant == "grad" and not s.grad:
                continue
            marks = []
            reason = XFAIL.get(prim) or (XFAIL_GRAD.get(prim) if variant == "grad" else None)
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(prim, s, id=f"{prim}-{s.name}", marks=marks))
    return out


# ------------------------------------------------------------------------------ tests
def test_registry_is_covered():
    names = set(RULES)
    assert set(SKIP_NOT_REACHABLE) <= names
    assert set(SAMPLES) <= names, set(SAMPLES) - names
    assert set(XFAIL) | set(XFAIL_GRAD) <= set(SAMPLES)
    missing = names - set(SAMPLES) - set(SKIP_NOT_REACHABLE) - set(NOT_EMITTED)
    assert not missing, f"primitives with a rule but no sample: {sorted(missing)}"
    assert not set(SAMPLES) & set(SKIP_NOT_REACHABLE)
    assert HEAVY | HEAVY_GRAD | SLOW_ONLY_GRAD <= set(_BY_NAME)


@pytest.mark.parametrize("prim,sample", [pytest.param(p, s, id=f"{p}-{s.name}")
                                         for p in sorted(SAMPLES) for s in SAMPLES[p]])
def test_sample_emits_primitive(prim, sample):
    mesh = _mesh(BASE_MESH)
    fn = sample.bind(mesh)
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _args(sample.name)]
    with jax.set_mesh(mesh):    # as parallelize traces
        graph = ir.trace(lambda *a: jax.tree.leaves(fn(*a)), avals)

    def prims(g):   # control-flow bodies included
        return {n for e in g.eqns for n in (e.prim.name, *(m for sub in e.subgraphs for m in prims(sub)))}
    emitted = prims(graph)
    assert prim in emitted, f"{sample.name} emits {sorted(emitted)}, not {prim}"


@pytest.mark.parametrize("prim,sample", _params("fwd"))
def test_forward(prim, sample):
    run_cases(prim, sample, "fwd")


@pytest.mark.parametrize("prim,sample", _params("grad"))
def test_forward_backward(prim, sample):
    run_cases(prim, sample, "grad")


@pytest.mark.slow
@pytest.mark.parametrize("prim,sample", _params("fwd"))
def test_forward_many_layouts(prim, sample):
    run_cases(prim, sample, "fwd", slow=True)


@pytest.mark.slow
@pytest.mark.parametrize("prim,sample", _params("grad"))
def test_forward_backward_many_layouts(prim, sample):
    run_cases(prim, sample, "grad", slow=True)


def _summary():
    total = sum(len(v) for v in CASES.values())
    failed = sum(1 for cs in CASES.values() for c in cs if _RESULTS.get(c) is not None)
    return (f"op database: {total} (primitive, layout) cases run over {len(CASES)} primitives, "
            f"{len(_RESULTS)} distinct checks, {len(_PROGRAMS)} distinct programs compiled and run, "
            f"{failed} failing (xfail included)"), total


@pytest.fixture(scope="module", autouse=True)
def _print_case_count():
    """Prints the count at the end of the module whatever was selected (``pytest -s``)."""
    yield
    if CASES and not _PRINTED:
        print("\n" + _summary()[0])


_PRINTED: list = []


def test_zz_case_count():
    """Runs last: how many (primitive, layout) cases ran (``pytest -s`` shows it)."""
    if not CASES:   # run on its own: do one primitive so the count means something
        for s in SAMPLES["add"]:
            for mesh_key, specs in case_plan(s, "fwd"):
                check_case(s, "fwd", mesh_key, specs)
                CASES["add"].add((s.name, "fwd", mesh_key, _spec_key(specs)))
    text, total = _summary()
    print("\n" + text)
    _PRINTED.append(text)
    assert total > 0
