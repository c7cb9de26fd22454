"""The compiler's flat IR: a jaxpr with nested calls inlined and dead code removed.

Tracing happens once, on abstract shapes, with ``jax.make_jaxpr``. Calls whose bodies only
name a function boundary (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat2``,
``closed_call``) are inlined, so propagation sees one flat list of equations and every
primitive gets a factor rule. (Forward semantics of custom_jvp/vjp calls are their
``call_jaxpr``; remat only matters for differentiation, which has already happened when a
training step is traced. Keeping remat boundaries through lowering is issue #3.)

>>> g = trace(lambda x: jnp.sin(x) * 2, (jax.ShapeDtypeStruct((4,), jnp.float32),))  # doctest: +SKIP
>>> [e.prim.name for e in g.eqns]                                                     # doctest: +SKIP
['sin', 'mul']
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from .. import compat

# Primitives that only delimit a function: their body is inlined. (Param names as jax 0.10
# spells them: ``compat.normalize_params`` renames later releases' spellings.)
_CALL_BODY_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "call": "call_jaxpr",              # jax.extend.core's call_p (0.10)
    "eval_jaxpr": "call_jaxpr",        # ... its successor (0.12)
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_jvp_call_jaxpr": "fun_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    # Forward semantics are the body's: a vmap rule, a decomposition XLA may replace, a host
    # placement or XLA metadata only change how it runs, never the values.
    "custom_vmap_call": "call",
    "composite": "jaxpr",
    "compute_on": "jaxpr",
    "xla_metadata_call": "jaxpr",
}

# Primitives whose bodies stay regions: their semantics (loops, branches, rematerialisation)
# must survive lowering. Param names of the bodies, in order.
REGION_PARAMS = {
    "scan": ("jaxpr",),
    "while": ("cond_jaxpr", "body_jaxpr"),
    "cond": ("branches",),
    "remat2": ("jaxpr",),
    "checkpoint": ("jaxpr",),
}


@dataclass(eq=False)
class Value:
    """One SSA value: a traced variable (``const is None``) or a constant/literal."""
    id: int
    shape: tuple[int, ...]
    dtype: Any
    name: str = ""
    const: Any = None          # numpy/jax value for literals and closed-over constants

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return self.name or f"v{self.id}"


@dataclass(eq=False)
class Eqn:
    prim: Any                  # jax Primitive
    invars: list[Value]
    outvars: list[Value]
    params: dict
    source: str                # "file.py:LINE (function)" of the user's code
    index: int = -1            # unique over the whole program, nested bodies included
    # Bodies of control flow kept as regions (scan/while body, cond branches, remat):
    # their values live in the same program and get layouts like any other value.
    subgraphs: list["Graph"] = field(default_factory=list)
    # A scan over layers whose stacked inputs carry an annotated split (passes/stages.py):
    # its stacked dim is a ``pass`` factor, so the split reaches every xs and ys (a pipeline).
    pipelined: bool = False


@dataclass
class Graph:
    invars: list[Value]
    outvars: list[Value]
    eqns: list[Eqn]
    values: list[Value] = field(default_factory=list)

    def all_eqns(self):
        """Every equation, nested bodies right after the equation that holds them."""
        for eqn in self.eqns:
            yield eqn
            for sub in eqn.subgraphs:
                yield from sub.all_eqns()


def _dtype(dtype):
    """A numpy dtype where there is one; JAX's extended dtypes (PRNG keys) as they are
    (they have ``itemsize`` and ``name`` too)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return dtype


def _jaxpr_name(i: int) -> str:
    """Jaxpr-style names: a..z, ba..bz, ca.. (as ``jax.make_jaxpr`` prints them)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = letters[i % 26]
    i //= 26
    while i:
        out = letters[i % 26] + out
        i //= 26
    return out


_PKG = os.path.dirname(os.path.dirname(__file__))
# autoshard's own machinery is not user code; its reference models are.
_LIB_DIRS = tuple(os.path.dirname(m.__file__) for m in (jax, np)) + tuple(
    os.path.join(_PKG, d) for d in ("compiler", "passes", "report", "runtime"))


def user_source(source_info) -> str:
    """``file:line (function)`` of the innermost frame outside jax/flax/optax/autoshard."""
    tb = getattr(source_info, "traceback", None)
    frames = list(tb.frames) if tb is not None else []
    for frame in frames:
        path = frame.file_name
        if "site-packages" in path or "dist-packages" in path or path.startswith(_LIB_DIRS) or path.startswith("<"):
            continue
        return f"{os.path.basename(path)}:{frame.line_num} ({frame.function_name})"
    for frame in frames:   # all library frames: name the outermost non-jax one
        if "/jax/" not in frame.file_name and "/jaxlib/" not in frame.file_name:
            return f"{os.path.basename(frame.file_name)}:{frame.line_num} ({frame.function_name})"
    return "<unknown>"


class _Builder:
    def __init__(self):
        self.counter = itertools.count()
        self.values: list[Value] = []
        self.eqns: list[Eqn] = []

    def new(self, aval, const=None) -> Value:
        i = next(self.counter)
        v = Value(i, tuple(int(d) for d in aval.shape), _dtype(aval.dtype), const=const)
        self.values.append(v)
        return v

    def literal(self, val, aval) -> Value:
        return self.new(aval, const=np.asarray(val, dtype=aval.dtype) if np.ndim(val) == 0 else val)

    def inline(self, jaxpr, consts, args: list[Value], outer_source: str = "<unknown>") -> list[Value]:
        """Copy ``jaxpr``'s equations in, inlining calls; equations whose own traceback
        names no user frame (bodies of cached jitted library functions) take the
        source line of the call that contains them."""
        env: dict = {}
        for var, c in zip(jaxpr.constvars, consts):
            env[var] = self.new(var.aval, const=c)
        for var, a in zip(jaxpr.invars, args):
            env[var] = a

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return self.literal(atom.val, atom.aval)
            return env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            source = user_source(eqn.source_info)
            if source == "<unknown>":
                source = outer_source
            params = compat.normalize_params(eqn.primitive.name, dict(eqn.params))
            body_param = _CALL_BODY_PARAM.get(eqn.primitive.name)
            if body_param is not None and compat.is_jaxpr(params.get(body_param)):
                outs = self.inline(*compat.jaxpr_and_consts(params[body_param]), ins, source)
                for var, o in zip(eqn.outvars, outs):
                    env[var] = o
                continue
            if eqn.primitive.name == "rev" and all(eqn.invars[0].aval.shape[d] == 1
                                                   for d in eqn.params["dimensions"]):
                # Reversing size-1 dims is the identity (a 1x1 kernel's gradient reads it):
                # XLA removes it too, and one value gets one set of reshards, not two.
                env[eqn.outvars[0]] = ins[0]
                continue
            outs = [self.new(v.aval) for v in eqn.outvars]
            for var, o in zip(eqn.outvars, outs):
                env[var] = o
            new = Eqn(eqn.primitive, ins, outs, params, source)
            for param in REGION_PARAMS.get(eqn.primitive.name, ()):
                bodies = params[param]
                for body in (bodies if isinstance(bodies, (tuple, list)) else (bodies,)):
                    new.subgraphs.append(self.region(body, source))
            self.eqns.append(new)
        return [read(a) for a in jaxpr.outvars]


    def region(self, body, source: str) -> Graph:
        """A body as its own graph over fresh values (its equations inlined likewise)."""
        jaxpr, consts = compat.jaxpr_and_consts(body)
        outer_eqns, self.eqns = self.eqns, []
        invars = [self.new(v.aval) for v in jaxpr.invars]
        outvars = self.inline(jaxpr, consts, invars, source)
        graph = Graph(invars, outvars, self.eqns)
        self.eqns = outer_eqns
        return graph


def from_closed_jaxpr(closed) -> Graph:
    b = _Builder()
    jaxpr, consts = compat.jaxpr_and_consts(closed)
    invars = [b.new(v.aval) for v in jaxpr.invars]
    outvars = b.inline(jaxpr, consts, invars)
    graph = Graph(invars, outvars, b.eqns, b.values)
    return dce(graph)


def trip_counts(graph: Graph, mult: int = 1, out: dict | None = None) -> dict:
    """Times per step each loop-body equation and value runs: the product of the trip counts
    of the loops around it (``scan``: its ``length``; a ``while`` loop's count is not known
    from the program: taken as 1). What is absent runs once."""
    out = {} if out is None else out
    for e in graph.eqns:
        inner = mult * int(e.params.get("length", 1)) if e.prim.name == "scan" else mult
        for sub in e.subgraphs:
            if inner != 1:
                out.update(dict.fromkeys(sub.invars, inner))
                for be in sub.eqns:
                    out[be] = inner
                    out.update(dict.fromkeys(be.outvars, inner))
            trip_counts(sub, inner, out)
    return out


def hoisted_runs(graph: Graph, mult: int = 1, out: dict | None = None) -> dict:
    """Times per step each loop-body value is made once XLA's loop-invariant code motion has
    hoisted what it can out of each ``scan``: the body's consts, and what the body computes
    from them and literals alone (a reshard of a weight the loop reads included), run as often
    as the loop's own operands; every other body value once per trip (``trip_counts``). A
    ``while`` loop's count is not known (taken as 1, as there). What is absent runs once."""
    out = {} if out is None else out
    for e in graph.eqns:
        if not e.subgraphs:
            continue
        inner = mult * int(e.params.get("length", 1)) if e.prim.name == "scan" else mult
        nconsts = e.params.get("num_consts", 0) if e.prim.name == "scan" else 0
        for sub in e.subgraphs:
            for i, v in enumerate(sub.invars):
                out[v] = out.get(e.invars[i], 1) if i < nconsts else inner
            for be in sub.eqns:
                runs = [out.get(v, 1) for v in be.invars if not v.is_const]
                hoisted = not be.subgraphs and all(r < inner for r in runs)
                out.update(dict.fromkeys(be.outvars, max(runs, default=1) if hoisted else inner))
            hoisted_runs(sub, inner, out)
    return out


def loss_residuals(graph: Graph) -> tuple[set, set]:
    """``(forward, kept)``: the top-level equations the scalar floating outputs (the loss)
    depend on, and the values they make that other top-level equations read (the
    activations kept for the backward pass)."""
    producer = {o: e for e in graph.eqns for o in e.outvars}
    stack = [producer[v] for v in graph.outvars
             if not v.shape and v in producer and jax.dtypes.issubdtype(v.dtype, np.floating)]
    forward: set = set()
    while stack:
        e = stack.pop()
        if e not in forward:
            forward.add(e)
            stack += [producer[w] for w in e.invars if w in producer and producer[w] not in forward]
    kept = {w for e in graph.eqns if e not in forward for w in e.invars
            if w in producer and producer[w] in forward}
    return forward, kept


def dce(graph: Graph, top: bool = True) -> Graph:
    """Drop equations none of whose results reach an output (effects-free jaxprs only).
    Region bodies are cleaned too, but keep all their outputs (the loop needs them)."""
    live = {id(v) for v in graph.outvars}
    kept = []
    for eqn in reversed(graph.eqns):
        if any(id(o) in live for o in eqn.outvars):
            kept.append(eqn)
            live.update(id(v) for v in eqn.invars)
            eqn.subgraphs = [dce(sub, top=False) for sub in eqn.subgraphs]
    kept.reverse()
    out = Graph(graph.invars, graph.outvars, kept, graph.values)
    if top:
        _number(out)
    return out


def _number(graph: Graph) -> None:
    """Unique equation indices and jaxpr-style value names over the whole program."""
    values, seen = [], set()

    def add(v):
        if id(v) not in seen:
            seen.add(id(v))
            values.append(v)
    for v in graph.invars:
        add(v)
    for i, e in enumerate(graph.all_eqns()):
        e.index = i
        for v in e.invars:
            add(v)
        for sub in e.subgraphs:
            for v in sub.invars:
                add(v)
        for v in e.outvars:
            add(v)
    for v in graph.outvars:
        add(v)
    n = 0
    for v in values:
        if not v.is_const:
            v.name = _jaxpr_name(n)
            n += 1
    graph.values = values


def trace(flat_fun, avals) -> Graph:
    """Trace ``flat_fun(*leaves) -> list of leaves`` on abstract values."""
    closed = jax.make_jaxpr(flat_fun)(*avals)
    return from_closed_jaxpr(closed)
