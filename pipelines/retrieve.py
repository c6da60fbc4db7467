"""RetrieveTopK: top-K corpus sentences per query embedding, by cosine similarity.

The corpus (ids, texts, normalised embeddings) is gathered into one side input, sorted by
sentence id so index positions do not depend on how the corpus was read. The index is built
once per worker process (shared across its threads). Results are made independent of batch
order: the index returns K + margin candidates, which are re-scored exactly (float64) and
ordered by (score, sentence_id).
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import threading
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from pipelines.metrics import add_stage_time
from pipelines.options import RetrieveOptions
from pipelines.sharing import acquire_shared

log = logging.getLogger(__name__)

SCORE_DECIMALS = 6  # scores equal to this many decimals count as ties, broken by sentence_id


@dataclass
class Corpus:
    """The retrieval corpus: row i of `vectors` is sentence ids[i] with text texts[i]."""
    ids: list[str]
    texts: list[str]
    vectors: np.ndarray  # float32 [n, dim], L2-normalised
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.ids)


class CorpusCoder(beam.coders.Coder):
    """The corpus side input as one pickle (protocol 5: the vector array as a single buffer),
    rather than Beam's element-wise encoding of its fields: it reaches every worker."""

    def encode(self, value: Corpus) -> bytes:
        return pickle.dumps(value, protocol=5)

    def decode(self, encoded: bytes) -> Corpus:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(Corpus, CorpusCoder)


@beam.typehints.with_output_types(Corpus)  # so the side input travels with CorpusCoder
class CollectCorpus(beam.CombineFn):
    """((sentence_id, text), vector) elements -> one Corpus sorted by sentence_id."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        (sentence_id, text), vector = element
        acc.append((sentence_id, text, np.asarray(vector, dtype=np.float32)))
        return acc

    def merge_accumulators(self, accumulators):
        merged = []
        for acc in accumulators:
            merged.extend(acc)
        return merged

    def extract_output(self, acc):
        acc.sort(key=lambda row: row[0])
        ids = [row[0] for row in acc]
        texts = [row[1] for row in acc]
        vectors = np.stack([row[2] for row in acc]) if acc else np.zeros((0, 0), np.float32)
        fingerprint = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        return Corpus(ids, texts, np.ascontiguousarray(vectors, dtype=np.float32), fingerprint)


# ---------------------------------------------------------------------------------------------
# Searchers: search(queries [q, d] float32) -> candidate indices [q, m] (may contain -1)


class FaissSearcher:
    """Exact IndexFlatIP, or IndexIVFFlat (inner product) for large corpora."""

    def __init__(self, vectors: np.ndarray, options: RetrieveOptions):
        import faiss

        dim = vectors.shape[1]
        if options.index == "flat":
            index = faiss.IndexFlatIP(dim)
        elif options.index == "ivf":
            # faiss wants ~39 training points per centroid; clamp for small corpora.
            nlist = max(1, min(options.nlist, len(vectors) // 39 or 1))
            if nlist != options.nlist:
                log.warning("ivf: nlist %d clamped to %d for a corpus of %d sentences", options.nlist, nlist, len(vectors))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)  # faiss k-means has a fixed seed: deterministic for the same input
            index.nprobe = min(options.nprobe, nlist)
        else:
            raise ValueError(f"unknown index type {options.index!r} (flat or ivf)")
        if options.device.startswith("cuda") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        index.add(vectors)
        self._index = index

    def search(self, queries: np.ndarray, m: int) -> np.ndarray:
        _, idx = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), m)
        return idx


class TorchExactSearcher:
    """Exact search as chunked matrix products + top-k (fp16 on CUDA), for --device cuda
    without faiss-gpu. Chunk results are merged with a second top-k."""

    def __init__(self, vectors: np.ndarray, device: str = "cuda", chunk_rows: int = 1 << 18,
                 query_batch: int = 8192):
        import torch

        self._torch = torch
        self._device = torch.device(device)
        dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        self._chunks = [torch.from_numpy(vectors[i:i + chunk_rows]).to(self._device, dtype)
                        for i in range(0, len(vectors), chunk_rows)]
        # fp32 copy (plus a zero row for "no candidate") for exact re-scoring on the device
        self._exact = torch.cat([torch.from_numpy(vectors), torch.zeros(1, vectors.shape[1])]).to(self._device)
        self._size = len(vectors)
        self._chunk_rows = chunk_rows
        self._query_batch = query_batch
        self._dtype = dtype

    def search(self, queries: np.ndarray, m: int) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = [self._candidates(q, m).cpu().numpy() for q in self._query_batches(queries)]
        return np.concatenate(out) if out else np.zeros((0, m), np.int64)

    def search_ranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates, exact fp32 re-scoring and the (score, id) order, all on the device:
        the same contract as `rank_candidates`, without moving candidate vectors to the host."""
        torch = self._torch
        m = candidate_count(k, self._size)
        indices, scores = [], []
        with torch.inference_mode():
            for q in self._query_batches(queries):
                cand, _ = self._candidates(q, m).sort(dim=1)  # index order == sentence_id order
                exact = torch.einsum("bmd,bd->bm", self._exact[cand], q.float())
                order = torch.sort(-torch.round(exact, decimals=SCORE_DECIMALS), dim=1, stable=True).indices[:, :k]
                indices.append(torch.gather(cand, 1, order))
                scores.append(torch.gather(exact, 1, order))
            if not indices:
                return np.zeros((0, k), np.int64), np.zeros((0, k))
            # one copy back at the end: no host-device sync inside the loop
            return torch.cat(indices).cpu().numpy(), torch.cat(scores).double().cpu().numpy()

    def _query_batches(self, queries: np.ndarray):
        for start in range(0, len(queries), self._query_batch):
            yield self._torch.from_numpy(np.ascontiguousarray(queries[start:start + self._query_batch])).to(self._device)

    def _candidates(self, q, m: int):
        """Top-m corpus rows per query by the fast (fp16 on CUDA) product, merged over chunks."""
        torch = self._torch
        q = q.to(self._dtype)
        best_scores, best_idx = None, None
        for c, chunk in enumerate(self._chunks):
            scores = q @ chunk.T
            top = min(m, chunk.shape[0])
            vals, idx = torch.topk(scores, top, dim=1)
            idx = idx + c * self._chunk_rows
            if best_scores is None:
                best_scores, best_idx = vals, idx
            else:
                vals = torch.cat([best_scores, vals], dim=1)
                idx = torch.cat([best_idx, idx], dim=1)
                keep = min(m, vals.shape[1])
                best_scores, pos = torch.topk(vals, keep, dim=1)
                best_idx = torch.gather(idx, 1, pos)
        return best_idx


def make_searcher(corpus: Corpus, options: RetrieveOptions):
    if options.device.startswith("cuda") and options.index == "flat":
        import faiss
        if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
            return TorchExactSearcher(corpus.vectors, options.device)
    return FaissSearcher(corpus.vectors, options)


def candidate_count(k: int, corpus_size: int) -> int:
    """K plus a margin, so exact re-scoring can fix the order of float32 near-ties."""
    return min(corpus_size, k + max(8, k))


def rank_candidates(queries: np.ndarray, candidates: np.ndarray, corpus: Corpus, k: int):
    """Exact float64 cosine of each query's candidates, ordered by (score desc, sentence_id).

    Vectorised over the batch. The corpus is sorted by sentence_id, so index order is id order:
    candidates are put in index order, then stably sorted by score rounded to SCORE_DECIMALS.
    Returns (indices [q, k], scores [q, k] float64); missing candidates (-1) sort last."""
    n = len(corpus)
    candidates = np.where(candidates < 0, n, candidates)
    candidates.sort(axis=1)
    missing = candidates == n
    # gather the candidates' rows (a missing one reads row 0, then scores -inf): never a copy of
    # the whole corpus per batch
    rows = corpus.vectors[np.where(missing, 0, candidates)].astype(np.float64)
    scores = np.einsum("qmd,qd->qm", rows, queries.astype(np.float64))
    scores[missing] = -np.inf
    order = np.argsort(-np.round(scores, SCORE_DECIMALS), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)


def hits_of(indices: np.ndarray, scores: np.ndarray, corpus: Corpus) -> list[dict]:
    """One query's ranked rows."""
    return [{"rank": rank, "sentence_id": corpus.ids[i], "sentence": corpus.texts[i], "score": float(np.float32(score))}
            for rank, (i, score) in enumerate(zip(indices, scores)) if i < len(corpus)]


class _SearchBatch(beam.DoFn):
    def __init__(self, options: RetrieveOptions):
        self._options = options
        self._shared = Shared()
        self._searcher = None
        self._searcher_for = None
        self._lock = threading.Lock()

    def _searcher_of(self, corpus: Corpus):
        with self._lock:
            if self._searcher_for != corpus.fingerprint:
                def build():
                    start = time.perf_counter()
                    searcher = make_searcher(corpus, self._options)
                    log.info("built %s index over %d sentences in %.1fs", self._options.index, len(corpus),
                             time.perf_counter() - start)
                    return searcher

                self._searcher = acquire_shared(self._shared, build, tag=f"{corpus.fingerprint}:{self._options}")
                self._searcher_for = corpus.fingerprint
            return self._searcher

    def process(self, batch, corpus: Corpus):
        if len(corpus) == 0:
            beam.metrics.Metrics.counter("retrieve", "queries_without_corpus").inc(len(batch))
            return
        start = time.perf_counter()
        searcher = self._searcher_of(corpus)
        queries = np.stack([np.asarray(vec, dtype=np.float32) for _, vec in batch])
        if hasattr(searcher, "search_ranked"):
            indices, scores = searcher.search_ranked(queries, self._options.k)
        else:
            candidates = searcher.search(queries, candidate_count(self._options.k, len(corpus)))
            indices, scores = rank_candidates(queries, candidates, corpus, self._options.k)
        results = [(key, hits_of(query_indices, query_scores, corpus))
                   for (key, _), query_indices, query_scores in zip(batch, indices, scores)]
        add_stage_time("retrieve", start)  # before yielding: downstream work is not this stage's
        beam.metrics.Metrics.counter("retrieve", "queries").inc(len(batch))
        yield from results


class RetrieveTopK(beam.PTransform):
    """(query_key, embedding) -> (query_key, [{rank, sentence_id, sentence, score}] * K).

    `corpus` is a singleton PCollection of Corpus (from CollectCorpus)."""

    def __init__(self, corpus, options: RetrieveOptions = RetrieveOptions()):
        super().__init__()
        self._corpus = corpus
        self._options = options

    def expand(self, queries):
        return (queries
                # Full batches: FAISS's flat search leaves BLAS for batches under 20 queries, and
                # BatchElements' adaptive sizes start at 1 (several times slower per query).
                | "BatchQueries" >> beam.BatchElements(min_batch_size=self._options.batch_size,
                                                       max_batch_size=self._options.batch_size)
                | "Search" >> beam.ParDo(_SearchBatch(self._options), corpus=beam.pvalue.AsSingleton(self._corpus)))
