"""The measures every family's held-out evaluation shares (vlp_train/evaluate.py): recall@k from a
similarity matrix with several right answers a query, ITM accuracy and AUC, cost per 1k queries."""
import contextlib
import math

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
