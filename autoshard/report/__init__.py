"""The sharding report: reads a finished ``ShardedProgram`` (and, when given, XLA's executable
of it) and says what every value's layout is, why, and what it costs.

Imports only ``autoshard.compiler``; the runtime hands a report what it cannot compute from
the plan (a callable that compiles, the mesh, the traced function's file).

>>> rep = pf.report(params, opt_state, batch)       # a ShardingReport   # doctest: +SKIP
>>> rep.total_wire_bytes, rep.warnings, rep.explain("args[0]['w']")     # doctest: +SKIP

Modules: ``report`` (the ``ShardingReport`` facade), ``context`` (value names, roles, loop
trips, per-device bytes), ``records`` (collective, equation and warning records),
``warnings``, ``explain`` (provenance chains), ``memory`` and ``schedule`` (XLA CPU's memory
model), ``strategy`` (step estimates, layer strategies in words), ``text``, ``html``, ``hlo``
(collectives parsed from compiled HLO), ``fmt`` (units and spec text).
"""
from .context import ROLES, ReportContext
from .records import CollectiveRecord, EquationRow, ReportWarning
from .report import SCHEMA_VERSION, ShardingReport
from .warnings import DEFAULT_THRESHOLDS, MiB, WARNING_KINDS

__all__ = ["ShardingReport", "ReportContext", "CollectiveRecord", "EquationRow", "ReportWarning",
           "ROLES", "DEFAULT_THRESHOLDS", "WARNING_KINDS", "SCHEMA_VERSION", "MiB"]
