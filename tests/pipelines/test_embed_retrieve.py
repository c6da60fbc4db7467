"""EmbedSentences (real all-MiniLM-L6-v2) and RetrieveTopK (FAISS, and the torch exact searcher)."""
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipelines.embed import EmbedSentences
from pipelines.encoding import MeanPoolingEncoder, encode, load_sentence_model
from pipelines.options import EmbedOptions, RetrieveOptions
from pipelines.retrieve import CollectCorpus, CorpusFiles, RetrieveTopK, ShardCorpus, load_corpus, spill_corpus
from pipelines.search import Corpus, FaissSearcher, TorchExactSearcher, candidate_count, rank_candidates

from .conftest import SOFA_SENTENCES, whole_corpus_hits


@pytest.fixture(scope="module")
def model():
    return load_sentence_model(None)


def test_embed_transform_matches_the_model_and_is_normalised(pipeline, model):
    texts = SOFA_SENTENCES + ["sofa woman"]
    expected = encode(model, texts, 32)
    out = (pipeline | beam.Create(list(enumerate(texts)))
           | EmbedSentences(EmbedOptions(batch_size=2, backend="torch"), group_batches=1)  # several groups
           | beam.combiners.ToList())

    def check(results):
        (pairs,) = results
        assert sorted(k for k, _ in pairs) == list(range(len(texts)))
        for key, vector in pairs:
            assert vector.dtype == np.float32 and vector.shape == (384,)
            assert abs(np.linalg.norm(vector) - 1) < 1e-5
            np.testing.assert_allclose(vector, expected[key], atol=1e-5)

    assert_that(out, check)
    pipeline.run()


def test_the_corpus_and_tag_string_embeddings_share_one_model_per_process(pipeline, monkeypatch):
    import pipelines.embed as embed

    loads = []
    monkeypatch.setattr(embed, "_MODELS", {})
    monkeypatch.setattr(embed, "load_sentence_encoder", lambda *a: loads.append(a) or load_sentence_model(*a[:3]))
    corpus = pipeline | "Corpus" >> beam.Create(list(enumerate(SOFA_SENTENCES))) | "EmbedCorpus" >> EmbedSentences()
    tags = pipeline | "Tags" >> beam.Create([("img", "sofa woman")]) | "EmbedQueries" >> EmbedSentences()
    assert_that(corpus | "CountCorpus" >> beam.combiners.Count.Globally(), equal_to([len(SOFA_SENTENCES)]),
                label="corpus")
    assert_that(tags | beam.Keys(), equal_to(["img"]), label="tags")
    pipeline.run()
    assert len(loads) == 1  # two RunInference transforms, one model in this (the only) worker process


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder with a sentence-transformers model"):
        load_sentence_model(str(tmp_path / "nope"))


def _corpus(model, texts):
    ids = [f"s{i:02d}" for i in range(len(texts))]
    return Corpus(ids, list(texts), encode(model, texts, 32), fingerprint="test")


def test_sofa_woman_ranks_the_sofa_sentence_first(pipeline, model, tmp_path):
    corpus_elements = [((f"s{i:02d}", t), v) for i, (t, v) in enumerate(zip(SOFA_SENTENCES, encode(model, SOFA_SENTENCES, 32)))]
    corpus = (pipeline | "Corpus" >> beam.Create(corpus_elements) | ShardCorpus(str(tmp_path / "spill"))).main
    queries = pipeline | "Queries" >> beam.Create([("sofa woman", encode(model, ["sofa woman"], 1)[0]),
                                                   ("stock market", encode(model, ["stock market"], 1)[0])])
    hits = (queries | RetrieveTopK(corpus, RetrieveOptions(k=3))).main

    def check(results):
        by_query = dict(results)
        sofa, market = by_query["sofa woman"], by_query["stock market"]
        assert [h["rank"] for h in sofa] == [0, 1, 2]
        assert sofa[0]["sentence"] == SOFA_SENTENCES[0]
        assert sofa[0]["score"] > sofa[1]["score"] >= sofa[2]["score"]
        stock_ids = {"s01", "s02", "s05"}
        assert all(sofa[0]["score"] > h["score"] + 0.2 for h in sofa[1:] if h["sentence_id"] in stock_ids)
        assert market[0]["sentence_id"] in stock_ids
        assert all(h["sentence_id"] != "s00" for h in market[:2])

    assert_that(hits, check)
    pipeline.run()


def test_results_do_not_depend_on_batch_and_ties_break_by_id(model):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors[7] = vectors[3]  # an exact tie: s003 must come before s007
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    corpus = Corpus([f"s{i:03d}" for i in range(300)], [f"t{i}" for i in range(300)], vectors, "x")
    # 64 queries: past FAISS's 20-query switch from its own loop to BLAS, so the batch takes
    # another code path than the lone query (whose float32 scores can differ in the last bits)
    queries = vectors[[3, 10, 20] + list(range(100, 161))] + 0.01 * rng.standard_normal((64, 16)).astype(np.float32)
    together = whole_corpus_hits(corpus, queries, 5)
    alone = [whole_corpus_hits(corpus, q[None], 5)[0] for q in queries]
    assert together == alone
    ids = [h["sentence_id"] for h in together[0]]
    assert ids.index("s003") + 1 == ids.index("s007")
    # brute force agrees
    exact = vectors.astype(np.float64) @ queries[1].astype(np.float64)
    assert [h["sentence_id"] for h in together[1]] == [f"s{i:03d}" for i in np.argsort(-exact, kind="stable")[:5]]


def test_ivf_and_torch_exact_search_agree_with_flat():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:200] + 0.3 * rng.standard_normal((200, 32)).astype(np.float32)
    corpus = Corpus([f"s{i:05d}" for i in range(5000)], [""] * 5000, vectors, "y")
    flat = FaissSearcher(vectors, RetrieveOptions(index="flat"))
    # 5000 = 78 blocks of 64 + a tail of 8: both paths of the two-level top-m
    torch_exact = TorchExactSearcher(vectors, device="cpu", block=64, query_batch=64)
    ivf = FaissSearcher(vectors, RetrieveOptions(index="ivf", nlist=16, nprobe=16))  # all lists: exact
    m = candidate_count(5, 5000)
    top = lambda searcher: rank_candidates(queries, searcher.search(queries, m), corpus, 5)[0].tolist()
    assert top(torch_exact) == top(flat)
    assert top(ivf) == top(flat)


def test_flat_search_runs_in_place_on_a_memory_map_with_index_flat_ip_results(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4000, 48)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(tmp_path / "v.npy", vectors)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")  # read-only, as load_corpus gives it
    searcher = FaissSearcher(mapped, RetrieveOptions(index="flat"))
    assert np.shares_memory(searcher._vectors, mapped)  # no private copy of the corpus
    index = faiss.IndexFlatIP(48)
    index.add(vectors)
    for queries in (vectors[:3] + 0.1, vectors[100:164] + 0.2 * rng.standard_normal((64, 48)).astype(np.float32)):
        # 3 queries: FAISS's own loop; 64: its BLAS path
        np.testing.assert_array_equal(searcher.search(queries, 13), index.search(np.ascontiguousarray(queries), 13)[1])


def test_empty_corpus_yields_no_hits(pipeline, tmp_path):
    corpus = (pipeline | "Corpus" >> beam.Create([]) | ShardCorpus(str(tmp_path / "spill"))).main
    hits = (pipeline | "Q" >> beam.Create([("q", np.ones(4, np.float32) / 2)]) | RetrieveTopK(corpus)).main
    assert_that(hits, equal_to([]))
    pipeline.run()


def test_direct_mean_pooling_path_equals_sentence_transformers_encode(model):
    texts = SOFA_SENTENCES + ["sofa", "a " * 300, "woman lamp sofa cup"]  # incl. one truncated at 256 tokens
    reference = model.encode(texts, batch_size=3, normalize_embeddings=True, convert_to_numpy=True)
    direct = MeanPoolingEncoder(model).encode(texts, batch_size=3)
    np.testing.assert_allclose(direct, reference, atol=1e-5)


def test_torch_search_ranked_on_device_equals_host_ranking():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((3000, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[11] = vectors[5]  # an exact tie
    corpus = Corpus([f"s{i:05d}" for i in range(3000)], [""] * 3000, vectors, "z")
    queries = np.concatenate([vectors[[5]], vectors[100:150] + 0.2 * rng.standard_normal((50, 24)).astype(np.float32)])
    searcher = TorchExactSearcher(vectors, device="cpu", block=128, query_batch=16)
    indices, scores = searcher.search_ranked(queries, 5)
    host_indices, host_scores = rank_candidates(queries, FaissSearcher(vectors, RetrieveOptions()).search(queries, 13), corpus, 5)
    np.testing.assert_array_equal(indices, host_indices)
    np.testing.assert_allclose(scores, host_scores, atol=1e-5)
    assert indices[0][:2].tolist() == [5, 11]


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("size, block", [(40, 64), (512, 64), (1000, 64), (1000, 1)])
def test_two_level_top_m_equals_brute_force(size, block):
    """All-tail, no-tail, blocks plus tail, and one-row blocks."""
    rng = np.random.default_rng(size + block)
    vectors, queries = _unit(rng, size, 16), _unit(rng, 30, 16)
    m = candidate_count(5, size)
    found = TorchExactSearcher(vectors, device="cpu", block=block, query_batch=7).search(queries, m)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :m]
    assert found.shape == (30, m)
    assert [sorted(r) for r in found.tolist()] == [sorted(r) for r in brute.tolist()]


def test_top_m_crowded_into_one_block_are_all_found():
    """The whole top-13 of a query inside one block: the block pruning must still return them,
    not one per block."""
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 640, 16)
    query = vectors[70]
    vectors[64:128] = query + 0.01 * rng.standard_normal((64, 16)).astype(np.float32)  # block 1 of 64
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    found = TorchExactSearcher(vectors, device="cpu", block=64).search(query[None], 13)[0]
    assert set(found.tolist()) == set(np.argsort(-(vectors @ query))[:13].tolist())
    assert all(64 <= i < 128 for i in found)


def test_spilled_corpus_gives_the_same_hits_and_only_names_travel(pipeline, tmp_path):
    rng = np.random.default_rng(4)
    vectors = _unit(rng, 500, 16)
    rows = [((f"s{i:04d}", f"text {i}"), v) for i, v in enumerate(vectors)]
    queries = [(f"q{i}", vectors[i] + 0.1 * rng.standard_normal(16).astype(np.float32)) for i in range(0, 500, 25)]
    in_memory = Corpus([f"s{i:04d}" for i in range(500)], [f"text {i}" for i in range(500)], vectors)
    expected = dict(zip([key for key, _ in queries], whole_corpus_hits(in_memory, np.stack([v for _, v in queries]), 3)))
    spill = str(tmp_path / "spill")
    corpus = (pipeline | "Corpus" >> beam.Create(rows[::-1])  # any input order: sorted by id
              | ShardCorpus(spill, RetrieveOptions(k=3))).main  # one shard at this size
    hits = (pipeline | "Q" >> beam.Create(queries) | RetrieveTopK(corpus, RetrieveOptions(k=3))).main
    assert_that(hits, equal_to(list(expected.items())))
    pipeline.run()
    files = sorted(os.listdir(spill))
    assert len(files) == 2 and {f.rsplit(".", 1)[1] for f in files} == {"npy", "arrow"}
    assert np.load(os.path.join(spill, files[1]), mmap_mode="r").shape == (500, 16)


def test_spilled_corpus_of_another_size_is_refused(tmp_path):
    vectors = _unit(np.random.default_rng(5), 10, 4)
    files = spill_corpus(Corpus([f"s{i}" for i in range(10)], [""] * 10, vectors, "f"), str(tmp_path))
    loaded = load_corpus(files)
    assert loaded.ids == [f"s{i}" for i in range(10)] and not loaded.vectors.flags.writeable
    np.testing.assert_array_equal(loaded.vectors, vectors)
    with pytest.raises(ValueError, match="hold 10 vectors and 10 rows, expected 11"):
        load_corpus(CorpusFiles(files.directory, "f", 11))


def test_spill_writes_rows_in_id_order_across_chunks(tmp_path, monkeypatch):
    import pipelines.retrieve as retrieve
    monkeypatch.setattr(retrieve, "SPILL_CHUNK_ROWS", 7)  # 50 rows: 7 full chunks and a partial one
    rng = np.random.default_rng(6)
    vectors = _unit(rng, 50, 8)
    ids = [f"s{i:03d}" for i in rng.permutation(50)]  # arrival order is not id order
    acc = (list(ids), [f"t-{i}" for i in ids], [vectors])
    files = CollectCorpus(str(tmp_path)).extract_output(acc)
    loaded = load_corpus(files)
    assert loaded.ids == sorted(ids) and loaded.texts == [f"t-{i}" for i in sorted(ids)]
    np.testing.assert_array_equal(loaded.vectors, vectors[np.argsort(ids, kind="stable")])
    assert loaded.fingerprint == files.fingerprint


def test_vlp_data_leaves_tokenizer_parallelism_to_the_device():
    """Through the `vlp-data` CLI module, a CUDA model load turns the Rust tokenizer's threads on
    (the host's tokenising limits a GPU) and a CPU load keeps them off; a user's setting wins."""
    import subprocess
    import sys
    code = ("import os, pipelines.cli\nfrom pipelines.encoding import load_sentence_model\n"
            "try:\n    load_sentence_model(None, os.environ['WANT_DEVICE'])\nexcept RuntimeError:\n    pass\n"
            "print(os.environ.get('TOKENIZERS_PARALLELISM'))")
    base = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    run = lambda **env: subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout.split()[-1]
    if not __import__("torch").cuda.is_available():  # here a CUDA load stops at "no CUDA device", after the choice
        assert run(WANT_DEVICE="cuda") == "true"
    assert run(WANT_DEVICE="cpu") == "false"
    assert run(WANT_DEVICE="cuda", TOKENIZERS_PARALLELISM="false") == "false"
