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

    python bench/loader_parts.py --only validate   # the schema check as the loader runs it, alone

`validate`: `schemas.validate_sample(types_checked=True)` per sample after one
`schemas.check_sample_types` of the batch (what `vlp_train.data.decode_batch` runs for a good
batch), and validate_sample alone; compare two checkouts by running this file from each (its
parent folder is imported). Writes bench/results/loader_parts_cpu_validate.json.
"""
from __future__ import annotations

import argparse
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

from bench.env import device_name, results_name, write_result  # noqa: E402
from bench.train import synthetic_corpus  # noqa: E402

SAMPLES, PASSES = 480, 7
VALIDATE_PASSES = 51  # a pass of the schema check is ~20 ms: more of them, for a steadier median


def per_sample_us(fn, n: int, passes: int = PASSES) -> float:
    fn()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n * 1e6


def validate_us(metas: list[dict], feats: list, n: int) -> dict:
    """The loader's schema check of a good batch, per sample, and validate_sample's share of it."""
    import schemas

    def per_sample():
        for meta, f in zip(metas, feats):
            schemas.validate_sample(meta, f, types_checked=True)

    def batch():
        schemas.check_sample_types(metas)
        per_sample()
    return {"validate_sample_us": per_sample_us(per_sample, n, VALIDATE_PASSES),
            "batch_check_us": per_sample_us(batch, n, VALIDATE_PASSES), "passes": VALIDATE_PASSES,
            "schemas": schemas.__file__}


def main() -> dict:
    import glob

    import pyarrow as pa
    import webdataset as wds
    from transformers import BertTokenizerFast

    import schemas
    from vlp_train.config import ObjectiveConfig
    from schemas.corpus import bundled_minilm_path, load_npy
    from vlp_train.masking import BatchBuilder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["validate"], help="measure only this piece")
    args = parser.parse_args()
    shards = synthetic_corpus(1000, 36, 2048)
    raws = []
    for url in sorted(glob.glob(shards)):
        raws += list(wds.WebDataset(url, shardshuffle=False))
    raws = raws[:SAMPLES]
    metas = [json.loads(r["json"]) for r in raws]
    feats = [load_npy(r["feats.npy"]) for r in raws]
    n = len(raws)
    if args.only == "validate":
        result = {"device": device_name("cpu"), "command": "python bench/loader_parts.py --only validate",
                  "samples": n, "unit": "microseconds per sample, median of the passes",
                  "load_before": os.getloadavg(), **validate_us(metas, feats, n), "load_after": os.getloadavg()}
        print(json.dumps(result))
        write_result(results_name("loader_parts_cpu", args.only), result)
        return result
    sentences = [m["sentences"][0]["text"] for m in metas]
    tokenizer = BertTokenizerFast.from_pretrained(bundled_minilm_path())
    builder = BatchBuilder(tokenizer, {}, 40, 36, ObjectiveConfig())
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
    result["validate"] = validate_us(metas, feats, n)
    print("validate", json.dumps(result["validate"]))
    write_result("loader_parts_cpu", result)
    return result


if __name__ == "__main__":
    main()
