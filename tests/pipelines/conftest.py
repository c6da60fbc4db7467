import json

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

RUNNER = "FnApiRunner"  # the default DirectRunner downloads Prism first, which fails offline


@pytest.fixture
def pipeline():
    return TestPipeline(runner=RUNNER)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


SOFA_SENTENCES = [
    "A woman sits on a red sofa in the living room.",
    "The stock market fell sharply after the bank raised interest rates.",
    "Shares of technology companies rose on Wall Street today.",
    "A cat sleeps on the kitchen floor next to its bowl.",
    "A man rides a motorcycle down a country road.",
    "Investors sold bonds as inflation worries grew.",
]


def whole_corpus_hits(corpus, queries, k):
    """Each query's top-k over the whole corpus searched at once, without Beam or shards (FAISS
    flat candidates, exact re-scoring, the (score, id) order), as the pipeline passes hits on:
    what every sharded search must equal."""
    from pipelines.options import RetrieveOptions
    from pipelines.search import FaissSearcher, candidate_count, hit_dict, rank_candidates

    found = FaissSearcher(corpus.vectors, RetrieveOptions()).search(queries, candidate_count(k, len(corpus)))
    return [[hit_dict(rank, corpus.ids[i], corpus.texts[i], score) for rank, (i, score) in enumerate(zip(row, scores))
             if i < len(corpus)]
            for row, scores in zip(*rank_candidates(queries, found, corpus, k))]
