"""The trainer: build the components, then the loop: resume -> step -> log -> eval -> save."""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlp_train import checkpoint
from vlp_train.config import COMPILE_MODES, COMPILE_SCOPES, TrainConfig, dumps
from vlp_train.curriculum import WEIGHTED_TASKS, combine, itm_weighting_on, sample_loss
from vlp_train.data import (CorpusStream, decode, enabled_tasks, every_sample, expand_shards,
                            load_tag_vocab, make_loader, samples_per_shard)
from vlp_train.masking import REGION_FIELDS, BatchBuilder
from vlp_train.model import bert_config_for, build_model, bundled_bert_path, call_layer, export_hf
from vlp_train.objectives import OBJECTIVES, encode_view, gather_positions

log = logging.getLogger(__name__)


class Pretraining(nn.Module):
    """The model with its objectives, so one module (DDP / torch.compile) sees every use."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, views: dict, weighted: tuple = ()):
        """Per task of the batch: (named per-sample losses, the ITM logits or None, and for the
        tasks in `weighted` each sample's detached ITM match probability of its clean (unmasked)
        pair, else None). Every task runs in this one call: DDP allows one forward per backward
        (a `mixed` batch holds several tasks), and torch.compile takes the extra ITM forward
        into the step's graph instead of running it eagerly."""
        results = {}
        for task, view in views.items():
            named, outputs = OBJECTIVES[task](self.model, view)
            weight = None
            if task in weighted:
                weight = self.match_probability(view["clean_ids"], view.get("clean_text_mask", view["text_mask"]),
                                                view["features"], view["locations"], view["region_mask"])
            results[task] = (named, outputs.get("itm_logits"), weight)
        return results

    @torch.no_grad()
    def match_probability(self, ids, text_mask, features, locations, region_mask):
        """With dropout off: a weight is the model's judgement of the pair, not a random draw.
        (The layer scope's no-grad eval graph is the evaluation's; the step scope traces the
        mode switch into its graph, which torch.compile does without a break.)"""
        was_training = self.model.training
        self.model.eval()
        try:
            text, _ = self.model(ids, text_mask, features, locations, region_mask)
        finally:
            self.model.train(was_training)
        return F.softmax(self.model.itm_logits(text).float(), dim=-1)[:, 1]


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control_group: object = None  # a gloo group: host-side agreement without a device sync

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    import torch.distributed as dist
    if not dist.is_initialized():  # else a second train() in this process (tests, notebooks): the same group
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if device_type == "cuda" else None  # None: the default (gloo) group
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), control)


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


def to_device(views: dict, device: torch.device) -> dict:
    """Views to the device; region features travel as float16 and are widened there."""
    def move(value):
        if not torch.is_tensor(value):
            return value
        value = value.to(device, non_blocking=True)
        return value.float() if value.dtype == torch.float16 else value
    return {task: {k: move(v) for k, v in view.items()} for task, view in views.items()}


def compile_scope(cfg: TrainConfig, device: torch.device) -> str | None:
    """What torch.compile compiles in this run: None (eager), "layers" or "step"."""
    if cfg.model.compile not in COMPILE_MODES:
        raise ValueError(f"model.compile={cfg.model.compile!r}: expected one of {COMPILE_MODES}")
    if cfg.model.compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"model.compile_scope={cfg.model.compile_scope!r}: expected one of {COMPILE_SCOPES}")
    on = cfg.model.compile == "on" or (cfg.model.compile == "auto" and device.type == "cuda")
    return cfg.model.compile_scope if on else None


def step_module_for(model: nn.Module, scope: str | None, backend: str = "inductor") -> nn.Module:
    """The module the loop calls: `Pretraining(model)`, compiled as `scope` says (`layers`: the
    model's layer call becomes the compiled one, so evaluation, which calls the model, uses it too)."""
    step_module = Pretraining(model)
    if scope == "step":
        return CompiledStep(step_module, backend)
    if scope == "layers":
        model.bert.call_layer = CompiledLayers(backend)
    return step_module


def allow_graphs(count: int) -> None:
    """Dynamo keeps at most `recompile_limit` graphs per function (default 8) and past it runs
    the function eagerly, with a log warning as the only sign."""
    import torch._dynamo  # here, not at module level: ~2 s of start-up that an eager run never needs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)


LAYER_GRAPHS = 8  # the layer's graphs: training, and one no-grad eval-mode graph (ITM weights, evaluation)
STEP_GRAPHS = 16  # the step's graphs: one per task set and weighting (round_robin 5, mixed 2), plus re-specialisation


class CompiledLayers:
    """Regional compilation (`model.compile_scope=layers`, the default): one torch.compile of
    `model.call_layer` serves every transformer layer, which all run the same code on parameters
    of the same shapes (dynamo lifts a layer's parameters into graph inputs, so the graph does not
    depend on which layer it is). A compile takes seconds, not the minutes per graph of the whole
    step; the embeddings, heads and losses run eagerly (by arithmetic 3-7% of `base`'s FLOPs:
    the region embedding, MRFR and the vocabulary heads at the labelled positions).

    The batch and sequence dims (text + regions: one length) are marked dynamic before every call,
    so one graph serves every batch from the first (unmarked, dynamo compiles a static graph first,
    and its duck sizing ties a sequence length that equals another size to it); graphs: the
    training forward/backward, and one no-grad eval-mode forward that the ITM weights (dropout off)
    and evaluation share."""

    def __init__(self, backend: str = "inductor"):
        allow_graphs(LAYER_GRAPHS)
        self.compiled = torch.compile(call_layer, backend=backend)

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for tensor, dims in ((hidden, (0, 1)), (attn_mask, (0, 3))):  # [B, N, D], [B, 1, 1, N]
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return self.compiled(layer, hidden, attn_mask)


class CompiledStep(nn.Module):
    """torch.compile of the whole step module (`model.compile_scope=step`), told up front which
    sizes vary from batch to batch. One graph per set of tasks in a batch and ITM weighting
    (round_robin: 5, each task alone, rp and is also weighted; mixed: 2, all tasks, unweighted and
    weighted), each holding all the layers, heads and losses: more fusion than `CompiledLayers`,
    minutes of compilation per graph.

    The batch (dim 0 of every view field: an epoch's last batch is smaller) and the per-batch
    lengths (dim 1 of the text and labelled-position fields) vary; the region count does not,
    since the loader pads regions to `max_regions` for a compiled step (`pad_regions`). Left to
    itself, dynamo compiles a graph for the first batch's sizes and recompiles a dynamic one when
    they change: two or more compiles per task and weighting, the first graph never serving
    again. Marked dynamic up front, one graph per task set and weighting serves every batch.

    The region count stays fixed because inductor (torch 2.13, CPU) fails to lower attention over
    a sequence of text + regions with both lengths symbolic (ValueRangeError in a stride check;
    tests/vlp_train/test_compile.py)."""

    def __init__(self, step_module: nn.Module, backend: str = "inductor"):
        super().__init__()
        allow_graphs(STEP_GRAPHS)
        self.compiled = torch.compile(step_module, backend=backend)

    def forward(self, views: dict, weighted: tuple = ()):
        for view in views.values():
            for name, value in view.items():
                if torch.is_tensor(value):
                    torch._dynamo.maybe_mark_dynamic(value, 0)
                    if value.ndim >= 2 and name not in REGION_FIELDS:
                        torch._dynamo.maybe_mark_dynamic(value, 1)
        return self.compiled(views, weighted)


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
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=device.type == "cuda")


def first_feature_dim(urls: list[str]) -> int:
    """The region feature size of the first decodable sample (bad ones are skipped, as in training)."""
    for raw in every_sample(urls):  # every rank reads the same
        try:
            return decode(raw)["feats"].shape[1]
        except ValueError as err:
            log.warning("skipping bad sample: %s", err)
    raise ValueError(f"no decodable sample in {urls[0]} ... {urls[-1]}")


# ---------------------------------------------------------------------------------------------


def compute_loss(step_module, views: dict, weighting: bool, autocast):
    """One batch: named per-sample losses per task, ITM weights, the scalar loss. The step
    module is called once for all the batch's tasks (one DDP forward per backward)."""
    weighted = tuple(task for task in views if weighting and task in WEIGHTED_TASKS)
    with autocast:
        results = step_module(views, weighted)
    per_task, actives, weights, named_means = {}, {}, {}, {}
    for task, (named, _, weight) in results.items():
        if weight is not None:
            weights[task] = weight
        per_task[task] = sample_loss(named)
        actives[task] = views[task]["active"]
        for name, value in named.items():
            count = (value != 0).float().sum().clamp(min=1)
            named_means[f"{task}/{name}"] = value.detach().sum() / count
    loss = combine(per_task, actives, weights)
    return loss, named_means, weights


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training into cfg.run.output. Returns a summary."""
    out = cfg.run.output
    ckpt_dir = os.path.join(out, "checkpoints")
    state = None
    if resume:
        path = checkpoint.latest(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
        state = checkpoint.load(path)
        cfg = TrainConfig.from_dict(state["config"])  # the run continues with its own config...
        cfg.run.stop_after = 0  # ...but a simulated kill belongs to the process that was stopped
        log.info("resuming from %s (step %d)", path, state["step"])

    # -- components ------------------------------------------------------------------------
    device = pick_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = setup_distributed(device.type)
    seed_everything(cfg.run.seed + dist_info.rank)
    urls = expand_shards(cfg.data.shards)
    if cfg.data.eval_shards:
        eval_urls = expand_shards(cfg.data.eval_shards)
    elif len(urls) > 1:
        urls, eval_urls = urls[:-1], urls[-1:]
    else:
        eval_urls = urls
        log.warning("only one shard: evaluating on the training shard (give data.eval_shards for a held-out one)")
    from transformers import BertTokenizerFast
    _, init_folder, _ = bert_config_for(cfg.model)
    tokenizer = BertTokenizerFast.from_pretrained(init_folder if os.path.isfile(os.path.join(init_folder, "vocab.txt"))
                                                  else bundled_bert_path())
    tags = load_tag_vocab(cfg.data.tag_vocab, urls)
    feature_dim = cfg.model.feature_dim or first_feature_dim(urls)
    model = build_model(cfg.model, feature_dim, len(tags)).to(device)
    tasks = enabled_tasks(cfg.objectives)
    scope = compile_scope(cfg, device)
    builder = BatchBuilder(tokenizer, {t: i for i, t in enumerate(tags)}, cfg.model.max_text_len,
                           cfg.model.max_regions, cfg.objectives, pad_regions=scope == "step")
    dataset = CorpusStream(urls, builder, cfg.data.batch_size, tasks, cfg.objectives.schedule,
                           cfg.data.shuffle_buffer, cfg.run.seed, cfg.data.resampled, dist_info.rank, dist_info.world)
    shard_samples = samples_per_shard(urls, cfg.data.manifest)
    if not shard_samples and not (cfg.data.resampled or cfg.data.steps_per_epoch):
        raise ValueError(f"the samples in remote shards ({urls[0]}, ...) cannot be counted here: give "
                         "data.manifest=PATH (the corpus's manifest.parquet) or data.steps_per_epoch")
    samples = sum(shard_samples.values())
    batches_of = epoch_batches(dataset, cfg, shard_samples, dist_info.world)
    if cfg.optim.epochs:
        total_steps = sum(max(1, batches_of(e) // cfg.optim.grad_accum) for e in range(cfg.optim.epochs))
        total_steps = min(total_steps, cfg.optim.max_steps or total_steps)
    else:
        total_steps = cfg.optim.max_steps
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio))

    step, epoch, start_batch = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, start_batch = state["step"], state["position"]["epoch"], state["position"]["batch"]
        restore_rng(state, dist_info)

    step_module = step_module_for(model, scope)
    if dist_info.world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    os.makedirs(out, exist_ok=True)
    logger = RunLogger(out, cfg) if dist_info.main else None
    if logger and state is None:
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            f.write(dumps(cfg))
    log.info("training %s: %d shard(s), %d samples, %d tags, features %d-d, tasks %s, %d steps",
             out, len(urls), samples, len(tags), feature_dim, tasks, total_steps)

    # -- the loop ----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not dist_info.main, dynamic_ncols=True)
    last_eval, stopped = None, False
    window = {"loss": [], "named": {}, "samples": 0, "bad": 0, "start": time.perf_counter()}
    model.train()
    while step < total_steps and not stopped:
        weighting = itm_weighting_on(epoch, cfg.objectives)
        dataset.set_position(epoch, start_batch, batches_of(epoch) if cfg.data.resampled else None,
                             task_offset=sum(batches_of(e) for e in range(epoch)))
        loader = make_loader(dataset, cfg.data.num_workers, pin_memory=device.type == "cuda")
        batch_in_epoch, micro = start_batch, 0
        for batch in _synchronised(loader, dist_info):
            with accumulating(step_module, completes_step=(micro + 1) % cfg.optim.grad_accum == 0):
                loss, named, _ = compute_loss(step_module, to_device(batch["views"], device), weighting, autocast)
                (loss / cfg.optim.grad_accum).backward()
            batch_in_epoch, micro = batch["index"] + 1, micro + 1
            window["loss"].append(loss.detach())
            for k, v in named.items():
                window["named"].setdefault(k, []).append(v)
            window["samples"] += len(batch["keys"]) * dist_info.world
            window["bad"] += batch["bad_samples"]
            if logger and cfg.run.log_keys:
                logger.keys(step, batch["keys"])
            if micro % cfg.optim.grad_accum:
                continue
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == total_steps:
                row = logger.flush(window, step, epoch, scheduler.get_last_lr()[0], weighting) if logger else None
                if row:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                window = {"loss": [], "named": {}, "samples": 0, "bad": 0, "start": time.perf_counter()}
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and dist_info.main:
                last_eval = evaluate(model, builder, eval_urls, cfg, device, autocast)
                logger.eval(step, last_eval)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                save_checkpoint(ckpt_dir, step, model, optimizer, scheduler,
                                {"epoch": epoch, "batch": batch_in_epoch}, cfg, dist_info)
            if cfg.run.stop_after and step >= cfg.run.stop_after:
                stopped = True  # as if the process were killed here
                break
            if step >= total_steps:
                break
        else:
            # an epoch's last micro-batches short of optim.grad_accum are dropped (as a loader drops
            # a partial batch): kept, they would join the next epoch's first step
            optimizer.zero_grad(set_to_none=True)
            epoch, start_batch = epoch + 1, 0
            continue
        start_batch = batch_in_epoch
    bar.close()
    summary = {"steps": step, "epoch": epoch, "stopped": stopped, "eval": last_eval}
    if stopped:
        return summary
    save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, {"epoch": epoch, "batch": start_batch}, cfg, dist_info)
    if not dist_info.main:
        return summary
    summary["eval"] = evaluate(model, builder, eval_urls, cfg, device, autocast)
    logger.eval(step, summary["eval"])
    export_hf(model, tokenizer, os.path.join(out, "hf"))
    logger.close()
    summary["bad_samples"] = logger.bad_samples
    return summary


def accumulating(step_module, completes_step: bool):
    """Under DDP, a micro-batch that does not complete an optimizer step keeps its gradients
    local (`no_sync`): they are all-reduced once, summed, with the step's last micro-batch,
    instead of once per micro-batch (optim.grad_accum all-reduces of every gradient a step)."""
    if completes_step or not isinstance(step_module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return step_module.no_sync()


def epoch_batches(dataset: CorpusStream, cfg: TrainConfig, shard_samples: dict[str, int], world: int):
    """epoch -> the batches training takes in it. Exact epochs: from the shards' sample counts
    and how they are split over ranks and loader workers (each worker's last batch is partial),
    so the schedule ends with the last epoch's data rather than short of it or in an extra one.
    Resampled (or remote shards without a manifest): data.steps_per_epoch, else corpus / batch."""
    if cfg.data.resampled or not shard_samples:
        fixed = cfg.data.steps_per_epoch or max(1, sum(shard_samples.values()) // (cfg.data.batch_size * world))
        return lambda epoch: fixed
    workers = max(1, cfg.data.num_workers)
    return functools.lru_cache(maxsize=None)(lambda epoch: dataset.epoch_batches(epoch, shard_samples, workers))


def save_checkpoint(folder: str, step: int, model, optimizer, scheduler, position: dict, cfg: TrainConfig,
                    dist_info: Distributed) -> None:
    """Rank 0 writes the checkpoint; every rank calls this, to hand in its own RNG state."""
    rank_rng = rank_rng_states(dist_info)
    if dist_info.main:
        checkpoint.save(folder, step, model, optimizer, scheduler, position, cfg.to_dict(), rank_rng=rank_rng)


def rank_rng_states(dist_info: Distributed) -> list[dict]:
    """Every rank's RNG state, by rank: each rank draws its own dropout masks (seed + rank), and
    after a resume must go on drawing its own, not rank 0's. Through the CPU (gloo) group."""
    if dist_info.world == 1:
        return [checkpoint.rng_state()]
    import torch.distributed as dist
    states = [None] * dist_info.world
    dist.all_gather_object(states, checkpoint.rng_state(), group=dist_info.control_group)
    return states


def restore_rng(state: dict, dist_info: Distributed) -> None:
    rng = checkpoint.rng_of_rank(state, dist_info.rank)
    if rng is None:
        log.warning("the checkpoint holds no RNG state of rank %d (saved by fewer ranks): it keeps its fresh seed",
                    dist_info.rank)
        return
    checkpoint.set_rng_state(rng)


def _synchronised(loader, dist_info: Distributed):
    """Batches; under DDP every rank stops the epoch when any rank runs out (no hang). The flag
    goes through a CPU (gloo) group: a CUDA tensor and `.item()` here would sync every step."""
    if dist_info.world == 1:
        yield from loader
        return
    import torch.distributed as dist
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dist_info.control_group)
        if flag.item() == 0:
            return
        yield batch


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, builder: BatchBuilder, urls: list[str], cfg: TrainConfig, device, autocast) -> dict:
    """MLM and MRC accuracy (region-tag and image-sentence views), ITM accuracy and ROC-AUC on
    true vs shuffled pairs, over up to run.eval_batches batches of the held-out shards."""
    from sklearn.metrics import roc_auc_score

    tasks = [t for t in ("rt", "is") if t in enabled_tasks(cfg.objectives) or t == "rt"]
    stream = CorpusStream(urls, builder, cfg.data.batch_size, tasks, "mixed", 1, seed=12345)
    stream.set_position(0, 0, None)
    was_training = model.training
    model.eval()
    hits = {"mlm": [0, 0], "mrc": [0, 0]}
    itm_scores, itm_labels = [], []
    for n, batch in enumerate(stream):
        if n >= cfg.run.eval_batches:
            break
        views = to_device(batch["views"], device)
        for task, view in views.items():
            with autocast:
                text, regions = encode_view(model, view)
            positions, labels = view["mlm_positions"], view["mlm_targets"]
            keep = labels != -100
            predicted = model.mlm_logits(gather_positions(text, positions)).argmax(-1)
            hits["mlm"][0] += (predicted[keep] == labels[keep]).sum().item()
            hits["mlm"][1] += keep.sum().item()
            if task == "rt":
                keep = view["mrc_labels"] != -100
                hits["mrc"][0] += (model.mrc(regions).argmax(-1)[keep] == view["mrc_labels"][keep]).sum().item()
                hits["mrc"][1] += keep.sum().item()
            if task == "is":
                itm_scores += F.softmax(model.itm_logits(text).float(), -1)[:, 1].tolist()
                itm_labels += view["itm_labels"].tolist()
    model.train(was_training)
    result = {f"{k}_acc": (h / n if n else float("nan")) for k, (h, n) in hits.items()}
    if itm_labels:
        predictions = [int(s >= 0.5) for s in itm_scores]
        result["itm_acc"] = float(np.mean([p == y for p, y in zip(predictions, itm_labels)]))
        result["itm_auc"] = float(roc_auc_score(itm_labels, itm_scores)) if len(set(itm_labels)) == 2 else float("nan")
    result["pairs"] = len(itm_labels)
    return result


class RunLogger:
    """JSON Lines (log.jsonl) and TensorBoard events in the run folder."""

    def __init__(self, out: str, cfg: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter
        self._jsonl = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(out, "tensorboard"))
        self.bad_samples = 0

    def _write(self, row: dict):
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()

    def flush(self, window: dict, step: int, epoch: int, lr: float, weighting: bool) -> dict | None:
        if not window["loss"]:
            return None
        elapsed = time.perf_counter() - window["start"]
        # the only host-device syncs: once per log interval
        row = {"step": step, "epoch": epoch, "lr": lr, "itm_weighting": weighting,
               "loss": torch.stack(window["loss"]).float().mean().item(),
               "samples_per_s": window["samples"] / max(elapsed, 1e-9), "bad_samples": window["bad"]}
        for name, values in sorted(window["named"].items()):
            row[name] = torch.stack(values).float().mean().item()
        self.bad_samples += window["bad"]
        self._write(row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step",):
                self._tb.add_scalar(f"train/{k}", v, step)
        return row

    def keys(self, step: int, keys: list[str]):
        self._write({"step": step, "keys": keys})

    def eval(self, step: int, result: dict):
        self._write({"step": step, "eval": result})
        for k, v in result.items():
            self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self):
        self._jsonl.close()
        self._tb.close()
