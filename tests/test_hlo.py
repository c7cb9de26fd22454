"""autoshard.report.hlo: collectives read back from compiled HLO (8 simulated CPU devices).

Every expected value below is derived from the program (its inputs, specs and the
collective it calls), never from the parser's output.
"""
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import autoshard  # noqa: F401
except ModuleNotFoundError:  # package not installed and no pytest `pythonpath` set
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from autoshard import compat
from autoshard.compiler.cost_model import wire_bytes
from autoshard.report.hlo import HloCollective, parse_collectives, summarize


def make_mesh(shape, names, order=None):
    devices = np.array(jax.devices())
    if order is not None:
        devices = devices[order]
    return Mesh(devices.reshape(shape), names)


def compile_shard_map(f, mesh, in_specs, out_specs, *args):
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                              check_vma=False))
    return g.lower(*args).compile().as_text()


def test_eight_devices():
    assert jax.device_count() == 8


# ------------------------------------------------------------- every kind, every mesh

MESHES = {
    "1d": ((8,), ("data",)),
    "2x4": ((2, 4), ("data", "model")),
    "4x2": ((4, 2), ("data", "model")),
    "2x2x2": ((2, 2, 2), ("a", "b", "c")),
}
# (mesh, axes the collective runs over, as the program names them)
AXES_CASES = [
    ("1d", ("data",)),
    ("2x4", ("model",)),
    ("2x4", ("data",)),
    ("4x2", ("data",)),
    ("2x2x2", ("b",)),
    ("2x2x2", ("c", "a")),   # named out of mesh order: reported in mesh order
]
# op -> (HLO kind, dtype of the program's data)
OPS = {
    "psum": ("all-reduce", np.int32),
    "pmax": ("all-reduce", np.float32),
    "all_gather": ("all-gather", np.bool_),
    "psum_scatter": ("reduce-scatter", np.float32),
    "all_to_all": ("all-to-all", np.float16),
    "ppermute": ("collective-permute", np.int8),
}


def _program(op, axes, n):
    if op == "psum":
        return lambda a: jax.lax.psum(a, axes)
    if op == "pmax":
        return lambda a: jax.lax.pmax(a, axes)
    if op == "all_gather":
        return lambda a: jax.lax.all_gather(a, axes, axis=1, tiled=True)
    if op == "psum_scatter":
        return lambda a: jax.lax.psum_scatter(a, axes, scatter_dimension=1, tiled=True)
    if op == "all_to_all":
        return lambda a: jax.lax.all_to_all(a, axes, split_axis=1, concat_axis=0, tiled=True)
    if op == "ppermute":
        return lambda a: jax.lax.ppermute(a, axes, [(i, (i + 1) % n) for i in range(n)])
    raise AssertionError(op)


@pytest.mark.parametrize("mesh_key,axes", AXES_CASES, ids=[f"{m}-{'+'.join(a)}" for m, a in AXES_CASES])
@pytest.mark.parametrize("op", list(OPS))
def test_kind_axes_shape_bytes(op, mesh_key, axes):
    shape, names = MESHES[mesh_key]
    mesh = make_mesh(shape, names)
    sizes = dict(zip(names, shape))
    n = math.prod(sizes[a] for a in axes)
    others = tuple(a for a in names if a not in axes)
    o = math.prod(sizes[a] for a in others)
    # Dim 0 is sharded over the axes the collective does not use; each device holds a
    # (2n, 3n) block, divisible by n wherever gather/scatter/all-to-all need it.
    local = (2 * n, 3 * n)
    kind, dtype = OPS[op]
    x = jnp.ones((o * local[0], local[1]), dtype)
    in_spec = P(others if others else None, None)
    with compat.ppermute_any_axis_order():     # ("c", "a") is out of mesh order on purpose
        text = compile_shard_map(_program(op, axes, n), mesh, in_spec, P(names), x)

    got = parse_collectives(text, mesh)

    payload = math.prod(local) * np.dtype(dtype).itemsize
    expected = HloCollective(
        kind=kind,
        mesh_axes=tuple(a for a in names if a in axes),
        shape=local,
        dtype=np.dtype(dtype).name,
        payload_bytes=payload,
        wire_bytes=wire_bytes(kind, n, payload),
        group_size=n,
    )
    assert got == [expected]


def test_wire_bytes_by_hand():
    # psum of a per-device f32[4, 4] over 'model' (4 devices): ring all-reduce sends
    # 2 * (4-1)/4 * 64 bytes.
    mesh = make_mesh((2, 4), ("data", "model"))
    text = compile_shard_map(lambda a: jax.lax.psum(a, "model"), mesh,
                             P("data", "model"), P("data", "model"), jnp.ones((8, 16)))
    (c,) = parse_collectives(text, mesh)
    assert (c.payload_bytes, c.wire_bytes, c.group_size) == (64, 96.0, 4)


@pytest.mark.parametrize("split_axis,concat_axis", [(0, 1), (1, 0), (0, 0)])
def test_all_to_all_whole_operand(split_axis, concat_axis):
    # XLA CPU lowers a tiled all_to_all to a tuple all-to-all of n slices; the record is
    # still one all-to-all of the whole per-device block.
    mesh = make_mesh((2, 4), ("data", "model"))
    local = (4, 16)
    x = jnp.ones((2 * local[0], local[1]), jnp.float32)
    text = compile_shard_map(
        lambda a: jax.lax.all_to_all(a, "model", split_axis, concat_axis, tiled=True),
        mesh, P("data", None), P("data", "model"), x)
    assert re.search(r"= \(f32\[[\d,]+\]\{[\d,]+\}(, f32\[[\d,]+\]\{[\d,]+\}){3}\) all-to-all\(", text)
    (c,) = parse_collectives(text, mesh)
    assert (c.kind, c.mesh_axes, c.shape, c.group_size) == ("all-to-all", ("model",), local, 4)
    assert c.payload_bytes == 4 * 16 * 4


def test_reduce_scatter_kept_on_cpu():
    mesh = make_mesh((2, 4), ("data", "model"))
    text = compile_shard_map(
        lambda a: jax.lax.psum_scatter(a, "model", scatter_dimension=0, tiled=True),
        mesh, P("data", None), P("data", "model"), jnp.ones((16, 8)))
    assert " reduce-scatter(" in text
    assert " all-reduce(" not in text
    assert summarize(parse_collectives(text, mesh)) == {("reduce-scatter", ("model",), (8, 8)): 1}


# ----------------------------------------------------------- combining, loops, dtypes

def test_two_psums_combined_into_tuple_all_reduce():
    mesh = make_mesh((2, 4), ("data", "model"))
    a, b = jnp.ones((8, 16), jnp.float32), jnp.ones((8,), jnp.float32)
    text = compile_shard_map(
        lambda a, b: (jax.lax.psum(a, "model"), jax.lax.psum(b * 2, "model")),
        mesh, (P("data", "model"), P("data")), (P("data", "model"), P("data")), a, b)
    # XLA's all-reduce combiner merged them: one all-reduce with a tuple result.
    tuple_ars = re.findall(r"= \([^)]*\) all-reduce\(", text)
    assert len(tuple_ars) == 1
    assert len(re.findall(r" all-reduce\(", text)) == 1
    got = parse_collectives(text, mesh)
    # a: (8,16) split (2,4) -> (4,4); b: (8,) split over data -> (4,)
    assert summarize(got) == {("all-reduce", ("model",), (4, 4)): 1,
                              ("all-reduce", ("model",), (4,)): 1}
    assert sorted(c.payload_bytes for c in got) == [4 * 4, 4 * 4 * 4]


def test_collective_in_loop_body_counts_once():
    mesh = make_mesh((2, 4), ("data", "model"))

    def f(a):
        return jax.lax.fori_loop(0, 5, lambda i, c: jax.lax.psum(c, "model") * 0.5, a)

    text = compile_shard_map(f, mesh, P("data", "model"), P("data", "model"), jnp.ones((8, 16)))
    assert re.search(r"\bwhile\(", text)
    assert summarize(parse_collectives(text, mesh)) == {("all-reduce", ("model",), (4, 4)): 1}


def test_bf16_is_computed_in_f32_on_cpu():
    # XLA CPU normalises bf16 collectives to f32; the parser reports what was compiled.
    mesh = make_mesh((2, 4), ("data", "model"))
    text = compile_shard_map(lambda a: jax.lax.psum(a, "model"), mesh,
                             P("data", "model"), P("data", "model"),
                             jnp.ones((8, 16), jnp.bfloat16))
    (c,) = parse_collectives(text, mesh)
    assert (c.dtype, c.payload_bytes) == ("float32", 4 * 4 * 4)


# -------------------------------------------------------- device numbering in groups

@pytest.mark.parametrize("order", [[1, 0, 3, 2, 5, 4, 7, 6], [0, 2, 4, 6, 1, 3, 5, 7]])
def test_permuted_device_order(order):
    # Device numbers in the HLO are positions in mesh.devices.flat, not Device.id:
    # the text does not change with the device order, and the axes come out right.
    # ([0,2,4,6,1,3,5,7] tells the two readings apart: read as Device.id, the groups
    # {0,1,2,3},{4,5,6,7} of a psum over 'model' would match no mesh axis.)
    plain = make_mesh((2, 4), ("data", "model"))
    mesh = make_mesh((2, 4), ("data", "model"), order)
    assert [d.id for d in mesh.devices.flat] == order
    x = jnp.ones((8, 16))
    programs = [
        (lambda a: jax.lax.psum(a, "model"), ("all-reduce", ("model",), (4, 4))),
        (lambda a: jax.lax.psum(a, "data"), ("all-reduce", ("data",), (4, 4))),
        (lambda a: jax.lax.all_gather(a, "model", axis=1, tiled=True),
         ("all-gather", ("model",), (4, 4))),
        (lambda a: jax.lax.ppermute(a, "model", [(0, 1), (1, 2), (2, 3), (3, 0)]),
         ("collective-permute", ("model",), (4, 4))),
    ]
    for f, expected in programs:
        text = compile_shard_map(f, mesh, P("data", "model"), P("data", "model"), x)
        groups = re.findall(r"(?:replica_groups|source_target_pairs)=\{[{}\d,]*\}", text)
        plain_text = compile_shard_map(f, plain, P("data", "model"), P("data", "model"), x)
        assert groups == re.findall(r"(?:replica_groups|source_target_pairs)=\{[{}\d,]*\}", plain_text)
        assert summarize(parse_collectives(text, mesh)) == {expected: 1}


# ---------------------------------------------- jit + NamedSharding (XLA-inserted ops)

def _compile_jit(f, mesh, in_specs, out_spec, *shapes):
    g = jax.jit(f, in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                out_shardings=None if out_spec is None else NamedSharding(mesh, out_spec))
    return g.lower(*[jnp.ones(s, jnp.float32) for s in shapes]).compile().as_text()


def test_jit_reduction_all_reduce():
    # sum over dim 0 of a (16, 16) array sharded P('model', 'data') on (2, 4): each
    # device reduces its (4, 8) block, then an all-reduce over 'model' of the (8,) partials.
    mesh = make_mesh((2, 4), ("data", "model"))
    text = _compile_jit(lambda a: a.sum(0), mesh, (P("model", "data"),), None, (16, 16))
    assert "replica_groups=mesh[" in text
    assert summarize(parse_collectives(text, mesh)) == {("all-reduce", ("model",), (8,)): 1}


def test_jit_reduction_over_two_axes_3d():
    # (16, 16) sharded P(('a','c'), 'b') on (2,2,2): block (4, 8); sum(0) all-reduces
    # the (8,) partials over ('a', 'c').
    mesh = make_mesh((2, 2, 2), ("a", "b", "c"))
    text = _compile_jit(lambda a: a.sum(0), mesh, (P(("a", "c"), "b"),), None, (16, 16))
    # XLA of jax 0.10 prints these replica groups as device_ids=(...), that of 0.12 as mesh
    # axes; the parser reads both.
    assert "device_ids=(" in text or "{'a','c'}" in text
    assert summarize(parse_collectives(text, mesh)) == {("all-reduce", ("a", "c"), (8,)): 1}


def test_jit_replicate_all_gathers():
    # P('model', 'data') -> P() of a (16, 16) array on (4, 2): each device holds an
    # (8, 4) block; XLA gathers one dim, then the other (either order is correct).
    mesh = make_mesh((4, 2), ("data", "model"))
    text = _compile_jit(lambda a: a + 1, mesh, (P("model", "data"),), P(), (16, 16))
    got = summarize(parse_collectives(text, mesh))
    data_first = {("all-gather", ("data",), (8, 4)): 1, ("all-gather", ("model",), (8, 16)): 1}
    model_first = {("all-gather", ("model",), (8, 4)): 1, ("all-gather", ("data",), (16, 4)): 1}
    assert got in (data_first, model_first)


def test_jit_resharding_over_part_of_an_axis_raises():
    # P('data','model') -> P('model','data') on (2, 4): XLA reshards with an all-to-all
    # over half of 'model' (groups of 2), which is no subset of mesh axes.
    mesh = make_mesh((2, 4), ("data", "model"))
    text = _compile_jit(lambda a: a * 2, mesh, (P("data", "model"),), P("model", "data"), (16, 32))
    assert "'axis_0':(2)2" in text or "'model':(2)2" in text      # jax 0.10 / 0.12 spelling
    with pytest.raises(ValueError, match=r"\[\[0, 1\], \[2, 3\], \[4, 5\], \[6, 7\]\]"):
        parse_collectives(text, mesh)


# --------------------------------------------- hand-written HLO: forms CPU does not emit

MESH_24 = ((2, 4), ("data", "model"))


def _parse(text, mesh_spec=MESH_24):
    return parse_collectives(text, make_mesh(*mesh_spec))


def test_iota_replica_groups():
    text = """
  %ar = f32[4,4]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = f32[8,4]{1,0} all-gather(%p), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
"""
    # [2,4]<=[8]: {0,1,2,3},{4,5,6,7} = 'model'; [4,2]<=[2,4]T(1,0): {0,4},{1,5},... = 'data'
    assert summarize(_parse(text)) == {("all-reduce", ("model",), (4, 4)): 1,
                                       ("all-gather", ("data",), (4, 4)): 1}


def test_empty_replica_groups_is_all_devices():
    text = "ROOT %r = f32[16]{0} all-reduce(f32[16]{0} %p), replica_groups={}, to_apply=%add\n"
    (c,) = _parse(text, ((2, 2, 2), ("a", "b", "c")))
    assert (c.mesh_axes, c.group_size, c.wire_bytes) == (("a", "b", "c"), 8, 2 * 7 / 8 * 64)


def test_async_starts_count_once_and_read_operands():
    text = """
ENTRY %main (p: f32[4,4]) -> f32[4,16] {
  %p = f32[4,4]{1,0} parameter(0)
  %all-gather-start = (f32[4,4]{1,0}, f32[4,16]{1,0}) all-gather-start(f32[4,4]{1,0} %p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}, use_global_device_ids=true, backend_config={"collective_backend_config":{"is_sync":false}}
  %all-gather-done = f32[4,16]{1,0} all-gather-done((f32[4,4]{1,0}, f32[4,16]{1,0}) %all-gather-start)
  %all-reduce-start = (f32[4,4]{1,0}, bf16[2]{0}) all-reduce-start(%p, %q), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %all-reduce-done = (f32[4,4]{1,0}, bf16[2]{0}) all-reduce-done(%all-reduce-start)
  %collective-permute-start = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, source_target_pairs={{0,4},{4,0},{1,5},{5,1}}
  %collective-permute-done = f32[4,4]{1,0} collective-permute-done(%collective-permute-start)
  %reduce-scatter-start = ((f32[4,16]{1,0}), f32[4,4]{1,0}) reduce-scatter-start(%x), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}, to_apply=%add
  %reduce-scatter-done = f32[4,4]{1,0} reduce-scatter-done(%reduce-scatter-start)
}
"""
    got = _parse(text)
    assert summarize(got) == {("all-gather", ("model",), (4, 4)): 1,
                              ("all-reduce", ("data",), (4, 4)): 1,
                              ("all-reduce", ("data",), (2,)): 1,
                              ("collective-permute", ("data",), (4, 4)): 1,
                              ("reduce-scatter", ("model",), (4, 16)): 1}
    bf16 = [c for c in got if c.shape == (2,)][0]
    assert (bf16.dtype, bf16.payload_bytes) == ("bfloat16", 4)


def test_tuple_all_gather_and_nested_computations():
    text = """
%fused (a: f32[2]) -> f32[2] {
  ROOT %inner = f32[2]{0} all-reduce(%a), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}

%body (c: f32[2]) -> f32[2] {
  %ag = (f32[8,3]{1,0}, s32[8]{0}, /*index=2*/pred[4,4]{1,0}) all-gather(%x, %y, %z), replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={0}
}
"""
    got = _parse(text, ((4, 2), ("data", "model")))
    # {0,1},{2,3},.. is 'model' on (4, 2); {0,2,4,6},{1,3,5,7} is 'data'.
    assert summarize(got) == {("all-reduce", ("model",), (2,)): 1,
                              ("all-gather", ("data",), (2, 3)): 1,
                              ("all-gather", ("data",), (2,)): 1,
                              ("all-gather", ("data",), (1, 4)): 1}
    assert {c.dtype for c in got} == {"float32", "int32", "bool"}


def test_array_all_to_all_and_mesh_form():
    text = """
  %a2a = f32[8,8]{1,0} all-to-all(%p), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={1}
  %ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=(0,4,1,5,2,6,3,7) {'axis_1'}, to_apply=%add
"""
    # a2a: mesh [2,4] in iota order grouped along 'y' -> {0,1,2,3},{4,5,6,7} = 'model'.
    # ar: devices [[0,4],[1,5],[2,6],[3,7]] grouped along axis_1 -> {0,4},{1,5},... = 'data'.
    assert summarize(_parse(text)) == {("all-to-all", ("model",), (8, 8)): 1,
                                       ("all-reduce", ("data",), (4,)): 1}


@pytest.mark.parametrize("refs,axes", [
    # device order [2,4]T(1,0) = 0,4,1,5,2,6,3,7; (1)2 is the major factor of size 2:
    # [[0,4,1,5],[2,6,3,7]] grouped down the columns -> {0,2},{4,6},{1,3},{5,7} = 'b'
    ("'axis_0':(1)2", ("b",)),
    # (2)4 is the minor factor of size 4 -> rows {0,4,1,5},{2,6,3,7} = ('a','c')
    ("'axis_0':(2)4", ("a", "c")),
])
def test_mesh_form_sub_axes(refs, axes):
    text = (f"%ar = f32[4]{{0}} all-reduce(%p), replica_groups=mesh['axis_0'=8], "
            f"device_ids=([2,4]T(1,0)) {{{refs}}}, to_apply=%add\n")
    (c,) = _parse(text, ((2, 2, 2), ("a", "b", "c")))
    assert (c.mesh_axes, c.group_size) == (axes, math.prod(2 for _ in axes))


def test_mesh_form_two_sub_axes_of_one_axis():
    # axis of 8 in iota order cut into (1)2, (2)2, (4)2; grouping over the outer two
    # leaves the middle factor fixed: {0,1,4,5},{2,3,6,7} = ('a','c') on (2,2,2).
    text = ("%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['axis_0'=8] "
            "{'axis_0':(1)2,'axis_0':(4)2}, to_apply=%add\n")
    (c,) = _parse(text, ((2, 2, 2), ("a", "b", "c")))
    assert c.mesh_axes == ("a", "c")


def test_mesh_form_names_of_a_refined_mesh():
    # JAX 0.12 writes a refined mesh's own axis names (autoshard's sub-axes, spelt as Shardy
    # does) inside quotes: 'model:(4)2' is an axis name, not a sub-axis of 'model'.
    text = ("%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['model:(1)4'=4,'model:(4)2'=2] "
            "{'model:(4)2'}, to_apply=%add\n")
    (c,) = _parse(text, ((4, 2), ("model:(1)4", "model:(4)2")))
    assert (c.mesh_axes, c.group_size) == (("model:(4)2",), 2)


def test_tuple_all_to_all_whose_source_is_not_found():
    # Chunks from unrelated producers: one record, leading dim scaled by n, bytes exact.
    text = ("%a = (f32[1,4,8]{2,1,0}, f32[1,4,8]{2,1,0}) all-to-all(%u, %v), "
            "replica_groups={{0,4},{1,5},{2,6},{3,7}}\n")
    (c,) = _parse(text)
    assert (c.kind, c.mesh_axes, c.shape, c.payload_bytes, c.group_size) == \
        ("all-to-all", ("data",), (2, 4, 8), 2 * 4 * 8 * 4, 2)


def test_unmatched_groups_raise_with_groups_in_message():
    text = "%r = f32[4]{0} all-reduce(%p), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add\n"
    with pytest.raises(ValueError, match=r"\[\[0, 1\], \[2, 3\], \[4, 5\], \[6, 7\]\]"):
        _parse(text)
    # ...but the same groups are the 'model' axis of a (4, 2) mesh.
    assert _parse(text, ((4, 2), ("data", "model")))[0].mesh_axes == ("model",)


def test_no_collectives_and_summarize():
    assert parse_collectives("HloModule m\nENTRY %e () -> f32[] {\n  ROOT %c = f32[] constant(1)\n}\n",
                             make_mesh(*MESH_24)) == []
    c = HloCollective("all-reduce", ("data",), (2,), "float32", 8, 8.0, 2)
    assert summarize([c, c]) == {("all-reduce", ("data",), (2,)): 2}
