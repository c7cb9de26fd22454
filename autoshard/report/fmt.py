"""Text helpers of the report: byte and time units, a layout as a ``PartitionSpec``, and the
parts of a ``file.py:LINE (function)`` source string.

>>> fmt_bytes(1536), fmt_time(2.5e-5), fmt_time(0.0125)
('1.5 KiB', '25.0 us', '12.50 ms')
>>> spec_text(Layout((("data",), (), ("model", "expert"))))
"P('data', None, ('model', 'expert'))"
>>> parse_source("gpt.py:117 (CausalSelfAttention.__call__)")["module"]
'CausalSelfAttention'
"""
from __future__ import annotations

import re

from ..compiler.layout import Layout

_SOURCE = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?: \((?P<fn>.*)\))?$")


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_time(t: float) -> str:
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def spec_text(lay: Layout) -> str:
    """The ``P(...)`` a user would write for ``lay`` (trailing unsplit dims left out)."""
    entries = [None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in lay.dims]
    while entries and entries[-1] is None:
        entries.pop()
    return "P(" + ", ".join(repr(e) for e in entries) + ")"


def parse_source(source: str) -> dict:
    """``"gpt.py:117 (CausalSelfAttention.__call__)"`` -> file, line, function, module."""
    m = _SOURCE.match(source or "")
    if not m:
        return {"file": source or "<unknown>", "line": 0, "function": "", "module": ""}
    fn = m["fn"] or ""
    head = fn.split(".<locals>.")[0]
    first = head.split(".")[0]
    module = first if first[:1].isupper() else fn.split(".<locals>.")[-1]
    return {"file": m["file"], "line": int(m["line"]), "function": fn, "module": module}
