"""Every ``Primitive`` the installed JAX defines has a sharding rule, is inlined as a call, or
has a stated reason (``autoshard/compiler/ops/coverage.py``): a new JAX release's primitives
fail here until one of the three is given.

The primitives are found by walking every module under ``jax._src`` with ``pkgutil`` (lax,
ad_util, prng, random, custom_derivatives, control flow, pjit, numpy, ad_checkpoint,
callbacks, pallas, ...), in a child process: importing every module has side effects the
rest of the suite should not see.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import jax
import pytest

from autoshard.compiler import ops
from autoshard.compiler.ops import coverage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def classified():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "autoshard.compiler.ops.coverage"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert data["jax"] == jax.__version__
    return data["primitives"]


def test_every_primitive_has_a_rule_or_a_reason(classified):
    kinds = collections.Counter(p["kind"] for p in classified.values())
    print(f"\njax {jax.__version__}: {len(classified)} primitives: {kinds['rule']} rules, "
          f"{kinds['inlined']} inlined calls, {kinds['reason']} reasons, {kinds['uncovered']} uncovered")
    uncovered = {n: p["modules"] for n, p in classified.items() if p["kind"] == "uncovered"}
    assert not uncovered, (
        f"{len(uncovered)} primitives of jax {jax.__version__} have neither a rule nor a reason "
        f"(add a rule in autoshard/compiler/ops/ with op-database samples, or a reason in "
        f"coverage.REASONS): {uncovered}")


def test_the_walk_finds_the_primitives_users_hit(classified):
    """The walk is not vacuous: it sees lax, control flow, random, custom derivatives, pjit,
    remat, callbacks and the new primitives of this JAX."""
    for name in ("add", "dot_general", "scan", "while", "cond", "random_bits", "custom_jvp_call",
                 "custom_vjp_call", "jit", "remat2", "pure_callback", "debug_callback", "stack", "unstack",
                 "sharding_constraint", "pallas_call"):
        assert name in classified, name
    assert len(classified) > 300
    if "one_minus_square" in classified:                 # jax 0.12
        assert classified["one_minus_square"]["kind"] == "rule"


def test_reasons_name_only_primitives_without_rules():
    """A reason never shadows a rule or an inlined call (stale entries fail here)."""
    from autoshard.compiler import ir
    ops._load_families()
    assert not set(coverage.REASONS) & set(ops.RULES)
    assert not set(coverage.REASONS) & set(ir._CALL_BODY_PARAM)
