"""``ReportContext``: what every part of the report reads about one placed program.

Names, argument roles, loop trips, layer labels and per-device bytes of the values of a
finished ``ShardedProgram``, computed once and read through public methods by the report's
parts (records, warnings, explain, memory, text, HTML).

For the README's MLP (``x`` f32[8,16] split over data on mesh data=2, model=4):

>>> ctx = ReportContext(mlp.program(x, w1, b1, w2, b2))               # doctest: +SKIP
>>> v = ctx.program.graph.invars[0]                                    # doctest: +SKIP
>>> ctx.name_of(v), ctx.role_of("args[0]"), ctx.sbp(ctx.program.layouts[v])   # doctest: +SKIP
('args[0]', 'inputs', '[S(0), B]')
>>> ctx.local_bytes(v, ctx.program.layouts[v])     # 4 x 16 x 4 B       # doctest: +SKIP
256
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np

from .. import compat
from ..compiler.ir import trip_counts
from ..compiler.naming import module_path, spread_labels

#: Roles of the function's arguments, for the memory table.
ROLES = ("parameters", "optimizer state", "batch", "inputs")

_OPT_KEYS = re.compile(r"(^|[.\['])(mu|nu|count|momentum|trace|opt_state|ema|exp_avg|exp_avg_sq)(\b|')")
_BATCH_KEYS = re.compile(r"\['(tokens|labels|inputs|targets|images|image|label|x|y|batch|ids|input_ids|mask)'\]")


class ReportContext:
    """The program's values as the report names and measures them.

    ``roles``: ``{arg_index: role}`` with roles from ``ROLES`` (default: guessed from the
    argument paths: optimizer-state keys, integer or batch-named leaves, module paths).
    """

    def __init__(self, program, roles=None):
        self.program = program
        mesh = program.mesh
        self.mesh_axes = mesh.axis_names
        self.mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
        graph = program.graph
        self._names = self._value_names()
        self._by_name = {}
        for v, n in self._names.items():
            self._by_name.setdefault(n, v)
        for v, path in zip(graph.outvars, program.out_paths):
            self._by_name.setdefault(path, v)      # outputs that are inputs answer to both names
        #: Every equation, bodies of control flow right after the equation that holds them.
        self.eqns = list(graph.all_eqns())
        self._eqn_by_index = {e.index: e for e in self.eqns}
        self._producer = {o: e for e in self.eqns for o in e.outvars}
        #: ``while`` loops, whose trip count is not known from the program (taken as 1).
        self.unknown_trip_counts = sum(e.prim.name == "while" for e in self.eqns)
        self._trips = trip_counts(graph)
        # A pipelined layer loop runs its body ticks x L/S times per device (on microbatches).
        for pipe in program.pipelines.values():
            (body,) = self._eqn_by_index[pipe.eqn].subgraphs
            mult = pipe.ticks * (pipe.layers // pipe.stages)
            self._trips.update(dict.fromkeys(body.invars, mult))
            for be in body.eqns:
                self._trips[be] = mult
                self._trips.update(dict.fromkeys(be.outvars, mult))
            trip_counts(body, mult, self._trips)
        self._roles_given = dict(roles or {})
        self._roles = self._arg_roles()
        self._labels = self._layer_labels()
        self._consumers = None

    @property
    def roles_given(self) -> dict[int, str]:
        return dict(self._roles_given)

    @property
    def links(self) -> dict:
        """``{mesh axis: LinkModel}`` of the program's mesh."""
        return self.program.mesh.link_models

    # -- naming --------------------------------------------------------------------------
    def _value_names(self) -> dict:
        p = self.program
        names = {}
        for v in p.graph.values:
            names[v] = v.name or repr(v)
        for v, path in zip(p.graph.invars, p.in_paths):
            names[v] = path
        for v, path in zip(p.graph.outvars, p.out_paths):
            if v not in p.graph.invars:
                names[v] = path
        return names

    def name_of(self, v) -> str:
        return self._names.get(v, repr(v))

    def find(self, name: str):
        """The value called ``name`` (an input or output path, or a jaxpr name), or None."""
        return self._by_name.get(name)

    def lookup(self, name: str):
        """:meth:`find`, raising ``KeyError`` with the names that exist."""
        v = self.find(name)
        if v is None:
            raise KeyError(f"no value named {name!r}; names are input paths (args[0]...), output paths "
                           f"(out...), or jaxpr names listed in report.layouts")
        return v

    def names_at(self, source_substring: str, op: str | None = None) -> list[str]:
        return [self.name_of(o) for e in self.eqns
                if source_substring in e.source and (op is None or e.prim.name == op) for o in e.outvars]

    def sbp(self, lay) -> str:
        """``lay`` in SBP notation over the mesh axes (``[S(0), P(sum)]``)."""
        return lay.to_str(self.mesh_axes)

    def local_bytes(self, v, lay) -> int:
        """Bytes of ``v``'s block on one device under ``lay`` (uneven splits padded)."""
        sizes = self.program.axis_sizes
        shape = [math.ceil(s / math.prod(sizes[a] for a in axes)) for s, axes in zip(v.shape, lay.dims)]
        return int(math.prod(shape)) * compat.itemsize(v.dtype)

    # -- equations -----------------------------------------------------------------------
    def eqn_at(self, index: int):
        return self._eqn_by_index[index]

    def producer_of(self, v):
        """The equation that makes ``v`` (None for inputs and constants)."""
        return self._producer.get(v)

    def made_at(self, v) -> str:
        e = self._producer.get(v)
        return e.source if e is not None else "<input>"

    def consumer_index(self, r):
        """Index of the equation that consumes reshard ``r`` (None for outputs and post)."""
        if self._consumers is None:
            p, found = self.program, {}
            for e in self.eqns:
                where = f"{e.prim.name} at {e.source}"
                for i, v in enumerate(e.invars):
                    found.setdefault((id(v), p.operand_layouts.get((e.index, i)), where), e.index)
            self._consumers = found
        return self._consumers.get((id(r.value), r.dst, r.consumer))

    def trips_of(self, v) -> int:
        """Times per step the value ``v`` is made (1 outside loops)."""
        return self._trips.get(v, 1)

    # -- roles and layers ----------------------------------------------------------------
    def _arg_roles(self) -> dict[int, str]:
        p = self.program
        leaves: dict[int, list] = {}
        for v, path in zip(p.graph.invars, p.in_paths):
            m = re.match(r"^args\[(\d+)\]", path)
            if m:
                leaves.setdefault(int(m.group(1)), []).append((v, path))
        roles = {}
        for i, items in leaves.items():
            if i in self._roles_given:
                role = self._roles_given[i]
                if role not in ROLES:
                    raise ValueError(f"role {role!r} for argument {i} is not one of {ROLES}")
            elif any(_OPT_KEYS.search(path[len(f"args[{i}]"):]) for _, path in items):
                role = "optimizer state"
            elif all(jax.dtypes.issubdtype(v.dtype, np.integer) or compat.dtype_name(v.dtype) == "bool" for v, _ in items) \
                    or any(_BATCH_KEYS.search(path) for _, path in items):
                role = "batch"
            elif any(module_path(path) for _, path in items):
                role = "parameters"
            else:
                role = "inputs"
            roles[i] = role
        return roles

    def role_of(self, path: str) -> str:
        m = re.match(r"^args\[(\d+)\]", path)
        return self._roles.get(int(m.group(1)), "inputs") if m else "inputs"

    def _layer_labels(self) -> dict:
        """Each value's nearest parameter (in equation hops, either direction), as a module
        path: the per-layer grouping of the summary. Parameters and optimizer state seed it
        from the inputs, updated parameters from the outputs; only leaves of string-keyed
        pytrees (``params['blocks']['0']['attn']['q']['kernel']``) have a module path, so a
        function of plain arrays has no layers."""
        p = self.program
        seeds = [(v, module_path(path)) for v, path in zip(p.graph.invars, p.in_paths)
                 if self.role_of(path) != "batch" and jax.dtypes.issubdtype(v.dtype, np.floating)]
        seeds += [(v, module_path(path)) for v, path in zip(p.graph.outvars, p.out_paths)]
        return spread_labels(seeds, self.eqns)

    def layer_of_value(self, v) -> str:
        """The module path of ``v``'s nearest parameter (``blocks.0.attn.q``), or ``""``."""
        return self._labels.get(v, "")
