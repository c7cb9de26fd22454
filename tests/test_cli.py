"""``autoshard report``, both forms, run in-process (the test process has 8 CPU devices)."""
from __future__ import annotations

import json
import textwrap

import pytest

from autoshard.cli import _literal, main, parse_link, parse_roles
from autoshard.compiler.cost_model import LinkModel

USER_MODULE = textwrap.dedent('''
    import jax


    def mlp(x, w1, w2):
        h = jax.nn.gelu(x @ w1)
        return h @ w2


    def params_fn(x, params):
        return x @ params["w"] + params["b"]
''')


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODULE)
    return path


def test_report_of_a_reference_model_writes_json_and_html(tmp_path, capsys):
    out_json, out_html = tmp_path / "gpt.json", tmp_path / "gpt.html"
    rc = main(["report", "--model", "gpt", "--mesh", "data=2,model=4", "--strategy", "dp_tp", "--no-xla",
               "--html", str(out_html), "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "collectives (all-reduce" in text and "memory per device: parameters" in text
    d = json.loads(out_json.read_text())
    assert d["schema_version"] == 1 and d["mesh"] == {"data": 2, "model": 4}
    assert {i["role"] for i in d["inputs"]} == {"parameters", "optimizer state", "batch"}
    assert d["total_wire_bytes"] > 0 and d["xla"] is None
    assert "device-grid" in out_html.read_text()


def test_report_of_a_users_function_on_abstract_shapes(user_file, tmp_path, capsys):
    out_json = tmp_path / "mlp.json"
    rc = main(["report", f"{user_file}:mlp", "--mesh", "data=2,model=4",
               "--in-specs", "P('data',None),P(None,'model'),None",
               "--shapes", "f32[8,16],f32[16,32],f32[32,16]",
               "--link", "model=25us,12.5GB/s", "--explain", "args[2]", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    # w2 follows w1's column split (Megatron): one all-reduce over model.
    assert "1 collectives (all-reduce 1x" in text
    assert "args[2]: [B, S(0)]" in text and "in_specs args[1] = P(None, 'model')" in text
    assert "user_model.py:6 (mlp)" in text and "return h @ w2" in text
    assert "XLA: arguments" in text                      # compiled for memory_analysis by default
    d = json.loads(out_json.read_text())
    (c,) = d["collectives"]
    assert (c["kind"], c["mesh_axes"], c["shape"]) == ("all-reduce", ["model"], [4, 16])
    assert c["time_s"] == pytest.approx(LinkModel(25e-6, 12.5e9).time("all-reduce", 4, 4 * 16 * 4))
    assert d["links"]["model"] == {"latency_s": 25e-6, "bandwidth_bytes_per_s": 12.5e9}
    assert d["xla"]["hlo_total_wire_bytes"] == pytest.approx(d["total_wire_bytes"])
    assert d["layouts"]["args[2]"] == "[B, S(0)]"


def test_report_of_a_function_with_pytree_args_on_an_abstract_mesh(user_file, tmp_path, capsys):
    rc = main(["report", f"{user_file}:params_fn", "--mesh", "data=2,model=4", "--abstract",
               "--html", str(tmp_path / "p.html"),
               "--in-specs", "P('data'), {'w': P(None, 'model'), 'b': None}",
               "--shapes", "f32[8,16], {'w': f32[16,32], 'b': f32[32]}",
               "--roles", "0=batch,1=parameters", "--explain", "args[1]['b']"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "0 collectives" in text and "XLA" not in text
    assert "args[1]['b']: [B, S(0)]" in text
    assert "class='device-grid'" in (tmp_path / "p.html").read_text()


def test_bad_command_lines_name_the_fix(user_file, capsys):
    assert main(["report", f"{user_file}:mlp", "--mesh", "data=2,model=4"]) == 2
    assert "needs --shapes" in capsys.readouterr().err
    assert main(["report", f"{user_file}:nope", "--shapes", "f32[2]"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert main(["report", f"{user_file}:mlp", "--shapes", "f32[8,16],__import__('os')"]) == 2
    assert "is not allowed here" in capsys.readouterr().err
    assert main(["report", f"{user_file}:mlp", "--mesh", "data=2,model=4", "--in-specs", "P('dta'),None,None",
                 "--shapes", "f32[8,16],f32[16,32],f32[32,16]"]) == 2
    assert "SpecError" in capsys.readouterr().err
    assert main(["report", f"{user_file}:mlp", "--mesh", "data=2,model=4", "--no-xla",
                 "--shapes", "f32[8,16],f32[16,32],f32[32,16]", "--explain", "zz"]) == 2
    assert "no value named 'zz'" in capsys.readouterr().err


def test_literal_and_option_parsers():
    from jax.sharding import PartitionSpec as P
    assert _literal("P('data',None),P(None,'model')", "--in-specs", False) == (P("data", None), P(None, "model"))
    assert _literal("P(('data','model'))", "--in-specs", False) == (P(("data", "model")),)
    (x, tree) = _literal("f32[], {'w': bf16[4, 8]}", "--shapes", True)
    assert x.shape == () and tree["w"].shape == (4, 8) and str(tree["w"].dtype) == "bfloat16"
    assert parse_link("data=2ms,1.5GB/s") == ("data", LinkModel(2e-3, 1.5e9))
    assert parse_link("model=10,100") == ("model", LinkModel(10e-6, 100e9))
    assert parse_roles("0=parameters,2=batch") == {0: "parameters", 2: "batch"}
