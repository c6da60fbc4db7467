"""Fine-tuning configuration: the trainer's model / optim / run sections, plus the data and task
sections of a downstream job; one preset per task (the literature's recipe); `--set k=v` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlp_train.config import ModelConfig, OptimConfig, RunConfig, Sections, apply_overrides, check_keys, check_model


@dataclass
class FinetuneData:
    data: str = ""                    # the dataset's folder, in its public release layout (--data)
    detections: str = ""              # detections of its images: glob / comma list (--detections)
    # the folder of its image files (--images): a model on pixels (model.visual patches/both) reads them
    images: str = ""
    train_split: str = "train"
    eval_split: str = "val"           # the split that picks the best checkpoint
    max_examples: int = 0             # >0: the first N training examples only (a subset, said in the log)
    max_eval_examples: int = 0        # >0: the first N examples of the validation split only
    batch_size: int = 32              # per rank and micro-batch
    global_batch_size: int = 0        # >0: examples per optimizer step over all ranks (as pre-training's)
    eval_batch_size: int = 64
    num_workers: int = 0


@dataclass
class TaskConfig:
    name: str = "easy-vqa"
    head_hidden_scale: int = 2        # the classifier's hidden layer: scale x the model's hidden size
    head_lr_scale: float = 1.0        # the head's learning rate: optim.lr x this (VLMo's VQA head: x 20)
    answer_min_count: int = 9         # VQA: answers seen at least this often in train make the vocabulary
    candidates: int = 16              # retrieval by ITM: first-stage top-K re-ranked by ITM
    # retrieval's objective: itc (a dual encoder, as VLMo fine-tunes it), itm (the fusion ITM over a
    # first stage's candidates), auto: itc for a family that has a dual encoder (vlmo, vlmae), else itm
    retrieval_objective: str = "auto"
    rerank_k: int = 0                 # retrieval by ITC: the fusion ITM re-scores each query's top k (0: off)
    iou_threshold: float = 0.5        # RefCOCO+: a region is correct at IoU >= this with the ground truth


@dataclass
class FinetuneConfig(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    # a retrieval run saved before the key trained by ITM: resuming it must not switch to ITC
    SAVED_BEFORE_KEY = {"task.retrieval_objective": "itm"}


def _common(cfg: FinetuneConfig) -> FinetuneConfig:
    cfg.run.output = "vlp-ft"
    cfg.run.log_every = 10
    cfg.run.eval_every = 0            # 0: at each epoch's end (fine-tuning keeps the best epoch)
    cfg.optim.warmup_ratio = 0.1
    cfg.optim.max_steps = 0
    return cfg


def preset(task: str) -> FinetuneConfig:
    """The task's recipe (epochs, lr, batch) as the region-based models of the literature fine-tune
    a BERT-base sized model (UNITER / VinVL / VLMo settings, docs/finetune.md); easy-vqa's is sized
    for a CPU."""
    cfg = _common(FinetuneConfig())
    cfg.task.name = task
    recipe = PRESETS.get(task)
    if recipe is None:
        raise ValueError(f"--task {task!r}: unknown task (choose from {sorted(PRESETS)})")
    for key, value in recipe.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


# key -> value per task. VQA: 10 epochs at 5e-5 (VLMo 10 ep; UNITER 5e-5), batch 128, the head at
# x 20 lr (VLMo), vocabulary of answers seen >= 9 times (3,129). NLVR2: 10 epochs, 5e-5, 32 pairs.
# SNLI-VE: 4 epochs (UNITER's ~4k steps of 128...), 5e-5. RefCOCO+: 10 epochs, 5e-5, 64.
# Retrieval: 5 epochs, 5e-5, 32 pairs (plus as many negatives), K = 16 candidates re-ranked.
PRESETS: dict[str, dict] = {
    "vqa": {"optim.epochs": 10, "optim.lr": 5e-5, "data.batch_size": 128, "task.head_lr_scale": 20.0,
            "data.train_split": "train2014", "data.eval_split": "val2014"},
    "nlvr2": {"optim.epochs": 10, "optim.lr": 5e-5, "data.batch_size": 32, "data.eval_split": "dev"},
    "snli-ve": {"optim.epochs": 4, "optim.lr": 5e-5, "data.batch_size": 128, "data.eval_split": "dev"},
    "refcoco+": {"optim.epochs": 10, "optim.lr": 5e-5, "data.batch_size": 64},
    "retrieval": {"optim.epochs": 5, "optim.lr": 5e-5, "data.batch_size": 32},
    # easy-vqa (64x64 synthetic shapes, 13 answers): a CPU-sized recipe; its only splits are
    # train and test, so the best epoch is chosen on test unless data.eval_split names another
    "easy-vqa": {"optim.epochs": 5, "optim.lr": 1e-4, "data.batch_size": 32, "task.head_lr_scale": 10.0,
                 "data.eval_split": "test", "model.max_text_len": 24},
}


def load_config(task: str, overrides: list[str] | None = None) -> FinetuneConfig:
    cfg = apply_overrides(preset(task), overrides or [])
    if cfg.task.name != task:
        raise ValueError(f"--set task.name={cfg.task.name}: the task is --task {task}")
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    check_keys(cfg)
    check_model(cfg.model)
    if cfg.optim.epochs == 0 and cfg.optim.max_steps == 0:
        raise ValueError("optim.epochs=0 and optim.max_steps=0: nothing to train")
