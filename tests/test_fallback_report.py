"""A primitive without a rule shows in the report as a ``no-rule-replicated`` warning whose
bytes are the wire bytes of replicating its operands, checked against the compiled HLO."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import PartitionSpec as P

import autoshard as ash
from autoshard.errors import UnsupportedPrimitiveWarning
from autoshard.report.hlo import parse_collectives

from _util import mesh

# A primitive nobody registered a rule for: x -> 2 * cumsum(x) along dim 0 (any split of dim 0
# would change the answer, so replicating it is what keeps the result right).
double_cumsum_p = Primitive("test_double_cumsum")
double_cumsum_p.def_impl(lambda x: 2 * jnp.cumsum(x, axis=0))
double_cumsum_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(double_cumsum_p, mlir.lower_fun(lambda x: 2 * jnp.cumsum(x, axis=0), multiple_results=False))


def test_fallback_is_a_report_warning_with_its_wire_bytes():
    m = mesh("data=8")
    x = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)

    def f(x):
        return double_cumsum_p.bind(jnp.sin(x))

    pf = ash.parallelize(f, mesh=m, in_specs=(P("data", None),))
    with pytest.warns(UnsupportedPrimitiveWarning, match="test_double_cumsum"):
        got = pf(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(f)(x)), rtol=1e-5)
    rep = pf.report(x)
    (w,) = [w for w in rep.warnings if w.kind == "no-rule-replicated"]
    assert "test_double_cumsum" in w.message and "register_rule" in w.fix
    assert "test_fallback_report.py" in w.source
    # Replicating sin(x) split 8 ways is one all-gather of an 8 x 16 float32 block: (n-1) * S.
    assert w.bytes == 7 * 8 * 16 * 4
    hlo = parse_collectives(pf.lower(x).compile().as_text(), m)
    assert [c.kind for c in hlo] == ["all-gather"]
    assert "no-rule-replicated" in [d["kind"] for d in rep.to_dict()["warnings"]]
