"""Embedding and exact retrieval throughput, ours vs the straightforward call, on one device.

    python bench/retrieval.py --device cuda --sentences 200000 --queries 1000000 --corpus 1000000
    python bench/retrieval.py --device cpu  --sentences 5000 --queries 2000 --corpus 200000

- embed: `pipelines.encoding.encode` (direct mean-pooling path) vs `SentenceTransformer.encode`
  (fp16 on CUDA, same batch size), on template sentences; sentences/s. Also the host's own
  ceiling: the tokenizer alone over the same sentences (`host_tokenize_sentences_per_s`).
- retrieve: top-5 exact cosine of `queries` random unit vectors against `corpus` (384-d):
  ours (`TorchExactSearcher.search_ranked` on CUDA: two-level top-m, exact re-rank, queries from
  and results to the host included; FAISS flat + exact re-rank on CPU) vs the naive call
  (chunked fp16 `Q @ C.T` + `torch.topk` on CUDA, one `IndexFlatIP.search` on CPU); s.
  On CPU also the index build, timed once: ours over the corpus file memory-mapped (as a Beam
  worker loads it) vs `IndexFlatIP.add`; seconds and the private memory it adds.
Median of --repeats runs of each, ours and the baseline in turn, after one warm-up of both. Writes bench/results/retrieval_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # one process: let the Rust tokenizer use all cores

from bench.data import template_sentences  # noqa: E402
from bench.env import device_name, results_name, write_result  # noqa: E402


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (CUDA kernels, compilation, caches)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(ours, baseline, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """Medians of `repeats` runs of each, taken in turn after a warm-up of both: neither side
    inherits the other's busy threads or caches only because it ran second."""
    times = {ours: [], baseline: []}
    for fn in (ours, baseline):
        fn()
        sync()
    for _ in range(repeats):
        for fn in (ours, baseline):
            start = time.perf_counter()
            fn()
            sync()
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[ours]), statistics.median(times[baseline])


def bench_embed(args, sync) -> dict:
    from pipelines.encoding import MeanPoolingEncoder, encode, load_sentence_model

    texts = template_sentences(args.sentences)
    model = load_sentence_model(None, args.device, fp16=True)
    encoder = MeanPoolingEncoder(model)
    chunk = encoder.chunk_size(args.batch_size)  # the tokenizer alone, on the chunks encode() cuts
    host = timed(lambda: [encoder.tokens.tokenize(texts[s:s + chunk]) for s in range(0, len(texts), chunk)], args.repeats)
    ours, plain = timed_pair(lambda: encode(model, texts, args.batch_size),
                             lambda: model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                                  convert_to_numpy=True, show_progress_bar=False), args.repeats, sync)
    return {"sentences": len(texts), "batch_size": args.batch_size,
            "sentences_per_s": len(texts) / ours, "baseline_sentences_per_s": len(texts) / plain,
            "host_tokenize_sentences_per_s": len(texts) / host,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
            "baseline": "SentenceTransformer.encode" + (" (fp16)" if args.device == "cuda" else ""),
            "baseline_ratio": ours / plain}


def private_mb() -> float:
    """This process's anonymous resident memory (MB): a private copy counts, pages of a
    memory-mapped file (shared by every process that maps it) do not."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def bench_retrieve(args, sync) -> dict:
    import torch

    from pipelines.options import RetrieveOptions
    from pipelines.search import Corpus, FaissSearcher, TorchExactSearcher, candidate_count, rank_candidates

    rng = np.random.default_rng(0)
    corpus_vectors = rng.standard_normal((args.corpus, 384), dtype=np.float32)
    corpus_vectors /= np.linalg.norm(corpus_vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, 384), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 5
    extra = {}
    if args.device == "cuda":
        start = time.perf_counter()
        searcher = TorchExactSearcher(corpus_vectors, "cuda")
        sync()
        extra["index_build_s"] = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        searcher.search_ranked(queries, k)
        sync()
        extra["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        # queries whose float16 result was not certain: searched again (wider, then in float32)
        extra["queries_widened"], extra["queries_redone"] = searcher.widened, searcher.redone
        ours_fn = lambda: searcher.search_ranked(queries, k)  # noqa: E731
        corpus_half = torch.from_numpy(corpus_vectors).cuda().half()

        def naive():  # what a researcher writes: chunked fp16 product + topk, merged on the host
            out = []
            for start in range(0, len(queries), 8192):
                q = torch.from_numpy(queries[start:start + 8192]).cuda().half()
                out.append(torch.topk(q @ corpus_half.T, k, dim=1).indices.cpu())
            return torch.cat(out)
        baseline_name = "chunked fp16 Q @ C.T + torch.topk"
    else:
        import faiss
        folder = tempfile.mkdtemp(prefix="bench-retrieval-")
        np.save(os.path.join(folder, "vectors.npy"), corpus_vectors)
        mapped = np.load(os.path.join(folder, "vectors.npy"), mmap_mode="r")  # as a Beam worker loads it
        before, start = private_mb(), time.perf_counter()
        searcher = FaissSearcher(mapped, RetrieveOptions(k=k))
        extra["index_build_s"], extra["index_private_mb"] = time.perf_counter() - start, private_mb() - before
        before, start = private_mb(), time.perf_counter()
        index = faiss.IndexFlatIP(384)
        index.add(corpus_vectors)
        extra["baseline_index_build_s"] = time.perf_counter() - start
        extra["baseline_index_private_mb"] = private_mb() - before
        corpus = Corpus([f"{i:09d}" for i in range(args.corpus)], [""] * args.corpus, mapped, "bench")

        def ours_cpu():
            for start in range(0, len(queries), 1024):
                q = queries[start:start + 1024]
                rank_candidates(q, searcher.search(q, candidate_count(k, args.corpus)), corpus, k)
        ours_fn = ours_cpu
        naive = lambda: index.search(queries, k)  # noqa: E731
        baseline_name = "faiss IndexFlatIP.search(k=5), one call"
    ours, plain = timed_pair(ours_fn, naive, args.repeats, sync)
    if args.device != "cuda":
        del searcher, corpus, mapped
        shutil.rmtree(folder, ignore_errors=True)
    return {"queries": args.queries, "corpus": args.corpus, "k": k, "seconds": ours, "baseline_seconds": plain,
            "queries_per_s": args.queries / ours, "baseline": baseline_name, "baseline_ratio": ours / plain, **extra}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sentences", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, help="embedding batch (default 1024 on cuda, 256 on cpu)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--corpus", type=int, default=200000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["embed", "retrieve"])
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (1024 if args.device == "cuda" else 256)
    sync = lambda: None  # noqa: E731
    if args.device == "cuda":
        import torch
        sync = torch.cuda.synchronize
    result = {"device": device_name(args.device), "command": "python " + " ".join(sys.argv), "repeats": args.repeats}
    if args.only in (None, "embed"):
        result["embed"] = bench_embed(args, sync)
        print("embed", json.dumps(result["embed"]))
        write_result(results_name(f"retrieval_{args.device}", args.only), result)  # kept if the rest is cut short
    if args.only in (None, "retrieve"):
        result["retrieve"] = bench_retrieve(args, sync)
        print("retrieve", json.dumps(result["retrieve"]))
    write_result(results_name(f"retrieval_{args.device}", args.only), result)


if __name__ == "__main__":
    main()
