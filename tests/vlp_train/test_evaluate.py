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


def test_right_answer_ranks_ties_count_against_the_right_answer_and_minus_inf_ranks_last():
    """evaluate.right_answer_ranks, the one rule of recall for pre-training's held-out recall_at and
    the downstream finetune.metrics.retrieval_recalls (which only builds each direction's right
    answers and percentages on it). A tie with a wrong answer counts against the right one (a
    constant scorer recalls nothing); a tie between two right answers does not; -inf ranks last."""
    import numpy as np

    from vlp_train.evaluate import right_answer_ranks
    from vlp_train.finetune.metrics import retrieval_recalls

    assert recall_at(torch.zeros(3, 4), torch.eye(3, 4, dtype=torch.bool), ks=(1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    # two right answers tied at the top: rank 0; a wrong one tied with them: rank 1; none right: never
    assert right_answer_ranks(torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.9], [0.5, 0.4, 0.3]]),
                              torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)).tolist() == [0, 1, 3]
    # a re-ranker's skipped candidates at -inf: below every scored one, tied among themselves
    inf = float("-inf")
    assert right_answer_ranks(torch.tensor([[inf, 0.2, 0.1, inf], [inf, 0.2, 0.1, inf]]),
                              torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)).tolist() == [1, 3]
    # the ranks are taken over chunks of queries alike
    scores = torch.rand(7, 5)
    positive = torch.rand(7, 5) > 0.6
    assert right_answer_ranks(scores, positive, chunk=2).tolist() == right_answer_ranks(scores, positive).tolist()
    two_right = retrieval_recalls(np.array([[0.9, 0.9, 0.1, 0.2], [0.1, 0.2, 0.8, 0.7]]), [0, 0, 1, 1], ks=(1,))
    assert two_right["tr@1"] == 100.0


@pytest.mark.parametrize("broken", ["all_nan", "one_nan", "plus_inf"])
def test_recall_refuses_nan_and_plus_inf_scores_instead_of_ranking_them_first(broken):
    """A NaN compares False with everything, so it used to rank its right answer first: all-NaN
    scores (a diverged model) gave recall 1.0 at every k. right_answer_ranks refuses them, for
    pre-training's recall_at and the downstream retrieval_recalls alike, saying how many queries."""
    import numpy as np

    from vlp_train.finetune.metrics import retrieval_recalls

    scores = torch.rand(4, 6)
    if broken == "all_nan":
        scores[:] = float("nan")
    elif broken == "one_nan":
        scores[2, 5] = float("nan")
    else:
        scores[1, 0] = float("inf")
    queries = 4 if broken == "all_nan" else 1
    positive = torch.eye(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"NaN or \+inf in {queries} of 4 queries"):
        recall_at(scores, positive)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        retrieval_recalls(scores.numpy(), [0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="NaN or \\+inf"):  # image retrieval's own ranking too
        retrieval_recalls(np.ones((4, 6)), [0, 1, 2, 3, 0, 1], image_scores=scores.numpy())
