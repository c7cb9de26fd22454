"""Elementwise primitives: every dim is one factor shared by all operands and results.

Rank-0 operands (scalar literals, implicit broadcast) and size-1 dims carry no factor, so they
are never split::

    mul x:f32[8,4] 2.0:f32[]   ->  factors d0 d1;  x: (d0)(d1), 2.0: (), result: (d0)(d1)

Partial values: ``add``/``sub`` keep ``P(sum)`` when every operand is partial alike; ``mul``
when exactly one operand is; ``div`` when the numerator is; ``neg`` always; ``max`` keeps
``P(max)`` (max over devices commutes with max against a replicated value).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import FactorBuilder, register
from ..kinds import PartialMode

_UNARY = [
    "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "not", "real", "imag", "conj",
    "population_count", "clz", "erf", "erfc", "erf_inv", "lgamma", "digamma", "square",
    "integer_pow", "reduce_precision", "bessel_i0e", "bessel_i1e", "copy", "copy_p",
    "stop_gradient", "bitcast_convert_type_same_width",
    # jax 0.12: tanh/asin/acos/atanh/gelu derivatives bind one_minus_square (1 - x**2);
    # jnp.log2 binds log2. ``name`` is jax.ad_checkpoint.checkpoint_name (identity).
    "one_minus_square", "log2", "name",
    # jax 0.12.1: lax.sinpi & co. (f(pi * x) and their inverses / pi), exp2m1, log2p1.
    "sinpi", "cospi", "tanpi", "asinpi", "acospi", "atanpi", "exp2m1", "log2p1",
]
_BINARY = [
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "max", "min", "and", "or", "xor",
    "eq", "ne", "lt", "le", "gt", "ge", "atan2", "nextafter", "shift_left",
    "shift_right_logical", "shift_right_arithmetic", "complex", "igamma", "igammac",
    "igamma_grad_a", "random_gamma_grad", "polygamma", "zeta", "mulhi", "select_n", "clamp",
    # jax 0.12: polynomial(x, *coeffs) (Horner's rule; erf's derivative), broadcasting.
    "polynomial", "regularized_incomplete_beta",
    # jax 0.12.1: atan2pi (atan2 / pi); fma and fmuladd (a * b + c, fused or not), ternary.
    "atan2pi", "fma", "fmuladd",
]


def elementwise_factors(eqn):
    out_shape = eqn.outvars[0].shape
    fb = FactorBuilder()
    dims = [fb.new(s) for s in out_shape]
    operands = []
    for v in eqn.invars:
        if len(v.shape) == 0:
            operands.append(())
        else:
            # A size-1 operand dim against a larger result dim is an implicit broadcast.
            operands.append(tuple(dims[d] if v.shape[d] == out_shape[d] else ()
                                  for d in range(len(v.shape))))
    return fb.build(operands, [tuple(dims)] * len(eqn.outvars))


_PARTIAL_MODE = {
    # neg is linear, but it turns a max into a min: -(P(max)) is not P(max) (gave wrong values
    # for ``-x.max(axis)`` with ``axis`` split), so only sums pass. reduce_precision rounds
    # each partial sum apart (wrong sums); it is monotone, so maxima pass.
    "neg": PartialMode.UNARY_SUM, "copy": PartialMode.UNARY_ANY, "copy_p": PartialMode.UNARY_ANY,
    "stop_gradient": PartialMode.UNARY_ANY, "name": PartialMode.UNARY_ANY, "reduce_precision": PartialMode.UNARY_MAX,
    "real": PartialMode.UNARY_SUM, "imag": PartialMode.UNARY_SUM, "conj": PartialMode.UNARY_SUM,
    "add": PartialMode.SAME_SUM, "add_any": PartialMode.SAME_SUM, "sub": PartialMode.SAME_SUM,
    "mul": PartialMode.ONE_SUM, "div": PartialMode.FIRST_SUM,
    "max": PartialMode.SAME_MAX, "min": PartialMode.SAME_MIN,
}

for _name in _UNARY + _BINARY:
    register(_name, partial=_PARTIAL_MODE.get(_name, PartialMode.NONE))(elementwise_factors)


def _convert_partial_mode(eqn):
    # jnp.issubdtype: np.issubdtype does not know bfloat16 is a float.
    src, dst = np.dtype(eqn.invars[0].dtype), np.dtype(eqn.params["new_dtype"])
    src_float, dst_float = jnp.issubdtype(src, jnp.floating), jnp.issubdtype(dst, jnp.floating)
    if src_float and dst_float and (dst.itemsize > src.itemsize or dst == src):
        return PartialMode.UNARY_ANY     # widening float -> float: sums and maxima commute (up to rounding)
    # Otherwise only monotone casts commute, with max only. Not monotone (wrong values before,
    # as every non-float cast passed P(max)): to bool (max(-1, 0) = 0 is False, but -1 is
    # True), int narrowing (wraps), signed <-> unsigned, float -> unsigned. A narrowing float
    # cast rounds each partial sum apart, so it passes maxima only.
    if dst == np.bool_:
        monotone = src == np.bool_
    elif src == np.bool_:
        monotone = True
    elif jnp.issubdtype(src, jnp.integer) and jnp.issubdtype(dst, jnp.integer):
        monotone = bool(np.can_cast(src, dst, "safe"))
    elif dst_float:
        monotone = src_float or jnp.issubdtype(src, jnp.integer)
    else:
        monotone = src_float and jnp.issubdtype(dst, jnp.signedinteger)
    return PartialMode.UNARY_MAX if monotone else PartialMode.NONE


register(lax.convert_element_type_p, partial=_convert_partial_mode)(elementwise_factors)


# -- identity on each operand: device_put, optimization_barrier --------------------------------
def pairwise_factors(eqn):
    """Result ``i`` is operand ``i``: each pair shares its dims' factors."""
    fb = FactorBuilder()
    dims = [[fb.new(s) for s in v.shape] for v in eqn.invars]
    return fb.build(dims, dims)


def _lower_identity(eqn, ctx, args):
    # ``jax.device_put`` inside a traced function names devices or a global sharding; in the
    # per-device program the value is already where the plan puts it.
    return list(args)


register("device_put", lower=_lower_identity)(pairwise_factors)
register("optimization_barrier")(pairwise_factors)
