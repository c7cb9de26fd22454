"""Every primitive the installed JAX defines, and how autoshard handles each.

A primitive is handled in one of three ways:

- a **rule** in ``RULES`` (one file per op family in this package);
- **inlined**: a call whose body ``compiler/ir.py`` inlines (``jit``, ``custom_jvp_call``, ...);
- a **reason** below, naming the handling: most are computed by the replicated ``FALLBACK``
  on purpose (callbacks see whole values, as on one device), some never reach a jaxpr that
  ``parallelize`` traces (they are made by lowering, live inside kernels or inside a user's
  own ``shard_map``, or need symbolic shapes), some are effects.

``defined_primitives()`` walks every module under ``jax._src`` (found with ``pkgutil``, not
listed by hand) for ``jax.extend.core.Primitive`` objects, so a new JAX release's primitives
show up as *uncovered* until one of the three is given (``tests/test_primitive_coverage.py``).
Importing every module has side effects (backends, flags), so the test runs it in a child
process: ``python -m autoshard.compiler.ops.coverage`` prints the classification as JSON.

>>> handling("one_minus_square")                             # doctest: +SKIP
('rule', 'elementwise')
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import warnings

# -- handlings, each stated once ------------------------------------------------------------
FALLBACK = ("fallback: computed on replicated operands (correct; a warning and report entry "
            "name it; ash.register_rule gives it a rule)")
HOST_CALLBACK = ("fallback by design: a host callback sees whole operands, as on one device; every "
                 "device calls it on the replicated operands")
EFFECT_ONLY = ("effect with no results: the jaxpr's dead-code elimination drops it (nothing prints "
               "or runs inside a parallelized function)")
NAMED_AXIS_COLLECTIVE = ("collective over named mesh axes: only valid inside a shard_map/pmap body, so "
                         "it never appears at the level autoshard plans (a traced function has no "
                         "named axes bound; JAX raises 'unbound axis name' otherwise)")
NESTED_SHARD_MAP = ("a user's own shard_map inside the function: not supported yet; parallelize raises "
                    "UnsupportedPrimitiveError naming it and its source line (ops.REFUSED)")
LOWERING_ONLY = ("made only while lowering another primitive (never in a traced jaxpr)")
SORT_COMPARATOR = ("only inside sort's comparator body, which XLA compiles with the sort (never an "
                   "equation of the traced program)")
KERNEL = ("kernel-language primitive (Pallas, Mosaic, Triton, thunky): lives inside a kernel body "
          "(pallas_call's jaxpr), which autoshard never enters; the kernel call itself is the unit "
          "(pallas_call: fallback, or a rule of the user's)")
SYMBOLIC_SHAPES = ("shape polymorphism (jax.export with symbolic dims): parallelize traces concrete "
                   "shapes, so it never appears")
AD_INTERNAL = ("internal to JAX's differentiation/linearization machinery: replaced before a "
               "jaxpr is returned")
REFS = ("mutable Refs (jax.new_ref, run_state) and memory-space pins: a Ref has no array layout; "
        "not supported (the fallback binds them on replicated operands, which JAX accepts only "
        "for Ref-free code) -- use functional updates")
CHECKIFY = ("jax.experimental.checkify: discharged by checkify.checkify before tracing finishes; "
            "an undischarged check raises in JAX itself")
GPU_ONLY = ("GPU-only library kernel (cuDNN): no CPU lowering; on a GPU the fallback computes it on "
            "replicated operands")
TOKENS = ("token plumbing (legacy infeed/outfeed ordering): tokens carry no data; fallback")

REASONS: dict[str, str] = {
    # host callbacks and FFI
    "pure_callback": HOST_CALLBACK, "io_callback": HOST_CALLBACK, "buffer_callback": HOST_CALLBACK,
    "ffi_call": FALLBACK, "call_exported": FALLBACK,
    # effects with no results
    "debug_callback": EFFECT_ONLY, "debug_print": EFFECT_ONLY, "inspect_sharding": EFFECT_ONLY,
    "dce_sink": EFFECT_ONLY,
    "after_all": TOKENS, "create_token": TOKENS,
    "check": CHECKIFY,
    # a user's own kernels: rules are the user's (register_rule). pallas_call and
    # custom_partitioning have rules (ops/custom.py: a registered kernel's or the function's own)
    "core_map": FALLBACK,
    "mpmd_map": FALLBACK, "fusible": FALLBACK, "custom_fusion": FALLBACK, "tpu_custom_call": LOWERING_ONLY,
    "shard_map": NESTED_SHARD_MAP,
    # rarely used ops computed whole
    "custom_linear_solve": FALLBACK,
    # jax 0.12.1's Poisson sampler and raw PRNG bits: replicated, so every device draws what one
    # device draws (equal values; no split lowering written)
    "random_poisson": FALLBACK, "raw_bits": FALLBACK, "ragged_dot_general": FALLBACK, "select_and_scatter": FALLBACK,
    "scaled_dot": FALLBACK, "rng_uniform": FALLBACK + "; XLA's stateful generator, equal in distribution only",
    "empty": FALLBACK, "tie": FALLBACK, "from_edtype": FALLBACK, "to_edtype": FALLBACK,
    "platform_index": FALLBACK, "linear_call": FALLBACK, "remat_opt": FALLBACK, "unreachable": FALLBACK,
    "layout_constraint": FALLBACK, "relayout": FALLBACK, "shard_alike": FALLBACK,
    "xla_metadata_value": FALLBACK, "program_order": FALLBACK, "zeros_like": AD_INTERNAL,
    "custom_lin": AD_INTERNAL, "stage": AD_INTERNAL,
    "call_hi_primitive": FALLBACK, "call_hi_primitive_linearized": AD_INTERNAL,
    # GPU-only library kernels
    **dict.fromkeys(("dot_product_attention_fwd", "dot_product_attention_bwd", "dot_product_attention_fp8_fwd",
                     "dot_product_attention_fp8_bwd", "dot_product_attention_fwd_wrapper",
                     "dot_product_attention_bwd_wrapper", "dot_product_attention_fp8_fwd_wrapper",
                     "dot_product_attention_fp8_bwd_wrapper", "scaled_matmul", "scaled_matmul_wrapper",
                     "cudnn_fusion"), GPU_ONLY),
    # made while lowering other primitives
    "iota_2x32_shape": LOWERING_ONLY + " (random_bits' counters)",
    "threefry4x32": LOWERING_ONLY + " (random_bits of that PRNG implementation)",
    "philox2x32": LOWERING_ONLY + " (random_bits of that PRNG implementation)",
    "philox4x32": LOWERING_ONLY + " (random_bits of that PRNG implementation)",
    "geqrf": LOWERING_ONLY + " (qr's Householder form)", "geqp3": LOWERING_ONLY + " (qr with pivoting)",
    "eq_to": SORT_COMPARATOR, "lt_to": SORT_COMPARATOR, "le_to": SORT_COMPARATOR,
    # shape polymorphism
    "dim_as_value": SYMBOLIC_SHAPES, "dimension_size": SYMBOLIC_SHAPES, "shape_assertion": SYMBOLIC_SHAPES,
    # collectives over named axes (inside shard_map / pmap bodies only)
    **dict.fromkeys((
        "psum", "pmax", "pmin", "ppermute", "all_gather", "all_to_all", "axis_index", "reduce_scatter",
        "ragged_all_to_all", "pbroadcast", "pbroadcast_dynamic", "psend", "precv", "preduced", "pvary",
        "psum_invariant", "all_gather_invariant", "all_gather_reduced", "unreduced_psum", "unreduced_pmax",
        "unreduced_pmin", "unreduced_reduce_scatter", "vary_unreduced_cast", "vary_unreduced_cast_p",
        "reduced_vary_cast", "reduced_vary_cast_p",
        "psum_start", "psum_done", "psum_invariant_start", "ppermute_start", "ppermute_done",
        "all_gather_start", "all_gather_done", "all_gather_reduced_start", "all_to_all_start",
        "all_to_all_done", "reduce_scatter_start", "reduce_scatter_done", "pbroadcast_start",
        "pbroadcast_done", "unreduced_psum_start", "unreduced_reduce_scatter_start",
        "pmax_scatter", "pmin_scatter", "pxor"), NAMED_AXIS_COLLECTIVE),
    # Refs and memory spaces
    **dict.fromkeys(("get", "swap", "addupdate", "new_ref", "freeze", "empty_ref", "free_ref",
                     "accum_grad_in_ref", "run_state", "broadcast_to", "create_linear", "pin", "unpin",
                     "with_memory_space_constraint", "box_get", "box_set", "new_box", "log_extend",
                     "log_read", "new_log"), REFS),
}

# Modules whose primitives are a kernel language (matched on the defining module's name); a
# primitive also defined elsewhere, or named in REASONS, is classified by that instead.
KERNEL_MODULES = ("jax._src.pallas.", "jax._src.thunky.", "jax._src.tpu_custom_call")


def defined_primitives() -> dict[str, list[str]]:
    """``{primitive name: [defining module, ...]}`` over every importable module of ``jax._src``."""
    import jax._src
    from jax.extend.core import Primitive
    found: dict[str, set] = {}
    for info in pkgutil.walk_packages(jax._src.__path__, "jax._src."):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(info.name)
        except Exception:       # optional backends (Mosaic GPU, export's flatbuffers) may be absent
            continue
        for value in list(vars(mod).values()):
            if isinstance(value, Primitive):
                found.setdefault(value.name, set()).add(mod.__name__)
    return {name: sorted(mods) for name, mods in found.items()}


def handling(name: str, modules=()) -> tuple[str, str]:
    """``(kind, detail)``: kind is ``rule``, ``inlined``, ``reason`` or ``uncovered``."""
    from .. import ir
    from . import RULES, _load_families
    _load_families()
    if name in RULES:
        fn = RULES[name].factors
        return "rule", getattr(fn, "__module__", "").rsplit(".", 1)[-1]
    if name in ir._CALL_BODY_PARAM:
        return "inlined", f"body param {ir._CALL_BODY_PARAM[name]!r} inlined by compiler/ir.py"
    if name in REASONS:
        return "reason", REASONS[name]
    if modules and all(m.startswith(KERNEL_MODULES) for m in modules):
        return "reason", KERNEL
    return "uncovered", ""


def classify() -> dict:
    """The classification of every primitive of the installed JAX."""
    import jax
    out = {"jax": jax.__version__, "primitives": {}}
    for name, modules in sorted(defined_primitives().items()):
        kind, detail = handling(name, modules)
        out["primitives"][name] = {"kind": kind, "detail": detail, "modules": modules}
    return out


if __name__ == "__main__":
    json.dump(classify(), sys.stdout, indent=1)
