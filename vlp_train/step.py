"""One training step's computation: a batch's views through the family's objectives, the
curriculum's ITM weights, the scalar loss."""
from __future__ import annotations

import torch
from torch import nn

from vlp_train.curriculum import WEIGHTED_TASKS, combine, sample_loss


class Pretraining(nn.Module):
    """The model with its family's objectives, so one module (DDP / torch.compile) sees every use."""

    def __init__(self, model: nn.Module, family):
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, views: dict, weighted: tuple = ()):
        """Per task of the batch: (named per-sample losses, the ITM logits or None, and for the
        tasks in `weighted` each sample's detached ITM match probability of its clean (unmasked)
        pair, else None). Every task runs in this one call: DDP allows one forward per backward
        (a `mixed` batch holds several tasks), and torch.compile takes the extra ITM forward
        into the step's graph instead of running it eagerly."""
        results = {}
        for task, view in views.items():
            named, outputs = self.family.objectives[task](self.model, view)
            weight = self.family.match_probability(self.model, view) if task in weighted else None
            results[task] = (named, outputs.get("itm_logits"), weight)
        return results


def to_device(views: dict, device: torch.device) -> dict:
    """Views to the device; region features travel as float16 and are widened there (pixels
    travel as uint8; the patch embedding normalises them). A tensor shared by several views (a
    batch's pixels) is copied once."""
    moved = {}

    def move(value):
        if not torch.is_tensor(value):
            return value
        if id(value) not in moved:
            copied = value.to(device, non_blocking=True)
            moved[id(value)] = (value, copied.float() if copied.dtype == torch.float16 else copied)
        return moved[id(value)][1]
    return {task: {k: move(v) for k, v in view.items()} for task, view in views.items()}


def compute_loss(step_module, views: dict, weighting: bool, autocast):
    """One batch: the scalar loss, each named loss as [sum, count] over the samples that have it
    (a window's mean is then over samples, and a batch without any adds nothing rather than a 0),
    and the ITM weights. The step module is called once for all the batch's tasks (one DDP
    forward per backward)."""
    # weighting: True (every weighted task of the batch), False, or the tasks to weight (curriculum.weighted_tasks)
    weighted = tuple(task for task in views if task in (WEIGHTED_TASKS if weighting is True else weighting or ()))
    with autocast:
        results = step_module(views, weighted)
    per_task, actives, weights, named_means = {}, {}, {}, {}
    for task, (named, _, weight) in results.items():
        if weight is not None:
            weights[task] = weight
        per_task[task] = sample_loss(named)
        actives[task] = views[task]["active"]
        for name, value in named.items():
            value = value.detach().float()
            named_means[f"{task}/{name}"] = torch.stack([value.sum(), (value != 0).float().sum()])
    loss = combine(per_task, actives, weights)
    return loss, named_means, weights
