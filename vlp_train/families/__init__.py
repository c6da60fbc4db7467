"""Model families, registered by name (`model.arch`). A family is its model, the tasks it can
train with their objectives (named per-sample losses), and how a run builds it; the trainer's
loop knows none of them by name.

Adding one: a module here that defines its model and objectives and calls `register(Family(...))`,
imported below.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vlp_train.registry import Registry
from vlp_train.tasks import Task


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type                      # with from_vlp_config(bert_config, section) for from_pretrained
    objectives: Mapping[Task, Callable]    # task -> fn(model, view) -> (named per-sample losses, outputs)
    build: Callable                        # (cfg.model, feature_dim, tags) -> a model initialised as model.init says
    evaluate: Callable                     # held-out metrics: (model, builder, urls, tasks, cfg, device, autocast) -> dict
    # the μ-VLA curriculum's per-sample weight: fn(model, view) -> [B] detached match probability
    # of each sample's clean pair; None when the family has no ITM head
    match_probability: Callable | None = None
    # views of its own for some tasks, built in the loader: fn(cfg) -> {task: fn(builder, samples,
    # sentences, rng) -> view}, replacing BatchBuilder's view of that task; None: BatchBuilder's
    views: Callable | None = None
    # what its model can see of an image (model.visual): detector regions, and/or image patches
    visual_inputs: tuple[str, ...] = ("regions",)
    # the tasks it can train on patches alone (model.visual=patches); None: all of its tasks
    patch_tasks: tuple[Task, ...] | None = None
    # a dual encoder: its model's embed_images(features, locations, region_mask, pixels=None) and
    # embed_texts(input_ids, text_mask) give the L2-normalised projected [CLS] features [B, D] of the
    # image alone and of the text alone, and contrast_log_scale the learnable log inverse temperature
    # of their contrast (ITC). Held-out retrieval and fine-tuned retrieval (finetune/tasks.py) rank by them
    dual_encoder: bool = False

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(self.objectives)


def clean_pair_match_probability(model, view: dict):
    """The model's ITM match probability of each sample's clean (unmasked) pair, with dropout off:
    a weight is the model's judgement of the pair, not a random draw (the μ-VLA curriculum's w_ITM).
    Any family whose forward takes (ids, text mask, features, locations, region mask, pixels) and
    returns the fused text states first. (The layer scope's no-grad eval graph is the evaluation's;
    the step scope traces the mode switch into its graph, which torch.compile does without a break.)"""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            text = model(view["clean_ids"], view.get("clean_text_mask", view["text_mask"]), view["features"],
                         view["locations"], view["region_mask"], view.get("pixels"))[0]
        finally:
            model.train(was_training)
        return F.softmax(model.itm_logits(text).float(), dim=-1)[:, 1]


FAMILIES: Registry[Family] = Registry("model family", "model.arch")
register, family_of = FAMILIES.register, FAMILIES.of


from vlp_train.families import single_stream  # noqa: E402,F401  (registers itself)
from vlp_train.families import vlmo  # noqa: E402,F401  (registers itself)
from vlp_train.families import vlmae  # noqa: E402,F401  (registers itself)


def build_model(cfg_model, feature_dim: int, tags: list[str]):
    """The model of `cfg_model.arch`, initialised as `cfg_model.init` says."""
    return family_of(cfg_model.arch).build(cfg_model, feature_dim, tags)
