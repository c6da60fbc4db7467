"""The measures every family's held-out evaluation shares (vlp_train/evaluate.py): recall@k from a
similarity matrix with several right answers a query, ITM accuracy and AUC, cost per 1k queries."""
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
