"""The corpus in shards, searched where it lies: the merged top-K of every shard equals the top-K
of the whole corpus searched at once (ties included), and an IVF / IVF-PQ index is trained once
per run and memory-mapped by the search."""
import glob
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import retrieve, search
from pipelines.options import RetrieveOptions
from pipelines.retrieve import CorpusFiles, RetrieveTopK, ShardCorpus, corpus_shard_of, load_index
from pipelines.search import Corpus

from .conftest import RUNNER, whole_corpus_hits

SIZE, DIM, K = 700, 16, 5


def _unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _tied_corpus():
    """Unit vectors with ties that cross shards: exact duplicates of row 3, and near-duplicates of
    row 5 whose float64 scores for query 1 rise with the id (601 > 333 > 12 > 5) by less than
    SCORE_DECIMALS resolves: tied by the rounding, so ordered by id (the reverse of their raw scores)."""
    rng = np.random.default_rng(7)
    vectors = _unit(rng.standard_normal((SIZE, DIM)))
    ids = [f"s{i:04d}" for i in range(SIZE)]
    near_query = _unit(vectors[5:6] + 0.05 * rng.standard_normal((1, DIM)))
    for copy in (11, 250, 480, 690):
        vectors[copy] = vectors[3]
    for step, near in enumerate((12, 333, 601), start=1):
        vectors[near] = _unit(vectors[5:6] + step * 5e-7 * near_query)[0]
    queries = np.concatenate([vectors[[3]], near_query, _unit(vectors[100:160] + 0.2 * rng.standard_normal((60, DIM)))])
    return ids, vectors, queries


def _unsharded_hits(ids, vectors, queries):
    """Today's search of the whole corpus at once: flat candidates, exact re-scoring, (score, id)."""
    corpus = Corpus(ids, [f"text of {i}" for i in ids], vectors, "whole")
    return [(f"q{j:03d}", hits) for j, hits in enumerate(whole_corpus_hits(corpus, queries, K))]


def _search_in_shards(tmp_path, ids, vectors, queries, options, runner_args=()):
    pipeline = TestPipeline(runner=RUNNER, argv=list(runner_args))
    rows = [((sid, f"text of {sid}"), v) for sid, v in zip(ids, vectors)][::-1]  # any arrival order
    shards = (pipeline | "Corpus" >> beam.Create(rows) | ShardCorpus(str(tmp_path / "spill"), options)).main
    hits = (pipeline | "Queries" >> beam.Create([(f"q{j:03d}", q) for j, q in enumerate(queries)])
            | RetrieveTopK(shards, options)).main
    return pipeline, hits


@pytest.mark.parametrize("shard_rows, shards", [(SIZE, 1), (234, 3), (100, 7)])
def test_sharded_search_equals_the_whole_corpus_searched_at_once(tmp_path, shard_rows, shards):
    ids, vectors, queries = _tied_corpus()
    expected = _unsharded_hits(ids, vectors, queries)
    tied = [h["sentence_id"] for h in expected[0][1]]
    assert tied == ["s0003", "s0011", "s0250", "s0480", "s0690"]  # the exact ties, by id
    near = [h["sentence_id"] for h in expected[1][1]][:4]
    assert near == ["s0005", "s0012", "s0333", "s0601"]  # tied by rounding, by id
    if shards > 1:  # the tied rows really are in different shards
        assert len({corpus_shard_of(i, SIZE, shard_rows) for i in tied}) > 1
        assert len({corpus_shard_of(i, SIZE, shard_rows) for i in near}) > 1
    pipeline, hits = _search_in_shards(tmp_path, ids, vectors, queries, RetrieveOptions(k=K, corpus_shard_rows=shard_rows))
    assert_that(hits, equal_to(expected))
    pipeline.run()
    assert len(glob.glob(str(tmp_path / "spill" / "corpus-*.npy"))) == shards
    written = sorted(np.load(f, mmap_mode="r").shape[0] for f in glob.glob(str(tmp_path / "spill" / "*.npy")))
    assert sum(written) == SIZE and written[-1] <= 2 * shard_rows  # split, never gathered whole


def test_merge_order_is_the_rounded_score_then_the_id():
    """What makes the merge exact: the rounded score, as rank_candidates orders a shard."""
    # 0.1234567 and 0.1234571 are one score at 6 decimals: the smaller id wins
    assert search.hit_order(0.1234567, "b") > search.hit_order(0.1234571, "a")
    assert sorted([search.hit_order(0.12345671, "b"), search.hit_order(0.12345669, "a")])[0][1] == "a"
    assert search.hit_order(0.5, "z") < search.hit_order(0.4999, "a")


def test_without_rounding_the_merge_breaks_ties_otherwise(tmp_path, monkeypatch):
    """The merge key is what the test above pins: merged by the raw score, the near-ties of the
    whole-corpus order come out in another order (shown on the merge itself)."""
    ids, vectors, queries = _tied_corpus()
    expected = _unsharded_hits(ids, vectors, queries)[1][1]
    exact = vectors.astype(np.float64) @ queries[1].astype(np.float64)
    candidates = [(float(exact[int(h["sentence_id"][1:])]), h["sentence_id"], h["sentence"]) for h in expected]
    raw = sorted(candidates, key=lambda c: (-c[0], c[1]))
    rounded = sorted(candidates, key=retrieve._candidate_order)
    assert [c[1] for c in rounded] == [h["sentence_id"] for h in expected]
    assert [c[1] for c in raw] != [h["sentence_id"] for h in expected]


@pytest.mark.parametrize("index", ["ivf", "ivfpq"])
def test_index_is_trained_once_and_memory_mapped_by_the_search(tmp_path, monkeypatch, index):
    """Two worker threads, three shards: one training (the counting wrapper sees every call in
    this process), each shard's index file memory-mapped; probing every list, IVF is exact."""
    trainings = []
    real_train = search.train_index

    def counted(sample, options):
        trainings.append(len(sample))
        return real_train(sample, options)

    monkeypatch.setattr(search, "train_index", counted)
    monkeypatch.setattr(retrieve, "train_index", counted)
    ids, vectors, queries = _tied_corpus()
    options = RetrieveOptions(k=K, index=index, nlist=4, nprobe=4, pq_bytes=8, train_rows=400, corpus_shard_rows=234)
    pipeline, hits = _search_in_shards(tmp_path, ids, vectors, queries, options,
                                       ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    if index == "ivf":
        assert_that(hits, equal_to(_unsharded_hits(ids, vectors, queries)))
    else:  # compressed codes: approximate candidates, re-scored exactly (scores are true cosines)
        expected = dict(_unsharded_hits(ids, vectors, queries))

        def check(results):
            found = dict(results)
            assert sorted(found) == sorted(expected)
            top1 = np.mean([found[q][0]["sentence_id"] == expected[q][0]["sentence_id"] for q in expected])
            assert top1 >= 0.8, top1
            for q, hits_ in found.items():
                row = queries[int(q[1:])]
                for h in hits_:
                    assert h["score"] == pytest.approx(float(vectors[int(h["sentence_id"][1:])] @ row), abs=1e-6)
        assert_that(hits, check)
    result = pipeline.run()
    result.wait_until_finish()
    assert trainings == [400]  # once, on the sample, whatever the workers and shards
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == "retrieve"}
    assert counters["index_trainings"] == 1 and counters["shards_indexed"] == 3
    spill = tmp_path / "spill"
    assert len(glob.glob(str(spill / "trained-*.faiss"))) == 1
    index_files = sorted(glob.glob(str(spill / "index-*.faiss")))
    assert len(index_files) == 3
    import faiss
    fingerprint = os.path.basename(index_files[0]).split("-")[1]
    size = np.load(spill / f"corpus-{fingerprint}.npy", mmap_mode="r").shape[0]
    loaded = load_index(CorpusFiles(str(spill), fingerprint, size, index_files[0]))
    assert loaded.ntotal == size
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded).invlists), faiss.OnDiskInvertedLists)


def test_training_sample_is_the_same_for_any_arrival_order():
    """The sample is the smallest training ranks (a hash of the id): a property of the ids only."""
    ids = [f"s{i:04d}" for i in range(200)]
    ranks = sorted(retrieve.training_rank(i) for i in ids)
    assert ranks == sorted(retrieve.training_rank(i) for i in reversed(ids))
    assert [i for i in ids if retrieve.training_rank(i) in ranks[:10]] != ids[:10]  # a spread, not the first ids


def test_pq_bytes_must_divide_the_width():
    with pytest.raises(ValueError, match="--pq-bytes 5 must divide the embedding width 16"):
        search.train_index(_unit(np.random.default_rng(0).standard_normal((300, 16))),
                           RetrieveOptions(index="ivfpq", nlist=2, pq_bytes=5))


def test_an_empty_corpus_trains_nothing_and_gets_no_hits(tmp_path, pipeline):
    options = RetrieveOptions(k=K, index="ivf", nlist=4)
    shards = (pipeline | "Corpus" >> beam.Create([]) | ShardCorpus(str(tmp_path / "spill"), options)).main
    hits = (pipeline | "Queries" >> beam.Create([("q", np.ones(DIM, np.float32) / 4)]) | RetrieveTopK(shards, options)).main
    assert_that(hits, equal_to([]))
    pipeline.run()
    assert not glob.glob(str(tmp_path / "spill" / "*.faiss"))
