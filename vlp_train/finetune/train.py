"""`vlp-train finetune` and `vlp-train evaluate`: a pre-trained model (or a BERT folder, or random
weights, as baselines) with a task head, trained by the pre-training loop (train.run_loop: the
same steps, gradient accumulation, skipped non-finite steps, logging, checkpoints and exact
resume), evaluated on the validation split after every epoch; the best epoch's model is kept.

The fine-tuning folder (--output):
  config.json, log.jsonl, tensorboard/, checkpoints/   as a pre-training run's
  best/          the best model: a whole-model folder (pretrained.save_pretrained: usable as --init)
                 plus head.safetensors and task.json (task, labels, the metric and its step)
  metrics.json   the best evaluation (and `vlp-train evaluate` writes its own beside it)
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from vlp_train import distributed
from vlp_train.compile import CompiledLayers, compile_scope
from vlp_train.components import lr_lambda, make_optimizer, pick_device, seed_everything
from vlp_train.finetune.config import FinetuneConfig, validate
from vlp_train.finetune.data import (Collate, SplitData, batch_indices, batches_per_epoch, epoch_order, loader,
                                     read_regions_once)
from vlp_train.finetune.heads import init_head
from vlp_train.finetune.pixels import ImageFolder
from vlp_train.finetune.regions import DetectionIndex
from vlp_train.finetune.tasks import FinetuneTask, task_for, task_of
from vlp_train.masking import BatchBuilder
from vlp_train.step import to_device
from vlp_train.train import LoopHooks, run_loop, save_checkpoint, start_run

log = logging.getLogger(__name__)

BEST = "best"
HEAD_WEIGHTS = "head.safetensors"
TASK_FILE = "task.json"
METRICS = "metrics.json"


class TaskModel(nn.Module):
    """The pre-trained model and a task head over its fusion [CLS] state (both images' [CLS] states,
    concatenated, for a pair task); or, for a dual-encoder task, the model's image and text alone."""

    def __init__(self, model: nn.Module, head: nn.Module, images: int = 1, regions: bool = False,
                 dual_encoder: bool = False):
        super().__init__()
        self.model, self.head, self.images, self.regions = model, head, images, regions
        self.dual_encoder = dual_encoder

    def forward(self, inputs: dict):
        pixels = inputs.get("pixels")  # the images' (uint8), for a model on patches; None: the batch has none
        if self.dual_encoder:  # (image features [B, D], text features [B, D], the contrast's log scale)
            m = self.model
            # the scale comes out of forward (not read beside it) so that DDP counts it as used and
            # all-reduces its gradient; `* 1` gives it a node in the graph DDP searches from the outputs
            return (m.embed_images(inputs["features"], inputs["locations"], inputs["region_mask"], pixels),
                    m.embed_texts(inputs["input_ids"], inputs["text_mask"]), m.contrast_log_scale * 1)
        text, region_states = self.model(inputs["input_ids"], inputs["text_mask"], inputs["features"],
                                         inputs["locations"], inputs["region_mask"], pixels)
        if self.regions:  # a score per region [B, R]
            return self.head(region_states, inputs["region_mask"])
        if self.head is None:  # a pair's match: the pre-trained model's ITM head
            return self.model.itm_logits(text)
        cls = text[:, 0]
        if self.images > 1:  # [images x B, D] -> [B, images x D]
            cls = torch.cat(cls.chunk(self.images), dim=-1)
        return self.head(cls)


@dataclass
class FinetuneRun:
    """What run_loop, save_checkpoint and load_state need (the names of components.Run)."""
    cfg: FinetuneConfig
    task: FinetuneTask
    device: torch.device
    dist: distributed.Distributed
    tokenizer: object
    builder: BatchBuilder
    labels: list[str]
    train: SplitData
    val: SplitData
    model: TaskModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_module: nn.Module
    autocast: object
    batch_size: int
    grad_accum: int
    total_steps: int
    steps_per_epoch: int
    epoch_batches: int        # batches a rank takes in an epoch (the same on every rank)


def read_split(task: FinetuneTask, cfg: FinetuneConfig, split: str):
    result = task.read(cfg.data.data, split)
    log.info("%s", result.summary())
    return result


@dataclass(frozen=True)
class InitModel:
    """model.init resolved once (pretrained.resolve_init), with a saved model's config read once."""
    folder: str | None
    config: tuple | None          # a saved model's read_config(folder): (BertConfig, vlp section); else None

    @property
    def section(self) -> dict | None:
        return self.config[1] if self.config else None


def resolve_model_init(cfg: FinetuneConfig) -> InitModel:
    """model.init resolved, a saved model's config read, and model.arch set from it (a saved model
    fine-tunes as the family it was trained as)."""
    from vlp_train.pretrained import read_config, resolve_init

    kind, folder = resolve_init(cfg.model.init)
    init = InitModel(folder, read_config(folder) if kind == "vlp" else None)
    if init.section is not None:
        cfg.model.arch = init.section["arch"]
    return init


@dataclass(frozen=True)
class VisualInput:
    """What the model to fine-tune sees of an image, and where that was read."""
    visual: str                   # model.visual: regions, patches or both
    image_size: int | None        # the square its pixels are resized to (None: regions)
    feature_dim: int | None       # a saved model's region feature size (None: a model built afresh)
    source: str                   # "model.init FOLDER" or "this run"


def saved_visual_input(section: dict, source: str) -> VisualInput:
    """A saved model's visual input, from its config's vlp section (`source`: "model.init FOLDER")."""
    visual = section.get("visual", "regions")
    from vlp_train.visual import patch_settings
    return VisualInput(visual, patch_settings(section)[0] if visual != "regions" else None,
                       section.get("feature_dim"), source)


def visual_input(cfg: FinetuneConfig, init: InitModel) -> VisualInput:
    """A saved model's own (its folder's config), else the run's model.visual (a model built afresh)."""
    if init.section is not None:
        return saved_visual_input(init.section, f"model.init {init.folder}")
    visual = cfg.model.visual
    return VisualInput(visual, cfg.model.image_size if visual != "regions" else None, None, "this run")


def check_inputs(seen: VisualInput, task: FinetuneTask, images: str, detections: str) -> None:
    """Refuse, before any data is read, a run without what its model sees: the images' pixels
    (--images) for model.visual patches or both, regions (--detections) for regions or both, and for
    a task that reads them whatever the model sees (RefCOCO+'s candidates, ITM retrieval's first
    stage). Otherwise such a run would read every detection and only fail at its first forward."""
    if seen.visual != "regions" and not images:
        raise ValueError(f"{seen.source} has model.visual={seen.visual}: it needs the images' pixels, and this run "
                         "has none: give --images DIR (data.images), the folder of the dataset's image files")
    if not detections and seen.visual != "patches":
        raise ValueError(f"--detections is required: the regions of the dataset's images (vlp-data detect output); "
                         f"{seen.source} has model.visual={seen.visual}")
    if not detections and task.needs_detections:
        raise ValueError(f"--detections is required: {task.name} reads the images' detected regions "
                         f"({'its candidates' if task.regions else 'their tags, the first stage'}) "
                         "even for a model on patches")
    if images and seen.visual == "regions":
        log.warning("--images %s is not used: %s has model.visual=regions (it reads region features only)", images,
                    seen.source)


def backbone(cfg: FinetuneConfig, init: InitModel, seen: VisualInput, feature_dim: int | None):
    """The model to fine-tune, as model.init says: a run or saved model folder (the whole
    pre-trained model, its family from the folder), a HF BERT folder, None (the bundled MiniLM)
    or "random". `feature_dim`: the detections' (None without; a saved model on patches alone
    keeps its own: its region features are not read)."""
    from vlp_train.families import family_of
    from vlp_train.pretrained import init_from

    family = family_of(cfg.model.arch)
    if init.config is not None:
        if seen.visual == "patches":  # no region embedding: the features are not read
            feature_dim = seen.feature_dim
        return init_from(init.folder, family.model_class, cfg.model, feature_dim,
                         list(init.section.get("tags", [])), init.config)
    return family.build(cfg.model, feature_dim or 0, [])


def make_builder(tokenizer, cfg: FinetuneConfig, feature_dim: int | None, image_size: int | None = None) -> BatchBuilder:
    from vlp_train.config import ObjectiveConfig
    return BatchBuilder(tokenizer, {}, cfg.model.max_text_len, cfg.model.max_regions, ObjectiveConfig(),
                        feature_dim=feature_dim, image_size=image_size)


def build_finetune(cfg: FinetuneConfig) -> FinetuneRun:
    from transformers import BertTokenizerFast

    from vlp_train.config import per_rank_batch
    from vlp_train.families import family_of
    from vlp_train.pretrained import tokenizer_in

    validate(cfg)
    init = resolve_model_init(cfg)
    task = task_for(cfg.task.name, cfg.task.retrieval_objective, family_of(cfg.model.arch).dual_encoder)
    seen = visual_input(cfg, init)
    check_inputs(seen, task, cfg.data.images, cfg.data.detections)
    device = pick_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = distributed.setup_distributed(device.type, cfg.run.dist_timeout_s)
    seed_everything(cfg.run.seed + dist_info.rank)
    index = DetectionIndex(cfg.data.detections) if cfg.data.detections else None
    images = ImageFolder(cfg.data.images) if seen.image_size else None
    train_read, val_read = read_split(task, cfg, cfg.data.train_split), read_split(task, cfg, cfg.data.eval_split)
    labels = task.labels(train_read, cfg)
    if index is not None:
        read_regions_once(index, [(train_read, cfg.data.max_examples), (val_read, cfg.data.max_eval_examples)],
                          cfg.model.max_regions)
    train = SplitData(task, train_read, index, cfg.model.max_regions, cfg.data.max_examples, images, seen.image_size,
                      dist_info)
    val = SplitData(task, val_read, index, cfg.model.max_regions, cfg.data.max_eval_examples, images, seen.image_size,
                    dist_info)
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_in(init.folder))
    builder = make_builder(tokenizer, cfg, train.feature_dim, seen.image_size)
    batch_size, grad_accum = per_rank_batch(cfg.data, cfg.optim, dist_info.world)
    epoch_batches = batches_per_epoch(len(train), batch_size, dist_info.world)
    if epoch_batches < grad_accum:
        raise ValueError(f"{task.name} {train.split}: {len(train)} examples over {dist_info.world} rank(s) make "
                         f"{epoch_batches} batch(es) of {batch_size} a rank, fewer than one optimizer step "
                         f"(optim.grad_accum={grad_accum}): use more examples or a smaller batch")
    steps_per_epoch = epoch_batches // grad_accum
    total_steps = steps_per_epoch * cfg.optim.epochs if cfg.optim.epochs else cfg.optim.max_steps
    total_steps = min(total_steps, cfg.optim.max_steps or total_steps)
    if not cfg.run.eval_every:
        cfg.run.eval_every = steps_per_epoch  # evaluate (and keep the best) at each epoch's end
    pretrained = backbone(cfg, init, seen, train.feature_dim)
    bert_config = pretrained.bert_config()  # every family's: its transformer's shape
    head = task.head(bert_config.hidden_size, len(labels), cfg.task.head_hidden_scale)
    head = head and init_head(head, bert_config.initializer_range)
    scope = compile_scope(cfg, device)
    if scope == "step":
        raise ValueError("model.compile_scope=step: fine-tuning compiles the transformer layer (model.compile_scope="
                         "layers, the default); the whole step is compiled for pre-training only")
    if scope == "layers":  # one compiled layer serves every layer (compile.CompiledLayers), as in pre-training
        pretrained.set_layer_call(CompiledLayers())
    model = TaskModel(pretrained, head, task.images, task.regions, task.dual_encoder).to(device)
    optimizer = make_optimizer(model, cfg, device)
    if cfg.task.head_lr_scale != 1.0 and head is not None:
        scale_head_lr(optimizer, model, cfg.optim.lr * cfg.task.head_lr_scale)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio))
    step_module = distributed.wrap(model, dist_info, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return FinetuneRun(cfg=cfg, task=task, device=device, dist=dist_info, tokenizer=tokenizer, builder=builder,
                       labels=labels, train=train, val=val, model=model, optimizer=optimizer, scheduler=scheduler,
                       step_module=step_module, autocast=autocast, batch_size=batch_size, grad_accum=grad_accum,
                       total_steps=total_steps, steps_per_epoch=steps_per_epoch, epoch_batches=epoch_batches)


def scale_head_lr(optimizer, model: TaskModel, lr: float) -> None:
    """The head's parameters in groups of their own at `lr` (weight decay as their group had)."""
    head = {id(p) for p in model.head.parameters()}
    for group in list(optimizer.param_groups):
        mine = [p for p in group["params"] if id(p) in head]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in head]
            optimizer.add_param_group({"params": mine, "weight_decay": group["weight_decay"], "lr": lr})


def finetune(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune (or resume) into cfg.run.output. Returns {"steps", "best": metrics at the best epoch}."""
    out = cfg.run.output
    run, logger, step, epoch, start_batch = start_run(cfg, resume, overwrite, build_finetune, FinetuneConfig,
                                                      describe=describe_finetune, entries=(BEST, METRICS))
    cfg = run.cfg
    best = read_best(out) if resume else None
    collate = Collate(run.train, run.builder, {label: i for i, label in enumerate(run.labels)})

    def batches(epoch: int, start_batch: int):
        order = epoch_order(len(run.train), cfg.run.seed, epoch, run.dist.rank, run.dist.world)
        taken = batch_indices(order, run.batch_size)[:run.epoch_batches]  # the same count on every rank
        return loader(run.train, collate, taken, start_batch, cfg.data.num_workers, cfg.run.seed,
                      pin_memory=run.device.type == "cuda")

    def batch_loss(batch: dict, epoch: int):
        inputs = to_device({"x": batch["inputs"]}, run.device)["x"]
        with run.autocast:
            logits = run.step_module(inputs)
        losses = run.task.sample_loss(logits, batch["targets"].to(run.device))
        loss = losses.mean()
        return loss, {f"{run.task.name}/loss": torch.stack([losses.detach().sum(), torch.tensor(
            float(len(losses)), device=losses.device)])}

    def evaluate_and_keep(at: int) -> dict:
        nonlocal best
        metrics, _ = predict_split(run.model, run.task, run.val, run.builder, run.labels, cfg, run.device,
                                   run.autocast)
        if best is None or metrics[run.task.metric] > best["metrics"][run.task.metric]:
            best = {"step": at, "metrics": metrics}
            save_best(run, at, metrics)
        return metrics

    # the step being evaluated: the scheduler steps once per optimizer step
    hooks = LoopHooks(batches=batches, loss=batch_loss, evaluate=lambda: evaluate_and_keep(run.scheduler.last_epoch))
    step, epoch, start_batch, last_eval, stopped = run_loop(run, hooks, logger, step, epoch, start_batch)
    summary = {"steps": step, "stopped": stopped}
    if stopped:
        return summary
    save_checkpoint(run, step, epoch, start_batch)
    if run.dist.main:
        if cfg.run.eval_every and step % cfg.run.eval_every:  # the last steps were not evaluated yet
            logger.eval(step, evaluate_and_keep(step))
        logger.close()
        summary["best"] = best
        with open(os.path.join(out, METRICS), "w", encoding="utf-8") as f:
            json.dump({"task": cfg.task.name, "split": cfg.data.eval_split, "examples": len(run.val),
                       "best_step": best["step"], **best["metrics"]}, f, indent=1, sort_keys=True)
    distributed.leave_together(run.dist)
    return summary


def describe_finetune(run: FinetuneRun) -> str:
    cfg = run.cfg
    return (f"fine-tuning {cfg.model.init or 'MiniLM'} on {cfg.task.name}: {len(run.train)} train / {len(run.val)} "
            f"{cfg.data.eval_split} examples, {run.task.outputs(run.labels, run.train.examples)}, {run.total_steps} steps")


def read_best(out: str) -> dict | None:
    path = os.path.join(out, BEST, TASK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return {"step": saved["step"], "metrics": saved["metrics"]}


def save_best(run: FinetuneRun, step: int, metrics: dict) -> None:
    """The best model so far into best/ (written beside, then swapped in whole)."""
    import shutil

    from safetensors.torch import save_file
    out = run.cfg.run.output
    tmp, final = os.path.join(out, BEST + ".tmp"), os.path.join(out, BEST)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    run.model.model.save_pretrained(tmp, run.tokenizer)
    if run.model.head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in run.model.head.state_dict().items()},
                  os.path.join(tmp, HEAD_WEIGHTS))
    with open(os.path.join(tmp, TASK_FILE), "w", encoding="utf-8") as f:
        json.dump({"task": run.task.name, "dual_encoder": run.task.dual_encoder, "labels": run.labels,
                   "head_hidden_scale": run.cfg.task.head_hidden_scale,
                   "max_text_len": run.cfg.model.max_text_len, "max_regions": run.cfg.model.max_regions,
                   "step": step, "metric": run.task.metric, "metrics": metrics}, f, indent=1)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


@torch.no_grad()
def predict_split(model: TaskModel, task: FinetuneTask, data: SplitData, builder, labels: list[str], cfg,
                  device, autocast) -> tuple[dict, dict]:
    """(metrics, {example_id: prediction}) of a split: the top label (or region) of each example; a
    task with an evaluation of its own (retrieval's re-ranking) runs that."""
    was_training = model.training
    model.eval()
    if task.predict is not None:
        try:
            return task.predict(model, data, builder, cfg, device, autocast)
        finally:
            model.train(was_training)
    collate = Collate(data, builder, None)
    predictions = {}
    for start in range(0, len(data), cfg.data.eval_batch_size):
        batch = collate(list(range(start, min(len(data), start + cfg.data.eval_batch_size))))
        inputs = to_device({"x": batch["inputs"]}, device)["x"]
        with autocast:
            logits = model(inputs)
        for i, (key, top) in enumerate(zip(batch["keys"], logits.float().argmax(-1).tolist())):
            if task.regions:  # the top region's box
                predictions[key] = data.regions[data.examples[start + i].image_ids[0]].boxes[top]
            else:
                predictions[key] = task.decode(labels[top])
    model.train(was_training)
    return task.score(predictions, data.examples), predictions


@dataclass
class Finetuned:
    """A fine-tuned model as load_finetuned reads it."""
    model: TaskModel
    task: FinetuneTask
    labels: list[str]
    saved: dict           # its task.json
    folder: str           # the model folder read (best/, or the folder named)
    section: dict         # its config.json's vlp section


def load_finetuned(folder: str, device) -> Finetuned:
    """The fine-tuned model of a fine-tuning folder's best/ (or of that folder, or of a run folder's export)."""
    from safetensors.torch import load_file

    from vlp_train import pretrained
    path = os.path.join(folder, BEST) if os.path.isdir(os.path.join(folder, BEST)) else pretrained.model_folder(folder)
    if not os.path.isfile(os.path.join(path, TASK_FILE)):
        raise FileNotFoundError(f"--model {folder}: no fine-tuned model ({BEST}/{TASK_FILE}); a fine-tuning writes it "
                                "at its first evaluation")
    with open(os.path.join(path, TASK_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    task = task_of(saved["task"])
    if saved.get("dual_encoder"):  # fine-tuned as a dual encoder (retrieval by ITC)
        task = task.dual_form
    config = pretrained.read_config(path)
    model = pretrained.load(path, config)
    head = task.head(model.bert_config().hidden_size, len(saved["labels"]), saved["head_hidden_scale"])
    if head is not None:
        head.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS)))
    return Finetuned(TaskModel(model, head, task.images, task.regions, task.dual_encoder).to(device).eval(), task,
                     saved["labels"], saved, path, config[1])


def evaluate(task_name: str, model_dir: str, data: str, split: str, detections: str | None, device: str = "auto",
             max_examples: int = 0, batch_size: int = 64, output: str | None = None, candidates: int = 16,
             rerank_k: int = 0, images: str | None = None) -> dict:
    """Metrics of a fine-tuned model on a split; written to `output` (default MODEL/metrics-SPLIT.json).
    `images`: the folder of the split's image files, for a model on pixels (model.visual patches or
    both); `detections` may be None for a model on patches alone.
    Retrieval: `candidates` for a model fine-tuned by ITM (the first stage's top K it re-ranks),
    `rerank_k` for a dual encoder (ITM re-scores each query's top k of it; 0: the dual encoder alone)."""
    from transformers import BertTokenizerFast

    torch_device = pick_device(device, 0)
    finetuned = load_finetuned(model_dir, torch_device)
    model, task, labels, saved, path = (finetuned.model, finetuned.task, finetuned.labels, finetuned.saved,
                                        finetuned.folder)
    if task.name != task_name:
        raise ValueError(f"--model {model_dir} is fine-tuned for {task.name}, not {task_name}")
    seen = saved_visual_input(finetuned.section, f"--model {path}")
    check_inputs(seen, task, images or "", detections or "")
    cfg = FinetuneConfig()
    cfg.task.name, cfg.data.data, cfg.data.detections = task_name, data, detections or ""
    cfg.data.eval_batch_size, cfg.model.max_text_len = batch_size, saved["max_text_len"]
    cfg.model.max_regions, cfg.task.candidates, cfg.task.rerank_k = saved["max_regions"], candidates, rerank_k
    split_data = SplitData(task, read_split(task, cfg, split), DetectionIndex(detections) if detections else None,
                           cfg.model.max_regions, max_examples, ImageFolder(images) if seen.image_size else None,
                           seen.image_size)
    builder = make_builder(BertTokenizerFast.from_pretrained(path), cfg, split_data.feature_dim, seen.image_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch_device.type == "cuda" else nullcontext()
    metrics, predictions = predict_split(model, task, split_data, builder, labels, cfg, torch_device, autocast)
    result = {"task": task.name, "split": split, "examples": len(split_data), "left_out": split_data.left_out,
              "damaged_images": len(split_data.damaged), **metrics}
    output = output or os.path.join(model_dir, f"metrics-{split}.json")
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    return result
