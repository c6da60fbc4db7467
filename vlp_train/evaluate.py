"""Held-out evaluation of pre-training: masked-token accuracy of the tags (region-tag view) and of
the sentences (image-sentence view) apart, region-tag classification accuracy, ITM accuracy and
ROC-AUC on true vs shuffled pairs.

Also the measures every family's evaluation shares (one owner each): masked-token hits
(`count_masked_tokens`), ITM accuracy and ROC-AUC (`itm_metrics`), retrieval recall@k from a
similarity matrix (`recall_at`, by the one ranking rule `right_answer_ranks`, which the
downstream retrieval metric uses too) and seconds per 1,000 queries (`per_1k_queries`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlp_train.data import CorpusStream
from vlp_train.objectives import encode_view, gather_positions
from vlp_train.step import to_device
from vlp_train.tasks import IGNORE, Task

MLM_METRIC = {Task.REGION_TAG: "tag_mlm", Task.IMAGE_SENTENCE: "sentence_mlm"}
EVAL_SEED = 12345  # the held-out batches: the same ones at every evaluation of every run


def held_out_stream(urls: list[str], builder, tasks: list[Task], cfg) -> CorpusStream:
    """The held-out shards' batches every family's evaluation reads: every view of `tasks` in each
    batch (`mixed`), in shard order (no shuffle buffer), seeded alike at every evaluation."""
    stream = CorpusStream(urls, builder, cfg.data.batch_size, tasks, "mixed", 1, seed=EVAL_SEED)
    stream.set_position(0, 0, None)
    return stream


@torch.no_grad()
def evaluate(model, builder, urls: list[str], tasks: list[Task], cfg, device, autocast) -> dict:
    """Over up to run.eval_batches batches of the held-out shards (`mixed`: every view of a batch)."""
    tasks = [t for t in (Task.REGION_TAG, Task.IMAGE_SENTENCE) if t in tasks or t is Task.REGION_TAG]
    stream = held_out_stream(urls, builder, tasks, cfg)
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
            count_masked_tokens(model, text, view, hits[MLM_METRIC[task]])
            if task is Task.REGION_TAG:
                keep = view["mrc_labels"] != IGNORE
                count(hits["mrc"], model.mrc(regions).argmax(-1)[keep], view["mrc_labels"][keep])
            if task is Task.IMAGE_SENTENCE:
                itm_scores += F.softmax(model.itm_logits(text).float(), -1)[:, 1].tolist()
                itm_labels += view["itm_labels"].tolist()
    model.train(was_training)
    result = {f"{name}_acc": (right / total if total else float("nan")) for name, (right, total) in hits.items()}
    result.update(itm_metrics(itm_scores, itm_labels))
    result["pairs"] = len(itm_labels)
    return result


def count(tally: list[int], predicted: torch.Tensor, labels: torch.Tensor) -> None:
    tally[0] += (predicted == labels).sum().item()
    tally[1] += labels.numel()


def count_masked_tokens(model, states, view, tally: list[int]) -> None:
    """Add the MLM head's right predictions and the labelled positions of a view (its
    `mlm_positions` / `mlm_targets`) to tally [right, total]."""
    labels = view["mlm_targets"]
    keep = labels != IGNORE
    predicted = model.mlm_logits(gather_positions(states, view["mlm_positions"])).argmax(-1)
    count(tally, predicted[keep], labels[keep])


def itm_metrics(scores: list[float], labels: list[int]) -> dict:
    """ITM accuracy (match probability >= 0.5) and ROC-AUC (nan with one class only) of held-out
    pairs; {} without pairs."""
    from sklearn.metrics import roc_auc_score

    if not labels:
        return {}
    return {"itm_acc": float(np.mean([int(s >= 0.5) == y for s, y in zip(scores, labels)])),
            "itm_auc": float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else float("nan")}


RECALL_AT = (1, 5, 10)


def right_answer_ranks(scores: torch.Tensor, positive: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Each query's rank (0-based) of its best-scored right answer: scores, positive [queries,
    candidates] (a query may have several right answers) -> [queries] the count of wrong answers
    scored at least as high as it. Ties count against the right answer (a constant scorer recalls
    nothing), another right answer tied with it does not; a candidate scored -inf ranks last (a
    re-ranker leaves the candidates it skipped there); a query without a right answer gets the
    candidate count (never recalled). NaN or +inf scores (a diverged model) are refused: a NaN
    compares False with everything, so it would rank its right answer first. The one rule of recall
    here: recall_at's, and finetune.metrics.retrieval_recalls' (Karpathy retrieval's R@K)."""
    ranks, nan, pos_inf, broken_queries = [], 0, 0, 0
    for start in range(0, scores.shape[0], chunk):
        s, right = scores[start:start + chunk], positive[start:start + chunk]
        is_nan, is_pos_inf = torch.isnan(s), torch.isposinf(s)
        nan, pos_inf = nan + int(is_nan.sum()), pos_inf + int(is_pos_inf.sum())
        broken_queries += int((is_nan | is_pos_inf).any(1).sum())
        best = s.masked_fill(~right, float("-inf")).max(1, keepdim=True).values
        rank = ((s >= best) & ~right).sum(1)
        ranks.append(rank.masked_fill(~right.any(1), scores.shape[1]))
    if broken_queries:
        raise ValueError(f"retrieval scores hold NaN or +inf in {broken_queries} of {scores.shape[0]} queries "
                         f"({nan} NaN, {pos_inf} +inf scores): the model's outputs diverged, so recall "
                         "would be meaningless")
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at(scores: torch.Tensor, positive: torch.Tensor, ks=RECALL_AT) -> dict[int, float]:
    """Retrieval recall@k: scores, positive [queries, candidates] (a query may have several right
    answers) -> {k: the share of queries with a right answer among their top k} (right_answer_ranks)."""
    ranks = right_answer_ranks(scores, positive)
    return {k: (ranks < k).float().mean().item() for k in ks}


def per_1k_queries(seconds: float, queries: int) -> float:
    """A retrieval's cost as seconds per 1,000 queries."""
    return seconds / queries * 1000
