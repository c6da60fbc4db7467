"""bench/scale.py end to end on a tiny corpus: the figures it reports are the pipeline's search
(exact = 1.0 recall by definition; IVF probing every list finds the exact top-5)."""
import json

from bench import scale


def test_scale_bench_reports_recall_size_and_speed(tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_BENCH_RESULTS", str(tmp_path))
    scale.main(["--corpus", "3000", "--queries", "40", "--nlist", "8", "--nprobes", "2", "8", "--nprobe", "8",
                "--pq-bytes", "16", "--train-rows", "1000", "--real-sentences", "0", "--results-name", "tiny"])
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["flat"]["recall_at_5"] == 1.0 and result["flat"]["index_bytes"] == 3000 * 384 * 4 + 128
    assert result["ivf"]["by_nprobe"]["8"]["recall_at_5"] == 1.0  # every list probed: exact
    assert 0 < result["ivf"]["by_nprobe"]["2"]["recall_at_5"] <= 1.0
    assert result["ivfpq"]["index_bytes"] < result["ivf"]["index_bytes"] / 5  # 16-byte codes vs 1,536-byte rows
    for kind in ("ivf", "ivfpq"):
        assert result[kind]["train_cpu_s"] > 0 and result[kind]["in_memory_at_nprobe"]["queries_per_cpu_s"] > 0
    assert 0 < result["realism_synthetic"]["mean_cosine_random_pairs"] < result["realism_synthetic"]["mean_cosine_query_top1"]
