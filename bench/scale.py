"""Retrieval at corpus scale on the CPU: exact search vs `--index ivf` / `--index ivfpq`, as the
pipeline runs them (pipelines.search / pipelines.retrieve), on synthetic sentence-like vectors.

    python bench/scale.py                                  # 1,000,000 x 384, 2,000 queries
    python bench/scale.py --corpus 200000 --queries 1000   # quicker

Vectors: unit 384-d vectors with the structure of sentence embeddings: a shared mean direction
(anisotropy), topics (corpus / 500 of them) and sub-topics, and noise on a decaying spectrum, so
that neighbours are much closer than random pairs; the realism figures (mean cosine of random
pairs, of each query's 1st and 5th exact neighbour) are in the results, beside the same figures
for real MiniLM embeddings of the bundled Lee corpus (`--real-sentences`).

Per index: training on `--train-rows` vectors (the pipeline's sample size), adding the corpus,
the index file's bytes, loading it memory-mapped (IO_FLAG_MMAP) and the private memory that adds,
then search + exact re-scoring of the queries in batches of 1,024 (queries/s) and recall@5
against the exact top-5; at --nprobe also with the index read into memory (no mmap). Exact:
faiss.knn over the memory-mapped corpus + re-scoring, the flat path. Every phase records its
wall time and the process's CPU time (all threads): on a shared machine the CPU time is the
per-core cost. Writes bench/results/scale_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.env import device_name, peak_rss_mb, results_name, write_result  # noqa: E402

DIM = 384


def sentence_like(n: int, seed: int, topics: int, noise: float = 0.9, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors: mean direction + topic + sub-topic + noise, each on a decaying spectrum."""
    base = np.random.default_rng(1234)  # the space (mean, topics) is shared by corpus and queries
    spectrum = (1.0 / np.sqrt(1.0 + np.arange(DIM) / 16.0)).astype(np.float32)
    mean = base.standard_normal(DIM).astype(np.float32) * spectrum
    centres = base.standard_normal((topics, DIM)).astype(np.float32) * spectrum
    subs = base.standard_normal((topics, 8, DIM)).astype(np.float32) * spectrum
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        topic = rng.integers(0, topics, m)
        sub = rng.integers(0, 8, m)
        v = (0.6 * mean + centres[topic] + 0.7 * subs[topic, sub]
             + noise * rng.standard_normal((m, DIM)).astype(np.float32) * spectrum)
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def private_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


class Timer:
    """Wall and CPU seconds (this process, all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def search_all(searcher, corpus, queries, k: int, m: int, batch: int = 1024):
    from pipelines.search import rank_candidates
    found = []
    for start in range(0, len(queries), batch):
        q = queries[start:start + batch]
        found.append(rank_candidates(q, searcher.search(q, m), corpus, k)[0])
    return np.concatenate(found)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]))


def realism(vectors: np.ndarray, queries: np.ndarray, exact_scores: np.ndarray, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), 20_000), rng.integers(0, len(vectors), 20_000)
    return {"mean_cosine_random_pairs": float(np.mean(np.sum(vectors[a] * vectors[b], axis=1))),
            "mean_cosine_query_top1": float(np.mean(exact_scores[:, 0])),
            "mean_cosine_query_top5": float(np.mean(exact_scores[:, -1]))}


def real_minilm_realism(count: int) -> dict:
    """The same figures for MiniLM embeddings of real sentences (the Lee corpus), queries = other sentences."""
    from gensim.test.utils import datapath

    from pipelines.encoding import encode, load_sentence_model
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        pieces = sorted({p.strip() for line in f for p in line.split(". ") if 20 < len(p.strip()) < 300})
    pieces = pieces[:count]
    vectors = encode(load_sentence_model(None), pieces, 64)
    queries, corpus = vectors[::10], np.delete(vectors, np.s_[::10], axis=0)
    scores = np.sort(queries @ corpus.T, axis=1)[:, ::-1][:, :5]
    return {"sentences": len(pieces), **realism(corpus, queries, scores)}


def bench_index(kind: str, args, corpus, mapped, queries, exact, sample, folder) -> dict:
    import faiss

    from pipelines.options import RetrieveOptions
    from pipelines.search import FaissSearcher, candidates_for, train_index
    options = RetrieveOptions(index=kind, nlist=args.nlist, nprobe=args.nprobe, pq_bytes=args.pq_bytes,
                              train_rows=len(sample))
    with Timer() as train:
        index = train_index(sample, options)
    with Timer() as add:
        for row in range(0, len(mapped), 65_536):
            index.add(np.ascontiguousarray(mapped[row:row + 65_536]))
    path = os.path.join(folder, f"{kind}.faiss")
    faiss.write_index(index, path)
    del index
    before = private_mb()
    loaded = faiss.read_index(path, faiss.IO_FLAG_MMAP)
    load_private_mb = private_mb() - before
    result = {"train_s": train.wall, "train_cpu_s": train.cpu, "add_s": add.wall, "add_cpu_s": add.cpu,
              "index_bytes": os.path.getsize(path),
              "index_bytes_per_vector": os.path.getsize(path) / len(mapped), "load_private_mb": load_private_mb,
              "nlist": options.nlist, "pq_bytes": options.pq_bytes if kind == "ivfpq" else None, "by_nprobe": {}}
    for nprobe in args.nprobes:
        opts = RetrieveOptions(index=kind, nlist=args.nlist, nprobe=nprobe, pq_bytes=args.pq_bytes)
        searcher = FaissSearcher(mapped, opts, loaded)
        m = candidates_for(opts, len(mapped))
        with Timer() as t:
            found = search_all(searcher, corpus, queries, 5, m)
        result["by_nprobe"][nprobe] = {"recall_at_5": recall(found, exact), "candidates": m,
                                       "queries_per_s": len(queries) / t.wall, "seconds": t.wall, "cpu_s": t.cpu,
                                       "queries_per_cpu_s": len(queries) / t.cpu}
        print(kind, nprobe, json.dumps(result["by_nprobe"][nprobe]), flush=True)
    in_ram = faiss.read_index(path)  # the same index read whole into this process
    opts = RetrieveOptions(index=kind, nlist=args.nlist, nprobe=args.nprobe, pq_bytes=args.pq_bytes)
    with Timer() as t:
        search_all(FaissSearcher(mapped, opts, in_ram), corpus, queries, 5, candidates_for(opts, len(mapped)))
    result["in_memory_at_nprobe"] = {"nprobe": args.nprobe, "seconds": t.wall, "cpu_s": t.cpu,
                                     "queries_per_cpu_s": len(queries) / t.cpu}
    print(kind, "in memory", json.dumps(result["in_memory_at_nprobe"]), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--pq-bytes", type=int, default=48)
    parser.add_argument("--train-rows", type=int, default=65_536)
    parser.add_argument("--real-sentences", type=int, default=3000)
    parser.add_argument("--results-name")
    args = parser.parse_args(argv)
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import training_rank
    from pipelines.search import Corpus, FaissSearcher, candidate_count

    import faiss
    result = {"device": device_name("cpu"), "command": "python " + " ".join(sys.argv), "corpus": args.corpus,
              "queries": args.queries, "dim": DIM, "faiss_threads": faiss.omp_get_max_threads()}
    folder = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        start = time.perf_counter()
        vectors = sentence_like(args.corpus, seed=1, topics=max(1, args.corpus // 500))
        queries = sentence_like(args.queries, seed=2, topics=max(1, args.corpus // 500), noise=1.4)
        result["generate_s"] = time.perf_counter() - start
        np.save(os.path.join(folder, "corpus.npy"), vectors)
        del vectors
        mapped = np.load(os.path.join(folder, "corpus.npy"), mmap_mode="r")  # as a search worker maps a shard
        corpus = Corpus([f"{i:09d}" for i in range(args.corpus)], [""] * args.corpus, mapped, "bench")
        # exact, the flat path
        flat = FaissSearcher(mapped, RetrieveOptions())
        with Timer() as t:
            exact = search_all(flat, corpus, queries, 5, candidate_count(5, args.corpus))
        exact_scores = np.take_along_axis(queries @ np.asarray(mapped).T, exact, 1) if args.corpus <= 200_000 else \
            np.stack([mapped[row] @ q for row, q in zip(exact.tolist(), queries)])
        result["flat"] = {"seconds": t.wall, "cpu_s": t.cpu, "queries_per_s": args.queries / t.wall,
                          "queries_per_cpu_s": args.queries / t.cpu,
                          "index_bytes": os.path.getsize(os.path.join(folder, "corpus.npy")), "recall_at_5": 1.0}
        result["realism_synthetic"] = realism(mapped, queries, exact_scores)
        print("flat", json.dumps(result["flat"]), json.dumps(result["realism_synthetic"]), flush=True)
        # the pipeline's training sample: smallest training ranks of the ids
        ranks = np.array([training_rank(i) for i in corpus.ids])
        sample_rows = np.sort(np.argsort(ranks)[:args.train_rows])
        sample = np.ascontiguousarray(mapped[sample_rows])
        for kind in ("ivf", "ivfpq"):
            result[kind] = bench_index(kind, args, corpus, mapped, queries, exact, sample, folder)
            write_result(results_name("scale_cpu", None) if not args.results_name else args.results_name, result)
        if args.real_sentences:
            result["realism_minilm_lee"] = real_minilm_realism(args.real_sentences)
            print("real", json.dumps(result["realism_minilm_lee"]), flush=True)
        result["peak_rss_mb"] = peak_rss_mb()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_result(args.results_name or "scale_cpu", result)


if __name__ == "__main__":
    main()
