"""bench/store_images.py on a tiny input: the figures it reports are there and consistent."""
import json
import sys

from bench import store_images


def test_store_images_bench_reports_time_and_bytes_per_size(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["store_images.py", "--images", "3", "--sizes", "64,128", "--repeats", "1"])
    result = store_images.main()
    assert json.loads((tmp_path / "store_images_cpu.json").read_text())["images"] == result["images"] == 3
    small, large = result["sizes"][64], result["sizes"][128]
    assert result["decode_ms_per_image"] > 0 and small["store_ms_per_image"] > 0
    assert 0 < small["mean_bytes"] < large["mean_bytes"]  # a larger stored side, more bytes
    assert large["bytes_per_feature_bytes"] == large["mean_bytes"] / store_images.FEATURE_BYTES
