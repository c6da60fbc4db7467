"""Exact top-K search over the corpus embeddings, without Beam (so it runs on a bare GPU node).

`RetrieveTopK` (retrieve.py) wraps these in a DoFn. A searcher returns `m = K + margin`
candidate rows per query; `rank_candidates` (or `TorchExactSearcher.search_ranked` on the
device) re-scores them exactly and orders them by (score, sentence_id), so the result does not
depend on float rounding in the fast search, on batch shapes, or on the worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipelines.options import RetrieveOptions

log = logging.getLogger(__name__)

SCORE_DECIMALS = 6  # scores equal to this many decimals count as ties, broken by sentence_id
# How far a float16 product (float32 accumulation, float16 result) can be from the float32 one,
# per unit of |query| |row|: each input rounded (2 u, u = 2**-11), the result rounded (u), the
# accumulation over <= 1,024 dims (< 2**-14); 4 u covers it.
FP16_SCORE_ERROR = 4 * 2.0 ** -11
WIDE_CANDIDATES = 8  # an uncertain query's second float16 search takes 8 x the candidates


@dataclass
class Corpus:
    """The retrieval corpus: row i of `vectors` is sentence ids[i] with text texts[i]."""
    ids: list[str]
    texts: list[str]
    vectors: np.ndarray  # float32 [n, dim], L2-normalised (may be a read-only memory map)
    fingerprint: str = ""
    # what keeps the files behind a memory-mapped `vectors` in place (a corpus cache lease,
    # retrieve.load_corpus): let go with the corpus
    holds: object = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)


def candidate_count(k: int, corpus_size: int) -> int:
    """K plus a margin, so exact re-scoring can fix the order of float32/float16 near-ties."""
    return min(corpus_size, k + max(8, k))


# ---------------------------------------------------------------------------------------------
# Searchers: search(queries [q, d] float32, m) -> candidate indices [q, m] (may contain -1)


PQ_CANDIDATES = 4  # ivfpq: its codes only approximate a score, so 4 x the candidates are re-scored exactly


def candidates_for(options: RetrieveOptions, corpus_size: int) -> int:
    """How many candidates the searcher returns per query for exact re-scoring."""
    m = candidate_count(options.k, corpus_size)
    return min(corpus_size, m * PQ_CANDIDATES) if options.index == "ivfpq" else m


def train_index(sample: np.ndarray, options: RetrieveOptions):
    """An empty IndexIVFFlat or IndexIVFPQ (inner product), trained on `sample` [n, dim].

    Trained once per run (retrieve.TrainIndexOnce) and then filled per corpus shard. FAISS's
    k-means has a fixed seed, so the same sample gives the same index."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    n, dim = sample.shape
    # faiss wants ~39 training points per centroid; clamp for small corpora.
    nlist = max(1, min(options.nlist, n // 39 or 1))
    if nlist != options.nlist:
        log.warning("%s: nlist %d clamped to %d for a training sample of %d sentences", options.index, options.nlist,
                    nlist, n)
    quantizer = faiss.IndexFlatIP(dim)
    if options.index == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif options.index == "ivfpq":
        if options.pq_bytes < 1 or dim % options.pq_bytes:
            raise ValueError(f"--pq-bytes {options.pq_bytes} must divide the embedding width {dim} "
                             f"(e.g. {', '.join(str(b) for b in (16, 32, 48, 64, 96) if dim % b == 0) or 'a divisor'})")
        bits = max(1, min(8, int(np.log2(max(2, n)))))  # a sub-quantizer's k-means needs 2**bits points
        if bits != 8:
            log.warning("ivfpq: %d-bit codes for a training sample of %d sentences (8 bits need 256)", bits, n)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, options.pq_bytes, bits, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index type {options.index!r} (flat, ivf or ivfpq)")
    index.train(sample)
    index.nprobe = min(options.nprobe, nlist)
    return index


class FaissSearcher:
    """Exact search (faiss.knn over the vectors in place), or an IVF / IVF-PQ index: the one
    given (trained once per run and memory-mapped from its file, see retrieve.py), else one
    trained here on the vectors themselves (direct use, outside the pipeline). On the GPU when
    --device cuda and faiss-gpu is importable and sees a GPU, else on the CPU: `device` says which
    (what the search stage keeps between bundles depends on it, retrieve._SearchShard)."""

    def __init__(self, vectors: np.ndarray, options: RetrieveOptions, index=None):
        import faiss

        dim = vectors.shape[1]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # no copy of a float32 memory map
        self._faiss, self._vectors, self._index = faiss, None, None
        on_gpu = options.device.startswith("cuda") and faiss_gpu_available()
        if options.device.startswith("cuda") and not on_gpu:
            _warn_cpu_fallback(options.index)
        self.device = "cuda" if on_gpu else "cpu"  # faiss-gpu puts the index on GPU 0 (below)
        if options.index == "flat" and not on_gpu:
            # faiss.knn is IndexFlatIP's search without the index's private copy of the corpus:
            # the (memory-mapped) matrix is searched in place, so the worker neither copies it
            # (~0.2 s per 300 MB) nor holds it twice, and processes on one machine share its pages.
            self._vectors = vectors
            return
        if options.index == "flat":
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
        elif index is None:
            index = train_index(vectors, options)
            index.add(vectors)
        else:
            faiss.extract_index_ivf(index).nprobe = min(options.nprobe, faiss.extract_index_ivf(index).nlist)
        if on_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self._index = index

    def search(self, queries: np.ndarray, m: int) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._vectors is not None:
            _, idx = self._faiss.knn(queries, self._vectors, m, metric=self._faiss.METRIC_INNER_PRODUCT)
        else:
            _, idx = self._index.search(queries, m)
        return idx


class TorchExactSearcher:
    """Exact search as one matrix product per query batch (float16 on CUDA) and a two-level
    top-m, for --device cuda without faiss-gpu.

    A plain `torch.topk` over a million-wide score row is the slow part of the obvious code.
    Here the scores are cut into blocks of `block` columns; the row's top-m scores lie in the m
    blocks with the largest maxima (a block holding one of them has a maximum at least that
    large, and at most m - 1 other blocks can beat it), so a max-reduction, a top-m over
    n / block block maxima and a top-m over m * block gathered scores give exactly the top-m
    of the whole row (ties aside). Queries go in batches sized so their score matrix fits
    `score_bytes`; nothing is copied back to the host until the end.

    In float16 (CUDA's default) `search_ranked` is still exact: a query's result is kept only
    where no corpus row outside its candidates can beat its K-th re-scored hit (see
    `_uncertain`); the other queries, where near-duplicates crowd the K-th score, are searched
    again with more candidates (`widened` counts them) and, where that is not enough either, in
    float32 over the whole corpus (`redone`)."""

    def __init__(self, vectors: np.ndarray, device: str = "cuda", block: int = 128,
                 score_bytes: int | None = None, query_batch: int | None = None, dtype=None):
        import torch

        self._torch = torch
        self._device = torch.device(device)
        on_gpu = self._device.type == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was given but torch sees no CUDA device (the flat search "
                               f"without faiss-gpu runs on torch): use --device cpu, or a machine with a GPU")
        self.device = str(self._device)  # where it searches (retrieve._SearchShard keeps a GPU searcher's shard)
        self._dtype = dtype or (torch.float16 if on_gpu else torch.float32)
        host = torch.from_numpy(np.require(vectors, np.float32, ["C", "W"]))  # a read-only memory map is copied
        self._size, dim = host.shape
        self._matrix = host.to(self._device, self._dtype)
        # float32 rows (plus a zero row for "no candidate") for exact re-scoring on the device
        self._exact = torch.cat([host, torch.zeros(1, dim)]).to(self._device)
        self._max_row_norm = float(host.norm(dim=1).max()) if self._size else 0.0
        self.widened = 0  # queries searched again with more float16 candidates
        self.redone = 0  # queries searched again in float32 (the float16 bound still not met)
        self._block = max(1, block)
        self._blocks = self._size // self._block
        self._offsets = torch.arange(self._block, device=self._device)
        self._main = self._blocks * self._block
        self._tail = torch.arange(self._main, self._size, device=self._device)
        if query_batch is None:
            budget = score_bytes or ((4 << 30) if on_gpu else (256 << 20))
            query_batch = budget // max(1, self._size * self._matrix.element_size())
        self._query_batch = int(min(max(1, query_batch), 1 << 16))

    def search(self, queries: np.ndarray, m: int) -> np.ndarray:
        """The top-m candidate rows by the fast product (float16 on CUDA: near-ties may be out of
        order or swapped at the m-th place; `search_ranked` is the exact search)."""
        torch = self._torch
        with torch.inference_mode():
            out = [self._candidates(q, m)[0] for q in self._query_batches(queries)]
            return torch.cat(out).cpu().numpy() if out else np.zeros((0, m), np.int64)

    def search_ranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates, exact fp32 re-scoring and the (score, id) order, all on the device:
        the same contract as `rank_candidates`, without moving candidate vectors to the host."""
        torch = self._torch
        m = candidate_count(k, self._size)
        indices, scores = [], []
        with torch.inference_mode():
            for q in self._query_batches(queries):
                cand, fast = self._candidates(q, m)
                top, exact = self._rank(q, cand, k)
                if self._dtype != torch.float32 and m < self._size:
                    self._redo_uncertain(q, fast, top, exact, m, k)
                indices.append(top)
                scores.append(exact)
            if not indices:
                return np.zeros((0, k), np.int64), np.zeros((0, k))
            # one copy back at the end (the float16 check syncs once per query batch, not per query)
            return torch.cat(indices).cpu().numpy(), torch.cat(scores).double().cpu().numpy()

    def _rank(self, q, cand, k: int):
        """Exact float32 scores of the candidates, the top k by (score to SCORE_DECIMALS, index)."""
        torch = self._torch
        cand, _ = cand.sort(dim=1)  # index order == sentence_id order
        exact = torch.einsum("bmd,bd->bm", self._exact[cand], q.float())
        order = torch.sort(-torch.round(exact, decimals=SCORE_DECIMALS), dim=1, stable=True).indices[:, :k]
        return torch.gather(cand, 1, order), torch.gather(exact, 1, order)

    def _uncertain(self, q, fast, exact, k: int):
        """Queries whose top k may miss a row outside the candidates.

        A row outside them has a fast score at most the m-th candidate's, so an exact score at
        most that plus the float16 error bound (FP16_SCORE_ERROR per unit of |q| |row|). The
        result is exact when that stays below the K-th hit's exact score by more than a
        rounding step of SCORE_DECIMALS (so neither a higher score nor a tie is possible)."""
        bound = fast[:, -1].float() + FP16_SCORE_ERROR * q.float().norm(dim=1) * self._max_row_norm
        return bound >= exact[:, k - 1] - 2 * 10.0 ** -SCORE_DECIMALS

    def _redo_uncertain(self, q, fast, top, exact, m: int, k: int) -> None:
        """Search the uncertain queries again, in place: first with WIDE_CANDIDATES times the
        candidates (float16 again, and checked again), then what is still uncertain in float32
        over the whole corpus."""
        torch = self._torch
        rows = self._uncertain(q, fast, exact, k).nonzero().squeeze(1)
        if len(rows):
            self.widened += len(rows)
            wide = min(self._size, m * WIDE_CANDIDATES)
            cand, wide_fast = self._candidates(q[rows], wide)
            top[rows], exact[rows] = self._rank(q[rows], cand, k)
            if wide < self._size:
                rows = rows[self._uncertain(q[rows], wide_fast, exact[rows], k).nonzero().squeeze(1)]
            else:
                rows = rows[:0]
        if not len(rows):
            return
        self.redone += len(rows)
        corpus = self._exact[:self._size]
        step = max(1, self._query_batch * self._matrix.element_size() // 4)  # the same score budget
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            cand = torch.topk(q[part].float() @ corpus.T, m, dim=1).indices
            top[part], exact[part] = self._rank(q[part], cand, k)

    def _query_batches(self, queries: np.ndarray):
        pin = self._device.type == "cuda"
        for start in range(0, len(queries), self._query_batch):
            q = self._torch.from_numpy(np.ascontiguousarray(queries[start:start + self._query_batch], dtype=np.float32))
            yield (q.pin_memory() if pin else q).to(self._device, non_blocking=pin)

    def _candidates(self, q, m: int):
        """The top-m corpus rows of each query by the fast product (see the class doc) and their
        fast scores, in descending order."""
        torch = self._torch
        scores = self._fast_scores(q)  # [b, n]
        rows = scores.shape[0]
        values, columns = [], []
        if self._blocks:
            main = scores[:, :self._main].view(rows, self._blocks, self._block)
            best_blocks = torch.topk(main.amax(dim=2), min(m, self._blocks), dim=1).indices
            cols = (best_blocks.unsqueeze(2) * self._block + self._offsets).reshape(rows, -1)
            values.append(torch.gather(scores, 1, cols))
            columns.append(cols)
        if len(self._tail):  # the last n % block rows, taken whole
            values.append(scores[:, self._main:])
            columns.append(self._tail.expand(rows, -1))
        values, columns = torch.cat(values, 1), torch.cat(columns, 1)
        best, top = torch.topk(values, min(m, values.shape[1]), dim=1)
        return torch.gather(columns, 1, top), best

    def _fast_scores(self, q):
        torch = self._torch
        if self._device.type != "cuda":
            return q.to(self._dtype) @ self._matrix.T
        # cuBLAS may otherwise reduce split-K partial sums in float16, outside FP16_SCORE_ERROR
        allowed = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        try:
            return q.to(self._dtype) @ self._matrix.T
        finally:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = allowed


_cpu_fallback_warned: set = set()


def _warn_cpu_fallback(index: str) -> None:
    """Once per process and index type: --device cuda asked for, the CPU used."""
    if index not in _cpu_fallback_warned:
        _cpu_fallback_warned.add(index)
        log.warning("--device cuda: faiss-gpu is not installed or sees no GPU, so the %s index is searched on the CPU",
                    index)


def faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def make_searcher(corpus: Corpus, options: RetrieveOptions, index=None):
    """The corpus's searcher; its `device` says where it really runs (--device cuda may end on the CPU)."""
    if options.device.startswith("cuda") and options.index == "flat" and not faiss_gpu_available():
        return TorchExactSearcher(corpus.vectors, options.device)
    return FaissSearcher(corpus.vectors, options, index)


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


def hit_order(score: float, sentence_id: str) -> tuple:
    """The order of hits, best first: score rounded to SCORE_DECIMALS (descending), then
    sentence_id. The order `rank_candidates` gives within one corpus (shard), whose rows are in
    id order; merging shards by it gives the order of the whole corpus searched at once."""
    return -float(np.round(np.float64(score), SCORE_DECIMALS)), sentence_id


def hit_dict(rank: int, sentence_id: str, text: str, score: float) -> dict:
    """One hit as the pipeline passes it on (the score as float32, as the retrievals table stores it)."""
    return {"rank": rank, "sentence_id": sentence_id, "sentence": text, "score": float(np.float32(score))}

