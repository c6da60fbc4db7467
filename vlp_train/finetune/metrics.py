"""The downstream tasks' official metrics, on the readers' Examples (vlp_train.finetune.formats).

Predictions are keyed by Example.example_id. Every figure is a percentage (0-100); VQA's are
rounded to 2 decimals as the official evaluation prints them, the others are not rounded.

- VQA v2 (`vqa_scores`): per question, the mean over its 10 annotators of min(1, (# of the other
  9 who gave the prediction) / 3), after the official normalisation (only when the 10 answers are
  not all identical); overall, per answer type and per question type. A split without
  annotations: `write_vqa_results` writes the official results JSON [{question_id, answer}].
- NLVR2 (`nlvr2_scores`): accuracy, and consistency = the share of sentences (identifier without
  its pair field: split-set-sentence) whose every example is right.
- SNLI-VE, easy-VQA (`accuracy`): exact-match accuracy.
- RefCOCO+ (`refcoco_accuracy`): share of expressions whose predicted box (x1, y1, x2, y2) has
  IoU >= 0.5 with the ground truth. IoU is continuous, on xyxy corners (as MDETR/OFA), not
  MAttNet's +1-pixel variant; COCO boxes are [x, y, w, h]: convert with `xywh_to_xyxy`.
- Retrieval (`retrieval_recalls`): from an [images x texts] score matrix, text retrieval R@K
  (image -> texts: an image is a hit when any of its captions ranks in the top K) and image
  retrieval R@K (text -> images: its one image in the top K), K = 1, 5, 10, their sum and mean.
  Ranked by `vlp_train.evaluate.right_answer_ranks` (the one rule of recall@K): ties with a wrong
  answer count against the ground truth (a constant scorer gets 0), and a candidate scored -inf is
  ranked last (a first-stage re-ranker leaves the rest at -inf); NaN or +inf scores are refused.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from vlp_train.finetune.formats.common import Example
from vlp_train.finetune.formats.vqa import clean_whitespace, normalize_answer

RETRIEVAL_KS = (1, 5, 10)
IOU_THRESHOLD = 0.5


def _predictions_for(predictions: Mapping[str, Any], examples: Sequence[Example], task: str) -> list:
    """The predictions in example order; a clear error when any example has none."""
    missing = [e.example_id for e in examples if e.example_id not in predictions]
    if missing:
        raise ValueError(f"{task}: {len(missing)} of {len(examples)} examples have no prediction "
                         f"(e.g. {', '.join(missing[:5])})")
    if not examples:
        raise ValueError(f"{task}: no examples to score")
    return [predictions[e.example_id] for e in examples]


def accuracy(predictions: Mapping[str, Any], examples: Sequence[Example]) -> float:
    """100 * share of examples whose prediction equals the target (SNLI-VE, easy-VQA, NLVR2)."""
    predicted = _predictions_for(predictions, examples, "accuracy")
    return 100.0 * sum(p == e.target for p, e in zip(predicted, examples)) / len(examples)


# ---- VQA v2 -----------------------------------------------------------------------------------------

def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One question's official accuracy in [0, 1]: mean over the annotators of
    min(1, matches among the others / 3). Answers are normalised only when not all identical."""
    gts = [clean_whitespace(a) for a in gt_answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = sum(g == pred for g in gts)
    # Leaving out annotator i leaves `matches - (gts[i] == pred)` matching others.
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def vqa_scores(predictions: Mapping[str, str], examples: Sequence[Example]) -> dict:
    """{"overall", "per_answer_type": {...}, "per_question_type": {...}} in percent, 2 decimals."""
    annotated = [e for e in examples if e.target is not None]
    if len(annotated) != len(examples):
        raise ValueError("vqa: a split without annotations cannot be scored here; write its results "
                         "file with write_vqa_results and submit it")
    predicted = _predictions_for(predictions, annotated, "vqa")
    per_answer_type, per_question_type, overall = defaultdict(list), defaultdict(list), []
    for pred, example in zip(predicted, annotated):
        acc = vqa_accuracy(pred, example.target.answers)
        overall.append(acc)
        per_answer_type[example.target.answer_type].append(acc)
        per_question_type[example.target.question_type].append(acc)

    def percent(values):
        return round(100.0 * sum(values) / len(values), 2)

    return {"overall": percent(overall),
            "per_answer_type": {k: percent(v) for k, v in sorted(per_answer_type.items())},
            "per_question_type": {k: percent(v) for k, v in sorted(per_question_type.items())}}


def write_vqa_results(path: str, predictions: Mapping[str, str], examples: Sequence[Example]) -> int:
    """The official results file: a JSON list of {question_id: int, answer: str}, exactly one per
    question of the split (the server rejects a file missing any). Returns how many were written."""
    predicted = _predictions_for(predictions, examples, "vqa results")
    rows = [{"question_id": int(e.example_id), "answer": str(p)} for p, e in zip(predicted, examples)]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    os.replace(tmp, path)
    return len(rows)


# ---- NLVR2 ------------------------------------------------------------------------------------------

def nlvr2_sentence_group(identifier: str) -> str:
    """'dev-850-0-3' -> 'dev-850-3': the identifier without its pair field (one sentence of a set)."""
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not '{{split}}-{{set}}-{{pair}}-{{sentence}}'")
    return "-".join((parts[0], parts[1], parts[3]))


def nlvr2_scores(predictions: Mapping[str, bool], examples: Sequence[Example]) -> dict:
    """{"accuracy", "consistency"} in percent; predictions are booleans keyed by identifier."""
    predicted = _predictions_for(predictions, examples, "nlvr2")
    groups: dict[str, bool] = {}
    correct = 0
    for pred, example in zip(predicted, examples):
        right = bool(pred) == example.target
        correct += right
        group = nlvr2_sentence_group(example.example_id)
        groups[group] = groups.get(group, True) and right
    return {"accuracy": 100.0 * correct / len(examples),
            "consistency": 100.0 * sum(groups.values()) / len(groups)}


# ---- RefCOCO+ ---------------------------------------------------------------------------------------

def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO [x, y, width, height] -> (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either has no area."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def refcoco_accuracy(predicted_boxes: Mapping[str, Sequence[float]], examples: Sequence[Example],
                     threshold: float = IOU_THRESHOLD) -> float:
    """100 * share of expressions whose predicted xyxy box has IoU >= threshold with target.box."""
    boxes = _predictions_for(predicted_boxes, examples, "refcoco")
    hits = sum(box_iou(box, e.target.box) >= threshold for box, e in zip(boxes, examples))
    return 100.0 * hits / len(examples)


# ---- retrieval --------------------------------------------------------------------------------------

def retrieval_recalls(scores: np.ndarray, text_image: Sequence[int], ks: Sequence[int] = RETRIEVAL_KS,
                      chunk: int = 2048, image_scores: np.ndarray | None = None) -> dict:
    """R@K both ways from scores[image, text] (higher = better match) and each text's image index.
    `image_scores` [image, text]: the ranking of image retrieval when it differs from text
    retrieval's (each direction's top k re-scored apart); None: `scores` ranks both.

    Returns {"tr@K": text retrieval (image -> text), "ir@K": image retrieval (text -> image),
    "rsum": sum of all, "rmean": their mean}, in percent."""
    scores = np.asarray(scores)
    image_scores = scores if image_scores is None else np.asarray(image_scores)
    text_image = np.asarray(text_image, dtype=np.int64)
    n_images, n_texts = scores.shape
    if image_scores.shape != scores.shape:
        raise ValueError(f"image_scores has shape {image_scores.shape}, scores {scores.shape}: both are [images, texts]")
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must give one image per text ({n_texts}), got shape {text_image.shape}")
    if n_texts == 0 or text_image.min() < 0 or text_image.max() >= n_images:
        raise ValueError(f"text_image must index the {n_images} images")
    captions_of = np.bincount(text_image, minlength=n_images)
    if (captions_of == 0).any():
        raise ValueError(f"{int((captions_of == 0).sum())} image(s) have no caption among the texts")
    # the ranks by evaluate.right_answer_ranks, the one rule of recall (pre-training's held-out
    # retrieval's too); this adds the Karpathy form: each caption's one image, percentages, rsum/rmean.
    # The right answers are built a chunk of queries at a time (COCO 5K: [5,000 x 25,000] would be 125 MB)
    import torch

    from vlp_train.evaluate import right_answer_ranks

    scores_t, image_scores_t = (torch.from_numpy(np.ascontiguousarray(a)) for a in (scores, image_scores))
    text_image_t = torch.from_numpy(text_image)
    # Text retrieval: image i's right answers are its captions
    text_ranks = torch.cat([right_answer_ranks(scores_t[i:i + chunk], text_image_t[None, :] == torch.arange(
        i, min(i + chunk, n_images))[:, None]) for i in range(0, n_images, chunk)]).numpy()
    # Image retrieval: caption j's one right answer is its image
    image_ranks = torch.cat([right_answer_ranks(image_scores_t[:, j:j + chunk].T, torch.arange(n_images)[None, :]
                                                == text_image_t[j:j + chunk, None])
                             for j in range(0, n_texts, chunk)]).numpy()
    out = {}
    for k in ks:
        out[f"tr@{k}"] = 100.0 * float((text_ranks < k).mean())
    for k in ks:
        out[f"ir@{k}"] = 100.0 * float((image_ranks < k).mean())
    values = list(out.values())
    out["rsum"] = float(sum(values))
    out["rmean"] = float(sum(values) / len(values))
    return out


def retrieval_recalls_folds(scores: np.ndarray, text_image: Sequence[int], folds: int,
                            ks: Sequence[int] = RETRIEVAL_KS) -> dict:
    """The mean of retrieval_recalls over `folds` consecutive equal blocks of images (COCO "1K":
    5 folds of the 5,000 test images), each against its own images' captions only."""
    scores = np.asarray(scores)
    text_image = np.asarray(text_image, dtype=np.int64)
    n_images = scores.shape[0]
    if folds < 1 or n_images % folds:
        raise ValueError(f"{n_images} images do not split into {folds} equal folds")
    size = n_images // folds
    results = []
    for f in range(folds):
        texts = np.flatnonzero((text_image >= f * size) & (text_image < (f + 1) * size))
        results.append(retrieval_recalls(scores[f * size:(f + 1) * size][:, texts],
                                         text_image[texts] - f * size, ks))
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def retrieval_index(examples: Sequence[Example]) -> tuple[list[str], list[int]]:
    """From retrieval Examples (one per caption): the image keys (first-seen order) and, per
    example, its image's index there: the rows and `text_image` of retrieval_recalls."""
    images: dict[str, int] = {}
    text_image = [images.setdefault(e.image_ids[0], len(images)) for e in examples]
    return list(images), text_image
