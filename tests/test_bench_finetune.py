"""bench/finetune.py end to end on a tiny model: positive figures for each part, the JSON written."""
import json

from bench import finetune as bench_finetune

TINY = ["--examples", "24", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--set", "model.init=random", "--set", "model.layers=1", "--set", "model.hidden=32", "--set", "model.heads=2",
        "--results-name", "tiny"]


def test_finetune_bench_measures_collate_step_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_BENCH_RESULTS", str(tmp_path))
    result = bench_finetune.main(TINY)
    for part in ("collate", "step", "eval"):
        assert result[part]["samples_per_s"] > 0
    assert result["eval"]["examples"] == 16 and result["model"] == "1 x 32"
    assert json.load(open(tmp_path / "tiny.json")) == json.loads(json.dumps(result))
