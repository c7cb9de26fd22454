"""The public API contract (../shared/API.md): decorator and call forms, shardings of inputs
and outputs, placed inputs not copied, caching, reports."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import autoshard as ash

MESH = None


def mesh():
    global MESH
    if MESH is None:
        MESH = ash.make_mesh({"data": 2, "model": 4})
    return MESH


def ffn(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2


def args(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 32)).astype(np.float32),
            rng.normal(size=(32, 16)).astype(np.float32))


SPECS = (P("data", None), P(None, "model"), P("model", None))


def test_decorator_and_call_forms_agree_with_one_device():
    decorated = ash.parallelize(mesh=mesh(), in_specs=SPECS)(ffn)
    called = ash.parallelize(ffn, mesh=mesh(), in_specs=SPECS)
    a = args()
    np.testing.assert_allclose(decorated(*a), ffn(*a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(called(*a), ffn(*a), rtol=1e-5, atol=1e-5)


def test_output_sharding_is_the_chosen_layout_and_input_shardings_place_data():
    pf = ash.parallelize(ffn, mesh=mesh(), in_specs=SPECS)
    a = args()
    out = pf(*a)
    (out_sharding,) = jax.tree.leaves(pf.output_shardings(*a))
    assert out.sharding == out_sharding
    assert pf.report(*a).layouts["out"] == "[S(0), B]"
    in_sh = pf.input_shardings(*a)
    assert in_sh[1] == NamedSharding(mesh(), P(None, "model"))


def test_inputs_already_placed_are_not_copied(monkeypatch):
    pf = ash.parallelize(ffn, mesh=mesh(), in_specs=SPECS)
    a = args()
    placed = [jax.device_put(x, s) for x, s in zip(a, pf.input_shardings(*a))]
    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *xs, **kw: calls.append(1) or real(*xs, **kw))
    np.testing.assert_allclose(pf(*placed), ffn(*a), rtol=1e-5, atol=1e-5)
    assert calls == []
    pf(*a)          # numpy inputs are placed
    assert len(calls) == 3


def test_second_call_with_same_shapes_does_not_retrace():
    pf = ash.parallelize(ffn, mesh=mesh(), in_specs=SPECS)
    pf(*args(0))
    pf(*args(1))
    assert pf.trace_count == 1
    pf(*(x[:4] if i == 0 else x for i, x in enumerate(args(0))))
    assert pf.trace_count == 2


def test_static_argnums_and_pytree_specs():
    def f(params, x, scale):
        return (x @ params["w"]) * scale

    pf = ash.parallelize(f, mesh=mesh(), in_specs=({"w": P(None, "model")}, P("data"), None),
                         static_argnums=(2,))
    params = {"w": np.ones((16, 8), np.float32)}
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    np.testing.assert_allclose(pf(params, x, 3.0), f(params, x, 3.0), rtol=1e-6)
    np.testing.assert_allclose(pf(params, x, 2.0), f(params, x, 2.0), rtol=1e-6)
    assert pf.trace_count == 2


def test_report_contents_and_serialisation(tmp_path):
    pf = ash.parallelize(ffn, mesh=mesh(), in_specs=SPECS)
    report = pf.report(*[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args()])
    (c,) = report.collectives
    assert (c.kind, c.mesh_axes, c.shape, c.dtype) == ("all-reduce", ("model",), (4, 16), "float32")
    assert c.payload_bytes == 4 * 16 * 4 and c.wire_bytes == pytest.approx(2 * 3 / 4 * 256)
    assert "dot_general" in c.reason and "test_api.py" in c.source
    assert report.total_wire_bytes == pytest.approx(c.wire_bytes)
    text = str(report)
    assert "collectives" in text and "all-reduce" in text and "memory per device" in text
    d = json.loads(report.to_json(tmp_path / "r.json"))
    assert d["schema_version"] == 1 and d["collectives"][0]["kind"] == "all-reduce"
    assert (tmp_path / "r.json").exists()
    report.to_html(tmp_path / "r.html")
    assert "<table" in (tmp_path / "r.html").read_text()


def test_explain_names_the_annotation_and_the_op_chain():
    pf = ash.parallelize(ffn, mesh=mesh(), in_specs=(P("data", None), P(None, "model"), None))
    report = pf.report(*args())
    why = report.explain("args[2]")       # w2 was not annotated: it follows w1's column split
    assert "split over 'model'" in why
    assert "in_specs args[1] = PartitionSpec(None, 'model')" in why or "in_specs args[1]" in why
    assert "dot_general" in why and "test_api.py" in why
    with pytest.raises(KeyError):
        report.explain("no_such_value")


def test_unannotated_inputs_are_replicated_with_a_reason():
    pf = ash.parallelize(ffn, mesh=mesh())
    report = pf.report(*args())
    assert report.layouts["args[0]"] == "[B, B]"
    assert "no annotation reaches it" in report.explain("args[0]")
    assert report.collectives == []
