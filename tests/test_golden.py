"""Golden SBP dumps (tests/golden/propagation.txt): the layouts the passes choose for small
programs, written down by hand from the rules."""
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash

GOLDEN = pathlib.Path(__file__).parent / "golden" / "propagation.txt"
f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

PROGRAMS = {
    "megatron_forward": (lambda x, w1, w2: jnp.tanh(x @ w1) @ w2,
                         (P("data", None), P(None, "model"), P("model", None)), (f32(8, 16), f32(16, 32), f32(32, 16))),
    # x's columns on data and w's rows on data and model: a contraction over both axes.
    "partial_flows_through_linear_ops": (lambda x, w: -(x @ w * 3.0),
                                         (P(None, ("data", "model")), None), (f32(8, 16), f32(16, 8))),
    # Activations (64x16) outweigh the weight (16x8): gathering the weight is cheapest.
    "fsdp_gathers_the_weight": (lambda x, w: x @ w, (P("data", None), P("data", None)), (f32(64, 16), f32(16, 8))),
    "column_split_flows_back_to_bias": (lambda x, w, b: x @ w + b,
                                        (P("data", None), P(None, "model"), None), (f32(8, 16), f32(16, 32), f32(32))),
    "constrained_row_parallel_reduce_scatters": (
        lambda h, w: ash.constrain(h @ w, P("data", "model")),
        (P("data", "model"), P("model", None)), (f32(8, 32), f32(32, 16))),
}


def parse_golden():
    cases = {}
    for block in GOLDEN.read_text().split("\n-----\n"):
        lines = [l for l in block.strip().splitlines() if l and not l.startswith("#")]
        name = lines[0].split(":", 1)[1].strip()
        mesh = lines[1].split(":", 1)[1].strip()
        cases[name] = (mesh, lines[2:])
    return cases


def dump(report) -> list[str]:
    lines = [f"{r.op} {' '.join(r.operands)} -> {' '.join(r.results)}" for r in report.equations]
    p = report.program
    for r in p.reshards:
        kinds = " ".join(f"{t.kind}({','.join(t.axes)})" for t in r.transforms if t.is_collective)
        if kinds:
            lines.append(f"reshard {report.name_of(r.value)}: {kinds}")
    return lines


CASES = parse_golden()


def test_every_golden_case_has_a_program():
    assert set(CASES) == set(PROGRAMS)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_golden_dump(name):
    mesh_text, expected = CASES[name]
    fn, specs, avals = PROGRAMS[name]
    pf = ash.parallelize(fn, mesh=ash.make_mesh(mesh_text), in_specs=specs)
    assert dump(pf.report(*avals)) == expected
