"""Fine-tuning throughput (`vlp-train finetune`), beside pre-training's (bench/train.py).

    python bench/finetune.py                      # CPU: easy-vqa's shape, the bundled MiniLM (6 x 384), batch 32
    python bench/finetune.py --device cuda --batch-size 128

What runs is what `vlp-train finetune --task easy-vqa` builds (finetune.train.build_finetune): the
real questions of the first `--examples` easy-vqa training examples, the harness's batches (the
trainer's BatchBuilder: tokenised question + regions), the task model (the pre-trained model and
its classifier head) and the loop's step (loss, backward, clipping, AdamW, schedule:
train.optimizer_step). The regions are `--regions` per image of 1,280-d features (what
`vlp-data detect --regions grid --grid-size 3` gives: the whole image + 9 cells), random values
written as a detections file (their values do not change the cost).

- collate: building batches from examples (tokenise, regions, targets), no model.
- step: one optimizer step on a batch built beforehand (no loader cost).
- eval: the no-grad forward of evaluation (`predict_split`'s), samples/s.

Each figure is the median over `--repeats` windows of `--steps` batches after `--warmup`. Writes
bench/results/finetune_<device>.json (or $VLP_BENCH_RESULTS).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--examples", type=int, default=512, help="easy-vqa training examples the batches come from")
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a fine-tuning config override")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results-name", default=None)
    return p.parse_args(argv)


def write_detections(path: str, image_keys: list[str], regions: int, dim: int = 1280) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [{"image_id": f"{key}.png", "width": 64, "height": 64,
             "boxes": [[0.0, 0.0, 64.0, 64.0]] + [[0.0, 0.0, 32.0, 32.0]] * (regions - 1),
             "labels": ["region"] * regions, "scores": [1.0] + [0.5] * (regions - 1),
             "features": rng.standard_normal((regions, dim)).astype(np.float32).tolist()} for key in image_keys]
    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv=None) -> dict:
    import torch

    from bench.env import device_name, peak_rss_mb, results_folder
    from bench.train import measure
    from vlp_train.finetune.config import load_config
    from vlp_train.finetune.data import Collate
    from vlp_train.finetune.formats import easy_vqa
    from vlp_train.finetune.train import build_finetune, predict_split
    from vlp_train.step import to_device
    from vlp_train.train import optimizer_step

    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-finetune-")
    keys = list(dict.fromkeys(k for split in ("train", "test") for e in easy_vqa.read(split).examples[:args.examples]
                              for k in e.image_ids))
    write_detections(os.path.join(work, "det.parquet"), keys, args.regions)
    cfg = load_config("easy-vqa", [f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}",
                                   f"data.max_examples={args.examples}", f"data.max_eval_examples={4 * args.batch_size}",
                                   f"run.device={args.device}", *args.overrides])
    cfg.data.detections, cfg.run.output = os.path.join(work, "det.parquet"), os.path.join(work, "ft")
    run = build_finetune(cfg)
    collate = Collate(run.train, run.builder, {label: i for i, label in enumerate(run.labels)})
    chunks = [list(range(i, min(len(run.train), i + args.batch_size))) for i in range(0, len(run.train), args.batch_size)]
    chunks = [c for c in chunks if len(c) == args.batch_size]
    cycle = itertools.cycle(chunks)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    result = {"device": device_name(args.device), "command": "python " + " ".join(sys.argv if argv is None else
                                                                                 ["bench/finetune.py", *argv]),
              "load_average_at_start": os.getloadavg()[0], "task": "easy-vqa", "batch_size": args.batch_size,
              "regions": args.regions, "text_tokens_max": cfg.model.max_text_len,
              "model": "{0.num_hidden_layers} x {0.hidden_size}".format(run.model.model.bert_config()),
              "torch_threads": torch.get_num_threads()}

    result["collate"] = measure(lambda: len(collate(next(cycle))["keys"]), args.warmup, args.steps, args.repeats,
                                lambda: None)
    prebuilt = [collate(c) for c in chunks[:4]]
    batches = itertools.cycle(prebuilt)
    run.model.train()

    def step():
        batch = next(batches)
        with run.autocast:
            logits = run.model(to_device({"x": batch["inputs"]}, run.device)["x"])
        loss = run.task.sample_loss(logits, batch["targets"].to(run.device)).mean()
        loss.backward()
        optimizer_step(run, loss)
        return len(batch["keys"])
    result["step"] = measure(step, args.warmup, args.steps, args.repeats, sync)

    def evaluation():
        metrics, _ = predict_split(run.model, run.task, run.val, run.builder, run.labels, cfg, run.device,
                                   run.autocast)
        return len(run.val)
    result["eval"] = measure(evaluation, 1, 1, args.repeats, sync)
    result["eval"]["examples"] = len(run.val)
    result["peak_rss_mb"] = peak_rss_mb()
    folder = results_folder()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{args.results_name or 'finetune_' + args.device}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: (v["samples_per_s"] if isinstance(v, dict) and "samples_per_s" in v else v)
                      for k, v in result.items()}, indent=1))
    return result


if __name__ == "__main__":
    main()
