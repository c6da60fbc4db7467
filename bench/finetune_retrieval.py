"""Retrieval evaluation cost of `vlp-train finetune --task retrieval`: a dual encoder (VLMo's ITC
fine-tuning: every image and caption encoded once, ranked by dot products) against the fusion ITM
over a first stage's candidates (single-stream's path, `task.retrieval_objective=itm`), and the dual
encoder with ITM re-scoring its top k (`task.rerank_k`). Seconds per 1,000 queries, a query being an
image (text retrieval) or a caption (image retrieval), as evaluate_vlmo.py counts them.

    python bench/finetune_retrieval.py                          # CPU: vlmo-debug (the bundled MiniLM, 6 x 384), 100 images x 5 captions
    python bench/finetune_retrieval.py --device cuda --images 1000

What runs is what `vlp-train evaluate --task retrieval` runs (finetune.tasks.dual_encoder_predict and
retrieval_predict) on a Karpathy-layout split written here: `--images` test images of `--captions`
template captions each, naming the image's tags, and detections of `--regions` regions of
`--dim`-d random features (what `vlp-data detect --regions grid --grid-size 3` gives: 10 x 1,280).
The model is vlmo-debug's as built for fine-tuning, not fine-tuned: the cost does not depend on the
weights. Each figure is the median of `--repeats` runs. Writes
bench/results/finetune_retrieval_<device>.json (or $VLP_BENCH_RESULTS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THINGS = ["dog", "cat", "car", "horse", "bird", "boat", "cup", "bus", "tree", "chair", "man", "woman"]
TEMPLATES = ["a {} next to a {}", "there is a {} and a {} here", "a photo of a {} with a {}", "the {} and the {}",
             "someone looks at a {} near a {}"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--images", type=int, default=100, help="test images (each with --captions captions)")
    p.add_argument("--captions", type=int, default=5)
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--k", type=int, default=16, help="candidates a query for ITM (first stage / re-ranking)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a fine-tuning config override")
    p.add_argument("--results-name", default=None)
    return p.parse_args(argv)


def write_split(folder: str, images: int, captions: int, regions: int, dim: int) -> str:
    """dataset_flickr30k.json (8 train images, `images` test ones) and their detections -> the detections path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    entries, rows, sentid = [], [], 0
    for i in range(8 + images):
        a, b = (THINGS[j] for j in rng.choice(len(THINGS), 2, replace=False))
        sentences = []
        for c in range(captions):
            sentences.append({"sentid": sentid, "imgid": i, "raw": TEMPLATES[c % len(TEMPLATES)].format(a, b),
                              "tokens": []})
            sentid += 1
        entries.append({"imgid": i, "split": "train" if i < 8 else "test", "filename": f"{1000 + i}.jpg",
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        rows.append({"image_id": f"flickr30k-images/{1000 + i}.jpg", "width": 64, "height": 64,
                     "boxes": [[0.0, 0.0, 64.0, 64.0]] * regions, "labels": [a, b] + ["region"] * (regions - 2),
                     "scores": [0.9] * regions,
                     "features": rng.standard_normal((regions, dim)).astype(np.float32).tolist()})
    with open(os.path.join(folder, "dataset_flickr30k.json"), "w", encoding="utf-8") as f:
        json.dump({"dataset": "flickr30k", "images": entries}, f)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "det.parquet"))
    return os.path.join(folder, "det.parquet")


def main(argv=None) -> dict:
    import statistics

    import torch

    from bench.env import device_name, peak_rss_mb, results_folder
    from vlp_train.evaluate import per_1k_queries
    from vlp_train.finetune.config import load_config
    from vlp_train.finetune.tasks import dual_encoder_predict, retrieval_predict
    from vlp_train.finetune.train import TaskModel, build_finetune

    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-finetune-retrieval-")
    detections = write_split(work, args.images, args.captions, args.regions, args.dim)
    cfg = load_config("retrieval", ["model.arch=vlmo", "model.vl_layers=2", "data.eval_split=test",
                                    f"data.eval_batch_size={args.batch_size}", f"run.device={args.device}",
                                    f"task.candidates={args.k}", *args.overrides])
    cfg.data.data, cfg.data.detections, cfg.run.output = work, detections, os.path.join(work, "ft")
    run = build_finetune(cfg)
    dual = run.model.eval()
    fusion_itm = TaskModel(run.model.model, None).eval()  # the ITM path's task model (no head: the ITM head)
    queries = len(run.val.regions) + len(run.val)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)

    def timed(predict, model, rerank_k: int) -> dict:
        cfg.task.rerank_k = rerank_k
        seconds = []
        for _ in range(args.repeats):
            sync()
            started = time.perf_counter()
            predict(model, run.val, run.builder, cfg, run.device, run.autocast)
            sync()
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        return {"s": round(median, 3), "s_per_1k_queries": round(per_1k_queries(median, queries), 3),
                "runs_s": [round(s, 3) for s in seconds]}

    result = {"device": device_name(args.device), "command": "python " + " ".join(
                  sys.argv if argv is None else ["bench/finetune_retrieval.py", *argv]),
              "load_average_at_start": os.getloadavg()[0], "images": len(run.val.regions), "captions": len(run.val),
              "queries": queries, "regions": args.regions, "feature_dim": args.dim, "k": args.k,
              "model": "vlmo {0.num_hidden_layers} x {0.hidden_size}".format(run.model.model.bert_config()),
              "torch_threads": torch.get_num_threads()}
    result["dual_encoder"] = timed(dual_encoder_predict, dual, 0)
    result["dual_encoder_itm_rerank"] = timed(dual_encoder_predict, dual, args.k)
    result["itm_over_first_stage"] = timed(retrieval_predict, fusion_itm, 0)
    result["peak_rss_mb"] = peak_rss_mb()
    folder = results_folder()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{args.results_name or 'finetune_retrieval_' + args.device}.json"), "w",
              encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
