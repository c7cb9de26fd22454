"""Issue #16, report side: a pipelined loop in the JSON (``to_dict()["pipeline"]``, validated by
docs/report_schema.json) and in the HTML page (a stages x ticks schedule chart)."""
import json
import pathlib
from html.parser import HTMLParser

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


class _PipeTables(HTMLParser):
    """Collects, per ``table.pipe``, its body rows as lists of cell texts ('' for a bubble)."""

    def __init__(self):
        super().__init__()
        self.tables, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("class") == "pipe":
            self.tables.append([])
        elif tag == "tr" and a.get("class") == "stage" and self.tables:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = [a.get("class"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell[1].strip() if self._cell[0] == "mb" else ("" if not self._cell[1].strip() else "?"))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None


def test_pipeline_schedule_in_html(rep, tmp_path):
    page = rep.to_html(tmp_path / "r.html")
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    parser = _PipeTables()
    parser.feed(page)
    # S=4 stages x M+S-1=5 ticks. Forward: stage s runs microbatch t-s at tick t (0 <= t-s < 2);
    # backward: stage 3 first, stage s runs microbatch t-(3-s). Written out by hand:
    forward = [["0", "1", "", "", ""],
               ["", "0", "1", "", ""],
               ["", "", "0", "1", ""],
               ["", "", "", "0", "1"]]
    backward = [["", "", "", "0", "1"],
                ["", "", "0", "1", ""],
                ["", "0", "1", "", ""],
                ["0", "1", "", "", ""]]
    assert parser.tables == [forward, backward]
    assert 'id="pipeline"' in page and "Bubble fraction <b>60.0%</b>" in page
    assert "each stage idles 3 of its 5 ticks" in page
    bytes_per_tick = (B // M) * D * 4
    from autoshard.report.fmt import fmt_bytes
    assert f"Bytes per tick: <b>{fmt_bytes(bytes_per_tick)}</b>" in page


def test_no_pipeline_section_without_a_pipeline(tmp_path):
    mesh = ash.make_mesh({"data": 2}, devices=jax.devices()[:2])
    x = jnp.ones((4, 8))
    page = ash.parallelize(lambda x: x * 2, mesh=mesh, in_specs=(P("data"),)).report(x).to_html(tmp_path / "r.html")
    assert "table class='pipe'" not in page and 'id="pipeline"' not in page
