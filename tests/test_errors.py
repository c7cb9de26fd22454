"""Issue #2 must-show 5: bad input gets a typed error naming what to change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash


def params():
    return {"w1": np.ones((8, 16), np.float32), "w2": np.ones((16, 8), np.float32)}


def model(x, p):
    return (x @ p["w1"]) @ p["w2"]


X = np.ones((4, 8), np.float32)


def call(in_specs, args=None, mesh_text="data=2,model=4"):
    pf = ash.parallelize(model, mesh=ash.make_mesh(mesh_text), in_specs=in_specs)
    return pf.report(*(args or (X, params())))


@pytest.mark.parametrize("spec,problem", [
    (P("modle", None), "unknown mesh axis 'modle'"),
    (P("model", "model"), "mesh axis 'model' is used twice"),
    (P(None, "model", None), "spec has 3 entries but the value has rank 2"),
    (P(("data", "data"),), "mesh axis 'data' is used twice"),
])
def test_bad_spec_names_path_shape_spec_and_mesh_axes(spec, problem):
    with pytest.raises(ash.SpecError) as info:
        call((P("data"), {"w1": spec, "w2": None}))
    msg = str(info.value)
    assert problem in msg
    assert "args[1]['w1']" in msg
    assert "(8, 16)" in msg
    assert str(spec) in msg
    assert "('data', 'model')" in msg
    assert "fix:" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, ash.ShardingError)


def test_in_specs_with_wrong_number_of_entries():
    with pytest.raises(ash.SpecError) as info:
        call((P("data"),))
    assert "in_specs has 1 entries but the function was called with 2" in str(info.value)


def test_in_specs_not_matching_argument_structure():
    with pytest.raises(ash.SpecError) as info:
        call((P("data"), {"w1": None, "w3": None}))
    msg = str(info.value)
    assert "args[1]" in msg and "in_specs[1] does not match the structure" in msg


def test_constraint_with_unknown_axis_names_the_source_line():
    def f(x):
        return ash.constrain(x * 2, P("nope"))
    pf = ash.parallelize(f, mesh=ash.make_mesh("data=8"), in_specs=(P("data"),))
    with pytest.raises(ash.SpecError) as info:
        pf.report(np.ones((8,), np.float32))
    assert "test_errors.py" in str(info.value) and "unknown mesh axis 'nope'" in str(info.value)


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ash.MeshError) as info:
        ash.make_mesh("data=3,model=4")
    assert "12 devices" in str(info.value) and f"{len(jax.devices())} are available" in str(info.value)
    with pytest.raises(ash.MeshError):
        ash.make_mesh("data=two")


def uses_callback(x):
    y = x * 2
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(y.shape, y.dtype), y)   # named in the error


def test_op_without_rule_under_strict_names_primitive_and_user_line():
    # Without strict=True such an op runs on replicated operands (tests/test_fallback.py).
    pf = ash.parallelize(uses_callback, mesh=ash.make_mesh("data=8"), in_specs=(P("data"),), strict=True)
    with pytest.raises(ash.UnsupportedPrimitiveError) as info:
        pf(np.ones((8, 4), np.float32))
    msg = str(info.value)
    assert "'pure_callback'" in msg
    line = uses_callback.__code__.co_firstlineno + 2
    assert f"test_errors.py:{line}" in msg, msg
    assert "workaround" in msg
    assert isinstance(info.value, NotImplementedError)


def test_calling_on_abstract_mesh_is_a_planning_error():
    pf = ash.parallelize(model, mesh=ash.abstract_mesh("data=2,model=4"), in_specs=(P("data"), None))
    report = pf.report(jax.ShapeDtypeStruct((4, 8), jnp.float32),
                       {"w1": jax.ShapeDtypeStruct((8, 16), jnp.float32),
                        "w2": jax.ShapeDtypeStruct((16, 8), jnp.float32)})
    assert report.layouts["args[0]"] == "[S(0), B]"
    with pytest.raises(ash.PlanningOnlyError):
        pf(X, params())
