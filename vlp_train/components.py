"""Everything a run is made of, built in one place: `build_run(cfg)` -> `Run`. Training,
evaluation, the benchmarks (and fine-tuning) build their components here, so they train what
`vlp-train run` trains."""
from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlp_train import distributed
from vlp_train.compile import compile_scope, step_module_for
from vlp_train.config import TrainConfig, check_init, per_rank_batch, validate
from vlp_train.data import (CorpusStream, check_corpora_published, decode, enabled_tasks, every_sample,
                            expand_shards, load_tag_vocab, missing_images, no_readable_sample, reads_region_features,
                            samples_per_shard)
from vlp_train.families import Family, family_of
from vlp_train.masking import BatchBuilder
from vlp_train.pretrained import tokenizer_folder
from vlp_train.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig
    device: torch.device
    dist: distributed.Distributed
    family: Family
    tokenizer: object
    tags: list[str]
    tasks: list[Task]
    model: nn.Module
    builder: BatchBuilder
    dataset: CorpusStream
    urls: list[str]
    eval_urls: list[str]
    batch_size: int                 # per rank and micro-batch
    grad_accum: int
    shard_samples: dict[str, int]
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scope: str | None               # what torch.compile compiles: None, "layers" or "step"
    step_module: nn.Module          # Pretraining(model, family), compiled and DDP-wrapped as configured
    autocast: object
    batches_of: Callable[[int], int]  # epoch -> the batches training takes in it


def build_run(cfg: TrainConfig) -> Run:
    """The run's components from its config (a fresh model; `train` loads a checkpoint into them)."""
    check_init(cfg)
    validate(cfg)
    family = family_of(cfg.model.arch)
    if cfg.model.visual not in family.visual_inputs:
        raise ValueError(f"model.arch={family.name} takes model.visual={' or '.join(family.visual_inputs)}, "
                         f"not {cfg.model.visual}")
    tasks = enabled_tasks(cfg.objectives, cfg.model.stage)
    supported = family.patch_tasks if cfg.model.visual == "patches" and family.patch_tasks is not None else family.tasks
    unsupported = [t for t in tasks if t not in supported]
    if unsupported:
        raise ValueError(f"model.arch={family.name} cannot train {', '.join(unsupported)} with "
                         f"model.visual={cfg.model.visual} (it supports {', '.join(supported)}): switch them off "
                         "in objectives")
    if family.match_probability is None and cfg.objectives.itm_weighting:
        raise ValueError(f"model.arch={family.name} gives no ITM match probability for the curriculum's weights: "
                         "set objectives.itm_weighting=false")
    device = pick_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = distributed.setup_distributed(device.type, cfg.run.dist_timeout_s)
    seed_everything(cfg.run.seed + dist_info.rank)
    batch_size, grad_accum = per_rank_batch(cfg.data, cfg.optim, dist_info.world)
    urls, eval_urls = split_shards(cfg)
    check_corpora_published(urls + eval_urls)
    from transformers import BertTokenizerFast
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_folder(cfg.model.init))
    tags = load_tag_vocab(cfg.data.tag_vocab, urls)
    first = first_sample(urls)
    feature_dim = cfg.model.feature_dim or first["feats"].shape[1]
    image_size = None
    if cfg.model.visual != "regions":  # a corpus without images stops here, not at every sample
        if first["image"] is None:
            raise missing_images(first["where"], cfg.model.visual)
        image_size = cfg.model.image_size
    scope = compile_scope(cfg, device)
    builder = BatchBuilder(tokenizer, {t: i for i, t in enumerate(tags)}, cfg.model.max_text_len,
                           cfg.model.max_regions, cfg.objectives, pad_regions=scope == "step", feature_dim=feature_dim,
                           views=family.views(cfg) if family.views else None, image_size=image_size,
                           region_features=reads_region_features(cfg.model.visual, tasks))
    dataset = CorpusStream(urls, builder, batch_size, tasks, cfg.objectives.schedule, cfg.data.shuffle_buffer,
                           cfg.run.seed, cfg.data.resampled, dist_info.rank, dist_info.world)
    shard_samples = samples_per_shard(urls, cfg.data.manifest)
    if cfg.model.stage == "language":  # VLMo's language stage: the corpus's text alone (vlp_train/text_corpus.py)
        from vlp_train.text_corpus import TextStream, rows_per_file, text_corpus_files
        text_files = text_corpus_files(cfg.data.text_corpus, urls)
        dataset = TextStream(text_files, builder, batch_size, tasks, cfg.objectives.schedule, cfg.data.shuffle_buffer,
                             cfg.run.seed, cfg.data.resampled, dist_info.rank, dist_info.world)
        shard_samples = rows_per_file(text_files)
    if not shard_samples and not (cfg.data.resampled or cfg.data.steps_per_epoch):
        raise ValueError(f"the samples in remote shards ({urls[0]}, ...) cannot be counted here: give "
                         "data.manifest=PATH (the corpus's manifest.parquet) or data.steps_per_epoch")
    batches_of = epoch_batches(dataset, cfg, shard_samples, batch_size, dist_info.world)
    if batches_of(0) == 0:  # a rank without a shard: without this, every epoch would end at once, forever
        workers = max(1, cfg.data.num_workers)
        raise ValueError(f"{len(urls)} training shard(s) for {dist_info.world} rank(s): a rank gets no shard, so an "
                         f"epoch has no step. Shards are split by rank, then by loader worker: give at least "
                         f"{dist_info.world} shards ({dist_info.world * workers} keep every loader worker busy), fewer "
                         "ranks, or data.resampled=true")
    if cfg.optim.epochs:
        total_steps = sum(max(1, batches_of(e) // grad_accum) for e in range(cfg.optim.epochs))
        total_steps = min(total_steps, cfg.optim.max_steps or total_steps)
    else:
        total_steps = cfg.optim.max_steps
    # the model last: every check above stops a misconfigured run before its weights are loaded
    model = family.build(cfg.model, feature_dim, tags).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio))
    step_module = distributed.wrap(step_module_for(model, family, scope), dist_info, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    run = Run(cfg=cfg, device=device, dist=dist_info, family=family, tokenizer=tokenizer, tags=tags, tasks=tasks,
              model=model, builder=builder, dataset=dataset, urls=urls, eval_urls=eval_urls, batch_size=batch_size,
              grad_accum=grad_accum, shard_samples=shard_samples, total_steps=total_steps, optimizer=optimizer,
              scheduler=scheduler, scope=scope, step_module=step_module, autocast=autocast, batches_of=batches_of)
    return run


def split_shards(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards): data.eval_shards, else the last shard when there are several."""
    urls = expand_shards(cfg.data.shards)
    if cfg.data.eval_shards:
        return urls, expand_shards(cfg.data.eval_shards)
    if len(urls) > 1:
        return urls[:-1], urls[-1:]
    log.warning("only one shard: evaluating on the training shard (give data.eval_shards for a held-out one)")
    return urls, urls


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def first_sample(urls: list[str]) -> dict:
    """The first decodable sample (bad ones are skipped, as in training), with `where` it is: its
    region feature size and whether the corpus has images are read off it."""
    for raw in every_sample(urls):  # every rank reads the same
        try:
            return {**decode(raw), "where": f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"}
        except ValueError as err:
            log.warning("skipping bad sample: %s", err)
    raise no_readable_sample(urls)



def epoch_batches(dataset: CorpusStream, cfg: TrainConfig, shard_samples: dict[str, int], batch_size: int,
                  world: int):
    """epoch -> the batches training takes in it. Exact epochs: from the shards' sample counts
    and how they are split over ranks and loader workers (each worker's last batch is partial),
    so the schedule ends with the last epoch's data rather than short of it or in an extra one.
    Resampled (or remote shards without a manifest): data.steps_per_epoch, else corpus / batch."""
    if cfg.data.resampled or not shard_samples:
        fixed = cfg.data.steps_per_epoch or max(1, sum(shard_samples.values()) // (batch_size * world))
        return lambda epoch: fixed
    workers = max(1, cfg.data.num_workers)
    return functools.lru_cache(maxsize=None)(lambda epoch: dataset.epoch_batches(epoch, shard_samples, workers))


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(warmup_ratio * total_steps)))

    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def make_optimizer(model: nn.Module, cfg, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # e.g. a momentum (EMA) copy: updated by the model, not the optimizer
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on every device: it can skip a non-finite step on the device (`found_inf`, train.optimizer_step)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=True)
