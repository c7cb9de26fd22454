"""Rules of your own: factor strings, ``custom_partitioning`` functions and Pallas kernels.

A rule is a factor string in the notation of ``jax.experimental.custom_partitioning``'s
``sharding_rule`` (parsed by JAX's own parser, so the two notations never drift apart)::

    "i j, j k -> i k"               factors i:pass j:sum k:pass
                                    operands (i)(j), (j)(k) -> result (i)(k)
    "b h q d, b h k d, b h k d -> b h q d", need_replication_factors=("k",)
                                    b, h, q, d pass; k never split (softmax over it)

- a factor that appears in a result is *pass-through*: every tensor carrying it is split alike;
- a factor that appears only in operands is *contracted*: splitting it over mesh axis ``a``
  leaves the result ``P(sum)`` over ``a`` (so is one listed in ``reduction_factors``);
- ``need_replication_factors`` and ``permutation_factors`` (no halo is known for a user op)
  and factors that appear only in results (their size is not an operand's) are never split;
- ``(h d)`` is a dim made of factors, major first (sizes of factors used only in products are
  keywords: ``d=64``); ``...`` names leading batch dims (``...0``, ``...1`` for groups);
  ``1`` (an autoshard extension) or any dim of size 1 takes no factor and is never split.

Three ways in (see ``register_rule`` and ``with_rule``):

1. ``register_rule(prim_or_name, rule)``: a primitive of your own (or overriding a built-in
   rule, with a warning). Lowered by binding the primitive on per-device operands with the
   same params (``lower=`` when params hold global shapes).
2. A ``custom_partitioning`` function whose ``def_partition`` carries a ``sharding_rule``: its
   equation is ``custom_partitioning[call=..., partition=..., sharding_rule=SdyShardingRule]``
   on JAX 0.10 and 0.12 alike. Lowered through its ``partition`` callback (which gets the
   chosen shardings and returns the per-device function). JAX's contract is that this
   function returns *complete* results, so contracted/reduction factors stay whole here.
3. Pallas: ``pallas_call`` is one primitive for every kernel, and its grid and block specs are
   computed from global shapes, so a kernel is lowered by calling the user's kernel *wrapper*
   on per-device arrays (re-tracing it makes a new ``pallas_call`` for the local shapes):
   ``with_rule(wrapper, rule)`` (a ``custom_partitioning`` function that also works under
   plain ``jax.jit``), or ``register_rule(kernel_fn, rule, lower=wrapper)`` for kernels called
   from code you cannot change (matched by the kernel function's source location).
"""
from __future__ import annotations

import dataclasses

import functools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import jax
from jax.extend import core as jcore
from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ... import compat
from ...errors import ShardingRuleError, UnsupportedPrimitiveError
from ..mesh import abstract_mesh
from . import RULES, FactorBuilder, FactorRule, OpRule, _load_families

# JAX's parser of the string notation (same module and API in JAX 0.10.2 through 0.12).
BATCHING, str_to_sdy_sharding_rule = compat.sharding_rule_parser()

_UNIT = "autoshard_unit"         # factor names standing for a "1" in a rule string

_NOTATION_FIX = (
    "write each operand and result as space-separated factor names, one per dim, operands and "
    "results separated by '->' (e.g. 'b h q d, b h k d -> b h q k'); '(h d)' for a dim that is a "
    "product of factors (give factors used only in products a size keyword, e.g. d=64); '...' "
    "for leading batch dims; '1' for a size-1 dim")


@dataclass(frozen=True)
class RuleSpec:
    """A parsed rule: the text the user wrote and JAX's ``SdyShardingRule`` for it."""
    text: str
    sdy: Any


# -- parsing ----------------------------------------------------------------------------------
def _substitute_units(text: str) -> tuple[str, dict]:
    """'i 1 -> i' -> 'i autoshard_unit0 -> i': JAX's parser has no size-1 marker. A '1'
    inside brackets needs its size (1) given, as any factor used only in products."""
    sizes: dict[str, int] = {}
    count = 0

    def sub(m):
        nonlocal count
        name = f"{_UNIT}{count}"
        count += 1
        start = m.start()
        if text.count("(", 0, start) > text.count(")", 0, start):
            sizes[name] = 1
        return name
    # A standalone 1: not part of a name (i1) nor an ellipsis group (...1).
    return re.sub(r"(?<![\w.])1(?!\w)", sub, text), sizes


def rule_text(sdy) -> str:
    """The string notation of an ``SdyShardingRule`` (for messages and reports)."""
    def dim(d):
        if isinstance(d, str):
            if d.startswith(BATCHING):
                return "..." + ("" if d[1:] in ("", "0") else d[1:])
            return "1" if d.startswith(_UNIT) else d
        return "(" + " ".join(dim(f) for f in d) + ")"

    def side(mappings):
        return ", ".join(" ".join(dim(d) for d in m) for m in mappings)
    text = f"{side(sdy.operand_mappings)} -> {side(sdy.result_mappings)}"
    for kind in ("reduction_factors", "need_replication_factors", "permutation_factors"):
        if getattr(sdy, kind):
            text += f"; {kind}={tuple(getattr(sdy, kind))}"
    return text


def parse_rule(rule, *, reduction_factors=(), need_replication_factors=(),
               permutation_factors=(), **factor_sizes) -> RuleSpec:
    """A factor string (or JAX ``SdyShardingRule``) -> ``RuleSpec``; ``ShardingRuleError``
    naming the string, the problem and the fix when it is malformed."""
    if isinstance(rule, RuleSpec):
        return rule
    special = dict(reduction_factors=reduction_factors,
                   need_replication_factors=need_replication_factors,
                   permutation_factors=permutation_factors)
    if isinstance(rule, SdyShardingRule):
        if any(special.values()) or factor_sizes:
            raise ShardingRuleError(
                "factor kinds and sizes given next to an SdyShardingRule object", rule=rule_text(rule),
                fix="put reduction_factors=..., need_replication_factors=... and sizes into the "
                    "SdyShardingRule itself, or pass the rule as a string")
        spec = RuleSpec(rule_text(rule), rule)
    elif isinstance(rule, str):
        text, unit_sizes = _substitute_units(rule)
        for kind, names in special.items():
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ShardingRuleError(f"{kind} must be a tuple of factor names, got {names!r}",
                                        rule=rule, fix=f"write e.g. {kind}=('k',)")
        try:
            sdy = str_to_sdy_sharding_rule(text, **{k: tuple(v) for k, v in special.items()},
                                           **unit_sizes, **factor_sizes)
        except (ValueError, TypeError) as e:
            problem = str(e).replace(text, rule) if text != rule else str(e)
            raise ShardingRuleError(f"bad factor rule: {problem}", rule=rule,
                                    fix=_NOTATION_FIX) from None
        spec = RuleSpec(rule, sdy)
    else:
        raise ShardingRuleError(
            f"a rule is a factor string, a jax SdyShardingRule or a function (eqn) -> FactorRule; "
            f"got {type(rule).__name__}", rule=rule, fix=_NOTATION_FIX)
    results = {f for m in spec.sdy.result_mappings for d in m
               for f in ((d,) if isinstance(d, str) else d)}
    for f in spec.sdy.reduction_factors:
        if f in results:
            raise ShardingRuleError(
                f"reduction factor '{f}' appears in a result: a reduced dim is not in the result",
                rule=spec.text, fix=f"drop '{f}' from the results or from reduction_factors")
    return spec


# -- a rule on an equation's shapes -------------------------------------------------------------
def factor_rule(spec: RuleSpec, in_shapes, out_shapes, *, where: str = "",
                contracted: str = "sum") -> FactorRule:
    """The ``FactorRule`` of ``spec`` on operands/results of these shapes. ``contracted`` is
    the kind of factors that appear only in operands (``sum``, or ``replicate`` where the
    lowering returns complete results)."""
    sdy = spec.sdy

    def fail(problem, fix):
        raise ShardingRuleError(problem, rule=spec.text, where=where, fix=fix)

    n_in = len(in_shapes)
    if len(sdy.operand_mappings) != n_in or len(sdy.result_mappings) != len(out_shapes):
        fail(f"the rule has {len(sdy.operand_mappings)} operand(s) and {len(sdy.result_mappings)} "
             f"result(s), the op has {n_in} and {len(out_shapes)}",
             "write one comma-separated entry per operand and per result")
    shapes = [tuple(s) for s in (*in_shapes, *out_shapes)]
    tensors, group_rank = [], {}
    for i, (m, shape) in enumerate(zip((*sdy.operand_mappings, *sdy.result_mappings), shapes)):
        what = f"operand {i}" if i < n_in else f"result {i - n_in}"
        m, lead = tuple(m), []
        if m and isinstance(m[0], str) and m[0].startswith(BATCHING):
            group, m = m[0][1:] or "0", m[1:]
            k = max(len(shape) - len(m), 0)
            if group_rank.setdefault(group, k) != k:
                fail(f"'...' stands for {group_rank[group]} leading dims on one tensor and {k} on "
                     f"{what} (shape {shape})", "give every tensor of one '...' group the same "
                     "number of leading dims, or name them")
            lead = [(f"{BATCHING}{group}#{j}",) for j in range(k)]
        if len(lead) + len(m) != len(shape):
            fail(f"{what} has rank {len(shape)} (shape {shape}) but the rule gives it {len(lead) + len(m)} dims",
                 "give every operand and result one factor per dim")
        tensors.append(lead + [(d,) if isinstance(d, str) else tuple(d) for d in m])

    seen: dict[str, set] = {}
    for dims, shape in zip(tensors, shapes):
        for names, size in zip(dims, shape):
            if len(names) == 1:
                seen.setdefault(names[0], set()).add(int(size))
    sizes = dict(sdy.factor_sizes)
    for name, found in seen.items():
        big = found - {1}
        if len(big) > 1:
            fail(f"factor '{_show(name)}' has sizes {sorted(big)} on different dims",
                 "use different factor names for dims of different sizes (only a size-1 dim "
                 "may share a factor with a larger one: it broadcasts)")
        sizes[name] = big.pop() if big else 1
    for name, size in sizes.items():
        if name.startswith(_UNIT) and size != 1:
            fail(f"'1' marks a dim of size {size}", "'1' is for size-1 dims: name this one")
    for i, (dims, shape) in enumerate(zip(tensors, shapes)):
        for d, (names, size) in enumerate(zip(dims, shape)):
            if len(names) > 1 and math.prod(sizes[n] for n in names) != size:
                what = f"operand {i}" if i < n_in else f"result {i - n_in}"
                fail(f"dim {d} of {what} has size {size} but its factors "
                     f"({' '.join(map(_show, names))}) multiply to {math.prod(sizes[n] for n in names)}",
                     "give the sizes of factors used only in products as keywords so they "
                     "multiply to the dim's size")

    in_names = {n for dims in tensors[:n_in] for d in dims for n in d}
    out_names = {n for dims in tensors[n_in:] for d in dims for n in d}
    never = set(sdy.need_replication_factors) | set(sdy.permutation_factors)

    def kind(name):
        if name in never or name not in in_names:
            return "replicate"
        if name in sdy.reduction_factors or name not in out_names:
            return contracted
        return "pass"

    fb, ids = FactorBuilder(), {}
    out = []
    for dims, shape in zip(tensors, shapes):
        t = []
        for names, size in zip(dims, shape):
            fids: tuple = ()
            if size != 1:                       # size-1 dims (broadcast) take no factor
                for n in names:
                    if n not in ids:
                        ids[n] = fb.new(sizes[n], kind(n))
                    fids += ids[n]
            t.append(fids)
        out.append(t)
    return dataclasses.replace(fb.build(out[:n_in], out[n_in:]), user=True)


def _show(name: str) -> str:
    if name.startswith(BATCHING):
        return "..." + name[1:].replace("0#", "#")
    return "1" if name.startswith(_UNIT) else name


def replicated_rule(eqn) -> FactorRule:
    """Every dim its own never-split factor: the op runs on whole operands."""
    fb = FactorBuilder()
    return fb.build([[fb.new(s, "replicate") for s in v.shape] for v in eqn.invars],
                    [[fb.new(s, "replicate") for s in v.shape] for v in eqn.outvars])


def _where(eqn) -> str:
    return f"{eqn.prim.name} at {eqn.source}"


def _flat_outs(eqn, ctx, outs, who: str, text: str) -> list:
    """Per-device results of a user lowering, checked against the planned local shapes."""
    outs = jax.tree.leaves(outs)
    got = [tuple(o.shape) for o in outs]
    want = [tuple(s) for s in ctx.out_shapes]
    if got != want:
        raise ShardingRuleError(
            f"{who} returned per-device results of shapes {got}; the rule makes them {want}",
            rule=text, where=_where(eqn),
            fix="compute every shape, grid and block size inside the lowering function from its "
                "arguments' shapes, not from the global ones")
    return outs


# -- register_rule ----------------------------------------------------------------------------
_USER: set[str] = set()                 # primitive names whose rule the user gave
_KERNELS: dict[tuple, "_Kernel"] = {}   # Pallas kernels: (file, line) or name -> rule


@dataclass(frozen=True)
class _Kernel:
    name: str
    factors: Callable
    lower: Callable
    text: str


def _factors_fn(rule, kw, contracted="sum") -> tuple[Callable, str]:
    """The user's rule as ``eqn -> FactorRule``, marked ``user``: the engine splits a user's op
    only where its operands' layouts already do (it never moves an axis onto a factor of its own
    accord, since a rule written for propagation, such as attention's ``b h q d, b h k d, ...``,
    may call a contracted dim a pass-through one)."""
    if callable(rule) and not isinstance(rule, (str, SdyShardingRule)):
        if any(kw.values()):
            raise ShardingRuleError("factor kinds and sizes given next to a rule function", rule=rule,
                                    fix="a function (eqn) -> FactorRule decides kinds itself")

        def from_function(eqn):
            return dataclasses.replace(rule(eqn), user=True)
        return from_function, getattr(rule, "__name__", repr(rule))
    spec = parse_rule(rule, **kw)

    def factors(eqn):
        return factor_rule(spec, [v.shape for v in eqn.invars], [v.shape for v in eqn.outvars],
                           where=_where(eqn), contracted=contracted)
    return factors, spec.text


def register_rule(target, rule, *, lower: Callable | None = None, reduction_factors=(),
                  need_replication_factors=(), permutation_factors=(), **factor_sizes) -> None:
    """Teach autoshard an op.

    ``target``: a ``jax.extend.core.Primitive`` or its name; or a Pallas kernel function (the
    function given to ``pl.pallas_call``), which then also needs ``lower``.
    ``rule``: a factor string (``"i j, j k -> i k"``, custom_partitioning's notation), a JAX
    ``SdyShardingRule``, or a function ``(eqn) -> FactorRule`` for full control. The keywords
    are those of ``custom_partitioning``'s ``def_partition``.
    ``lower``: computes the op on per-device arrays in place of binding it: for a primitive
    ``lower(*operands, **params)``; for a Pallas kernel ``lower(*operands)`` gets the
    ``pallas_call``'s operands and must call ``pallas_call`` with shapes, grid and blocks taken
    from them (usually the wrapper that called the kernel).

    Registering again replaces the rule. A rule for a primitive autoshard already knows
    overrides the built-in one, with a ``UserWarning``.

    >>> register_rule(my_matmul_p, "i j, j k -> i k")                           # doctest: +SKIP
    >>> register_rule(attn_kernel, "b h q d, b h k d, b h k d -> b h q d",
    ...               need_replication_factors=("k",), lower=attention)       # doctest: +SKIP
    """
    kw = dict(reduction_factors=reduction_factors, need_replication_factors=need_replication_factors,
              permutation_factors=permutation_factors, **factor_sizes)
    if isinstance(target, (jcore.Primitive, str)):
        name = target if isinstance(target, str) else target.name
        if name in ("pallas_call", "custom_partitioning"):
            raise ShardingRuleError(
                f"'{name}' is one primitive for many functions; a rule for all of them at once "
                "cannot be right", rule=rule,
                fix="for Pallas, register the kernel function (register_rule(kernel, rule, lower="
                    "wrapper)) or wrap the call with ash.with_rule; a custom_partitioning function "
                    "brings its own sharding_rule (def_partition(..., sharding_rule=...))")
        factors, text = _factors_fn(rule, kw)
        low = None
        if lower is not None:
            def low(eqn, ctx, args, _lower=lower):
                return _flat_outs(eqn, ctx, _lower(*args, **eqn.params), f"lower= of '{name}'", text)
        _load_families()               # built-ins first, so they never overwrite the user's rule
        if name in RULES and name not in _USER:
            warnings.warn(f"autoshard.register_rule: your rule replaces autoshard's built-in rule "
                          f"for '{name}'", UserWarning, stacklevel=2)
        RULES[name] = OpRule(factors, "none", None, low)
        _USER.add(name)
        return
    if callable(target):
        if lower is None:
            raise ShardingRuleError(
                f"a Pallas kernel ({_fn_name(target)}) needs lower=: its grid and block specs are "
                "computed from global shapes, so autoshard re-runs your wrapper on per-device arrays",
                rule=rule, fix="pass lower=<the function that calls pl.pallas_call(kernel, ...) on "
                               "its arguments>, or wrap that function with ash.with_rule")
        factors, text = _factors_fn(rule, kw)
        _KERNELS[_kernel_key(target)] = _Kernel(_fn_name(target), factors, lower, text)
        return
    raise ShardingRuleError(
        f"register_rule's target is a Primitive, a primitive name or a Pallas kernel function; "
        f"got {type(target).__name__}", rule=rule, fix="pass e.g. my_p or 'my_prim'")


def _unwrap(fn):
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _fn_name(fn) -> str:
    return getattr(_unwrap(fn), "__name__", repr(fn))


def _kernel_key(fn) -> tuple:
    """Kernels are told apart by where they are defined (as JAX's debug info names them)."""
    fn = _unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("name", _fn_name(fn))
    return ("src", code.co_filename, code.co_firstlineno)


def _eqn_kernel(eqn) -> _Kernel | None:
    dbg = getattr(eqn.params.get("jaxpr"), "debug_info", None)
    info = getattr(dbg, "func_src_info", None) or ""
    name, _, src = info.rpartition(" at ")
    file, _, line = src.rpartition(":")
    if line.isdigit() and ("src", file, int(line)) in _KERNELS:
        return _KERNELS[("src", file, int(line))]
    return _KERNELS.get(("name", getattr(dbg, "func_name", None) or name))


_WARNED: set = set()


def _warn_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, UserWarning, stacklevel=2)


def _pallas_factors(eqn):
    k = _eqn_kernel(eqn)
    if k is None:
        # Not computed on whole operands as other unknown ops are: the traced pallas_call
        # cannot be bound again inside the per-device program (its kernel's equations carry
        # the trace-time mesh context, which JAX checks against the per-device values).
        dbg = getattr(eqn.params.get("jaxpr"), "debug_info", None)
        name = getattr(dbg, "func_name", None) or "?"
        raise UnsupportedPrimitiveError(
            "pallas_call", eqn.source, detail=f"Pallas kernel '{name}' has no sharding rule",
            workaround=f"wrap the function that calls pl.pallas_call with ash.with_rule(fn, "
                       f"'<factors>'), or ash.register_rule({name}, '<factors>', lower=fn) where fn "
                       f"calls pl.pallas_call on its arguments (a rule whose factors are all in "
                       f"need_replication_factors runs it on whole operands)")
    return k.factors(eqn)


def _pallas_lower(eqn, ctx, args):
    k = _eqn_kernel(eqn)
    return _flat_outs(eqn, ctx, k.lower(*args), f"lower= of Pallas kernel '{k.name}'", k.text)


_PALLAS_RULE = OpRule(_pallas_factors, "none", None, _pallas_lower)
RULES["pallas_call"] = _PALLAS_RULE


# -- custom_partitioning and with_rule -----------------------------------------------------------
@dataclass(frozen=True)
class _WithRule:
    """Attached to the partition callback of a ``with_rule`` function: autoshard calls
    ``fun`` itself on per-device arrays, and knows it returns raw local results (so a
    contracted factor may be split: the result is then a partial sum)."""
    fun: Callable
    spec: RuleSpec
    static_argnums: tuple


def _merge_args(static_argnums, static_args, dyn):
    dyn, out = list(dyn), []
    for i in range(len(static_argnums) + len(dyn)):
        out.append(static_args[static_argnums.index(i)] if i in static_argnums else dyn.pop(0))
    return out


def _cp_name(eqn) -> str:
    call = eqn.params.get("call")
    dbg = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    return getattr(dbg, "func_name", None) or "custom_partitioning function"


def _cp_spec(eqn) -> tuple[RuleSpec | None, str]:
    """The rule of a ``custom_partitioning`` equation and the kind of its contracted factors;
    ``(None, why)`` when it carries none autoshard can read."""
    ours = getattr(eqn.params["partition"], "_autoshard", None)
    if ours is not None:
        return ours.spec, "sum"
    rule = eqn.params.get("sharding_rule")
    if isinstance(rule, SdyShardingRule):
        return parse_rule(rule), "replicate"
    if rule is None:
        return None, ("it has no sharding_rule (def_partition(..., sharding_rule='...'); JAX drops "
                      "the rule when jax_use_shardy_partitioner is off)")
    return None, "its sharding_rule is a function of MLIR types; give a string or SdyShardingRule"


def custom_partitioning_factors(eqn):
    spec, why = _cp_spec(eqn)          # why: the contracted factors' kind, or why no rule
    if spec is None:
        _warn_once(("cp", _cp_name(eqn)), f"custom_partitioning function '{_cp_name(eqn)}' "
                   f"({eqn.source}) runs on whole (replicated) operands: {why}")
        return replicated_rule(eqn)
    return factor_rule(spec, [v.shape for v in eqn.invars], [v.shape for v in eqn.outvars],
                       where=f"custom_partitioning '{_cp_name(eqn)}' at {eqn.source}", contracted=why)


def _cp_lower(eqn, ctx, args):
    p = eqn.params
    ours = getattr(p["partition"], "_autoshard", None)
    if ours is not None:
        full = _merge_args(ours.static_argnums, p["static_args"], p["in_tree"].unflatten(args))
        return _flat_outs(eqn, ctx, ours.fun(*full), f"with_rule function '{_cp_name(eqn)}'",
                          ours.spec.text)
    spec, _ = _cp_spec(eqn)
    if p["partition"] is None:
        raise UnsupportedPrimitiveError(
            "custom_partitioning", eqn.source, detail=f"'{_cp_name(eqn)}' has no partition callback",
            workaround="give it one with def_partition(partition, sharding_rule=...)")
    # JAX's own protocol: partition(*static, mesh, arg_shapes, result_shape) ->
    # (mesh, lower_fn, result_shardings, arg_shardings); lower_fn runs per device. (Binding
    # the traced body again is no option: its equations carry the trace-time mesh context.)
    # Without a rule the layouts are replicated, and so are the shardings it gets.
    text = spec.text if spec is not None else "(none)"
    mesh = abstract_mesh(ctx.axis_sizes)

    def shaped(vs, lays):
        return [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, lay.without_partial().spec()))
                for v, lay in zip(vs, lays)]
    arg_shapes = p["in_tree"].unflatten(shaped(eqn.invars, ctx.in_layouts))
    result_shape = p["out_tree"].unflatten(shaped(eqn.outvars, ctx.out_layouts))
    _, lower_fn, res_sh, arg_sh = p["partition"](*p["static_args"], mesh, arg_shapes, result_shape)
    for what, given, got in (("operand", arg_shapes, arg_sh), ("result", result_shape, res_sh)):
        want = [s.sharding.spec for s in jax.tree.leaves(given)]
        have = [getattr(s, "spec", s) for s in jax.tree.structure(given).flatten_up_to(got)]
        if [_norm(s, len(x.shape)) for s, x in zip(want, jax.tree.leaves(given))] != \
                [_norm(s, len(x.shape)) for s, x in zip(have, jax.tree.leaves(given))]:
            raise ShardingRuleError(
                f"the partition callback of '{_cp_name(eqn)}' returned {what} shardings {have}; its "
                f"sharding_rule gives {want}", rule=text, where=_where(eqn),
                fix="return the shardings it was given (tuple(a.sharding for a in arg_shapes), "
                    "result_shape's shardings), or list the factors it cannot split in "
                    "need_replication_factors")
    return _flat_outs(eqn, ctx, lower_fn(*p["in_tree"].unflatten(args)),
                      f"the partition callback of '{_cp_name(eqn)}'", text)


RULES["custom_partitioning"] = OpRule(custom_partitioning_factors, "none", None, _cp_lower)


def _norm(spec, rank) -> tuple:
    entries = tuple(spec) + (None,) * (rank - len(tuple(spec)))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def with_rule(fun_or_rule, rule=None, /, *, static_argnums=(), reduction_factors=(),
              need_replication_factors=(), permutation_factors=(), **factor_sizes):
    """Give a function (typically a Pallas kernel wrapper) a sharding rule.

    ``with_rule(fun, "b h q d, b h k d, b h k d -> b h q d", need_replication_factors=("k",))``
    or ``@with_rule("...")``. Returns a ``jax.experimental.custom_partitioning`` function with
    that ``sharding_rule``. Under ``autoshard.parallelize`` each device calls ``fun`` on its own
    blocks (so the kernel's grid and blocks follow the local shapes); a contracted factor that
    ends up split leaves the result ``P(sum)``. Under plain ``jax.jit`` the same rule drives
    JAX's Shardy partitioner (pass-through factors split as the first operand carrying them is
    split; everything else gathered). Like every ``custom_partitioning`` function it has no
    autodiff rule: differentiate through ``jax.custom_vjp``.
    """
    if rule is None and isinstance(fun_or_rule, (str, SdyShardingRule)):
        return lambda fun: with_rule(fun, fun_or_rule, static_argnums=static_argnums,
                                     reduction_factors=reduction_factors,
                                     need_replication_factors=need_replication_factors,
                                     permutation_factors=permutation_factors, **factor_sizes)
    fun = fun_or_rule
    if not callable(fun):
        raise ShardingRuleError(f"with_rule wraps a function, got {type(fun).__name__}", rule=rule,
                                fix="with_rule(fun, 'i j -> i j') or @with_rule('i j -> i j')")
    spec = parse_rule(rule, reduction_factors=reduction_factors,
                      need_replication_factors=need_replication_factors,
                      permutation_factors=permutation_factors, **factor_sizes)
    static_argnums = tuple(sorted({static_argnums} if isinstance(static_argnums, int) else set(static_argnums)))
    if any(i < 0 for i in static_argnums):
        raise ShardingRuleError("with_rule's static_argnums must be non-negative", rule=spec.text,
                                fix="count positions from the first argument")
    wrapped = custom_partitioning(fun, static_argnums=static_argnums)
    partition = _jax_partition(fun, spec, static_argnums)
    partition._autoshard = _WithRule(fun, spec, static_argnums)
    wrapped.def_partition(partition, sharding_rule=spec.sdy)
    return wrapped


def _jax_partition(fun, spec: RuleSpec, static_argnums):
    """The partition callback JAX's own partitioner calls (plain ``jax.jit``): split the
    pass-through factors as the operands already are, keep every other factor whole, so each
    device's block of ``fun`` is exact with no collective inside."""
    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        flat_in, flat_out = jax.tree.leaves(arg_shapes), jax.tree.leaves(result_shape)
        fr = factor_rule(spec, [a.shape for a in flat_in], [r.shape for r in flat_out])
        assign, used = {}, set()
        for dims, a in zip(fr.operands, flat_in):
            entries = _norm(a.sharding.spec, len(a.shape))
            for fids, axes in zip(dims, entries):
                if len(fids) != 1 or fr.kinds[fids[0]] != "pass" or fids[0] in assign or not axes:
                    continue
                if used.isdisjoint(axes) and fr.sizes[fids[0]] % math.prod(mesh.shape[x] for x in axes) == 0:
                    assign[fids[0]] = axes
                    used.update(axes)

        def sharding(dims):
            entries = [assign.get(f[0]) if len(f) == 1 else None for f in dims]
            return NamedSharding(mesh, PartitionSpec(*[e if e is None or len(e) > 1 else e[0] for e in entries]))
        arg_sh = jax.tree.structure(arg_shapes).unflatten([sharding(d) for d in fr.operands])
        res_sh = jax.tree.structure(result_shape).unflatten([sharding(d) for d in fr.results])

        def lower_fn(*dyn):
            return fun(*_merge_args(static_argnums, tuple(static), dyn))
        return mesh, lower_fn, res_sh, arg_sh
    return partition
