"""Held-out evaluation of pre-training: masked-token accuracy of the tags (region-tag view) and of
the sentences (image-sentence view) apart, region-tag classification accuracy, ITM accuracy and
ROC-AUC on true vs shuffled pairs."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlp_train.data import CorpusStream
from vlp_train.objectives import encode_view, gather_positions
from vlp_train.step import to_device
from vlp_train.tasks import IGNORE, Task

MLM_METRIC = {Task.REGION_TAG: "tag_mlm", Task.IMAGE_SENTENCE: "sentence_mlm"}


@torch.no_grad()
def evaluate(model, builder, urls: list[str], tasks: list[Task], cfg, device, autocast) -> dict:
    """Over up to run.eval_batches batches of the held-out shards (`mixed`: every view of a batch)."""
    from sklearn.metrics import roc_auc_score

    tasks = [t for t in (Task.REGION_TAG, Task.IMAGE_SENTENCE) if t in tasks or t is Task.REGION_TAG]
    stream = CorpusStream(urls, builder, cfg.data.batch_size, tasks, "mixed", 1, seed=12345)
    stream.set_position(0, 0, None)
    was_training = model.training
    model.eval()
    hits = {name: [0, 0] for name in (*(MLM_METRIC[t] for t in tasks), "mrc")}
    itm_scores, itm_labels = [], []
    for n, batch in enumerate(stream):
        if n >= cfg.run.eval_batches:
            break
        views = to_device(batch["views"], device)
        for task, view in views.items():
            with autocast:
                text, regions, _ = encode_view(model, view)
            labels = view["mlm_targets"]
            keep = labels != IGNORE
            predicted = model.mlm_logits(gather_positions(text, view["mlm_positions"])).argmax(-1)
            count(hits[MLM_METRIC[task]], predicted[keep], labels[keep])
            if task is Task.REGION_TAG:
                keep = view["mrc_labels"] != IGNORE
                count(hits["mrc"], model.mrc(regions).argmax(-1)[keep], view["mrc_labels"][keep])
            if task is Task.IMAGE_SENTENCE:
                itm_scores += F.softmax(model.itm_logits(text).float(), -1)[:, 1].tolist()
                itm_labels += view["itm_labels"].tolist()
    model.train(was_training)
    result = {f"{name}_acc": (right / total if total else float("nan")) for name, (right, total) in hits.items()}
    if itm_labels:
        predictions = [int(s >= 0.5) for s in itm_scores]
        result["itm_acc"] = float(np.mean([p == y for p, y in zip(predictions, itm_labels)]))
        result["itm_auc"] = float(roc_auc_score(itm_labels, itm_scores)) if len(set(itm_labels)) == 2 else float("nan")
    result["pairs"] = len(itm_labels)
    return result


def count(tally: list[int], predicted: torch.Tensor, labels: torch.Tensor) -> None:
    tally[0] += (predicted == labels).sum().item()
    tally[1] += labels.numel()
