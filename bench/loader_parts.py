"""The loader's per-sample pieces, each against what it replaced, on the synthetic base-shape shards.

    python bench/loader_parts.py           # 480 samples (one base batch), median of 7 passes

- the .npy member: `np.load` vs `schemas.corpus.load_npy` (parsed headers kept);
- the finite check of 36 x 2048 float16 features: `np.isfinite(...).all()` vs the exponent-bit test
  `schemas.float16_nonfinite` (what `schemas.validate_sample` runs);
- the schema's type check: Arrow's conversion one sample at a time vs the whole batch at once
  (`schemas.check_sample_types`);
- tokenising the batch's sentences: the `transformers` call vs the Rust tokenizer configured once
  (`BatchBuilder._tokenize`);
- JSON parsing, for scale.
Microseconds per sample. Writes bench/results/loader_parts_cpu.json.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as in the loader's workers

from bench.env import device_name, write_result  # noqa: E402
from bench.train import synthetic_corpus  # noqa: E402

SAMPLES, PASSES = 480, 7


def per_sample_us(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(PASSES):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n * 1e6


def main() -> dict:
    import glob

    import pyarrow as pa
    import webdataset as wds
    from transformers import BertTokenizerFast

    import schemas
    from vlp_train.config import ObjectiveConfig
    from schemas.corpus import bundled_minilm_path, load_npy
    from vlp_train.masking import BatchBuilder

    shards = synthetic_corpus(1000, 36, 2048)
    raws = []
    for url in sorted(glob.glob(shards)):
        raws += list(wds.WebDataset(url, shardshuffle=False))
    raws = raws[:SAMPLES]
    metas = [json.loads(r["json"]) for r in raws]
    feats = [load_npy(r["feats.npy"]) for r in raws]
    sentences = [m["sentences"][0]["text"] for m in metas]
    tokenizer = BertTokenizerFast.from_pretrained(bundled_minilm_path())
    builder = BatchBuilder(tokenizer, {}, 40, 36, ObjectiveConfig())
    n = len(raws)
    pairs = {
        "npy": (lambda: [np.load(io.BytesIO(r["feats.npy"]), allow_pickle=False) for r in raws],
                lambda: [load_npy(r["feats.npy"]) for r in raws]),
        "finite_check": (lambda: [np.isfinite(f).all() for f in feats],
                         lambda: [schemas.float16_nonfinite(f) for f in feats]),
        "schema_types": (lambda: [pa.Table.from_pylist([m], schema=schemas.SAMPLE) for m in metas],
                         lambda: schemas.check_sample_types(metas)),
        "tokenize": (lambda: tokenizer(sentences, truncation=True, max_length=40, padding="longest",
                                       return_offsets_mapping=True, return_tensors="np"),
                     lambda: builder._tokenize(sentences)),
    }
    result = {"device": device_name("cpu"), "command": "python bench/loader_parts.py", "samples": n,
              "passes": PASSES, "unit": "microseconds per sample, median of the passes",
              "json_us": per_sample_us(lambda: [json.loads(r["json"]) for r in raws], n)}
    for name, (before, after) in pairs.items():
        result[name] = {"before_us": per_sample_us(before, n), "after_us": per_sample_us(after, n)}
        print(name, json.dumps(result[name]))
    print("json_us", result["json_us"])
    write_result("loader_parts_cpu", result)
    return result


if __name__ == "__main__":
    main()
