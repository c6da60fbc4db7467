"""Contrastive pieces shared by the dual-encoder families (VLMo, VLMAE): image-text contrast (ITC)
over the global batch, and hard negatives for image-text matching (ITM) drawn from its similarities.

Under DDP the features of every rank are gathered with an autograd-aware all-gather: each rank's
loss covers its own samples (rows) against every rank's (columns), and the backward sends each
column's gradient back to the rank that made it. After DDP averages the ranks' gradients, the
gradient is the one of the loss over the joined batch (the no-grad gather of VLMo and CLIP gives
only 1/world of the other ranks' part; see docs/trainer.md). Ranks may hold batches of different
sizes (an epoch's last, partial batch): tensors are padded to the largest for the collective and
cut back after it.

Duplicate texts: two images of our corpus can retrieve the same sentence. `text_keys` (an integer
per sample, equal for equal texts) makes ITC spread its target over every column of the same text
(as ALBEF does for images of one id in retrieval), and hard-negative sampling never draws one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's and VLMo's initial temperature 0.07
MAX_LOGIT_SCALE = 100.0                # CLIP's cap on exp(scale); VLMo leaves it unclamped
NO_KEY = -(2 ** 63)                    # pads a set of text keys (masking.text_key never gives it)


def _world():
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist


def gather_padded(x: torch.Tensor, pad_value=0, with_grad: bool = False) -> tuple[torch.Tensor, int, list[int]]:
    """Every rank's `x` joined along dim 0 in rank order -> (joined, this rank's first row, rows
    of each rank). Ranks may differ in every dimension: each tensor is padded with `pad_value` to
    the largest for the collective; dim 0 is cut back to each rank's rows, the other dimensions
    stay padded to the largest (pad with what the caller's mask ignores). `with_grad`: gradients
    of the joined tensor flow back to each rank's own `x` (torch.distributed.nn's all-gather); else
    the other ranks' rows are constants and only the local rows keep their graph. One process:
    (x, 0, [len(x)])."""
    dist = _world()
    if dist is None or dist.get_world_size() == 1:
        return x, 0, [x.shape[0]]
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = torch.stack(shapes).tolist()
    largest = [max(s[d] for s in shapes) for d in range(x.dim())]
    padding = []
    for d in reversed(range(x.dim())):  # F.pad takes the last dimension first
        padding += [0, largest[d] - x.shape[d]]
    padded = F.pad(x, padding, value=pad_value) if any(padding) else x
    if with_grad:
        from torch.distributed.nn.functional import all_gather
        parts = list(all_gather(padded.contiguous()))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        parts[rank] = padded  # the local rows keep their graph
    rows = [s[0] for s in shapes]
    return torch.cat([p[:n] for p, n in zip(parts, rows)]), sum(rows[:rank]), rows


def contrast_feature(projection: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The contrast feature of an encoder's states: its projected [CLS], L2-normalised, float32 (one rule
    for the dual encoder, ITC's online and momentum features and evaluation's recall)."""
    return F.normalize(projection(states[:, 0]).float(), dim=-1)


@dataclass
class Contrast:
    """What ITC computed: per-sample losses of the local samples, and (detached, for hard
    negatives) the scaled similarities of the local rows against the global batch's columns and
    which columns are each row's positives."""
    losses: torch.Tensor          # [B] (image-to-text + text-to-image) / 2 of each local sample
    image_to_text: torch.Tensor   # [B, N] local images x global texts, detached
    text_to_image: torch.Tensor   # [B, N] local texts x global images, detached
    offset: int                   # the local samples' first column in the global batch
    text_keys: torch.Tensor | None  # [N] global text keys (None: every text distinct)
    positive_image_to_text: torch.Tensor | None = None  # [B, N] bool: the texts each local image counts as its own
    positive_text_to_image: torch.Tensor | None = None  # [B, N] bool: the images each local text counts as its own


def logit_scale_of(log_scale: torch.Tensor) -> torch.Tensor:
    """exp of the learnable log-scale, capped at MAX_LOGIT_SCALE (CLIP's cap; a guard against a
    scale that grows until bf16 logits overflow)."""
    return log_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)


def positives(keys_local: torch.Tensor | None, keys_global: torch.Tensor | None, offset: int, rows: int,
              columns: int, device) -> torch.Tensor:
    """[B, N] True where column j is a positive of local row i: j is i itself, or has i's text."""
    own = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    own[torch.arange(rows, device=device), offset + torch.arange(rows, device=device)] = True
    if keys_local is None:
        return own
    return own | (keys_local[:, None] == keys_global[None, :])


def in_sets(keys: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """keys [Q], sets [S, K] -> [S, Q] bool: key q is in set s."""
    return (keys[None, :, None] == sets[:, None, :]).any(-1)


def itc_losses(image_features: torch.Tensor, text_features: torch.Tensor, log_scale: torch.Tensor,
               text_keys: torch.Tensor | None = None, soft_targets: tuple | None = None,
               alpha: float = 0.0, image_keys: torch.Tensor | None = None) -> Contrast:
    """Image-text contrast over the global batch. image_features, text_features [B, D]: the
    local samples' L2-normalised projections (sample i's image and its text are a pair);
    log_scale: the learnable log of the inverse temperature. text_keys [B] (optional): equal for
    equal texts; columns of the same text are positives too (target spread evenly over them).
    image_keys [B, K] (optional, with text_keys): the keys of the texts each image counts as its
    own (in our corpus its K retrieved sentences; padded with NO_KEY): those are positives of the
    image too, both ways. soft_targets (optional, ALBEF's momentum distillation): (image-to-text,
    text-to-image) distributions [B, N] over the global columns; the target is (1 - alpha) x the
    hard target + alpha x these (alpha 0: plain ITC). Logits and cross-entropy in float32."""
    if image_keys is not None and text_keys is None:
        raise ValueError("itc_losses: image_keys (the texts each image counts as its own) need the text_keys")
    all_text, offset, _ = gather_padded(text_features, with_grad=True)
    all_image, _, _ = gather_padded(image_features, with_grad=True)
    keys = gather_padded(text_keys)[0] if text_keys is not None else None
    scale = logit_scale_of(log_scale)
    image_to_text = scale * image_features.float() @ all_text.float().T   # [B, N]
    text_to_image = scale * text_features.float() @ all_image.float().T   # [B, N]
    rows, columns = image_to_text.shape
    positive_i2t = positives(text_keys, keys, offset, rows, columns, image_to_text.device)
    positive_t2i = positive_i2t  # text keys alone are symmetric: the same positives both ways
    if image_keys is not None:
        all_sets = gather_padded(image_keys, pad_value=NO_KEY)[0]
        positive_i2t = positive_i2t | in_sets(keys, image_keys)              # global texts in a local image's set
        positive_t2i = positive_t2i | in_sets(text_keys, all_sets).T        # a local text in a global image's set
    targets_i2t = positive_i2t.float() / positive_i2t.sum(1, keepdim=True)
    targets_t2i = positive_t2i.float() / positive_t2i.sum(1, keepdim=True)
    if soft_targets is not None and alpha:
        targets_i2t = (1 - alpha) * targets_i2t + alpha * soft_targets[0].float()
        targets_t2i = (1 - alpha) * targets_t2i + alpha * soft_targets[1].float()
    loss_i2t = -(targets_i2t * F.log_softmax(image_to_text, dim=1)).sum(1)
    loss_t2i = -(targets_t2i * F.log_softmax(text_to_image, dim=1)).sum(1)
    return Contrast((loss_i2t + loss_t2i) / 2, image_to_text.detach(), text_to_image.detach(), offset, keys,
                    positive_i2t, positive_t2i)


def hard_negatives(contrast: Contrast, text_keys: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each local sample, one negative text for its image and one negative image for its text,
    drawn from the global batch in proportion to the softmax of the ITC similarities (VLMo's global
    hard-negative mining), never a positive of ITC: not the sample itself, not a sample of the
    same text, not a text the image counts as its own (`itc_losses`' text_keys and image_keys).
    -> (negative text column [B], negative image column [B], valid [B]); columns index the global
    batch; `valid` is False for a sample with nothing to draw on either side. (`text_keys`: for
    a contrast made without its positives, the keys given to itc_losses.)"""
    rows, columns = contrast.image_to_text.shape
    if contrast.positive_image_to_text is None:
        excluded = positives(text_keys, contrast.text_keys, contrast.offset, rows, columns,
                             contrast.image_to_text.device)
        contrast.positive_image_to_text = contrast.positive_text_to_image = excluded
    valid = ~contrast.positive_image_to_text.all(1) & ~contrast.positive_text_to_image.all(1)
    picks = []
    for similarities, excluded in ((contrast.image_to_text, contrast.positive_image_to_text),
                                   (contrast.text_to_image, contrast.positive_text_to_image)):
        weights = F.softmax(similarities.float(), dim=1).masked_fill(excluded, 0.0)
        # a row with nothing to draw, or whose every weight underflowed to 0, draws evenly from the
        # allowed columns (an invalid row draws any column; `valid` says to ignore it)
        fallback = (~excluded).float()
        fallback[excluded.all(1)] = 1.0
        empty = weights.sum(1, keepdim=True) <= 0
        weights = torch.where(empty, fallback, weights)
        picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return picks[0], picks[1], valid


def itm_with_hard_negatives(contrast: Contrast, text_keys: torch.Tensor | None, pair_logits,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching over three pairs a local sample: its own (a match), its text with a hard
    negative image and its image with a hard negative text (mismatches), the negatives drawn from
    the global batch by `hard_negatives`. `pair_logits(text_rows, image_rows)` -> the ITM logits
    [3B, 2] of the pairs (text of global sample text_rows[i], image of global sample image_rows[i]):
    the family's fusion pass (its inputs or states gathered over ranks). -> (per-sample loss [B]:
    the mean of its three cross-entropies, or its own pair's alone when it had no negative to
    draw; the logits [3B, 2], the own pairs first)."""
    negative_text, negative_image, valid = hard_negatives(contrast, text_keys, generator)
    batch = negative_text.shape[0]
    own = contrast.offset + torch.arange(batch, device=negative_text.device)
    logits = pair_logits(torch.cat([own, own, negative_text]), torch.cat([own, negative_image, own]))
    labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
    labels[:batch] = 1
    losses = F.cross_entropy(logits.float(), labels, reduction="none").view(3, batch)
    return torch.where(valid, losses.mean(0), losses[0]), logits
