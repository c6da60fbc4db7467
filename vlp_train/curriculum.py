"""The curriculum, as pure functions of the epoch.

Before epoch m: L = L_RT + L_RP + L_IS. From epoch m on: L = L_RT + w_ITM * (L_RP + L_IS), with
w_ITM the model's own detached ITM match probability of each sample's (image, retrieved
sentence) pair, applied per sample before averaging (not to a batch mean).
"""
from __future__ import annotations

import torch

from vlp_train.tasks import Task

WEIGHTED_TASKS = (Task.REGION_PHRASE, Task.IMAGE_SENTENCE, Task.IMAGE_TEXT)


def itm_weighting_on(epoch: int, objectives) -> bool:
    return bool(objectives.itm_weighting and objectives.image_sentence and epoch >= objectives.itm_weight_from_epoch)


def weighted_tasks(epoch: int, objectives) -> tuple[Task, ...]:
    """The tasks whose samples are weighted by w_ITM in `epoch`: μ-VLA's region-phrase and
    image-sentence ones (objectives.itm_weighting), and the family's image-text task (objectives.weight_image_text)."""
    if epoch < objectives.itm_weight_from_epoch:
        return ()
    tasks = (Task.REGION_PHRASE, Task.IMAGE_SENTENCE) if itm_weighting_on(epoch, objectives) else ()
    return tasks + ((Task.IMAGE_TEXT,) if objectives.image_text and objectives.weight_image_text else ())


def sample_loss(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-sample loss of one granularity: the sum of its named per-sample losses."""
    return torch.stack(list(named.values())).sum(0)


def combine(per_task: dict[str, torch.Tensor], actives: dict[str, torch.Tensor],
            weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-task per-sample losses [B] -> the scalar to minimise. `weights[task]` [B] scales the
    region-phrase and image-sentence samples (absent: weight 1); each task averages over its
    active samples."""
    total = 0.0
    for task, losses in per_task.items():
        active = actives[task].to(losses.dtype)
        weight = weights.get(task) if task in WEIGHTED_TASKS else None
        scaled = losses * weight.to(losses.dtype) if weight is not None else losses
        total = total + (scaled * active).sum() / active.sum().clamp(min=1)
    return total
