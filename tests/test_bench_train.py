"""bench/train.py end to end on a tiny shape: valid synthetic shards, positive figures, the JSON keys."""
import json
import os

import numpy as np
import pytest
import webdataset as wds

from bench import train as bench_train
from schemas import validate_sample
from vlp_train.data import decode, expand_shards

TINY = ["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--feature-dim", "64",
        "--images", "32", "--batch-size", "8", "--num-workers", "1", "--shuffle-buffer", "8",
        "--steps", "3", "--warmup", "1", "--repeats", "1"]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VLP_BENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def read(folder, name):
    with open(folder / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def test_synthetic_shards_are_valid_corpus_samples(results):
    shards = bench_train.synthetic_corpus(images=12, regions=36, feature_dim=64, per_shard=5)
    urls = expand_shards(shards)
    assert len(urls) == 3
    samples = [decode(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]
    assert len(samples) == 12
    for s in samples:
        meta = s["meta"]
        validate_sample(meta, s["feats"].astype(np.float16))
        assert s["feats"].shape == (36, 64) and len(meta["sentences"]) == bench_train.SENTENCES_PER_IMAGE
        for sentence in meta["sentences"]:
            assert 10 <= len(sentence["text"].split()) <= 24
            linked = [p for p in sentence["phrases"] if p["region"] is not None]
            assert 2 <= len(linked) <= 4
            assert all(meta["tags"][p["region"]] == p["tag"] and 0.5 <= p["similarity"] <= 0.95 for p in linked)
    assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(urls[0])), "tag_vocab.json"))


def test_all_three_measurements(results):
    result = bench_train.main(TINY + ["--results-name", "tiny"])
    assert read(results, "tiny") == json.loads(json.dumps(result))
    for key in ("device", "command", "shape", "schedule", "sample", "target_samples_per_s", "peak_rss_mb"):
        assert key in result
    assert result["schedule"] == "round_robin" and result["steps"] == 3
    assert result["shape"] == {"layers": 1, "hidden": 32, "heads": 2, "parameters": result["shape"]["parameters"],
                               "regions": 36, "feature_dim": 64, "text_len": 40, "batch": 8, "num_workers": 1,
                               "shuffle_buffer": 8, "images": 32, "visual": "regions"}
    for part in ("loader", "step", "e2e"):
        assert result[f"{part}_samples_per_s"] > 0
        assert all(rate > 0 for rate in result[part]["windows_samples_per_s"])
        assert result[part]["warmup_s"] > 0
    step = result["step"]
    assert set(step["model_gflops_per_sample"]) == {"rt", "rp", "is"}
    assert step["model_tflops_per_s"] == pytest.approx(step["mean_gflops_per_sample"] * step["samples_per_s"] / 1e3)
    assert "peak_gpu_memory_mb" not in result  # CPU: peak RSS instead


@pytest.mark.parametrize("part", ["loader", "step", "e2e"])
def test_one_measurement_mixed(results, part):
    result = bench_train.main(TINY + ["--only", part, "--schedule", "mixed", "--itm-weighting", "off",
                                      "--steps", "2"])
    assert read(results, f"train_cpu_{part}")[f"{part}_samples_per_s"] > 0  # a partial run: its own file
    assert {"loader", "step", "e2e"} & set(result) == {part}
    assert result["steps"] == 2  # mixed: no rounding to whole rounds of the three tasks
    assert result["schedule"] == "mixed" and "3B samples" in result["sample"] and not result["itm_weighting"]


def test_flops_count_the_itm_weight_forward_and_nothing_is_timed(results):
    on = bench_train.main(TINY + ["--only", "flops"])["flops"]["model_gflops_per_sample"]
    off = bench_train.main(TINY + ["--only", "flops", "--itm-weighting", "off"])["flops"]["model_gflops_per_sample"]
    assert on["rt"] == off["rt"] > 0  # region-tag is never weighted
    for task in ("rp", "is"):  # the weight is one more forward, without the heads' backward
        assert 0 < on[task] - off[task] < off[task] / 2, (task, on, off)
    assert not {"loader", "step", "e2e"} & set(read(results, "train_cpu_flops"))


def test_the_patch_models_step_and_loader_on_shards_with_images(results):
    result = bench_train.main(TINY + ["--visual", "patches", "--image-size", "32", "--only", "e2e",
                                      "--results-name", "patches"])
    assert result["shape"]["visual"] == "patches" and result["shape"]["patches"] == 4
    assert read(results, "patches")["e2e_samples_per_s"] > 0  # the loader decoded the images, the step ran on them
    gflops = {size: bench_train.main(TINY + ["--visual", "patches", "--image-size", str(size), "--only", "flops"])
              ["flops"]["mean_gflops_per_sample"] for size in (32, 64)}
    assert gflops[64] > gflops[32] > 0  # 16 patches cost more than 4: the patches are in the sequence


def test_compile_benchmark_names_other_shapes_apart_from_the_default_run():
    from argparse import Namespace

    from bench import compile as bench_compile

    default = Namespace(device="cpu", batch_size=None, layers=None, hidden=None, heads=None)
    shape = {"layers": 2, "hidden": 256, "heads": 4, "batch": 32}
    every = list(bench_compile.VARIANTS)
    assert bench_compile.results_name(default, every, shape) == "compile_cpu"
    wider = Namespace(**{**vars(default), "hidden": 512})  # one shape flag alone is another file
    assert bench_compile.results_name(wider, every, {**shape, "hidden": 512}) == \
        "compile_cpu_2x512_4heads_batch32_" + "_".join(every)
    assert bench_compile.results_name(default, ["layers"], shape) == "compile_cpu_2x256_4heads_batch32_layers"


def test_vlmo_step_and_retrieval_scoring(results):
    vlmo = TINY + ["--layers", "3", "--preset", "vlmo-debug"]  # VL-FFN in the top 2 of 3
    result = bench_train.main(vlmo + ["--only", "step", "--results-name", "vlmo"])
    assert result["tasks"] == ["vl"] and result["step_samples_per_s"] > 0
    assert result["step"]["model_gflops_per_sample"]["vl"] > 0
    scoring = bench_train.main(vlmo + ["--only", "retrieval", "--results-name", "vlmo_r"])
    retrieval = scoring["retrieval"]
    assert retrieval["itm_pair_ms"] > 0 and retrieval["image_encode_ms"] > 0 and retrieval["text_encode_ms"] > 0
    # scoring a gallery of 1,000 by ITM is 1,000 fusion passes a query; the dual encoder encodes each item once
    assert retrieval["itm_s_per_1k_queries"] == pytest.approx(1000 * 1000 * retrieval["itm_pair_ms"] / 1e3)
    assert retrieval["dual_encoder_s_per_1k_queries"] < retrieval["itm_rerank_s_per_1k_queries"]
