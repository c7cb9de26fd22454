"""Check the placement before lowering.

Expects: ``insert_collectives`` has run. Guarantees (or raises ``AssertionError``, an
internal bug, never user input): every value has a layout; every operand layout is reached
from its value's layout by a planned reshard; outputs are never partial nor uneven.
"""
from __future__ import annotations

name = "verify"


def run(program):
    sizes = program.axis_sizes
    # A layout is reached when a reshard ends there or passes through it (plans share prefixes).
    planned = {(r.value, lay) for r in program.reshards if not r.internal
               for lay in (r.dst, *(t.dst for t in r.transforms))}
    for eqn in program.graph.all_eqns():
        for i, v in enumerate(eqn.invars):
            want = program.operand_layouts[(eqn.index, i)]
            have = program.final_layout(v)
            assert have == want or (v, want) in planned, \
                f"operand {i} of {eqn.prim.name} at {eqn.source}: no reshard from {have} to {want}"
    for v, lay in zip(program.graph.outvars, program.out_layouts):
        assert not lay.partial, f"output layout {lay} is partial"
        assert not lay.uneven_dims(v.shape, sizes), f"output layout {lay} is uneven for {v.shape}"
    return program
