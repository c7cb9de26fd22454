"""Names of values that the layout search and the report share: the module path and layer of
a pytree leaf path, and the spread of such labels over a program's dataflow.

A leaf path is what ``jax.tree_util.keystr`` spells after the argument (``args[1]``) or
output (``out[0]``) root; its string keys are the module path of a parameter:

>>> module_path("args[1][0].mu['blocks']['0']['attn']['q']['kernel']")
'blocks.0.attn.q'
>>> layer_of("blocks.0.attn.q"), layer_of("lm_head")
('blocks.0.attn', 'lm_head')
>>> path_tokens("args[0]['w'][1].b")
[('key', 'w'), ('index', '1'), ('attr', 'b')]
"""
from __future__ import annotations

import re
from collections import deque

_TOKEN = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(-?\d+)\]|\.([A-Za-z_]\w*)")


def path_tokens(path: str) -> list[tuple[str, str]]:
    """Keys of a pytree path after its root (``args[1]`` / ``out[0]`` / ``out``), each
    ``("key", name)``, ``("index", digits)`` or ``("attr", name)``."""
    rest = re.sub(r"^(args|out)(\[\d+\])?", "", path)
    out = []
    for m in _TOKEN.finditer(rest):
        if m.group(1) is not None:
            out.append(("key", m.group(1)))
        elif m.group(2) is not None:
            out.append(("index", m.group(2)))
        else:
            out.append(("attr", m.group(3)))
    return out


def module_path(path: str) -> str | None:
    """``args[1][0].mu['blocks']['0']['attn']['q']['kernel']`` -> ``blocks.0.attn.q``: the
    string-keyed part of a leaf path (optimizer containers before it dropped), less the leaf."""
    toks = path_tokens(path)
    first = next((i for i, (k, _) in enumerate(toks) if k == "key"), None)
    if first is None:
        return None
    keys = [t for _, t in toks[first:]]
    return ".".join(keys[:-1] if len(keys) > 1 else keys)


def layer_of(mpath: str | None) -> str:
    """``blocks.0.attn.q`` -> ``blocks.0.attn``; ``lm_head`` -> ``lm_head``."""
    if not mpath:
        return ""
    parts = mpath.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 2])
    return parts[0]


def spread_labels(seeds, eqns) -> dict:
    """``{value: label}``: each value takes the label of the nearest seed, counted in equations
    between them in either direction (breadth first; on a tie the seed listed first wins).
    ``seeds``: ``(value, label)`` pairs (empty labels skipped); ``eqns``: the equations the
    labels travel through. Constants are never labelled (they belong to no layer)."""
    label, queue = {}, deque()
    for v, lab in seeds:
        if lab and v not in label:
            label[v] = lab
            queue.append(v)
    users: dict = {}
    producer: dict = {}
    for e in eqns:
        for v in e.invars:
            if not v.is_const:
                users.setdefault(v, []).append(e)
        for o in e.outvars:
            producer[o] = e
    while queue:
        v = queue.popleft()
        for e in (*users.get(v, ()), *((producer[v],) if v in producer else ())):
            for w in (*e.invars, *e.outvars):
                if not w.is_const and w not in label:
                    label[w] = label[v]
                    queue.append(w)
    return label
