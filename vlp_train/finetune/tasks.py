"""Downstream tasks, registered by name (`--task`): how each reads its dataset (the readers in
formats/), its label space, its head, its per-sample loss, its predictions and its metrics. The
harness (finetune/train.py) knows none of them by name.

Adding one: a `FinetuneTask(...)` passed to `register`, with a preset in finetune/config.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp_train.finetune.heads import ClassifierHead, RegionScoreHead
from vlp_train.registry import Registry


@dataclass(frozen=True)
class FinetuneTask:
    name: str
    read: Callable          # (data folder, split) -> formats.common.ReadResult
    labels: Callable        # (train ReadResult, cfg) -> the label names (a classifier's outputs), saved with the model
    target: Callable        # (Example, label index {name: i}, its images' Regions) -> float tensor [labels]
    #                         (soft scores / one-hot; a region task: [its regions], padded by the batch)
    score: Callable         # ({example_id: prediction}, examples) -> metrics dict
    metric: str             # the key of `score`'s dict that picks the best checkpoint (higher is better)
    images: int = 1         # images an example (NLVR2: 2, the pair model)
    loss: str = "bce"       # bce: binary cross-entropy over the labels x their count (VQA's); ce: softmax
    decode: Callable = lambda label: label  # a label name -> the prediction the metric compares (NLVR2: a bool)
    regions: bool = False   # the head scores each region ([B, R]; RefCOCO+), not a label ([B, labels])
    pairs: Callable | None = None    # training pairs of a batch: (examples) -> [(example, image key, label name)]
    #                                  (retrieval: each caption with its image and with another one)
    predict: Callable | None = None  # evaluation of its own: (model, data, builder, cfg, device, autocast) -> (metrics, predictions)
    # trained as a dual encoder (families.Family.dual_encoder): the model returns each example's image
    # and text features and the contrast's log scale, the targets [B] are each example's image key
    # (the examples of one image are each other's positives), the loss is ITC over the (global) batch
    dual_encoder: bool = False
    dual_form: FinetuneTask | None = None  # this task as a dual encoder trains it (retrieval; task_for picks)
    reads_tags: bool = False  # its evaluation reads the regions' tags (ITM retrieval's first stage)

    @property
    def needs_detections(self) -> bool:
        """Whether it needs the images' regions whatever the model sees (a model on patches alone
        takes the rest from the pixels)."""
        return self.regions or self.reads_tags

    def outputs(self, labels: list[str], examples) -> str:
        """What the model learns to output, for the run's description: its labels, or what a task
        without labels has instead (a dual encoder: ITC over the examples' images, the captions of
        one image each other's positives; a region task: a score per region)."""
        if self.dual_encoder:
            return f"ITC over {len({e.image_ids[0] for e in examples})} images"
        if self.regions:
            return "a score per detected region"
        return f"{len(labels)} labels"

    def head(self, hidden: int, labels: int, scale: int):
        if self.pairs is not None or self.dual_encoder:  # the pre-trained model's own ITM head / projections
            return None
        if self.regions:
            return RegionScoreHead(hidden)
        return ClassifierHead(hidden * self.images, hidden * scale, labels)

    def sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B]."""
        if self.dual_encoder:
            from vlp_train.objectives.contrastive import itc_losses
            image_features, text_features, log_scale = logits
            return itc_losses(image_features, text_features, log_scale, text_keys=targets).losses
        if self.loss == "bce":  # summed over the labels: the mean x labels of the literature's VQA loss
            return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1)
        if self.regions:  # softmax over the image's regions (padding at -inf) against the target distribution
            log_probs = torch.log_softmax(logits.float(), -1).masked_fill(targets == 0, 0.0)
            return -(targets * log_probs).sum(-1)
        return F.cross_entropy(logits.float(), targets.argmax(-1), reduction="none")


TASKS: Registry[FinetuneTask] = Registry("task", "task.name")
register, task_of = TASKS.register, TASKS.of


def task_for(name: str, objective: str = "auto", dual_encoder: bool = False) -> FinetuneTask:
    """The task `name` as a model trains it: a task with a dual-encoder form (retrieval) takes it when
    the model's family has a dual encoder and `objective` (task.retrieval_objective, one of
    config.RETRIEVAL_OBJECTIVES: the config's validation checks it) is auto or itc, as VLMo
    fine-tunes retrieval; itm keeps the fusion ITM; itc on a family without one is refused (the
    family is known only once model.init is read)."""
    task = task_of(name)
    if task.dual_form is None:
        return task
    if objective == "itc" and not dual_encoder:
        raise ValueError("task.retrieval_objective=itc: this model's family has no dual encoder (its image and text "
                         "alone, projected: vlmo, vlmae); use itm (or auto)")
    return task.dual_form if dual_encoder and objective != "itm" else task


def one_hot(label: str, index: dict[str, int], regions=None) -> torch.Tensor:
    target = torch.zeros(len(index))
    if label in index:  # a label unseen in train: no positive (it cannot be predicted)
        target[index[label]] = 1.0
    return target


# -- easy-vqa: the package's questions, 13 answers, exact-match accuracy -------------------------------

def _easy_vqa_read(data: str, split: str):
    from vlp_train.finetune.formats import easy_vqa
    return easy_vqa.read(split, data or None)


def _easy_vqa_labels(train, cfg) -> list[str]:
    from vlp_train.finetune.formats import easy_vqa
    return easy_vqa.answers(cfg.data.data or None)


def _accuracy(predictions: dict, examples) -> dict:
    from vlp_train.finetune.metrics import accuracy
    return {"accuracy": accuracy(predictions, examples)}


register(FinetuneTask(
    name="easy-vqa", read=_easy_vqa_read, labels=_easy_vqa_labels, target=lambda e, index, regions: one_hot(e.target, index),
    score=_accuracy, metric="accuracy", loss="bce"))


# -- VQA v2: answers seen >= task.answer_min_count times in train, soft scores, official accuracy ------

def _vqa_read(data: str, split: str):
    from vlp_train.finetune.formats import vqa
    return vqa.read(data, split)


def _vqa_labels(train, cfg) -> list[str]:
    from vlp_train.finetune.formats.vqa import AnswerVocab
    return AnswerVocab.build(train.examples, cfg.task.answer_min_count).answers


def _vqa_target(example, index: dict[str, int], regions=None) -> torch.Tensor:
    from vlp_train.finetune.formats.vqa import soft_scores
    target = torch.zeros(len(index))
    for label, score in soft_scores(example.target, index).items():
        target[label] = score
    return target


def _vqa_score(predictions: dict, examples) -> dict:
    from vlp_train.finetune.metrics import vqa_scores
    scores = vqa_scores(predictions, examples)
    return {"accuracy": scores["overall"], **{f"accuracy/{k}": v for k, v in scores["per_answer_type"].items()}}


register(FinetuneTask(
    name="vqa", read=_vqa_read, labels=_vqa_labels, target=_vqa_target, score=_vqa_score, metric="accuracy",
    loss="bce"))


# -- SNLI-VE: image + hypothesis -> entailment / neutral / contradiction, 3-way accuracy ---------------

def _snli_ve_read(data: str, split: str):
    from vlp_train.finetune.formats import snli_ve
    return snli_ve.read(data, split)


def _snli_ve_labels(train, cfg) -> list[str]:
    from vlp_train.finetune.formats.snli_ve import LABELS
    return list(LABELS)


register(FinetuneTask(
    name="snli-ve", read=_snli_ve_read, labels=_snli_ve_labels, target=lambda e, index, regions: one_hot(e.target, index),
    score=_accuracy, metric="accuracy", loss="ce"))


# -- NLVR2: the pair model (each image with the sentence; both [CLS] states into the classifier) ------

NLVR2_LABELS = ["false", "true"]


def _nlvr2_read(data: str, split: str):
    from vlp_train.finetune.formats import nlvr2
    return nlvr2.read(data, split)


def _nlvr2_score(predictions: dict, examples) -> dict:
    from vlp_train.finetune.metrics import nlvr2_scores
    return nlvr2_scores(predictions, examples)


register(FinetuneTask(
    name="nlvr2", read=_nlvr2_read, labels=lambda train, cfg: list(NLVR2_LABELS),
    target=lambda e, index, regions: one_hot(NLVR2_LABELS[int(e.target)], index), score=_nlvr2_score, metric="accuracy",
    images=2, loss="ce", decode=lambda label: label == "true"))


# -- RefCOCO+: a score per detected region for the expression; right when the top region's box has
# IoU >= task.iou_threshold with the referred object's (the "det" setting: the detections' boxes) ----

def _refcoco_read(data: str, split: str):
    from vlp_train.finetune.formats import refcoco
    return refcoco.read(data, split)


def _refcoco_target(example, index, regions) -> torch.Tensor:
    """The region of largest IoU with the referred object's box (the detector's best proposal)."""
    from vlp_train.finetune.metrics import box_iou
    ious = torch.tensor([box_iou(box, example.target.box) for box in regions[0].boxes])
    target = torch.zeros(len(ious))
    target[int(ious.argmax())] = 1.0
    return target


def _refcoco_score(predictions: dict, examples) -> dict:
    from vlp_train.finetune.metrics import refcoco_accuracy
    return {"accuracy": refcoco_accuracy(predictions, examples)}


register(FinetuneTask(
    name="refcoco+", read=_refcoco_read, labels=lambda train, cfg: [], target=_refcoco_target,
    score=_refcoco_score, metric="accuracy", loss="regions", regions=True))


# -- retrieval (Karpathy splits). A family with a dual encoder (VLMo, VLMAE): ITC over the batch, as
# VLMo fine-tunes it, ranked by the dual encoder (task.rerank_k: ITM re-scores its top k). Otherwise
# (or task.retrieval_objective=itm): ITM fine-tuned on each caption with its image and with another
# image of the batch; evaluated by re-ranking a first stage's top `task.candidates` with ITM --------

MATCH_LABELS = ["no", "match"]


def _retrieval_read(data: str, split: str):
    from vlp_train.finetune.formats import retrieval
    return retrieval.read(data, split)


def retrieval_pairs(examples) -> list:
    """Each caption with its image (match) and with the next example's image (no match, unless it
    is the same image)."""
    pairs = [(e, e.image_ids[0], "match") for e in examples]
    for i, e in enumerate(examples):
        other = examples[(i + 1) % len(examples)].image_ids[0]
        pairs.append((e, other, "match" if other == e.image_ids[0] else "no"))
    return pairs


def tag_text(regions) -> str:
    """An image's query text: its tags in the corpus's order (what corpus building searches with)."""
    from schemas.corpus import tag_query
    return tag_query(regions.tags, list(range(len(regions.tags), 0, -1)))


@torch.no_grad()
def retrieval_predict(model, data, builder, cfg, device, autocast) -> tuple[dict, dict]:
    """First stage: sentence-BERT (the bundled MiniLM, as corpus building) of each image's tags
    against each caption; the top `task.candidates` images of each caption and captions of each
    image are scored by ITM (the match probability); the rest rank last. R@1/5/10 both ways."""
    import numpy as np

    from pipelines.encoding import encode, load_sentence_model
    from vlp_train.finetune.metrics import retrieval_index, retrieval_recalls
    from vlp_train.step import to_device

    images, text_image = retrieval_index(data.examples)
    sbert = load_sentence_model(None, "cuda" if device.type == "cuda" else "cpu")
    image_vectors = encode(sbert, [tag_text(data.regions[k]) for k in images], 256)
    text_vectors = encode(sbert, [e.text for e in data.examples], 256)
    first = image_vectors @ text_vectors.T  # [images, texts]
    k = min(cfg.task.candidates, len(images), len(data.examples))
    pairs = set()
    for t in range(first.shape[1]):
        pairs.update((int(i), t) for i in np.argsort(-first[:, t], kind="stable")[:k])
    for i in range(first.shape[0]):
        pairs.update((i, int(t)) for t in np.argsort(-first[i], kind="stable")[:k])
    scores = np.full(first.shape, -np.inf)
    pairs = sorted(pairs)
    for start in range(0, len(pairs), cfg.data.eval_batch_size):
        chunk = pairs[start:start + cfg.data.eval_batch_size]
        inputs = to_device({"x": data.inputs(builder, [data.examples[t].text for _, t in chunk],
                                             [images[i] for i, _ in chunk],
                                             [data.examples[t].example_id for _, t in chunk])}, device)["x"]
        with autocast:
            logits = model(inputs)
        for (i, t), p in zip(chunk, torch.softmax(logits.float(), -1)[:, 1].tolist()):
            scores[i, t] = p
    metrics = retrieval_recalls(scores, text_image)
    top = scores.argmax(0)
    return metrics, {e.example_id: images[int(top[t])] for t, e in enumerate(data.examples)}


def pair_key(image_key: str) -> int:
    """An integer per image (ITC's positives in a batch: the captions of one image). By image, not by
    text, as ALBEF's retrieval fine-tuning (positives by image id): the same caption written for two
    different images is a negative of the other image: a fact of the data (a generic caption can
    repeat across images), as in the reference, not a key collision."""
    from vlp_train.masking import text_key
    return text_key(image_key)


@torch.no_grad()
def dual_encoder_predict(model, data, builder, cfg, device, autocast) -> tuple[dict, dict]:
    """Every image of the split and every caption through the dual encoder (embed_images,
    embed_texts), ranked by the dot products of their features: R@1/5/10 both ways over the whole
    split. With task.rerank_k > 0 the fusion ITM re-scores each query's top k (the held-out
    evaluation's re-ranking, evaluate_vlmo.rerank_retrieval; VLMo's fine-tuned retrieval is the
    dual encoder alone, the default)."""
    from vlp_train.evaluate_vlmo import rerank_retrieval
    from vlp_train.finetune.metrics import retrieval_index, retrieval_recalls
    from vlp_train.step import to_device

    encoder = model.model
    images, text_image = retrieval_index(data.examples)
    texts = [e.text for e in data.examples]
    size = cfg.data.eval_batch_size
    k = min(cfg.task.rerank_k, len(images), len(texts))
    # each chunk's inputs (on the host), kept when ITM re-ranks: its pairs index into them rather
    # than decode an image file and tokenise a caption again for every pair scored
    image_chunks, text_chunks = [], []
    image_features, text_features = [], []
    for start in range(0, len(images), size):
        x = data.inputs(builder, None, images[start:start + size])
        if k:
            image_chunks.append(x)
        x = to_device({"x": x}, device)["x"]
        with autocast:
            image_features.append(encoder.embed_images(x["features"], x["locations"], x["region_mask"],
                                                       x.get("pixels")).float().cpu())
    for start in range(0, len(texts), size):
        x = data.inputs(builder, texts[start:start + size], None)
        if k:
            text_chunks.append(x)
        x = to_device({"x": x}, device)["x"]
        with autocast:
            text_features.append(encoder.embed_texts(x["input_ids"], x["text_mask"]).float().cpu())
    scores = torch.cat(image_features) @ torch.cat(text_features).T  # [images, texts]
    image_to_text = text_to_image = scores
    if k:  # each distinct (image, caption) pair of both directions' top k scored once
        image_to_text, text_to_image = rerank_retrieval(encoder, scores, k, text_chunks, image_chunks, size, autocast,
                                                        device)
        text_to_image = text_to_image.T
    metrics = retrieval_recalls(image_to_text.numpy(), text_image, image_scores=text_to_image.numpy())
    if k:
        metrics["rerank_k"] = k
    top = text_to_image.argmax(0)
    return metrics, {e.example_id: images[int(top[t])] for t, e in enumerate(data.examples)}


RETRIEVAL_DUAL = FinetuneTask(
    name="retrieval", read=_retrieval_read, labels=lambda train, cfg: [], target=None, score=None, metric="rmean",
    loss="itc", predict=dual_encoder_predict, dual_encoder=True)

register(FinetuneTask(
    name="retrieval", read=_retrieval_read, labels=lambda train, cfg: list(MATCH_LABELS),
    target=lambda e, index, regions: one_hot(e.target, index), score=None, metric="rmean", loss="ce",
    pairs=retrieval_pairs, predict=retrieval_predict, dual_form=RETRIEVAL_DUAL, reads_tags=True))
