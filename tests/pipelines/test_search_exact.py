"""TorchExactSearcher in float16 (what --device cuda runs) stays exact: the same top-K as the
float32 flat index, near-duplicates crowding the K-th score included."""
import numpy as np
import pytest
import torch

from pipelines import search
from pipelines.options import RetrieveOptions
from pipelines.search import Corpus, FaissSearcher, TorchExactSearcher, rank_candidates


def _crowded_corpus(dim=384, size=20_000, duplicates=40, spacing=2.5e-5, seed=0):
    """Unit vectors, one query, and `duplicates` rows at cosines 0.9, 0.9 + spacing, ... to it:
    closer together than float16 resolves (2**-11 near 0.9), so the fast scores tie and misorder them."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = rng.standard_normal(dim).astype(np.float32)
    query /= np.linalg.norm(query)
    side = rng.standard_normal(dim).astype(np.float32)
    side -= side @ query * query
    side /= np.linalg.norm(side)
    for j, row in enumerate(range(5000, 5000 + duplicates)):
        cosine = 0.9 + spacing * j
        v = cosine * query + np.sqrt(1 - cosine * cosine) * side
        vectors[row] = v / np.linalg.norm(v)
    others = rng.standard_normal((30, dim)).astype(np.float32)
    queries = np.concatenate([query[None], vectors[:30] + 0.3 * others / np.linalg.norm(others, axis=1, keepdims=True)])
    return vectors, queries


def _flat_top5(vectors, queries):
    corpus = Corpus([f"s{i:06d}" for i in range(len(vectors))], [""] * len(vectors), vectors, "c")
    return rank_candidates(queries, FaissSearcher(vectors, RetrieveOptions()).search(queries, 13), corpus, 5)


@pytest.mark.parametrize("duplicates, spacing, widened, redone", [(40, 2.5e-5, 1, 0), (1000, 3e-6, 1, 1)])
def test_float16_search_ranked_equals_the_float32_flat_index(duplicates, spacing, widened, redone):
    """40 near-duplicates fit in the widened float16 search (8 x 13 candidates); 1,000 within
    3e-3 (hundreds tied in float16) do not, and go to the float32 one."""
    vectors, queries = _crowded_corpus(duplicates=duplicates, spacing=spacing)
    expected, expected_scores = _flat_top5(vectors, queries)
    top = 5000 + duplicates - 1
    assert expected[0].tolist() == [top, top - 1, top - 2, top - 3, top - 4]  # the crowd's top, in score order
    searcher = TorchExactSearcher(vectors, device="cpu", dtype=torch.float16, query_batch=8)
    found, scores = searcher.search_ranked(queries, 5)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert (searcher.widened, searcher.redone) == (widened, redone)  # only the crowded query


def test_without_the_float16_bound_the_crowded_query_goes_wrong(monkeypatch):
    """What the check guards against: the float16 candidates alone miss the crowd's best rows."""
    vectors, queries = _crowded_corpus()
    expected, _ = _flat_top5(vectors, queries)
    monkeypatch.setattr(search, "FP16_SCORE_ERROR", -1.0)  # every result taken as certain
    searcher = TorchExactSearcher(vectors, device="cpu", dtype=torch.float16, query_batch=8)
    found, _ = searcher.search_ranked(queries, 5)
    assert searcher.widened == searcher.redone == 0
    assert found[0].tolist() != expected[0].tolist()
    np.testing.assert_array_equal(found[1:], expected[1:])  # well separated queries need no second search
