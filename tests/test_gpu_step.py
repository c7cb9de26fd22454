"""Issue #15, item 4: benchmarks/gpu_step.py runs here with --small (a smoke test of the
script a GPU session will run: sizes, equality check, interleaved timing, the markdown row).
The timing ratio is asserted only on a real run (CPU step times are noise)."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def test_gpu_step_small_runs_equal_and_prints_a_row(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    results = tmp_path / "RESULTS.md"
    code = gpu_step.main(["--small", "--layers", "1", "--warmup", "1", "--rounds", "2", "--steps", "1",
                          "--append", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "one step: loss jit" in out and "timing ratio not asserted" in out
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[5] == cells[6]                       # the same loss through both paths
    text = results.read_text()
    assert gpu_step.HEADER in text and rows[0] in text
    # The full-size arithmetic: 0.94 B parameters, and a batch that fills 78 GiB.
    from autoshard.models import get_model
    from autoshard.models.gpt import param_count
    cfg = get_model("gpt").Config(vocab_size=32768, d_model=2048, n_heads=16, n_layers=16, seq_len=2048)
    n = param_count(cfg)
    assert 0.9e9 < n < 1.0e9
    mem = gpu_step.memory_model(cfg, n, 1)
    fixed = 16 * n
    batch = (int(0.9 * 78 * gpu_step.GiB) - fixed) // mem["per sequence"]
    assert batch >= 4
