"""Planning without devices (issue #8), continued: the 1T GPT's per-device activations against
the fsdp_tp formulas (no replicated [B, H, T, T] temporaries), loop operands no body reads,
the unrolled abstract model, and ``lower()`` on a 2,048-device abstract mesh.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.compiler.mesh import refined_mesh
from autoshard.compiler import ir
from autoshard.errors import PlanningOnlyError
from autoshard.models import gpt

import test_planning

MESH_1T = {"data": 16, "fsdp": 16, "model": 8}


def _plan(cfg, mesh, strategy, batch_size):
    rep, pf, *args = test_planning._plan(cfg, mesh, strategy, batch_size)
    return rep, pf, args


def _analytic_activations(cfg, mesh_shape, batch_size, kept=(2, 6)):
    """Per-device bytes the fsdp_tp GPT step keeps from its forward pass for the backward pass
    (JAX's autodiff residuals, no remat), from the architecture alone.

    The batch is split over data x fsdp (``b`` rows), heads and the FFN's hidden dim over
    model (Megatron), the residual stream [b, T, D] is whole on every model rank. Per layer:
    the softmax's exp and probabilities, ``kept[0]`` [b, H/m, T, T] score tensors; q (scaled), k,
    v and the attention output, four [b, T, D/m]; the FFN's up projection and GELU (tanh)
    intermediates, ``kept[1]`` [b, T, F/m] (JAX 0.10 keeps two and six; 0.12.1's softmax and
    tanh derivatives one fewer of each: ``residuals_kept``); per layernorm (float32 inside) three [b, T, D] float32
    and its [b, T, D] output. After the layers: the final layernorm (three [b, T, D] float32)
    and the cross-entropy's two [b, T, V] float32."""
    n_d, n_f, n_m = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["model"]
    d, f, v, t, heads = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.seq_len, cfg.n_heads
    item = jnp.dtype(cfg.dtype).itemsize
    b = batch_size // (n_d * n_f)
    score = b * (heads // n_m) * t * t * item
    per_layer = (kept[0] * score + 4 * b * t * (d // n_m) * item + kept[1] * b * t * (f // n_m) * item
                 + 2 * (3 * b * t * d * 4 + b * t * d * item))
    top = 3 * b * t * d * 4 + 2 * b * t * v * 4
    return {"score": score, "activations_for_backward": cfg.n_layers * per_layer + top,
            # The largest stacked residual: a layernorm's float32 [L, b, T, D] (or the scores').
            "largest_temporary": cfg.n_layers * max(b * t * d * 4, score)}


def residuals_kept(rep, cfg, batch_size) -> tuple[int, int]:
    """How many stacked score tensors [L, B, H, T, T] and FFN tensors [L, B, T, F] the installed
    JAX's autodiff keeps for the backward pass, read off the traced program (the rest of
    ``_analytic_activations`` is the architecture's): (2, 6) on JAX 0.10; (1, 5) on 0.12.1,
    whose softmax and tanh derivatives keep one fewer each."""
    _, kept = ir.loss_residuals(rep.program.graph)
    shapes = [tuple(v.shape) for v in kept]
    L, T = cfg.n_layers, cfg.seq_len
    scores = shapes.count((L, batch_size, cfg.n_heads, T, T))
    ffn = shapes.count((L, batch_size, T, cfg.ff_dim))
    assert scores in (1, 2) and ffn in (5, 6), (scores, ffn)
    return scores, ffn


def _replicated_values(rep):
    """(local bytes, value, consumer primitives) of every intermediate whose final layout
    splits nothing and is not partial."""
    p = rep.program
    users = collections.defaultdict(set)
    for e in p.graph.all_eqns():
        for x in e.invars:
            users[id(x)].add(e.prim.name)
    out = []
    for e in p.graph.all_eqns():
        for o in e.outvars:
            lay = p.final_layout(o)
            if not any(lay.dims) and not lay.partial:
                out.append((rep.context.local_bytes(o, lay), o, users[id(o)]))
    return out


def test_1t_plan_splits_the_attention_mask_like_the_scores_and_matches_the_formulas():
    cfg = gpt.SIZES["1t"]
    rep, _, _ = _plan(cfg, ash.abstract_mesh(MESH_1T), "fsdp_tp", 256)
    mem = rep.memory()
    want = _analytic_activations(cfg, MESH_1T, 256, kept=residuals_kept(rep, cfg, 256))
    # Before: the where's [B, H, T, T] bfloat16 residual, hoisted out of the layer loop,
    # was planned whole on every device (320 GiB) for a backward loop that never reads it.
    big = [(n, o.shape, us) for n, o, us in _replicated_values(rep) if n > want["score"]]
    # The only exception: the embedding gradient's zero accumulator [V, D], which the
    # scatter-add of batch-split rows needs whole (its result is a partial sum).
    assert all(us == {"scatter-add"} and shape == (cfg.vocab_size, cfg.d_model)
               for _, shape, us in big), big
    # Every score-shaped value ([B, H, T, T], stacked or not) is split over batch and heads.
    tail = (256, cfg.n_heads, cfg.seq_len, cfg.seq_len)
    scores = [o for e in rep.program.graph.all_eqns() for o in e.outvars if o.shape[-4:] == tail]
    assert scores
    for o in scores:
        dims = rep.program.final_layout(o).dims[-4:]
        assert set(dims[0]) == {"data", "fsdp"} and dims[1] == ("model",), (o, dims)
    assert mem["activations_for_backward"] == pytest.approx(want["activations_for_backward"], rel=0.05)
    assert mem["largest_temporary"] == pytest.approx(want["largest_temporary"], rel=0.05)
    assert mem["largest_temporary"] < 30 * 2**30            # was 320 GiB


def test_loop_operands_no_body_reads_are_dropped():
    # Differentiating the scanned layers hoists the mask's where-residuals out of the loop;
    # the backward loop reads only some of them. None of the rest may stay in the program.
    cfg = dataclasses.replace(gpt.SIZES["test"], scan_layers=True)
    rep, _, _ = _plan(cfg, ash.abstract_mesh("data=2,fsdp=2,model=2"), "fsdp_tp", 8)
    for e in rep.program.graph.all_eqns():
        if e.prim.name == "scan":
            (body,) = e.subgraphs
            read = {id(v) for v in body.outvars} | {id(v) for be in body.eqns for v in be.invars}
            nc, nk = e.params["num_consts"], e.params["num_carry"]
            assert all(id(v) in read for i, v in enumerate(body.invars) if not nc <= i < nc + nk)
    score = (8, cfg.n_heads, cfg.seq_len, cfg.seq_len)
    for n, o, _ in _replicated_values(rep):
        assert o.shape != score, o


def test_while_loop_without_its_dead_operand_runs_as_before():
    mesh = ash.make_mesh("data=2,model=4")

    def f(x, w):
        def body(c):
            i, y = c
            unused = jnp.sin(w) * 3.0        # a body operand nothing reads once DCE'd
            del unused
            return i + 1, y * 0.5 + 1.0
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1].sum()

    x, w = jnp.arange(16.0).reshape(8, 2), jnp.ones((64, 64))
    pf = ash.parallelize(f, mesh=mesh, in_specs=(P("data", None), None))
    (loop,) = [e for e in pf.program(x, w).graph.eqns if e.prim.name == "while"]
    assert loop.params["body_nconsts"] == 0 and len(loop.invars) == 2
    np.testing.assert_allclose(pf(x, w), f(x, w), rtol=1e-6)


def test_unrolled_abstract_init_is_init_without_arrays():
    cfg = dataclasses.replace(gpt.SIZES["test"], n_layers=3)
    real_def, real = gpt.init(cfg)
    model_def, abstract = gpt.abstract_init(cfg)
    assert model_def.graphdef == real_def.graphdef
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    assert shapes(real) == shapes(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


# ----------------------------------------------------------------------------- lower()

_OP = re.compile(r'"stablehlo\.(all_reduce|all_gather|reduce_scatter|all_to_all|collective_permute)"')
_MESH_AXES = re.compile(r'replica_groups = #stablehlo\.replica_group_mesh_axes<mesh = @\w+, axes = \[(.*?)\]>')
_GROUPS = re.compile(r'replica_groups = dense<(?:"0x([0-9A-Fa-f]+)"|(\[[^>]*\]))> : tensor<(\d+)x(\d+)xi64>')


def _collectives_of_stablehlo(text, mesh):
    """Counter of (kind, mesh axes) of the StableHLO collectives, the axes read back from
    each op's replica groups (device ids in mesh order, row-major)."""
    names, sizes = tuple(mesh.axis_names), tuple(mesh.shape[a] for a in mesh.axis_names)
    ids = np.arange(math.prod(sizes)).reshape(sizes)

    def groups_of(axes):
        k = [names.index(a) for a in axes]
        rest = [i for i in range(len(names)) if i not in k]
        return frozenset(map(tuple, ids.transpose(rest + k).reshape(-1, math.prod(sizes[i] for i in k)).tolist()))
    axes_of = {groups_of(ax): ax for r in range(1, len(names) + 1) for ax in itertools.permutations(names, r)}
    found = collections.Counter()
    for line in text.splitlines():
        op = _OP.search(line)
        if not op:
            continue
        mesh_axes = _MESH_AXES.search(line)      # jax 0.12 names the mesh axes themselves
        if mesh_axes:
            found[(op[1].replace("_", "-"), tuple(re.findall(r'axis_ref<name = "([^"]+)"', mesh_axes[1])))] += 1
            continue
        g = _GROUPS.search(line)                 # jax 0.10: device ids
        hx, listed, n_groups, size = g.groups()
        flat = (np.frombuffer(bytes.fromhex(hx), dtype="<i8") if hx
                else np.array([int(x) for x in re.findall(r"-?\d+", listed)]))
        groups = frozenset(map(tuple, flat.reshape(int(n_groups), int(size)).tolist()))
        found[(op[1].replace("_", "-"), axes_of[groups])] += 1
    return found


def test_lower_on_a_2048_device_abstract_mesh():
    mesh = ash.abstract_mesh(MESH_1T)
    rep, pf, args = _plan(gpt.SIZES["test"], mesh, "fsdp_tp", 256)
    lowered = pf.lower(*args)
    assert isinstance(lowered, jax.stages.Lowered)
    text = lowered.as_text()
    assert "mhlo.num_partitions = 2048" in text
    # Every collective of the plan is in the program, over the mesh axes the plan says.
    # The plan may run on a refined mesh (an axis cut into sub-axes for a reshape that does not
    # divide by it, passes/refine_mesh.py); the program's replica groups are over that mesh.
    found = _collectives_of_stablehlo(text, refined_mesh(mesh, pf.program(*args).mesh))
    assert sum(found.values()) == len(_OP.findall(text)) == len(rep.collectives)
    assert found == collections.Counter((c.kind, tuple(c.mesh_axes)) for c in rep.collectives)
    assert {a for _, axes in found for a in axes} >= {"fsdp", "data"}
    assert any(a == "model" or a.startswith("model:") for _, axes in found for a in axes)
    with pytest.raises(PlanningOnlyError, match="abstract mesh"):
        lowered.compile()
    with pytest.raises(PlanningOnlyError):
        pf(*args)
