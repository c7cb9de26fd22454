"""Issue #16, report side: a pipelined loop in the JSON (``to_dict()["pipeline"]``, validated by
docs/report_schema.json) and in the HTML page (a stages x ticks schedule chart)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard as ash

SCHEMA = pathlib.Path(__file__).resolve().parents[1] / "docs" / "report_schema.json"
S, M, L, B, D = 4, 2, 8, 8, 16


def _stack(w, x):
    def layer(h, wi):
        h = h + jnp.tanh(h @ wi)
        return h, None
    return jax.lax.scan(layer, x, w)[0]


@pytest.fixture(scope="module")
def rep():
    """Forward and gradient of an 8-layer scan, pipelined over stage=4 with 2 microbatches."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w, x = jax.random.normal(k1, (L, D, D)) / np.sqrt(D), jax.random.normal(k2, (B, D))
    mesh = ash.make_mesh({"stage": S}, devices=jax.devices()[:S])

    def f(w, x):
        return jax.value_and_grad(lambda w: _stack(w, x).sum())(w)
    return ash.parallelize(f, mesh=mesh, in_specs=(P("stage"), None), microbatches=M).report(w, x)


def test_pipeline_in_json_and_schema(rep, tmp_path):
    d = json.loads(rep.to_json(tmp_path / "r.json"))
    assert [p["direction"] for p in d["pipeline"]] == ["forward", "backward"]
    for p in d["pipeline"]:
        assert (p["axis"], p["stages"], p["microbatches"], p["schedule"]) == ("stage", S, M, "gpipe")
        assert p["ticks"] == M + S - 1 and p["bubble_fraction"] == pytest.approx((S - 1) / (M + S - 1))
        assert p["layers"] == L and p["layers_per_stage"] == L // S
        assert p["bytes_per_tick"] == (B // M) * D * 4
    jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema package (pip install -e '.[test]')")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(d)]
    assert not errors, errors[:5]
    bad = json.loads(json.dumps(d))
    bad["pipeline"][0]["extra"] = 1          # the schema forbids keys it does not describe
    assert not validator.is_valid(bad)
    del bad["pipeline"][0]["extra"], bad["pipeline"][0]["ticks"]
    assert not validator.is_valid(bad)
