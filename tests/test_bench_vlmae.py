"""bench/vlmae.py end to end on a tiny shape: every mask ratio measured, fewer elements visible and
fewer FLOPs a pair the more is masked, the JSON keys."""
import json

import pytest

from bench import train as bench_train
from bench import vlmae as bench_vlmae

TINY = ["--device", "cpu", "--shape", "tiny", "--feature-dim", "32", "--regions", "8", "--images", "16",
        "--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1"]


@pytest.mark.parametrize("visual,elements", [("regions", 8), ("patches", 16)])
def test_the_vlmae_step_costs_less_the_more_is_masked(tmp_path, monkeypatch, visual, elements):
    monkeypatch.setattr(bench_train, "DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VLP_BENCH_RESULTS", str(tmp_path / "results"))
    result = bench_vlmae.main(TINY + ["--visual", visual])
    with open(tmp_path / "results" / f"vlmae_cpu_{visual}_tiny.json", encoding="utf-8") as f:
        assert json.load(f)["ratios"].keys() == result["ratios"].keys() == {"0.0", "0.5", "0.75"}
    ratios = [result["ratios"][r] for r in ("0.0", "0.5", "0.75")]
    assert [r["elements_per_image"] for r in ratios] == [elements] * 3
    assert [r["visible_per_image"] for r in ratios] == [elements, elements // 2, elements // 4]
    flops = [r["gflops_per_sample"] for r in ratios]
    assert flops[0] > flops[1] > flops[2] > 0
    assert all(0 < r["forward_gflops_per_sample"] < r["gflops_per_sample"] for r in ratios)
    assert all(r["samples_per_s"] > 0 and len(r["windows_samples_per_s"]) == 1 for r in ratios)
