"""The measures every family's held-out evaluation shares (vlp_train/evaluate.py): recall@k from a
similarity matrix with several right answers a query, ITM accuracy and AUC, cost per 1k queries."""
import contextlib
import math

import pytest
import torch

from vlp_train.evaluate import itm_metrics, per_1k_queries, recall_at


def test_recall_at_k_counts_a_query_whose_first_right_answer_is_in_its_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # right answer (2) ranked 2nd
                           [0.2, 0.8, 0.1, 0.0],    # right answer (1) ranked 1st
                           [0.9, 0.8, 0.7, 0.1],    # right answers 3 (4th) and 2 (3rd): first at rank 3
                           [0.9, 0.8, 0.7, 0.1]])   # no right answer among the candidates
    right = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert recall_at(scores, right, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75}


def test_itm_metrics_and_cost_per_thousand_queries():
    result = itm_metrics([0.9, 0.6, 0.4, 0.2], [1, 0, 1, 0])
    assert result["itm_acc"] == 0.5 and result["itm_auc"] == 0.75
    assert math.isnan(itm_metrics([0.9, 0.8], [1, 1])["itm_auc"]) and itm_metrics([], []) == {}
    assert per_1k_queries(2.0, 400) == 5.0


def test_itm_reranking_reorders_the_top_k_and_keeps_the_dual_encoders_order_below_it():
    """The top k re-scored by ITM rank above the rest, which keep the dual encoder's order, so a right
    answer at the dual encoder's rank k+1 still counts for recall@(k+1)."""
    from vlp_train.evaluate_vlmo import rerank_scores

    class FakeITM(torch.nn.Module):  # the ITM's match-minus-mismatch logit is the candidate's index
        def forward(self, candidates):
            return candidates, None

        def itm_logits(self, candidates):
            return torch.stack([torch.zeros(len(candidates)), candidates.float()], 1)

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.1, 0.5, 0.4, 0.3, 0.2]])
    reranked = rerank_scores(FakeITM(), scores, k=2, pair_of=lambda q, c: (c,), batch_size=3,
                             autocast=contextlib.nullcontext())
    # query 0: top 2 (candidates 0, 1) re-ordered by ITM (1 over 0), then 2, 3, 4 in the dual order
    assert reranked[0].argsort(descending=True).tolist() == [1, 0, 2, 3, 4]
    assert reranked[1].argsort(descending=True).tolist() == [2, 1, 3, 4, 0]
    right = torch.zeros_like(scores, dtype=torch.bool)
    right[0, 2] = right[1, 3] = True               # the dual encoder's rank 3: outside k, inside 3
    assert recall_at(reranked, right, ks=(2, 3)) == {2: 0.0, 3: 1.0}


def test_recall_has_one_rule_for_pre_training_and_the_downstream_retrieval_metric():
    """evaluate.right_answer_ranks ranks for both recall_at (any right answers) and
    finetune.metrics.retrieval_recalls (Karpathy: each caption's one image): on the same scores,
    ties included, their figures agree. A tie with a wrong answer counts against the right one (a
    constant scorer recalls nothing); a tie between two right answers does not. Before, recall_at
    broke ties by argsort's order and retrieval_recalls counted a tied right answer against."""
    import numpy as np

    from vlp_train.evaluate import right_answer_ranks
    from vlp_train.finetune.metrics import retrieval_recalls

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (6, 12)).astype(np.float64)  # many ties
    scores[2] = 0.0                                          # a constant row
    text_image = np.repeat(np.arange(6), 2)                  # 2 captions an image
    ours = retrieval_recalls(scores, text_image, ks=(1, 2, 5))
    positive = torch.from_numpy(text_image[None, :] == np.arange(6)[:, None])
    for k, share in recall_at(torch.from_numpy(scores), positive, ks=(1, 2, 5)).items():
        assert ours[f"tr@{k}"] == pytest.approx(100 * share)
    for k, share in recall_at(torch.from_numpy(scores).T, positive.T, ks=(1, 2, 5)).items():
        assert ours[f"ir@{k}"] == pytest.approx(100 * share)
    assert recall_at(torch.zeros(3, 4), torch.eye(3, 4, dtype=torch.bool), ks=(1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    # two right answers tied at the top: rank 0; a wrong one tied with them: rank 1; none right: never
    assert right_answer_ranks(torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.9], [0.5, 0.4, 0.3]]),
                              torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)).tolist() == [0, 1, 3]
    two_right = retrieval_recalls(np.array([[0.9, 0.9, 0.1, 0.2], [0.1, 0.2, 0.8, 0.7]]), [0, 0, 1, 1], ks=(1,))
    assert two_right["tr@1"] == 100.0
