"""Collectives of a compiled XLA program, read from its HLO text.

``parse_collectives(compiled.as_text(), mesh)`` returns one :class:`HloCollective` per
collective the compiler kept, with the mesh axes it runs over, the per-device operand and
the bytes it puts on the wire (:func:`autoshard.compiler.cost_model.wire_bytes`). The
tests and the report compare these with what the auto-sharding pass planned, using
:func:`summarize` as a multiset.

Example. On a ``('data', 'model') = (2, 4)`` mesh, ``psum_scatter(x, 'model',
scatter_dimension=1, tiled=True)`` of a per-device ``f32[4,16]`` compiles on XLA CPU to::

    %reduce_scatter.7 = f32[4,4]{0,1} reduce-scatter(%wrapped_copy), channel_id=1,
        replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, dimensions={1},
        to_apply=%region_0.0, metadata={...}

(one line in the real text), which parses to::

    HloCollective(kind='reduce-scatter', mesh_axes=('model',), shape=(4, 16),
                  dtype='float32', payload_bytes=256, wire_bytes=192.0, group_size=4)

What is read, and how:

* Ops ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
  ``collective-permute`` and the async pairs ``all-reduce-start``/``-done``,
  ``all-gather-start``/``-done``, ``collective-permute-start``/``-done`` (and the
  async-op sugar ``reduce-scatter-start``, ``all-to-all-start``): the start is
  counted, the done is not; a start's operands are read from its tuple shape. Other communication ops (``ragged-all-to-all``,
  ``collective-broadcast``, send/recv) are not reported.
* Every textual occurrence counts once, wherever it is: in the entry computation, a while
  body, a fusion or an async computation. A collective in a loop body that runs ten
  times is **one** record; multiply by trip counts yourself if you need them.
* A collective whose result is a tuple (XLA's combiners merge several same-typed
  collectives over the same groups into one op) gives one record per tuple element.
  The exception is the *tuple form of all-to-all* (no ``dimensions=`` attribute):
  there the ``n`` operands are the ``n`` chunks one device sends to the ``n`` members of
  its group, i.e. the pieces of a single logical all-to-all, so it gives one record whose
  shape is the whole per-device operand. XLA CPU lowers ``all_to_all(tiled=True)``
  this way: the operands are slices of one array, which is found by following the
  operands back to it; when that fails the chunk's leading dimension is multiplied by
  ``n`` (the byte counts are right either way).
* ``shape`` is the per-device *operand* shape: the result for all-reduce, all-to-all and
  collective-permute; the result divided by the group size along ``dimensions`` for
  all-gather; the result multiplied by it for reduce-scatter.
* ``replica_groups`` in every printed form: explicit ``{{0,1,2,3},{4,5,6,7}}``; iota
  ``[2,4]<=[8]`` and ``[4,2]<=[2,4]T(1,0)``; empty ``{}`` (all devices in one group);
  and the mesh form XLA uses for collectives it inserts itself during sharding
  propagation, ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``, with optional
  ``device_ids=(...)`` and sub-axes ``'axis_0':(2)2``. ``source_target_pairs`` for
  collective-permute.
* Device numbers in the groups are *positions in* ``mesh.devices.flat`` (XLA's logical
  ids, ``use_global_device_ids=true``), not ``Device.id``: the same program on a mesh built
  from a permuted device list compiles to the same text. The mesh axes of a group set
  are the subset of mesh axes that, with devices grouped by their coordinates along the
  other axes, gives exactly these groups (as sets; the order inside a group is ignored)
  and are reported in mesh order. Groups that no subset produces (e.g. XLA resharding
  over part of an axis) raise ``ValueError``. For a collective-permute the mesh axes are
  those along which some source and its target differ, and ``group_size`` is the
  product of their sizes.
* ``dtype`` is the numpy name of the HLO element type (``f32`` -> ``float32``,
  ``bf16`` -> ``bfloat16``, ``pred`` -> ``bool``, ...); ``payload_bytes`` is
  ``prod(shape) * itemsize`` with numpy/ml_dtypes item sizes (sub-byte types count one
  byte per element). Note that XLA CPU computes bf16 collectives in f32, so programs on
  bf16 data show ``float32`` collectives there.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..compiler.cost_model import KINDS, wire_bytes as _wire_bytes

if TYPE_CHECKING:  # pragma: no cover
    import jax

__all__ = ["HloCollective", "parse_collectives", "summarize"]


@dataclass(frozen=True)
class HloCollective:
    """One collective of compiled HLO, seen from one device."""

    kind: str            # one of cost_model.KINDS
    mesh_axes: tuple     # mesh axis names (in mesh order) whose devices form each group
    shape: tuple         # per-device operand shape
    dtype: str           # numpy dtype name
    payload_bytes: int   # bytes of the per-device operand
    wire_bytes: float    # cost_model.wire_bytes(kind, group_size, payload_bytes)
    group_size: int


def summarize(collectives: Iterable[HloCollective]) -> Counter:
    """Multiset of ``(kind, mesh_axes, shape)``, for comparing planned and compiled."""
    return Counter((c.kind, c.mesh_axes, c.shape) for c in collectives)


# --------------------------------------------------------------------------- dtypes

# HLO element type -> (numpy dtype name, itemsize in bytes).
_DTYPES = {
    "pred": ("bool", 1),
    "s2": ("int2", 1), "s4": ("int4", 1), "s8": ("int8", 1), "s16": ("int16", 2),
    "s32": ("int32", 4), "s64": ("int64", 8),
    "u2": ("uint2", 1), "u4": ("uint4", 1), "u8": ("uint8", 1), "u16": ("uint16", 2),
    "u32": ("uint32", 4), "u64": ("uint64", 8),
    "f16": ("float16", 2), "bf16": ("bfloat16", 2), "f32": ("float32", 4),
    "f64": ("float64", 8), "c64": ("complex64", 8), "c128": ("complex128", 16),
    "f4e2m1fn": ("float4_e2m1fn", 1), "f8e3m4": ("float8_e3m4", 1),
    "f8e4m3": ("float8_e4m3", 1), "f8e4m3fn": ("float8_e4m3fn", 1),
    "f8e4m3fnuz": ("float8_e4m3fnuz", 1), "f8e4m3b11fnuz": ("float8_e4m3b11fnuz", 1),
    "f8e5m2": ("float8_e5m2", 1), "f8e5m2fnuz": ("float8_e5m2fnuz", 1),
    "f8e8m0fnu": ("float8_e8m0fnu", 1),
}


# ---------------------------------------------------------------- low-level text scan

_COMMENT = re.compile(r"/\*.*?\*/")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=(){},]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<ty>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][a-z0-9\-]*)\(")
_DIMENSIONS = re.compile(r"(?<![\w-])dimensions=\{(?P<d>[\d,\s]*)\}")
_INT = re.compile(r"-?\d+")


def _closing(text: str, i: int) -> int:
    """Index just past the bracket that closes the one opening at ``text[i]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    j = i
    while j < len(text):
        ch = text[j]
        if ch == '"':  # skip a string literal (metadata), honouring backslash escapes
            j += 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
        j += 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[i:i + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:j])
            start = j + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_type(text: str, i: int = 0):
    """Parse an HLO shape at ``text[i:]``; returns ``(shape, end)``.

    A shape is ``("array", hlo_type, dims)`` or ``("tuple", [shapes])``; layouts
    (``{1,0}``, ``{1,0:T(8,128)}``) are skipped, dynamic bounds (``<=4``) read as sizes.
    """
    while text[i] == " ":
        i += 1
    if text[i] == "(":
        end = _closing(text, i)
        elems = [_parse_type(part)[0] for part in _split_top(text[i + 1:end - 1])]
        return ("tuple", elems), end
    m = _ARRAY.match(text, i)
    if not m:
        raise ValueError(f"cannot read an HLO shape at {text[i:i + 60]!r}")
    dims = tuple(int(d.strip().lstrip("<=")) for d in m["dims"].split(",") if d.strip())
    end = m.end()
    if end < len(text) and text[end] == "{":
        end = _closing(text, end)
    return ("array", m["ty"], dims), end


def _leaves(shape) -> list:
    return [shape] if shape[0] == "array" else [leaf for s in shape[1] for leaf in _leaves(s)]


@dataclass
class _Instr:
    name: str
    shape: tuple
    opcode: str
    operands: list      # operand names
    attrs: str          # everything after the operand list


def _base_kind(opcode: str) -> str:
    """``all-gather-start`` -> ``all-gather``; a ``-done`` keeps its suffix (not counted)."""
    return opcode[: -len("-start")] if opcode.endswith("-start") else opcode


def _instructions(hlo_text: str):
    """Yield every instruction line of the module, parsed."""
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        m = _INSTR.match(line)
        if not m:
            continue
        rest = m["rest"]
        try:
            shape, end = _parse_type(rest)
        except (ValueError, IndexError):
            continue
        om = _OPCODE.match(rest, end)
        if not om:
            continue
        open_paren = om.end() - 1
        try:
            close = _closing(rest, open_paren)
        except ValueError:
            if _base_kind(om["op"]) in KINDS:
                raise
            continue
        operands = [p.split()[-1].lstrip("%") for p in _split_top(rest[open_paren + 1:close - 1])]
        yield _Instr(m["name"], shape, om["op"], operands, rest[close:])


# ------------------------------------------------------------------- replica groups

def _iota_groups(text: str) -> np.ndarray:
    """``[2,4]<=[8]`` or ``[4,2]<=[2,4]T(1,0)`` -> array of shape (num_groups, size)."""
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if not m:
        raise ValueError(f"cannot read iota replica groups {text!r}")
    dims = [int(x) for x in m[1].split(",")]
    reshape = [int(x) for x in m[2].split(",")]
    perm = [int(x) for x in m[3].split(",")] if m[3] else list(range(len(reshape)))
    arr = np.arange(math.prod(reshape)).reshape(reshape).transpose(perm)
    return arr.reshape(dims[0], -1)


def _mesh_device_ids(text: str, n: int) -> np.ndarray:
    """``device_ids=(...)`` of the mesh form: an iota ``[2,2,2]T(0,2,1)`` or a list."""
    text = text.strip()
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if m:
        reshape = [int(x) for x in m[1].split(",")]
        perm = [int(x) for x in m[2].split(",")] if m[2] else list(range(len(reshape)))
        return np.arange(math.prod(reshape)).reshape(reshape).transpose(perm).ravel()
    ids = np.array([int(x) for x in _INT.findall(text)])
    if ids.size != n:
        raise ValueError(f"cannot read mesh device_ids ({text!r}) for {n} devices")
    return ids


def _mesh_form_groups(text: str) -> np.ndarray:
    """Expand ``mesh['a'=2,'b'=4], device_ids=(...) {'a','b':(2)2}`` into groups.

    Same rule as XLA's ``MeshAxesReplicaGroupList``: a sub-axis ``x:(p)k`` is the
    middle factor of axis ``x`` reshaped to ``[p, k, size/(p*k)]`` (major to minor);
    devices are grouped along the listed (sub-)axes, in the listed order.
    """
    m = re.match(r"mesh\[(?P<axes>[^\]]*)\]", text)
    if not m:
        raise ValueError(f"cannot read mesh replica groups {text!r}")
    axes = [(a, int(s)) for a, s in re.findall(r"'?([^'=,\s]+)'?\s*=\s*(\d+)", m["axes"])]
    names = [a for a, _ in axes]
    sizes = [s for _, s in axes]
    n = math.prod(sizes)
    i = m.end()
    ids = np.arange(n)
    dm = re.match(r"\s*,\s*device_ids=", text[i:])
    if dm:
        j = i + dm.end()
        end = _closing(text, j)
        ids = _mesh_device_ids(text[j + 1:end - 1], n)
        i = end
    bm = re.match(r"\s*\{", text[i:])
    if not bm:
        raise ValueError(f"cannot read mesh replica groups {text!r}")
    j = i + bm.end() - 1
    refs_text = text[j + 1:_closing(text, j) - 1]
    refs = []  # (axis index, pre_size, size)
    # A quoted name is whole ('model:(4)2', autoshard's own sub-axis of a refined mesh, holds
    # what would otherwise read as XLA's sub-axis syntax); a sub-axis of it follows the quotes.
    for quoted, bare, pre, size in re.findall(r"(?:'([^']+)'|([^':,\s]+))(?::\((\d+)\)(\d+))?", refs_text):
        name = quoted or bare
        if name not in names:
            raise ValueError(f"replica groups {text!r} name unknown axis {name!r}")
        k = names.index(name)
        refs.append((k, int(pre), int(size)) if pre else (k, 1, sizes[k]))
    # Cut every axis at the sub-axis boundaries, giving a list of factor dims.
    factor_dims, factor_of_ref = [], []
    for k, size in enumerate(sizes):
        cuts = sorted({1, size} | {c for r in refs if r[0] == k for c in (r[1], r[1] * r[2])})
        base = len(factor_dims)
        factor_dims += [cuts[t + 1] // cuts[t] for t in range(len(cuts) - 1)]
        for r in refs:
            if r[0] == k:
                lo, hi = cuts.index(r[1]), cuts.index(r[1] * r[2])
                factor_of_ref.append((refs.index(r), list(range(base + lo, base + hi))))
    grouped = [f for _, fs in sorted(factor_of_ref) for f in fs]
    others = [f for f in range(len(factor_dims)) if f not in grouped]
    group_size = math.prod(factor_dims[f] for f in grouped)
    arr = ids.reshape(factor_dims).transpose(others + grouped)
    return arr.reshape(-1, group_size)


def _replica_groups(attrs: str):
    """Groups of the ``replica_groups=`` attribute as a list of lists; ``None`` = all."""
    m = re.search(r"(?<![\w-])replica_groups=", attrs)
    if not m:
        return None
    i = m.end()
    if attrs.startswith("mesh[", i):
        j = attrs.find("]", i)
        dm = re.match(r"\s*,\s*device_ids=", attrs[j + 1:])
        if dm:
            j = _closing(attrs, j + 1 + dm.end()) - 1
        k = attrs.find("{", j)
        return _mesh_form_groups(attrs[i:_closing(attrs, k)]).tolist()
    if attrs.startswith("{", i):
        body = attrs[i:_closing(attrs, i)]
        groups = [[int(x) for x in _INT.findall(g)] for g in re.findall(r"\{([^{}]*)\}", body[1:-1])]
        return groups or None
    if attrs.startswith("[", i):
        end = _closing(attrs, i)
        end = _closing(attrs, end + 2)  # the "<=[...]" part
        tm = re.match(r"T\([\d,]+\)", attrs[end:])
        if tm:
            end += tm.end()
        return _iota_groups(attrs[i:end]).tolist()
    raise ValueError(f"cannot read replica_groups at {attrs[i:i + 80]!r}")


def _source_target_pairs(attrs: str) -> list[tuple[int, int]]:
    m = re.search(r"(?<![\w-])source_target_pairs=", attrs)
    if not m:
        raise ValueError(f"collective-permute without source_target_pairs: {attrs[:120]!r}")
    body = attrs[m.end():_closing(attrs, m.end())]
    return [tuple(int(x) for x in _INT.findall(p)) for p in re.findall(r"\{([^{}]*)\}", body[1:-1])]


# ---------------------------------------------------------------------- mesh axes

@functools.lru_cache(maxsize=None)
def _partitions(mesh_shape: tuple) -> list:
    """For every subset of mesh axes (smallest first), the groups it induces as a set."""
    ids = np.arange(math.prod(mesh_shape)).reshape(mesh_shape)
    k = len(mesh_shape)
    out = []
    for r in range(k + 1):
        for subset in itertools.combinations(range(k), r):
            rest = [a for a in range(k) if a not in subset]
            size = math.prod(mesh_shape[a] for a in subset)
            groups = ids.transpose(rest + list(subset)).reshape(-1, size)
            out.append((subset, frozenset(frozenset(g) for g in groups.tolist())))
    return out


def _mesh_info(mesh) -> tuple[tuple, tuple]:
    """Axis names and sizes, in mesh order (``Mesh`` or ``AbstractMesh``)."""
    return tuple(mesh.shape.keys()), tuple(int(s) for s in mesh.shape.values())


def _axes_of_groups(groups, mesh, where: str, strict: bool = True) -> tuple[tuple, int]:
    names, shape = _mesh_info(mesh)
    n = math.prod(shape)
    if groups is None:  # empty replica_groups: every device in one group
        return names, n
    target = frozenset(frozenset(g) for g in groups)
    for subset, partition in _partitions(shape):
        if partition == target:
            return tuple(names[a] for a in subset), math.prod(shape[a] for a in subset)
    if not strict:
        # XLA's own partitioner may split a mesh axis into sub-axes; name the groups instead.
        return (f"groups of {len(groups[0])}",), len(groups[0])
    raise ValueError(
        f"replica groups {[list(g) for g in groups]} of {where} match no subset of the mesh "
        f"axes {dict(zip(names, shape))} (device numbers are positions in mesh.devices.flat)")


def _axes_of_pairs(pairs, mesh, where: str) -> tuple[tuple, int]:
    names, shape = _mesh_info(mesh)
    n = math.prod(shape)
    differ = set()
    for src, dst in pairs:
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"source_target_pairs {pairs} of {where} name devices outside "
                             f"the {n}-device mesh {dict(zip(names, shape))}")
        a, b = np.unravel_index(src, shape), np.unravel_index(dst, shape)
        differ |= {k for k in range(len(shape)) if a[k] != b[k]}
    axes = sorted(differ)
    return tuple(names[k] for k in axes), math.prod(shape[k] for k in axes)


# -------------------------------------------------------------------- the parser

def _all_to_all_operand(instr: _Instr, chunk: tuple, n: int, by_name: dict) -> tuple:
    """Whole per-device operand of a tuple-form all-to-all whose chunks are ``chunk``.

    The chunks are normally slices of one array: the one operand shared by every chunk's
    producer that holds ``n`` chunks' elements. Its shape is ``chunk`` with one dimension ``n``
    times larger, or (XLA with JAX 0.12.1) ``chunk`` without the unit dims the slicing fusions
    add (``f32[4,16]`` cut into ``f32[1,1,16]`` pieces).
    """
    producers = [by_name.get(op) for op in instr.operands]
    if all(p is not None for p in producers):
        common = set(producers[0].operands)
        for p in producers[1:]:
            common &= set(p.operands)
        found = set()
        for name in common:
            src = by_name.get(name)
            if src is None or src.shape[0] != "array":
                continue
            if math.prod(src.shape[2]) == n * math.prod(chunk):
                found.add(src.shape[2])
        if len(found) == 1:
            return found.pop()
    if not chunk:
        return (n,)
    return (chunk[0] * n,) + tuple(chunk[1:])


def _record(kind, axes, group_size, hlo_type, shape) -> HloCollective:
    if hlo_type not in _DTYPES:
        raise ValueError(f"unknown HLO element type {hlo_type!r} in a {kind}")
    dtype, itemsize = _DTYPES[hlo_type]
    payload = math.prod(shape) * itemsize
    return HloCollective(kind=kind, mesh_axes=axes, shape=tuple(shape), dtype=dtype,
                         payload_bytes=payload,
                         wire_bytes=_wire_bytes(kind, group_size, payload),
                         group_size=group_size)


def parse_collectives(hlo_text: str, mesh: "jax.sharding.Mesh",
                      strict: bool = True) -> list[HloCollective]:
    """The collectives of compiled HLO text, one record per operand, in text order.

    ``mesh`` is the mesh the program was compiled for; device numbers in the HLO are
    positions in ``mesh.devices.flat``. Raises ``ValueError`` for replica groups that
    no subset of the mesh axes produces, unless ``strict=False`` (for XLA's programs, which
    may use part of an axis): then ``mesh_axes`` is ``("groups of K",)``.
    """
    instrs = list(_instructions(hlo_text))
    by_name = {ins.name: ins for ins in instrs}
    out: list[HloCollective] = []
    for ins in instrs:
        op = ins.opcode
        is_start = op.endswith("-start")
        kind = _base_kind(op)
        if kind not in KINDS:
            continue
        where = f"{op} %{ins.name}"
        if kind == "collective-permute":
            axes, n = _axes_of_pairs(_source_target_pairs(ins.attrs), mesh, where)
        else:
            axes, n = _axes_of_groups(_replica_groups(ins.attrs), mesh, where, strict)

        # Per-device operands as (hlo_type, dims).
        shape = ins.shape
        dm = _DIMENSIONS.search(ins.attrs)
        dim = int(dm["d"].split(",")[0]) if dm else None
        if is_start and kind != "all-reduce" and shape[0] == "tuple":
            # Async starts carry their operands as tuple element 0: all-gather-start is
            # (operand(s), result(s)), collective-permute-start (operand, result, ...),
            # and the async-op sugar (reduce-scatter-start, all-to-all-start, ...)
            # ((operands...), result(s), ...).
            leaves = [(a[1], a[2]) for a in _leaves(shape[1][0])]
            from_result = False
        else:
            # all-reduce(-start) results are their operands, one per tuple element.
            leaves = [(a[1], a[2]) for a in _leaves(shape) if a[1] != "token"]
            from_result = True
        if kind == "all-to-all" and dim is None and len(leaves) > 1:
            t, chunk = leaves[0]
            operands = [(t, _all_to_all_operand(ins, chunk, len(leaves), by_name))]
        elif from_result and kind == "all-gather":
            operands = [(t, _scale(d, dim, n, divide=True, where=where)) for t, d in leaves]
        elif from_result and kind == "reduce-scatter":
            operands = [(t, _scale(d, dim, n, divide=False, where=where)) for t, d in leaves]
        else:
            operands = leaves
        out.extend(_record(kind, axes, n, t, d) for t, d in operands)
    return out


def _scale(dims: tuple, dim, n: int, *, divide: bool, where: str) -> tuple:
    if dim is None:
        raise ValueError(f"{where} has no dimensions= attribute")
    dims = list(dims)
    if divide:
        if dims[dim] % n:
            raise ValueError(f"{where}: result dim {dim} of size {dims[dim]} is not a "
                             f"multiple of the group size {n}")
        dims[dim] //= n
    else:
        dims[dim] *= n
    return tuple(dims)
