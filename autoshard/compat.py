"""Every difference between the JAX releases autoshard supports, in one place.

Supported: JAX 0.10.2 (the newest for Python 3.11) through 0.12.x. Code elsewhere calls these
helpers and never tests a version itself, so a new JAX release means one edit here.

What differs, and where it shows:

- 0.11 merged ``Jaxpr`` and ``ClosedJaxpr``: a ``Jaxpr`` carries its ``.consts`` (the first
  ``len(consts)`` inputs are its constvars), ``jax.extend.core.ClosedJaxpr`` is an alias of
  ``Jaxpr``, and ``jit``/``scan`` bodies are such closed ``Jaxpr`` objects
  (:func:`jaxpr_and_consts`, :func:`dce_closed_jaxpr`).
- 0.11 replaced ``scan``'s ``num_consts``/``num_carry`` params by ``ft_in``/``ft_out`` FlatTrees
  (``(consts, carry, xs)`` and ``(carry, ys)``). The compiler's IR keeps the old integer params
  on every ``scan`` equation whatever the JAX (:func:`normalize_params`); scan equations are
  never re-bound from their params (lowering calls ``lax.scan``), so nothing else reads them.
  Likewise ``composite``'s body param ``jaxpr`` became ``call_jaxpr`` in 0.12.
- 0.12 checks that ``ppermute`` names mesh axes in mesh order (autoshard's collectives always
  do; :func:`ppermute_any_axis_order` lifts the check where a test names them out of order).
- The compiled-HLO text of XLA's own SPMD partitioner prints replica groups as
  ``mesh[...] {'a','c'}`` in 0.12 where 0.10 printed ``device_ids=(...)``; ``report/hlo.py``
  parses both, so no helper is needed. Likewise 0.12's StableHLO (``pf.lower().as_text()``)
  names mesh axes (``#stablehlo.replica_group_mesh_axes``) where 0.10 listed device ids.
- Not differences for autoshard, recorded so nobody adds a check for them: ``jit``'s ``inline``
  param may be a ``jax.Inline`` in 0.12 (``ir`` inlines every ``jit`` regardless);
  ``jax.make_mesh`` defaults to Explicit axes (``ash.make_mesh`` builds ``Auto`` meshes with
  ``jax.sharding.Mesh``); ``.vma``/``pvary`` are not used.
- JAX internals autoshard uses, the same in every supported release, imported here only so a
  release that moves them means one edit: the threefry primitive (random bits per device) and
  the parser of ``custom_partitioning``'s rule strings (:func:`threefry2x32_p`,
  :func:`sharding_rule_parser`).
- Extended dtypes (typed PRNG keys, ``key<fry>``) have no NumPy dtype in any version:
  :func:`canonicalize_dtype` and :func:`itemsize` accept them (``np.dtype(v.dtype)`` does not).

>>> scan_counts({"num_consts": 1, "num_carry": 2})
(1, 2)
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.extend import core as jcore

#: ``(major, minor, patch)`` of the installed JAX.
JAX_VERSION: tuple[int, int, int] = tuple(int(p) for p in jax.__version_info__[:3])

# 0.11 merged ClosedJaxpr into Jaxpr (jax.extend.core.ClosedJaxpr became Jaxpr itself).
JAXPR_CARRIES_CONSTS: bool = jcore.ClosedJaxpr is jcore.Jaxpr


# -- jaxprs ------------------------------------------------------------------------------
def is_jaxpr(x) -> bool:
    """A (closed or open) jaxpr, in either representation."""
    return isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))


def jaxpr_and_consts(body) -> tuple:
    """``(jaxpr, consts)`` of a jit/scan/cond body: ``jaxpr.constvars`` pair with ``consts``,
    ``jaxpr.invars`` are the body's inputs."""
    if JAXPR_CARRIES_CONSTS:
        return body, list(body.consts)
    if isinstance(body, jcore.ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    return body, []


def dce_closed_jaxpr(closed, instantiate):
    """JAX's DCE of a closed body whose inputs ``instantiate`` marks as kept (outputs all
    live): ``(closed body, used inputs)``, consts kept attached."""
    from jax._src.interpreters import partial_eval as pe
    jaxpr, consts = jaxpr_and_consts(closed)
    n_out = len(jaxpr.outvars)
    if JAXPR_CARRIES_CONSTS:        # dce_jaxpr keeps the consts of a closed Jaxpr
        return pe.dce_jaxpr(closed, [True] * n_out, instantiate=list(instantiate))
    out, used = pe.dce_jaxpr(jaxpr, [True] * n_out, instantiate=list(instantiate))
    return jcore.ClosedJaxpr(out, consts), used


# -- equation params -----------------------------------------------------------------------
def scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation's params, in either schema."""
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


def normalize_params(prim_name: str, params: dict) -> dict:
    """The params the compiler's IR keeps for one equation: JAX's own, plus the 0.10 spelling
    of what later releases renamed (``scan``: ``num_consts``/``num_carry``)."""
    if prim_name == "scan" and "num_consts" not in params:
        nc, nk = scan_counts(params)
        params = {**params, "num_consts": nc, "num_carry": nk}
    elif prim_name == "composite" and "call_jaxpr" in params:      # 0.12 renamed jaxpr
        params = {**params, "jaxpr": params["call_jaxpr"]}
    return params


# -- dtypes ------------------------------------------------------------------------------
def is_extended(dtype) -> bool:
    """A JAX extended dtype (typed PRNG keys): no NumPy dtype stands for it."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def canonicalize_dtype(dtype):
    """``jax.dtypes.canonicalize_dtype`` for every JAX dtype: extended dtypes are canonical
    as they are (canonicalize_dtype raises on them)."""
    if is_extended(dtype):
        return dtype
    return jax.dtypes.canonicalize_dtype(dtype)


def itemsize(dtype) -> int:
    """Bytes per element (extended dtypes: the bytes of their underlying key data)."""
    if is_extended(dtype):
        return int(dtype.itemsize)
    return int(np.dtype(dtype).itemsize)


def dtype_name(dtype) -> str:
    """``float32``, ``bfloat16``, ``key<fry>``: a name for every JAX dtype."""
    return str(dtype) if is_extended(dtype) else np.dtype(dtype).name


# -- collectives -------------------------------------------------------------------------
def threefry2x32_p():
    """The threefry-2x32 hash primitive (``jax._src.random.threefry2x32``)."""
    from jax._src.random.threefry2x32 import threefry2x32_p as prim
    return prim


def sharding_rule_parser():
    """``(BATCHING, str_to_sdy_sharding_rule)`` of ``jax._src.custom_partitioning_sharding_rule``:
    the prefix of ellipsis factor names and the parser of rule strings."""
    from jax._src.custom_partitioning_sharding_rule import BATCHING, str_to_sdy_sharding_rule
    return BATCHING, str_to_sdy_sharding_rule


def ppermute_any_axis_order():
    """Context in which ``lax.ppermute`` may name mesh axes out of mesh order (0.12 raises by
    default; older releases never checked)."""
    from jax._src import config     # the state's context manager is not re-exported
    check = getattr(config, "raise_on_ppermute_sort_diff", None)
    return check(False) if check is not None else contextlib.nullcontext()
