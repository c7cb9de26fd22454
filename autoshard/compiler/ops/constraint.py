"""Sharding constraints: ``autoshard.constrain(x, spec)`` and
``jax.lax.with_sharding_constraint``.

Both are identities on values whose result layout is *closed* (fixed by the user); the
propagation pass seeds it, and the collective pass reshards the operand into it (a
``P(sum)`` operand constrained to ``S(d)`` becomes one reduce-scatter).

``constrain`` is its own primitive so it traces without a mesh in context and survives
differentiation: the cotangent gets the same constraint.
"""
from __future__ import annotations

from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from . import register
from .elementwise import elementwise_factors
from ..kinds import PartialMode

constrain_p = Primitive("autoshard_constrain")
constrain_p.def_impl(lambda x, *, spec: x)
constrain_p.def_abstract_eval(lambda aval, *, spec: aval)
ad.deflinear2(constrain_p, lambda ct, x, *, spec: [constrain_p.bind(ct, spec=spec)])
mlir.register_lowering(constrain_p, lambda ctx, x, *, spec: [x])


def _batch_rule(args, dims, *, spec):
    # A vmapped constraint has one more dim; leave it unconstrained.
    (x,), (d,) = args, dims
    entries = list(spec) + [None] * (x.ndim - 1 - len(spec))
    entries.insert(d, None)
    return constrain_p.bind(x, spec=PartitionSpec(*entries)), d


batching.primitive_batchers[constrain_p] = _batch_rule


def constrain(x, spec):
    """Pin the layout of one intermediate value: ``ash.constrain(h, P('data', 'model'))``."""
    if isinstance(spec, NamedSharding):
        spec = spec.spec
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"constrain expects a jax.sharding.PartitionSpec or NamedSharding, got {spec!r}")
    return constrain_p.bind(x, spec=spec)


def constraint_spec(eqn) -> PartitionSpec | None:
    """The spec a constraint equation pins, or None if the equation is not a constraint."""
    if eqn.prim is constrain_p:
        return eqn.params["spec"]
    if eqn.prim is lax.sharding_constraint_p:
        sharding = eqn.params["sharding"]
        return getattr(sharding, "spec", sharding)
    return None


def _identity_lower(eqn, ctx, args):
    return list(args)


register(constrain_p, lower=_identity_lower)(elementwise_factors)
register(lax.sharding_constraint_p, lower=_identity_lower)(elementwise_factors)

# ``reshard`` appears in jaxprs traced with the mesh in context (jnp's scatter inserts one on
# its updates; on Auto mesh axes its ``dst_sharding`` only restates an unconstrained type).
# It is a value identity that lets layouts propagate through it, not a constraint; without a
# rule ``x.at[i].add(u)`` under ``parallelize`` raised UnsupportedPrimitiveError.
register("reshard", partial=PartialMode.UNARY_ANY, lower=_identity_lower)(elementwise_factors)
