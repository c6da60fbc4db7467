"""Trainer configuration: small dataclasses, presets (debug, base), dotted overrides."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field


log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
REQUIRED = "<required>"  # a preset's model.init that the user must give (a folder, or "random")
COMPILE_SCOPES = ("layers", "step")
VISUAL_INPUTS = ("regions", "patches", "both")
RETRIEVAL_OBJECTIVES = ("auto", "itc", "itm")  # fine-tuning's task.retrieval_objective


@dataclass
class ModelConfig:
    arch: str = "single_stream"      # the model family (vlp_train/families/)
    # None = the bundled MiniLM (6 x 384); a HF BERT folder; a saved vlp model or a run folder (the
    # whole model); "random" = random weights of layers/hidden/heads, asked for on purpose
    init: str | None = None
    layers: int = 0                  # >0 with hidden/heads: the shape the run needs (init must have it, or be "random")
    hidden: int = 0
    heads: int = 0
    feature_dim: int = 0             # region feature size; 0 = read from the first sample
    max_regions: int = 36
    max_text_len: int = 40
    dropout: float = 0.1
    compile: str = "auto"            # auto = on CUDA only; on | off
    compile_scope: str = "layers"    # layers: one compiled layer serves all (seconds); step: the whole step (minutes)
    # VLMo (arch vlmo): the top layers whose pairs use the VL-FFN (the paper's F), and the
    # pre-training stage (vision: images alone; language: text alone; vl: image-text pairs)
    vl_layers: int = 2
    stage: str = "vl"
    # vlmae (vlp_train/families/vlmae.py): the image encoder sees (1 - mask_ratio) of the image's
    # patches or regions; the top fusion_layers BERT layers (0: half) cross-attend to the image
    mask_ratio: float = 0.5
    fusion_layers: int = 0
    vision_layers: int = 0           # vlmae image encoder (ViT): 0 = as the text model
    vision_hidden: int = 0
    vision_heads: int = 0
    decoder_layers: int = 4          # vlmae image decoder (the paper's 4 x 512)
    decoder_hidden: int = 512
    decoder_heads: int = 8
    # what the model sees of an image: detector regions (features + boxes), 16x16 patches of its
    # pixels (shards written with `vlp-data build-retrieval --store-images`), or both
    visual: str = "regions"
    image_size: int = 384            # patches: the square side images are resized to (a multiple of patch_size)
    patch_size: int = 16
    vision_init: str | None = None   # a ViT folder (timm or HF layout): the patch embedding starts from it; else random


@dataclass
class DataConfig:
    shards: str = "vlp-out/shards/*.tar"   # glob, comma list, or brace pattern
    eval_shards: str | None = None         # None: the last shard is held out when there are several
    tag_vocab: str | None = None           # None: tag_vocab.json beside the shards folder, else a scan
    manifest: str | None = None            # manifest.parquet of the corpus: sample counts of remote shards
    batch_size: int = 32                   # per rank and micro-batch (with global_batch_size: the most one rank holds)
    global_batch_size: int = 0             # >0: samples per optimizer step over all ranks; grad_accum derived
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False                # False: exact epochs; True: shards drawn with replacement
    steps_per_epoch: int = 0               # resampled (or remote shards without a manifest): batches an epoch
    # the language stage's text (model.stage=language): Parquet files of sentences (sentence_id, text);
    # None = the corpus's sentences/ folder beside the shards folder
    text_corpus: str | None = None


@dataclass
class ObjectiveConfig:
    region_tag: bool = True
    region_phrase: bool = True
    image_sentence: bool = True
    itm_weighting: bool = True       # from epoch `itm_weight_from_epoch` on
    itm_weight_from_epoch: int = 1   # the paper's m
    schedule: str = "round_robin"    # round_robin: one granularity per step; mixed: all three each step
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.15
    phrase_mask_scale: float = 1.0   # masking probability of a linked item = scale x link similarity
    itm_negative_prob: float = 0.5
    rt_masking: str = "both"         # both: tags and regions of every sample (the paper); one: one modality a sample
    # the family's own image-text pair task (`vl`): VLMo's ITC + ITM with global hard negatives +
    # MLM, VLMAE's RMIM + IFR + ITC + ITM + MLM (was objectives.vlmo, which switched VLMAE's too)
    image_text: bool = False
    weight_image_text: bool = False  # the curriculum's w_ITM also weights that task, from epoch itm_weight_from_epoch
    # vlmae: EMA of the momentum encoders, ALBEF's distillation share of the ITC targets, RMIM's
    # per-patch (per-region) normalised targets and its optional link-similarity weights
    momentum: float = 0.995
    distill_alpha: float = 0.4
    rmim_norm: bool = True
    rmim_link_weight: bool = False


@dataclass
class OptimConfig:
    lr: float = 6e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    epochs: int = 2
    max_steps: int = 0               # >0 caps the run


@dataclass
class RunConfig:
    output: str = "vlp-run"
    seed: int = 42
    device: str = "auto"             # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 0              # 0 = at the end only
    save_every: int = 0              # 0 = at the end only
    eval_batches: int = 20
    stop_after: int = 0              # stop (as if killed) after this many steps; for tests and preemption drills
    log_keys: bool = False           # also log the sample keys of every batch (to audit what was seen)
    max_skipped_steps: int = 3       # steps with a non-finite loss are skipped; more than this many in a row stop the run
    dist_timeout_s: int = 1800       # a collective waiting longer for a rank fails (DDP) instead of hanging
    rerank_k: int = 16               # VLMo's evaluation: ITM re-ranks each query's top k of the dual encoder (0: off)


# Renamed keys: old dotted key -> its new name. The old name is still read (a run's config.json, a
# checkpoint's config) and accepted by --set, with a warning naming the new one.
RENAMED_KEYS = {
    # it switched VLMAE's pair task too, not only VLMo's
    "objectives.vlmo": "objectives.image_text",
    "objectives.weight_vlmo": "objectives.weight_image_text",
}


def renamed_key(key: str, where: str) -> str:
    """`key`, or the new name of a renamed one (with a warning saying so)."""
    if key not in RENAMED_KEYS:
        return key
    new = RENAMED_KEYS[key]
    log.warning("%s: %s is renamed %s (the family's own image-text task, `vl`: VLMo's ITC/ITM/MLM and VLMAE's "
                "RMIM/IFR/ITC/ITM/MLM alike); read as %s. Use the new name: the old one will go.", where, key, new, new)
    return new


class Sections:
    """A config made of dataclass sections (the trainer's, fine-tuning's): to and from a plain dict
    (config.json, a checkpoint's config)."""

    # "section.key" -> the value a saved config that predates the key means (where the key's default
    # would change what an older run does when it resumes)
    SAVED_BEFORE_KEY: dict = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        sections = {}
        for f in dataclasses.fields(cls):
            values = {}
            for key, value in d[f.name].items():
                _, name = renamed_key(f"{f.name}.{key}", "a saved config").split(".", 1)
                if name != key and name in d[f.name]:
                    continue  # a config holding both names: the new one's value
                values[name] = value
            for key, value in cls.SAVED_BEFORE_KEY.items():
                section, name = key.split(".", 1)
                if section == f.name and name not in values:
                    values[name] = value
            sections[f.name] = type(f.default_factory())(**values)
        return cls(**sections)


@dataclass
class TrainConfig(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def debug() -> TrainConfig:
    """Bundled MiniLM, small batches, a few steps: minutes on 2 CPU cores."""
    cfg = TrainConfig()
    cfg.data.batch_size = 8
    cfg.data.shuffle_buffer = 64
    cfg.optim.epochs = 6
    cfg.optim.max_steps = 24
    cfg.optim.lr = 1e-4
    cfg.run.log_every = 2
    cfg.run.eval_batches = 4
    cfg.model.image_size = 128  # patches: 8 x 8 of 16 px, so a CPU step stays short
    return cfg


def base() -> TrainConfig:
    """The paper's setting: BERT-base (12 x 768; model.init must name a bert-base-uncased folder,
    or be "random" on purpose), 36 regions of 2048-d features, text up to 40 tokens, a global batch
    of 480 over however many GPUs, 20 epochs."""
    cfg = TrainConfig()
    cfg.model.layers, cfg.model.hidden, cfg.model.heads = 12, 768, 12
    cfg.model.init = REQUIRED
    cfg.model.feature_dim = 2048
    cfg.data.global_batch_size = 480
    cfg.data.batch_size = 480  # the most one rank holds at once: 1 GPU trains 480 a step, 8 GPUs 60 each
    # loader processes of a 16-core GPU node (throughput per worker: docs/benchmarks.md); the
    # buffer is per worker (2,000 x ~150 KB of features each)
    cfg.data.num_workers = 12
    cfg.data.shuffle_buffer = 2000
    cfg.optim.epochs = 20
    cfg.run.log_every = 50
    cfg.run.eval_every = 2000
    cfg.run.save_every = 2000
    return cfg


def vlmo(cfg: TrainConfig, layers: int, hidden: int, heads: int, vl_layers: int) -> TrainConfig:
    """VLMo's objectives alone (ITC, ITM with global hard negatives, MLM) on a multiway transformer."""
    cfg.model.arch = "vlmo"
    if layers:
        cfg.model.layers, cfg.model.hidden, cfg.model.heads = layers, hidden, heads
    cfg.model.vl_layers = vl_layers
    cfg.objectives.region_tag = cfg.objectives.region_phrase = cfg.objectives.image_sentence = False
    cfg.objectives.itm_weighting = False
    cfg.objectives.image_text = True
    return cfg


def vlmo_debug() -> TrainConfig:
    """VLMo on the bundled MiniLM (6 x 384, the top 2 layers with the VL-FFN): a CPU run."""
    return vlmo(debug(), 0, 0, 0, vl_layers=2)


def vlmo_base() -> TrainConfig:
    """VLMo-Base: 12 x 768, VL-FFN in the top 2 layers; model.init a bert-base-uncased folder."""
    return vlmo(base(), 12, 768, 12, vl_layers=2)


def vlmo_large() -> TrainConfig:
    """VLMo-Large: 24 x 1024 (16 heads), VL-FFN in the top 3 layers; model.init a bert-large-uncased folder."""
    cfg = vlmo(base(), 24, 1024, 16, vl_layers=3)
    return cfg


PRESETS = {"debug": debug, "base": base, "vlmo-debug": vlmo_debug, "vlmo-base": vlmo_base, "vlmo-large": vlmo_large}
STAGES = ("vision", "language", "vl")


def _convert(value: str, current, key: str):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={value}: expected true/false")
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ValueError(f"--set {key}={value}: expected {type(current).__name__ == 'int' and 'an integer' or 'a number'}") from None
    if current is None and value.lower() in ("none", "null", ""):
        return None
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`optim.lr=6e-5` style overrides, type-checked against the current value."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        key = renamed_key(key.strip(), f"--set {key.strip()}")
        parts = key.split(".")
        if len(parts) != 2 or not hasattr(cfg, parts[0]) or not hasattr(getattr(cfg, parts[0]), parts[1]):
            sections = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"--set {key!r}: unknown key (sections: {sections})")
        section = getattr(cfg, parts[0])
        optional = "None" in str({f.name: f.type for f in dataclasses.fields(section)}[parts[1]])
        if optional and value.lower() in ("none", "null"):  # e.g. model.init=none: back to the bundled model
            setattr(section, parts[1], None)
            continue
        setattr(section, parts[1], _convert(value, getattr(section, parts[1]), key))
    return cfg


def load_config(preset: str = "debug", overrides: list[str] | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown config {preset!r} (choose from {sorted(PRESETS)})")
    return apply_overrides(PRESETS[preset](), overrides or [])


# key -> (check, what it must be): every numeric key, checked at start so a bad value is named
# before minutes of set-up (the choices of the string keys are checked where they are used)
_RANGES = {
    "model.layers": (lambda v: v >= 0, ">= 0"), "model.hidden": (lambda v: v >= 0, ">= 0"),
    "model.heads": (lambda v: v >= 0, ">= 0"), "model.feature_dim": (lambda v: v >= 0, ">= 0 (0: from the shards)"),
    "model.max_regions": (lambda v: v >= 1, ">= 1"), "model.max_text_len": (lambda v: 3 <= v <= 512, "in [3, 512]"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.image_size": (lambda v: 16 <= v <= 2048, "in [16, 2048]"), "model.patch_size": (lambda v: 2 <= v <= 64, "in [2, 64]"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"), "data.global_batch_size": (lambda v: v >= 0, ">= 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"), "data.shuffle_buffer": (lambda v: v >= 1, ">= 1"),
    "data.steps_per_epoch": (lambda v: v >= 0, ">= 0"),
    "objectives.itm_weight_from_epoch": (lambda v: v >= 0, ">= 0"),
    "objectives.mlm_prob": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "objectives.region_mask_prob": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "objectives.phrase_mask_scale": (lambda v: v >= 0, ">= 0"),
    "objectives.itm_negative_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.lr": (lambda v: v >= 0, ">= 0"), "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
    "optim.grad_accum": (lambda v: v >= 1, ">= 1"), "optim.epochs": (lambda v: v >= 0, ">= 0"),
    "optim.max_steps": (lambda v: v >= 0, ">= 0"),
    "run.log_every": (lambda v: v >= 1, ">= 1"), "run.eval_every": (lambda v: v >= 0, ">= 0 (0: at the end)"),
    "run.save_every": (lambda v: v >= 0, ">= 0 (0: at the end)"), "run.eval_batches": (lambda v: v >= 1, ">= 1"),
    # fine-tuning's own keys (vlp_train/finetune/config.py)
    "data.max_examples": (lambda v: v >= 0, ">= 0 (0: all)"), "data.max_eval_examples": (lambda v: v >= 0, ">= 0 (0: all)"),
    "data.eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "task.head_hidden_scale": (lambda v: v >= 1, ">= 1"), "task.head_lr_scale": (lambda v: v > 0, "> 0"),
    "task.answer_min_count": (lambda v: v >= 1, ">= 1"), "task.candidates": (lambda v: v >= 1, ">= 1"),
    "task.iou_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "task.rerank_k": (lambda v: v >= 0, ">= 0 (0: the dual encoder alone)"),
    "run.stop_after": (lambda v: v >= 0, ">= 0"), "run.dist_timeout_s": (lambda v: v >= 1, ">= 1"), "run.max_skipped_steps": (lambda v: v >= 0, ">= 0 (0: never stop)"),
    "model.vl_layers": (lambda v: v >= 0, ">= 0 (VLMo: at most model.layers)"),
    "run.rerank_k": (lambda v: v >= 0, ">= 0 (0: no ITM re-ranking)"),
}
_CHOICES = {"run.device": ("auto", "cpu", "cuda"), "objectives.schedule": ("round_robin", "mixed"),
            "model.compile": COMPILE_MODES, "model.compile_scope": COMPILE_SCOPES, "model.stage": STAGES,
            "model.visual": VISUAL_INPUTS,
            # fine-tuning's own keys (vlp_train/finetune/config.py)
            "task.retrieval_objective": RETRIEVAL_OBJECTIVES}


def validate(cfg: TrainConfig) -> None:
    """Every key's type, range and choices, and the files it names; ValueError naming the key."""
    check_keys(cfg)
    check_model(cfg.model)
    for key, path in (("data.tag_vocab", cfg.data.tag_vocab), ("data.manifest", cfg.data.manifest)):
        if path and "://" not in path and not os.path.isfile(path):
            raise ValueError(f"{key}={path}: no such file")


def check_keys(cfg) -> None:
    """Every key's type, range (_RANGES) and choices (_CHOICES) of a config of dataclass sections
    (the trainer's, fine-tuning's); ValueError naming the key."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            expected = type(getattr(type(values)(), f.name))
            if expected in (int, float, bool) and not (isinstance(value, expected) or
                                                       (expected is float and isinstance(value, int))) \
                    or isinstance(value, bool) and expected is not bool:
                raise ValueError(f"{key}={value!r}: expected {expected.__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key}={value!r}: must be a finite number")
            if key in _RANGES and not _RANGES[key][0](value):
                raise ValueError(f"{key}={value!r}: must be {_RANGES[key][1]}")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ValueError(f"{key}={value!r}: expected one of {_CHOICES[key]}")


def check_model(m: ModelConfig) -> None:
    """The model section's checks across keys (shape; patches)."""
    if (m.layers, m.hidden, m.heads) != (0, 0, 0) and (min(m.layers, m.hidden, m.heads) == 0 or m.hidden % m.heads):
        raise ValueError(f"model.layers/hidden/heads={m.layers}/{m.hidden}/{m.heads}: all three > 0, hidden a "
                         "multiple of heads (or all 0: the init's shape)")
    if m.image_size % m.patch_size:
        raise ValueError(f"model.image_size={m.image_size}: must be a multiple of model.patch_size={m.patch_size}")
    if m.vision_init and not os.path.isdir(os.path.expanduser(m.vision_init)):
        raise ValueError(f"model.vision_init={m.vision_init}: no such folder (a ViT folder, timm or Hugging Face layout)")


def check_init(cfg: TrainConfig, preset: str = "") -> None:
    """A preset that needs a pre-trained BERT (base) must not quietly train a random one."""
    if cfg.model.init == REQUIRED:
        shape = f"{cfg.model.layers} x {cfg.model.hidden}"
        raise ValueError(f"model.init is required{' by the ' + preset + ' preset' if preset else ''}: it is a "
                         f"{shape} BERT, initialised from BERT as the paper does. Give --set model.init=PATH "
                         f"(a bert-base-uncased folder, a saved vlp model or a run folder), or "
                         f"--set model.init=random to train from random weights on purpose")


def per_rank_batch(data, optim, world: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps). With data.global_batch_size G, each of
    the `world` ranks takes G / world samples a step, in the fewest micro-batches of at most
    data.batch_size that split it evenly; so 1, 4 or 8 GPUs train the same schedule."""
    if data.global_batch_size <= 0:
        return data.batch_size, optim.grad_accum
    if optim.grad_accum != 1:
        raise ValueError("data.global_batch_size derives optim.grad_accum: set one of them, not both")
    if data.global_batch_size % world:
        raise ValueError(f"data.global_batch_size={data.global_batch_size} does not divide over {world} ranks")
    per_rank = data.global_batch_size // world
    accum = -(-per_rank // max(1, data.batch_size))
    while per_rank % accum:
        accum += 1
    if per_rank // accum < data.batch_size // 2:
        log.warning("data.global_batch_size=%d over %d ranks: %d micro-batches of %d a step (data.batch_size=%d "
                    "does not split %d evenly); a global batch with more divisors keeps micro-batches fuller",
                    data.global_batch_size, world, accum, per_rank // accum, data.batch_size, per_rank)
    return per_rank // accum, accum


def dumps(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1, sort_keys=True)


# -- VLMAE (model.arch=vlmae, vlp_train/families/vlmae.py) ---------------------------------------

_RANGES.update({
    "model.mask_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "model.fusion_layers": (lambda v: v >= 0, ">= 0 (0: half)"),
    "model.vision_layers": (lambda v: v >= 0, ">= 0"), "model.vision_hidden": (lambda v: v >= 0, ">= 0"),
    "model.vision_heads": (lambda v: v >= 0, ">= 0"), "model.decoder_layers": (lambda v: v >= 1, ">= 1"),
    "model.decoder_hidden": (lambda v: v >= 1, ">= 1"), "model.decoder_heads": (lambda v: v >= 1, ">= 1"),
    "objectives.momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "objectives.distill_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
})


def _vlmae(cfg: TrainConfig) -> TrainConfig:
    """VLMAE's own objectives on the retrieved pair (the family's image-text task, switched by
    objectives.image_text as VLMo's: RMIM, IFR, ITC, ITM, MLM), the μ-VLA granularities and curriculum
    weight off (switch them on by config)."""
    cfg.model.arch = "vlmae"
    cfg.objectives.region_tag = cfg.objectives.region_phrase = cfg.objectives.image_sentence = False
    cfg.objectives.itm_weighting = False
    cfg.objectives.image_text = True
    return cfg


def vlmae_debug() -> TrainConfig:
    """VLMAE on the bundled MiniLM (3 text + 3 fusion layers, 384 wide), a 2-layer image encoder of
    the same width, a 2 x 128 decoder: minutes on 2 CPU cores."""
    cfg = _vlmae(debug())
    cfg.model.vision_layers, cfg.model.vision_hidden, cfg.model.vision_heads = 2, 384, 6
    cfg.model.decoder_layers, cfg.model.decoder_hidden, cfg.model.decoder_heads = 2, 128, 4
    return cfg


def vlmae_base() -> TrainConfig:
    """The paper's VLMAE: BERT-base (6 text + 6 fusion layers; model.init a bert-base-uncased folder,
    or "random"), a 12 x 768 image encoder (ViT-B/16 on 256 px patches: a --store-images corpus;
    model.vision_init a ViT folder), the 4 x 512 decoder, mask ratio 0.5,
    momentum 0.995, distillation alpha 0.4; a global batch of 512, lr 1e-4, weight decay 0.02,
    30 epochs."""
    cfg = _vlmae(base())
    cfg.model.vision_layers, cfg.model.vision_hidden, cfg.model.vision_heads = 12, 768, 12
    cfg.model.decoder_layers, cfg.model.decoder_hidden, cfg.model.decoder_heads = 4, 512, 8
    cfg.data.global_batch_size = cfg.data.batch_size = 512
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs = 1e-4, 0.02, 30
    cfg.model.visual, cfg.model.image_size, cfg.model.patch_size = "patches", 256, 16  # the paper's 256 px
    return cfg


PRESETS.update({"vlmae-debug": vlmae_debug, "vlmae-base": vlmae_base})
