"""Trainer throughput: the loader alone, the model step alone, and the two together.

    python bench/train.py --device cuda    # one H100: the `base` config, 12 x 768, batch 480, 12 workers
    python bench/train.py --device cpu     # 2 CPU cores: the same data shape, a 2 x 256 model, batch 32, 2 workers
    python bench/train.py --device cpu --only loader --batch-size 480 --num-workers 2   # the base loader here
    python bench/train.py --device cpu --visual patches      # the patch model (model.visual=patches), images in the shards
    python bench/train.py --device cpu --preset vlmo-base --only step --results-name train_cpu_vlmo  # VLMo's step

VLMo (`--preset vlmo-base`/`vlmo-debug`): the step is VLMo's image-text step (ITC over the batch,
ITM on three fusion passes with hard negatives, MLM on a fourth), a sample is one image with its
sentence; the same `--layers/--hidden/--heads` as a single-stream run compare the two at one size.
`--compile on` (the CUDA default) compiles its layers as train.py does: the shared attention and
the FFN, the two regions every layer, mode and expert share (vlp_train/compile.py).
Its `retrieval` part (also `--only retrieval`) times the scoring of zero-shot retrieval: the
dual encoder (each query and candidate encoded once, then dot products) against ITM (one fusion
pass per query-candidate pair), per pair and per 1,000 queries over a 1,000-candidate gallery,
and with ITM re-ranking the dual encoder's top 16.

The base data shape (36 regions x 2048-d, text up to 40 tokens) is kept everywhere; on CPU the
defaults shrink the model, batch and workers (each flag overrides). The shape measured is printed
and written with the figures.

Input: synthetic shards in the real corpus format (`{key}.json` + `{key}.feats.npy`, valid
against `schemas.validate_sample`): `--images` images, 36 regions of `--feature-dim` float16
features tagged with COCO names, K=5 retrieved sentences of about 12-20 words, each with 2-4 noun
phrases linked to regions (similarity 0.5-0.95) and one unlinked one, and `tag_vocab.json`.
They are written once under bench/data/ (or $VLP_BENCH_DATA), keyed by the shape, and reused.
The loader reads them with `data.resampled=true` (shards drawn with replacement), so a small
corpus feeds any number of steps; everything else is what `vlp_train.components.build_run` builds from the preset.

- loader: `make_loader(CorpusStream(...))` as train.py builds it (read tars, shuffle buffer,
  decode + validate, tokenize with the real BERT tokenizer, masks, padded tensors, `--num-workers`
  processes, pinned memory on CUDA); batches are consumed and dropped.
- step: the model, AdamW and `compute_loss` of train.py, backward, gradient clipping, optimizer and
  scheduler step, on a few batches built beforehand and already on the device (no loader cost);
  bf16 autocast and torch.compile on CUDA as train.py does (`--compile`; `--compile-scope`: one
  transformer layer compiled for all, train.py's default, or the whole step).
- e2e: the loader feeding the step, with train.py's non-blocking copies to the device.
- flops (in step, or alone with `--only flops`): the step's model FLOPs per sample, counted on a
  meta-device copy (matrix products and attention), and from them the step's TFLOP/s and what
  the 8,000 samples/s target asks of the device.

A sample is one (regions, text) sequence through the model with its objectives. With
`--schedule round_robin` (default, the paper's MMF setup) a batch of B images is one granularity
(region-tag, region-phrase, image-sentence in turn): B samples. With `mixed` every batch carries
all three views of its B images: 3B samples. With ITM weighting on (`--itm-weighting`, default
on: every epoch after the first) region-phrase and image-sentence steps also run the extra
no-grad forward pass that gives the per-sample ITM weights; it is not counted as samples.

Each figure is the median over `--repeats` windows of `--steps` batches (the loader: at least 4,000
samples a window), after `--warmup`
batches (worker start-up, shuffle buffer, compilation: their time is `warmup_s`). Writes bench/results/train_<device>.json
(`--results-name` or $VLP_BENCH_RESULTS, a folder, to put it elsewhere).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as vlp-train: the loader forks workers

from bench.data import ADJECTIVES, PLACES, VERBS  # noqa: E402
from bench.env import device_name, peak_rss_mb, results_folder, results_name, write_result  # noqa: E402
from vlp_train.config import COMPILE_MODES, COMPILE_SCOPES  # noqa: E402

DATA = os.environ.get("VLP_BENCH_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TARGET_SAMPLES_PER_S = 8000  # base config, one H100 (the goal)
SENTENCES_PER_IMAGE = 5
CORPUS_VERSION = 1  # bump when the synthetic samples change, so cached corpora are rebuilt
STORED_IMAGE_SIZE = 384  # --visual patches/both: images stored as build-retrieval --store-images does by default

COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
        "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush"]
FILLERS = ["on a sunny afternoon", "early in the morning", "as people walk by", "for a little while",
           "without any hurry", "next to each other"]


# -- synthetic corpus -----------------------------------------------------------------------------


def synthetic_sentence(rng: random.Random, regions_of: dict[str, list[int]], sentence_id: str, rank: int) -> dict:
    """About 12-20 words: 2-4 noun phrases about the image's tags, each linked to one of its
    regions, joined by a verb and connectives, then a place (an unlinked noun phrase)."""
    tags = rng.sample(sorted(regions_of), min(rng.randint(2, 4), len(regions_of)))
    pieces = []  # (text, phrase or None); the text is joined with spaces
    for n, tag in enumerate(tags):
        if n == 1:
            pieces.append((rng.choice(VERBS), None))
        elif n > 1:
            pieces.append((rng.choice(["with", "and", "beside", "near"]), None))
        adjective = rng.choice(ADJECTIVES)
        pieces.append((f"{rng.choice(['a', 'the', 'one'])} {adjective} {tag}",
                       {"words": [adjective, *tag.split()], "region": rng.choice(regions_of[tag]), "tag": tag,
                        "similarity": round(rng.uniform(0.5, 0.95), 4)}))
    place = rng.choice(PLACES)
    preposition, rest = place.split(" ", 1)
    pieces += [(preposition, None), (rest, {"words": [w for w in rest.split() if w not in ("a", "the")],
                                            "region": None, "tag": None,
                                            "similarity": round(rng.uniform(0.1, 0.45), 4)})]
    while sum(len(text.split()) for text, _ in pieces) < 12:
        pieces.append((rng.choice(FILLERS), None))
    text, phrases = "", []
    for piece, phrase in pieces:
        start = len(text) + (1 if text else 0)
        text = f"{text} {piece}" if text else piece
        if phrase:
            phrases.append({"start": start, "end": start + len(piece), **phrase})
    text = text[0].upper() + text[1:] + "."
    for p in phrases:  # the span's text as it stands in the final sentence (capitalised first word)
        p["text"] = text[p["start"]:p["end"]]
    return {"sentence_id": sentence_id, "text": text, "rank": rank, "score": round(0.75 - 0.05 * rank, 4),
            "phrases": phrases}


def synthetic_sample(i: int, rng: random.Random, nprng: np.random.Generator, regions: int,
                     prototypes: np.ndarray) -> tuple[dict, np.ndarray]:
    """One image: `regions` detections over 6-16 COCO classes, best score first; features near
    their class prototype (non-negative, like pooled CNN features)."""
    width, height = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375), (800, 600)])
    classes = rng.sample(range(len(COCO)), rng.randint(6, 16))
    labels = classes + [rng.choice(classes) for _ in range(regions - len(classes))]
    rng.shuffle(labels)
    labels = labels[:regions]
    boxes = []
    for _ in labels:
        x1, y1 = rng.uniform(0, 0.8 * width), rng.uniform(0, 0.8 * height)
        boxes.append([round(x1, 1), round(y1, 1), round(min(width, x1 + rng.uniform(0.05, 0.6) * width), 1),
                      round(min(height, y1 + rng.uniform(0.05, 0.6) * height), 1)])
    feats = np.abs(prototypes[labels] + nprng.standard_normal((len(labels), prototypes.shape[1]), dtype=np.float32))
    tags = [COCO[c] for c in labels]
    regions_of: dict[str, list[int]] = {}
    for r, tag in enumerate(tags):
        regions_of.setdefault(tag, []).append(r)
    sentences = [synthetic_sentence(rng, regions_of, hashlib.sha1(f"{i}/{k}".encode()).hexdigest()[:16], k)
                 for k in range(SENTENCES_PER_IMAGE)]
    meta = {"schema_version": 1, "image_id": f"bench/{i:08d}.jpg", "width": width, "height": height,
            "boxes": boxes, "tags": tags, "scores": sorted((round(rng.uniform(0.2, 0.99), 4) for _ in labels), reverse=True),
            "sentences": sentences}
    return meta, feats.astype(np.float16)


def synthetic_image(meta: dict, rng: random.Random, pool: list[np.ndarray], stored: int) -> tuple[dict, bytes]:
    """The sample with its image as `build-retrieval --store-images` stores it: one of the bundled
    photos (bench/decode.py), a random crop of it resized to the sample's width x height, encoded by
    schemas.corpus.encode_image at `stored` px on the longer side."""
    import cv2

    from schemas import SCHEMA_VERSION
    from schemas.corpus import IMAGE_SIZE_FIELD, encode_image, stored_image_size
    photo = rng.choice(pool)
    h, w = photo.shape[:2]
    top, left = rng.randrange(h // 4), rng.randrange(w // 4)
    picture = cv2.resize(np.ascontiguousarray(photo[top:top + 3 * h // 4, left:left + 3 * w // 4]),
                         (meta["width"], meta["height"]), interpolation=cv2.INTER_AREA)
    stored_size = stored_image_size(meta["width"], meta["height"], stored)
    return {**meta, "schema_version": SCHEMA_VERSION, IMAGE_SIZE_FIELD: list(stored_size)}, encode_image(picture, stored)


def synthetic_corpus(images: int, regions: int, feature_dim: int, per_shard: int = 1000, stored_images: int = 0) -> str:
    """bench/data/train-<shape>/{shards/corpus-*.tar, tag_vocab.json}, written once; the shards glob.
    `stored_images` > 0: each sample carries its image (`{key}.jpg`), that many px on the longer side."""
    from schemas.corpus import sample_key, sample_members, tar_bytes
    from schemas import validate_sample

    folder = os.path.join(DATA, f"train-v{CORPUS_VERSION}-n{images}-r{regions}-d{feature_dim}-k{SENTENCES_PER_IMAGE}"
                                + (f"-i{stored_images}" if stored_images else ""))
    shards = os.path.join(folder, "shards")
    if os.path.exists(os.path.join(folder, "done")):
        return os.path.join(shards, "*.tar")
    start = time.perf_counter()
    os.makedirs(shards, exist_ok=True)
    rng, nprng = random.Random(0), np.random.default_rng(0)
    prototypes = nprng.standard_normal((len(COCO), feature_dim), dtype=np.float32) * 2
    if stored_images:
        from bench.decode import photos
        pool, image_rng = list(photos().values()), random.Random(1)
    for s in range(0, images, per_shard):
        samples = [synthetic_sample(i, rng, nprng, regions, prototypes) for i in range(s, min(images, s + per_shard))]
        members = []
        for meta, feats in sorted(samples, key=lambda mf: sample_key(mf[0]["image_id"])):
            image = None
            if stored_images:
                meta, image = synthetic_image(meta, image_rng, pool, stored_images)
            validate_sample(meta, feats, where=meta["image_id"])
            members += sample_members(sample_key(meta["image_id"]), meta, feats, image)
        path = os.path.join(shards, "corpus-%06d.tar" % (s // per_shard))
        with open(path + ".tmp", "wb") as f:
            f.write(tar_bytes(members))
        os.replace(path + ".tmp", path)
    with open(os.path.join(folder, "tag_vocab.json"), "w", encoding="utf-8") as f:
        json.dump({"schema_version": 1, "tags": sorted(COCO)}, f)
    open(os.path.join(folder, "done"), "w").close()
    print(f"wrote {images} synthetic samples to {folder} in {time.perf_counter() - start:.1f} s")
    return os.path.join(shards, "*.tar")


# -- the trainer's components, as vlp_train.components.build_run builds them -----------------------


def build_config(args):
    from vlp_train.config import load_config

    cfg = load_config(args.preset)
    cfg.model.layers = args.layers if args.layers is not None else cfg.model.layers
    cfg.model.hidden = args.hidden if args.hidden is not None else cfg.model.hidden
    cfg.model.heads = args.heads if args.heads is not None else cfg.model.heads
    cfg.model.feature_dim = args.feature_dim
    cfg.model.compile, cfg.model.compile_scope = args.compile, args.compile_scope
    cfg.model.init = "random"  # throughput only: the weights' values do not matter (base needs no BERT folder here)
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer = args.batch_size, args.num_workers, args.shuffle_buffer
    cfg.data.global_batch_size = 0  # one process, one micro-batch a step: the step measured is one batch
    cfg.data.resampled = True
    cfg.data.steps_per_epoch = 10**6
    cfg.model.max_regions = args.regions
    cfg.model.visual = args.visual
    cfg.model.image_size = args.image_size or cfg.model.image_size
    cfg.objectives.schedule = args.schedule
    cfg.run.device = args.device
    return cfg


class Trainer:
    """The components `vlp-train run` builds (vlp_train.components.build_run), on synthetic shards."""

    def __init__(self, cfg, shards: str):
        import torch

        from vlp_train.components import build_run
        from vlp_train.data import CorpusStream

        cfg.data.shards = cfg.data.eval_shards = shards  # every shard trains: none held out
        self.cfg, self.torch = cfg, torch
        self.run = run = build_run(cfg)
        self.device, self.model, self.tasks, self.compiled = run.device, run.model, run.tasks, run.scope
        self.optimizer, self.scheduler, self.step_module, self.autocast = (run.optimizer, run.scheduler,
                                                                           run.step_module, run.autocast)
        self._stream = lambda shuffle_buffer: CorpusStream(
            run.urls, run.builder, run.batch_size, run.tasks, cfg.objectives.schedule, shuffle_buffer,
            cfg.run.seed, resampled=True)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.model.train()

    def loader(self, batches: int):
        """train.py's DataLoader over the resampled stream, ending after `batches` batches."""
        from vlp_train.data import make_loader
        dataset = self._stream(self.cfg.data.shuffle_buffer)
        dataset.set_position(0, 0, max_batches=batches)
        return make_loader(dataset, self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")

    def prebuilt(self, batches: int) -> list[dict]:
        """`batches` batches built in this process (small shuffle buffer) and moved to the device."""
        from vlp_train.step import to_device
        dataset = self._stream(self.cfg.data.batch_size)
        dataset.set_position(0, 0, max_batches=batches)
        return [{**batch, "views": to_device(batch["views"], self.device)} for batch in dataset]

    def step(self, views: dict, weighting: bool) -> None:
        """One optimizer step as in train.py's loop (grad_accum 1): loss, backward, clip, step."""
        from vlp_train.step import compute_loss
        from vlp_train.train import optimizer_step
        loss, _, _ = compute_loss(self.step_module, views, weighting, self.autocast)
        loss.backward()
        optimizer_step(self.run, loss)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def samples_in(batch: dict) -> int:
    """(regions, text) sequences in a batch: images x views (1 view round-robin, 3 mixed)."""
    return sum(int(view["active"].shape[0]) for view in batch["views"].values())


# -- measurements ---------------------------------------------------------------------------------


def measure(next_samples, warmup: int, steps: int, repeats: int, sync) -> dict:
    """Run `warmup` units, then `repeats` windows of `steps` units; samples/s of each window."""
    return measure_interleaved({"": next_samples}, warmup, steps, repeats, sync)[""]


def measure_interleaved(runs: dict, warmup: int, steps: int, repeats: int, sync) -> dict:
    """`measure` of several runs (key -> next_samples) at once: each warmed up before any is
    timed, then their windows interleaved (a, b, c, a, b, c, ...) so that on a shared machine each
    meets the same load and their rates compare even when the absolute figures drift."""
    warmup_s = {}
    for key, next_samples in runs.items():
        start = time.perf_counter()
        for _ in range(warmup):
            next_samples()
        sync()
        warmup_s[key] = time.perf_counter() - start  # worker start-up, shuffle buffer fill, compilation
    rates = {key: [] for key in runs}
    for _ in range(repeats):
        for key, next_samples in runs.items():
            start, samples = time.perf_counter(), 0
            for _ in range(steps):
                samples += next_samples()
            sync()
            rates[key].append(samples / (time.perf_counter() - start))
    return {key: {"samples_per_s": statistics.median(rates[key]), "windows_samples_per_s": rates[key],
                  "warmup_s": warmup_s[key]} for key in runs}


LOADER_WINDOW_SAMPLES = 4000  # a loader window of 3 small batches lasts ~50 ms: too noisy to compare


def bench_loader(trainer: Trainer, args) -> dict:
    steps = max(args.steps, -(-LOADER_WINDOW_SAMPLES // trainer.cfg.data.batch_size))
    total = args.warmup + steps * args.repeats
    batches = iter(trainer.loader(total))
    start = time.perf_counter()
    first = next(batches)  # worker start-up and shuffle buffer fill
    first_batch_s = time.perf_counter() - start
    pending = [first]

    def next_samples():
        batch = pending.pop() if pending else next(batches)
        return samples_in(batch)
    result = measure(next_samples, args.warmup, steps, args.repeats, lambda: None)
    for _ in batches:  # the stream ends exactly here; the workers exit
        pass
    result["batches_per_window"] = steps
    result["first_batch_s"] = first_batch_s
    result["worker_peak_rss_mb"] = peak_rss_mb(children=True)
    return result


def bench_step(trainer: Trainer, args) -> dict:
    torch = trainer.torch
    prebuilt = one_of_each_view(trainer, args)
    cycle = itertools.cycle(prebuilt)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def next_samples():
        batch = next(cycle)
        trainer.step(batch["views"], args.itm_weighting == "on")
        return samples_in(batch)
    # every prebuilt batch once at least before timing (torch.compile: one graph per task and weighting)
    result = measure(next_samples, max(args.warmup, len(prebuilt)), args.steps, args.repeats, trainer.sync)
    result.update(flops_of(trainer, prebuilt, args))
    result["model_tflops_per_s"] = result["mean_gflops_per_sample"] * result["samples_per_s"] / 1e3
    if args.profile:
        result["profile"] = profile_steps(trainer, next_samples, args)
    if trainer.device.type == "cuda":  # includes the prebuilt batches, resident on the device
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        result["prebuilt_batches_mb"] = sum(t.nbytes for b in prebuilt for v in b["views"].values()
                                            for t in v.values() if torch.is_tensor(t)) / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def flops_per_sample(trainer: Trainer, prebuilt: list[dict], weighting: bool) -> dict:
    """Model FLOPs per sample of each task's step: forward and backward, plus the ITM-weight
    forward where it runs. Counted by torch's FlopCounterMode (matrix products and attention; the
    element-wise rest is left out, as in the usual MFU figure) on a meta-device copy of the model
    and batch: shapes only, nothing computed, so the count costs no device time."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from vlp_train.backbone import call_layer
    from vlp_train.step import Pretraining, compute_loss
    torch = trainer.torch
    meta_model = copy.deepcopy(trainer.model).to("meta")
    meta_model.set_layer_call(call_layer)  # eager: compiled code would compile again for meta tensors
    meta_step = Pretraining(meta_model, trainer.run.family)
    per_task = {}
    for batch in prebuilt:
        for task, view in batch["views"].items():
            view = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in view.items()}
            with FlopCounterMode(display=False) as counter:
                loss, _, _ = compute_loss(meta_step, {task: view}, weighting, nullcontext())
                loss.backward()
            per_task[task] = counter.get_total_flops() / int(view["active"].shape[0])
    return per_task


def flops_of(trainer: Trainer, prebuilt: list[dict], args) -> dict:
    """The counted FLOPs of the step's batches; every timed window holds whole rounds of the
    tasks (or mixed batches), so a sample's mean is the mean over the tasks."""
    per_task = flops_per_sample(trainer, prebuilt, args.itm_weighting == "on")
    mean = statistics.mean(per_task.values())
    return {"text_tokens": sorted({int(v["input_ids"].shape[1]) for b in prebuilt for v in b["views"].values()}),
            "model_gflops_per_sample": {task: flops / 1e9 for task, flops in per_task.items()},
            "mean_gflops_per_sample": mean / 1e9, "tflops_per_s_at_target": mean * TARGET_SAMPLES_PER_S / 1e12}


def bench_flops(trainer: Trainer, args) -> dict:
    """The step's FLOPs per sample alone (`--only flops`): batches built, counted, nothing timed,
    so the base shape's arithmetic can be had on a CPU."""
    return flops_of(trainer, one_of_each_view(trainer, args), args)


def one_of_each_view(trainer: Trainer, args) -> list[dict]:
    """Prebuilt batches holding each granularity once: one batch a task round robin, one mixed."""
    return trainer.prebuilt(len(trainer.tasks) if args.schedule == "round_robin" else 1)


def profile_steps(trainer: Trainer, next_samples, args) -> dict:
    """torch.profiler over `--profile` more steps: where a step's time goes (the ops with the most
    self time on the device, or on the CPU without one). The full table goes to
    train_<device>_profile.txt beside the JSON."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile):
            next_samples()
        trainer.sync()
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort_key, row_limit=40)
    path = os.path.join(results_folder(), f"{args.results_name}_profile.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(table)
    total = sum(getattr(e, sort_key) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:12]
    return {"steps": args.profile, "sorted_by": sort_key, "table": os.path.basename(path),
            "top": [{"op": e.key, "ms_per_step": getattr(e, sort_key) / 1000 / args.profile,
                     "share": getattr(e, sort_key) / total, "calls_per_step": e.count / args.profile} for e in top]}


def bench_e2e(trainer: Trainer, args) -> dict:
    from vlp_train.step import to_device

    torch = trainer.torch
    batches = iter(trainer.loader(args.warmup + args.steps * args.repeats))
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def next_samples():
        batch = next(batches)
        trainer.step(to_device(batch["views"], trainer.device), args.itm_weighting == "on")
        return samples_in(batch)
    result = measure(next_samples, args.warmup, args.steps, args.repeats, trainer.sync)
    for _ in batches:
        pass
    if trainer.device.type == "cuda":
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    return result


RETRIEVAL_GALLERY = 1000  # candidates a query is scored against
RERANK_K = 16              # the dual encoder's top k that ITM re-scores (run.rerank_k's default)


def bench_retrieval(trainer: Trainer, args) -> dict:
    """VLMo's zero-shot retrieval scoring: the dual encoder against ITM, timed on the step's
    batches with the model in eval mode (no gradient): per image and per text encoded alone, per
    fusion pair, and from them per 1,000 queries over a gallery of RETRIEVAL_GALLERY."""
    from vlp_train.tasks import Task
    torch, model = trainer.torch, trainer.model
    view = next(b["views"][Task.IMAGE_TEXT] for b in one_of_each_view(trainer, args) if Task.IMAGE_TEXT in b["views"])
    rows = int(view["active"].shape[0])
    model.eval()

    def timed(fn) -> float:
        """Seconds per call: the median of `repeats` windows of `steps` calls, after `warmup`."""
        with torch.no_grad():
            result = measure(lambda: (fn(), 1)[1], args.warmup, args.steps, args.repeats, trainer.sync)
        return 1 / result["samples_per_s"]
    with trainer.autocast:
        pixels = view.get("pixels")
        image_s = timed(lambda: model.image_features(model.encode_image(view["features"], view["locations"],
                                                                        view["region_mask"], pixels))) / rows
        text_s = timed(lambda: model.text_features(model.encode_text(view["clean_ids"], view["text_mask"]))) / rows
        pair_s = timed(lambda: model.itm_logits(model(view["clean_ids"], view["text_mask"], view["features"],
                                                      view["locations"], view["region_mask"], pixels)[0])) / rows
    model.train()
    encode_s = (image_s + text_s) / 2  # a query or candidate of either modality, on average
    dual_1k = 1000 * encode_s + RETRIEVAL_GALLERY * encode_s  # the candidates once, then one matrix product
    return {"rows": rows, "gallery": RETRIEVAL_GALLERY, "rerank_k": RERANK_K,
            "image_encode_ms": image_s * 1e3, "text_encode_ms": text_s * 1e3, "itm_pair_ms": pair_s * 1e3,
            "dual_encoder_s_per_1k_queries": dual_1k,
            "itm_s_per_1k_queries": 1000 * RETRIEVAL_GALLERY * pair_s,
            "itm_rerank_s_per_1k_queries": dual_1k + 1000 * RERANK_K * pair_s,
            "samples_per_s": 1 / pair_s}


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--preset", choices=["base", "debug", "vlmo-base", "vlmo-debug"], default="base")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the preset's; 32 on CPU)")
    parser.add_argument("--num-workers", type=int, help="loader processes (default: the preset's; 2 on CPU)")
    parser.add_argument("--shuffle-buffer", type=int, help="samples per worker (default: the preset's; 256 on CPU)")
    parser.add_argument("--layers", type=int, help="model override (default: the preset's; 2 on CPU)")
    parser.add_argument("--hidden", type=int, help="model override (default: the preset's; 256 on CPU)")
    parser.add_argument("--heads", type=int, help="model override (default: the preset's; 4 on CPU)")
    parser.add_argument("--feature-dim", type=int, default=2048, help="region feature size")
    parser.add_argument("--regions", type=int, default=36, help="regions per image")
    parser.add_argument("--visual", choices=["regions", "patches", "both"], default="regions",
                        help="model.visual; patches/both: the synthetic samples carry images (stored at 384 px)")
    parser.add_argument("--image-size", type=int, default=None, help="model.image_size (default: the preset's)")
    parser.add_argument("--images", type=int, help="synthetic corpus size (default 10000; 1000 on CPU)")
    parser.add_argument("--schedule", choices=["round_robin", "mixed"], default="round_robin")
    parser.add_argument("--itm-weighting", choices=["on", "off"], default="on",
                        help="the curriculum's ITM weighting (on from the second epoch)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="auto", help="torch.compile (auto: CUDA only)")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="layers",
                        help="what is compiled: one transformer layer serving all (train.py's default) or the whole step")
    parser.add_argument("--steps", type=int, help="batches per timed window (default 30; 3 on CPU); "
                                                    "round_robin rounds it up to whole rounds of the three tasks")
    parser.add_argument("--warmup", type=int, help="batches before timing (default 30; 3 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--only", choices=["loader", "step", "e2e", "flops", "retrieval"],
                        help="one measurement; flops: count the step's FLOPs per sample, time nothing")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the step measurement, profile this many steps with torch.profiler")
    parser.add_argument("--results-name", default=None,
                        help="results file name without .json (default train_<device>, train_<device>_<only> "
                             "with --only: a partial run does not replace the full one), in $VLP_BENCH_RESULTS "
                             "or bench/results/")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from vlp_train.config import load_config
    preset = load_config(args.preset)
    visual = "" if args.visual == "regions" else f"_{args.visual}{args.image_size or preset.model.image_size}"
    args.results_name = args.results_name or results_name(f"train_{args.device}{visual}", args.only)
    reduced = args.device == "cpu"  # a 2-core CPU cannot train the base shape in a benchmark's time
    defaults = {"batch_size": 32 if reduced else preset.data.batch_size,
                "num_workers": 2 if reduced else preset.data.num_workers,
                "shuffle_buffer": 256 if reduced else preset.data.shuffle_buffer,
                "layers": 2 if reduced else None, "hidden": 256 if reduced else None, "heads": 4 if reduced else None,
                "images": 1000 if reduced else 10000, "steps": 3 if reduced else 30, "warmup": 3 if reduced else 30}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.schedule == "round_robin":  # every window holds the same mix of granularities
        from vlp_train.data import enabled_tasks
        tasks = len(enabled_tasks(preset.objectives, preset.model.stage))
        args.steps = -(-args.steps // tasks) * tasks
    return args


def differs_from_preset(preset_name: str, shape: dict) -> dict:
    """What this run changed from the preset (the CPU defaults shrink the model, batch and workers)."""
    from vlp_train.config import load_config
    preset = load_config(preset_name)
    wanted = {"layers": preset.model.layers, "hidden": preset.model.hidden, "heads": preset.model.heads,
              "batch": preset.data.batch_size, "num_workers": preset.data.num_workers,
              "shuffle_buffer": preset.data.shuffle_buffer, "feature_dim": preset.model.feature_dim,
              "regions": preset.model.max_regions}
    return {k: {"preset": v, "measured": shape[k]} for k, v in wanted.items() if v and v != shape[k]}


def main(argv=None) -> dict:
    load_average = os.getloadavg()[0]  # others' work on a shared machine skews CPU figures
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # build_model warns that a fresh shape is randomly initialised
    cfg = build_config(args)
    shards = synthetic_corpus(args.images, args.regions, args.feature_dim,
                              stored_images=STORED_IMAGE_SIZE if args.visual != "regions" else 0)
    trainer = Trainer(cfg, shards)
    bert = trainer.model.bert_config()
    shape = {"layers": bert.num_hidden_layers, "hidden": bert.hidden_size,
             "heads": bert.num_attention_heads, "parameters": trainer.parameters,
             "regions": args.regions, "feature_dim": args.feature_dim, "text_len": cfg.model.max_text_len,
             "batch": cfg.data.batch_size, "num_workers": cfg.data.num_workers, "shuffle_buffer": cfg.data.shuffle_buffer,
             "images": args.images, "visual": cfg.model.visual}
    if cfg.model.visual != "regions":
        shape.update(image_size=cfg.model.image_size, patch_size=cfg.model.patch_size,
                     patches=(cfg.model.image_size // cfg.model.patch_size) ** 2)
    print(f"measuring {args.preset} on {args.device}: " + ", ".join(f"{k} {v}" for k, v in shape.items())
          + f"; schedule {args.schedule}, ITM weighting {args.itm_weighting}, compile {trainer.compiled}")
    result = {"device": device_name(args.device), "command": "python " + " ".join(sys.argv if argv is None else
                                                                                 ["bench/train.py", *argv]),
              "preset": args.preset, "shape": shape, "schedule": args.schedule,
              "tasks": trainer.tasks, "itm_weighting": args.itm_weighting == "on", "compile": trainer.compiled,
              "autocast": "bf16" if args.device == "cuda" else None,
              "sample": ("one image with its sentence through VLMo's image-text step (ITC, ITM on 3 fusion passes, "
                         "MLM on a 4th)" if cfg.model.arch == "vlmo" else
                         "one (regions, text) sequence through the model with its objectives; "
                         + ("a batch holds one granularity (rt, rp, is in turn), so a batch of B images is B samples"
                            if args.schedule == "round_robin" else
                            "a batch holds all three granularities of its B images, so 3B samples")),
              "differs_from_preset": differs_from_preset(args.preset, shape),
              "torch_threads": trainer.torch.get_num_threads(), "load_average_at_start": load_average,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "target_samples_per_s": TARGET_SAMPLES_PER_S,
              "target": "base config (12 x 768, batch 480, 36 x 2048-d regions) on one H100"}
    if args.only == "flops":
        result["flops"] = bench_flops(trainer, args)
        print("flops:", json.dumps(result["flops"]))
    parts = [("loader", bench_loader), ("step", bench_step), ("e2e", bench_e2e)]
    if cfg.model.arch == "vlmo":
        parts.append(("retrieval", bench_retrieval))
    for part, fn in parts:
        if args.only in (None, part):
            result[part] = fn(trainer, args)
            result[f"{part}_samples_per_s"] = result[part]["samples_per_s"]
            print(f"{part}: {result[part]['samples_per_s']:.1f} samples/s", json.dumps(result[part]))
            write_result(args.results_name, result)  # each part as it ends: a run cut short keeps them
    for part in ("e2e", "step"):  # training's figure: e2e holds only the batches in flight
        if "peak_gpu_memory_mb" in result.get(part, {}):
            result["peak_gpu_memory_mb"] = result[part]["peak_gpu_memory_mb"]
            break
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.results_name, result)
    return result


if __name__ == "__main__":
    main()
