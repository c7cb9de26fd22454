"""Dense linear algebra and FFTs: batched over leading dims, whole on the matrix dims.

Every ``jax.lax.linalg`` primitive (``cholesky``, ``eigh``, ``qr``, ``svd``, ``lu``,
``triangular_solve``, ...) works on the trailing one or two dims of its operands and maps
over the leading *batch* dims, which all its operands and results share. The batch dims are
``pass`` factors (each device factors its own matrices, no communication); the matrix dims
are ``replicate`` (a factorisation needs the whole matrix)::

    cholesky a:f32[8,16,16]        factors b:8 (pass), then fresh replicate factors
    operand (b)(r1)(r2)   result (b)(r3)(r4)

``fft`` is the same with ``len(fft_lengths)`` trailing transform dims (an RFFT changes the
size of the last one). Nothing here is linear in a partial sum except a plain FFT, which is
kept simple: partial operands are reduced first.
"""
from __future__ import annotations

from . import FactorBuilder, register

# Trailing (core) dims of the first operand; the rest of its dims are batch dims.
_CORE_RANK = {
    "cholesky": 2, "cholesky_update": 2, "eig": 2, "eigh": 2,
    "hessenberg": 2, "householder_product": 2, "lu": 2, "lu_pivots_to_permutation": 1,
    "ormqr": 2, "qr": 2, "schur": 2, "svd": 2, "symmetric_product": 2,
    "triangular_solve": 2, "tridiagonal": 2, "tridiagonal_solve": 1,
}


def batched_factors(eqn, core_rank: int):
    """Leading ``rank(operand 0) - core_rank`` dims shared by every operand and result
    (where that tensor has them at that size), every other dim ``replicate``."""
    batch_shape = eqn.invars[0].shape[:len(eqn.invars[0].shape) - core_rank]
    fb = FactorBuilder()
    batch = [fb.new(s) for s in batch_shape]

    def dims(shape):
        shared = len(shape) >= len(batch_shape) and tuple(shape[:len(batch_shape)]) == tuple(batch_shape)
        lead = batch if shared else [fb.new(s, "replicate") for s in shape[:len(batch_shape)]]
        return lead + [fb.new(s, "replicate") for s in shape[len(lead):]]
    return fb.build([dims(v.shape) for v in eqn.invars], [dims(o.shape) for o in eqn.outvars])


for _name, _core in _CORE_RANK.items():
    register(_name)((lambda core: lambda eqn: batched_factors(eqn, core))(_core))


@register("fft")
def fft_factors(eqn):
    return batched_factors(eqn, len(eqn.params["fft_lengths"]))
