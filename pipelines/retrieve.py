"""RetrieveTopK: top-K corpus sentences per query embedding, by cosine similarity, over a corpus
split into shards that are searched where they lie.

ShardCorpus cuts the embedded corpus into S = ceil(N / corpus_shard_rows) shards by a hash of
the sentence id (`batching.group_of`, the same for any worker count); each shard is gathered on
one worker (CollectCorpus, per key), sorted by sentence id, and written under the staging folder
as a float32 .npy and an Arrow file (ids, texts). The corpus as a whole is never on one worker.
Only the shards' file names travel as a side input: workers memory-map a shard's files, from a
copy on the machine's disk where the folder is remote (one per machine, not per process, in a
cache bounded by --corpus-cache-gb that evicts the least recently used shard: corpus_cache.py).

RetrieveTopK pairs every query batch with every shard (a cross product), searches each pair
(a process maps one shard at a time), and merges the per-shard top-K of each query with a top-K
combiner. Within a shard the searcher returns K + margin candidates, re-scored exactly and
ordered by (score rounded to SCORE_DECIMALS, sentence_id) (search.py); the merge orders by the
same key, so the result is the one of the whole corpus searched at once, with any S.

--index ivf / ivfpq: the index is trained once per run, on one worker, on a sample of the corpus
(TrainIndexOnce), written under staging, filled with each shard's vectors where that shard is
written, and memory-mapped by every search process (faiss.IO_FLAG_MMAP).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.batching import group_of
from pipelines.corpus_cache import CACHE_CHUNK_BYTES, Lease, cache_root, lease_copies
from pipelines.files import is_local
from pipelines.metrics import add_stage_time
from pipelines.options import RetrieveOptions
from pipelines.search import (Corpus, candidates_for, hit_dict, hit_order, make_searcher, rank_candidates,
                              train_index)
from pipelines.shards import write_bytes, write_whole
from pipelines.sharing import LatestShared
from pipelines.stages import stage_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusFiles:
    """A corpus (shard) written to `directory`: what reaches the workers instead of its vectors.
    `index_path`: its IVF / IVF-PQ index file, where --index is not flat."""
    directory: str
    fingerprint: str
    size: int
    index_path: str | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def vectors_path(self) -> str:
        return posixpath.join(self.directory, f"corpus-{self.fingerprint}.npy")

    @property
    def rows_path(self) -> str:
        return posixpath.join(self.directory, f"corpus-{self.fingerprint}.arrow")

    @property
    def paths(self) -> list[str]:
        return [self.vectors_path, self.rows_path] + ([self.index_path] if self.index_path else [])


class ArrowStrings(Sequence):
    """A string column of a memory-mapped Arrow file as a read-only sequence: a shard's ids and
    texts are read where a hit needs them, not turned into millions of Python strings per process."""

    def __init__(self, column: pa.ChunkedArray):
        self._column = column.combine_chunks()

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._column[i].to_pylist()
        return self._column[int(i)].as_py()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


SPILL_CHUNK_ROWS = 4096


def _write_rows(f, vectors: np.ndarray, order) -> None:
    """vectors[order] as a float32 .npy, gathered a chunk at a time: the file is the only full-size
    copy (a fresh 300 MB array costs more in page faults than the copy itself)."""
    rows = len(vectors) if order is None else len(order)
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                             "fortran_order": False, "shape": (rows, vectors.shape[1])})
    buffer = np.empty((min(rows, SPILL_CHUNK_ROWS), vectors.shape[1]), np.float32)  # reused: no new pages
    for start in range(0, rows, SPILL_CHUNK_ROWS):
        part = buffer[:min(SPILL_CHUNK_ROWS, rows - start)]
        if order is None:
            part[...] = vectors[start:start + len(part)]
        else:
            np.take(vectors, order[start:start + len(part)], axis=0, out=part)
        f.write(memoryview(part).cast("B"))


def spill_corpus(corpus: Corpus, directory: str, order=None) -> CorpusFiles:
    """Write the corpus under `directory`; with `order`, its vectors are rows `order` of
    corpus.vectors (ids and texts are already in that order)."""
    files = CorpusFiles(directory, corpus.fingerprint, len(corpus))
    rows = pa.table({"sentence_id": pa.array(corpus.ids, pa.string()), "text": pa.array(corpus.texts, pa.string())})
    arrow = io.BytesIO()
    with pa.ipc.new_file(arrow, rows.schema) as writer:
        writer.write_table(rows)
    start = time.perf_counter()
    write_whole(files.vectors_path, lambda f: _write_rows(f, corpus.vectors, order))
    write_bytes(files.rows_path, arrow.getvalue())
    log.info("corpus of %d sentences written to %s in %.1fs", len(corpus), directory, time.perf_counter() - start)
    return files


def load_corpus(files: CorpusFiles, cache_gb: float | None = None) -> Corpus:
    """The spilled corpus, its vectors and rows memory-mapped (read-only). A remote folder (gs://)
    is first copied to this machine once (corpus_cache.py): Dataflow runs an SDK process per vCPU,
    and each would otherwise hold its own copy of the vectors in memory. The returned corpus holds
    the copy's cache lease (`holds`) while it lives: the copy is not evicted under it."""
    local, lease = local_copy(files, cache_gb)
    vectors = np.load(local.vectors_path, mmap_mode="r", allow_pickle=False)
    rows = pa.ipc.open_file(pa.memory_map(local.rows_path)).read_all()
    if len(rows) != files.size or len(vectors) != files.size:
        raise ValueError(f"corpus files {files.vectors_path} / {files.rows_path} hold {len(vectors)} vectors and "
                         f"{len(rows)} rows, expected {files.size}: written by another run?")
    return Corpus(ArrowStrings(rows.column("sentence_id")), ArrowStrings(rows.column("text")), vectors,
                  files.fingerprint, holds=lease)


def load_index(files: CorpusFiles, cache_gb: float | None = None):
    """The shard's IVF / IVF-PQ index, memory-mapped: its inverted lists stay in the file (in the
    page cache, shared by the machine's processes), not in each process's memory. Where the shard
    is remote, the index keeps its cache lease while it lives (in faiss's `referenced_objects`,
    its way of tying Python objects to an index's lifetime)."""
    import faiss
    local, lease = local_copy(files, cache_gb)
    index = faiss.read_index(local.index_path, faiss.IO_FLAG_MMAP)
    if lease is not None:
        index.referenced_objects = [*getattr(index, "referenced_objects", []), lease]
    return index


def local_copy(files: CorpusFiles, cache_gb: float | None = None,
               run: str | None = None) -> tuple[CorpusFiles, Lease | None]:
    """The corpus files on this machine and the lease that keeps them there: `files` itself (and
    no lease) where its folder is local, else the same files in this machine's cache (copied there
    once per machine, within `cache_gb` GiB, corpus_cache.py) and a lease on them, to be held for
    as long as they are mapped. The one place a remote shard's local paths are worked out: a
    reader of both the corpus and its index asks once and passes the result on, so the remote
    folder is matched once. `run`: see match_shard_files."""
    if is_local(files.vectors_path):
        return files, None
    found = match_shard_files(files, run)
    lease = lease_copies(corpus_cache_dir(files, found), {path: found[path].size_in_bytes for path in files.paths},
                         cache_gb, name=files.vectors_path)
    local_index = os.path.join(lease.folder, posixpath.basename(files.index_path)) if files.index_path else None
    return replace(files, directory=lease.folder, index_path=local_index), lease


MATCHES_KEPT = 4096  # a process's kept shard matches (each a few paths, sizes and times), oldest dropped
_matches: OrderedDict = OrderedDict()  # (run, shard paths) -> {path: FileMetadata}, per process
_matches_lock = threading.Lock()


def match_shard_files(files: CorpusFiles, run: str | None = None) -> dict:
    """The shard's remote files' metadata by path (FileSystems.match: a round trip to gs://).

    With `run` (the token of one pipeline run: _SearchShard's), the answer is kept per process,
    so a search process pays the round trip in its first bundle of a shard only, not in every
    bundle that maps the shard again (each bundle's end lets it go, for the cache's eviction).
    What a staged shard's paths match does not change within a run: its vectors and rows are
    written (renamed into place, shards.write_whole) before its CorpusFiles exists, a search
    element is made from that CorpusFiles, the staging folder is cleared before the run (not
    during it), and the index file, written after the vectors, has its own path in another key.
    Per run, not per path alone: a later run in the same process (DirectRunner, a worker pool)
    may rewrite the same names (same ids, another model), and the cache folder's key
    (corpus_cache_dir) must see the new sizes and times. Missing files raise and are not kept."""
    key = (run, tuple(files.paths))
    if run is not None:
        with _matches_lock:
            if key in _matches:
                _matches.move_to_end(key)
                return _matches[key]
    found = {m.path: m for result in FileSystems.match(files.paths) for m in result.metadata_list}
    missing = [path for path in files.paths if path not in found]
    if missing:
        raise FileNotFoundError(f"corpus shard files {', '.join(missing)} not found: deleted while the run used them?")
    if run is not None:
        with _matches_lock:
            _matches[key] = found
            while len(_matches) > MATCHES_KEPT:
                _matches.popitem(last=False)
    return found


def corpus_cache_dir(files: CorpusFiles, found: dict) -> str:
    """This machine's cache folder for a remote corpus. The fingerprint covers only the sentence
    ids (another embedding model gives the same one), so the remote files' path, size and time
    are in the key too: a rewritten file is never served from a stale copy. The index file is
    not in the key (it is written after the vectors, from them), so the copy made where a shard
    was indexed serves its search too. `found`: the files' metadata by path (local_copy's match)."""
    keyed = [files.vectors_path, files.rows_path]
    stamps = [(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in (found[p] for p in keyed if p in found)]
    source = hashlib.sha1(repr(stamps).encode()).hexdigest()[:16]
    return os.path.join(cache_root(), f"{files.fingerprint}-{source}")


class CollectCorpus(beam.CombineFn):
    """((sentence_id, text), vector) elements of one corpus shard -> the CorpusFiles it was
    written to under `spill_dir`, its rows sorted by sentence_id (ShardCorpus, per shard).

    Accumulators are columns (ids, texts, one stacked array), pickled whole between stages:
    Beam's default coder would pickle every row's vector separately."""

    def __init__(self, spill_dir: str):
        super().__init__()
        self._spill_dir = spill_dir

    def get_accumulator_coder(self):
        return beam.coders.PickleCoder()

    def create_accumulator(self):
        return [], [], []

    def add_input(self, acc, element):
        (sentence_id, text), vector = element
        acc[0].append(sentence_id)
        acc[1].append(text)
        acc[2].append(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        return acc

    def merge_accumulators(self, accumulators):
        ids, texts, vectors = [], [], []
        for acc in accumulators:
            ids += acc[0]
            texts += acc[1]
            vectors += acc[2]
        return ids, texts, vectors

    def compact(self, acc):
        ids, texts, vectors = acc
        return ids, texts, [np.concatenate(vectors)] if len(vectors) > 1 else vectors

    def extract_output(self, acc) -> CorpusFiles:
        ids, texts, vectors = self.compact(acc)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        ids, texts = [ids[i] for i in order], [texts[i] for i in order]
        fingerprint = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        if not ids:  # a shard is keyed by its rows, so never empty; nothing to write or search
            return CorpusFiles(self._spill_dir, fingerprint, 0)
        # gathered into id order as they are written
        return spill_corpus(Corpus(ids, texts, vectors[0], fingerprint), self._spill_dir, order=np.asarray(order))


def _stack_queries(batch) -> tuple[list, np.ndarray]:
    """[(key, vector)] -> (keys, float32 [n, dim])."""
    return [key for key, _ in batch], np.stack([np.asarray(vector, dtype=np.float32) for _, vector in batch])


# ---------------------------------------------------------------------------------------------
# The corpus in shards, and the index trained once


def corpus_shard_of(sentence_id: str, corpus_size: int, shard_rows: int) -> int:
    """A sentence's shard among ceil(corpus_size / shard_rows): a hash of its id, so the same in
    every run and with any number of workers."""
    return group_of(sentence_id, corpus_size, shard_rows)


def training_rank(sentence_id: str) -> str:
    """The training sample is the `train_rows` sentences of smallest rank: a hash of the id, so
    the sample (and the trained index) is the same in every run and with any number of workers."""
    return hashlib.sha1(f"train:{sentence_id}".encode("utf-8")).hexdigest()


INDEX_CHUNK_ROWS = 65_536  # vectors added to an index at a time (its assignment step's memory)


def _write_index(index, path: str) -> None:
    """faiss writes to a local file; it is then copied into place (any filesystem Beam knows)."""
    import faiss
    fd, local = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, local)
        with open(local, "rb") as source:
            write_whole(path, lambda f: shutil.copyfileobj(source, f, CACHE_CHUNK_BYTES))
    finally:
        os.remove(local)


def _read_index_bytes(path: str):
    import faiss
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))


def _options_tag(options: RetrieveOptions) -> str:
    return hashlib.sha1(repr((options.index, options.nlist, options.pq_bytes, options.train_rows)).encode()).hexdigest()[:12]


def train_once(sample: list, directory: str, options: RetrieveOptions) -> str:
    """[(rank, vector)] (the training sample, in rank order) -> the path of the trained, empty index
    ("" for an empty corpus, which has no shards to index: the run stops on its zero sentences)."""
    if not sample:
        return ""
    start = time.perf_counter()
    vectors = np.stack([np.asarray(v, dtype=np.float32) for _, v in sample])
    index = train_index(vectors, options)
    digest = hashlib.sha1("\n".join(rank for rank, _ in sample).encode()).hexdigest()[:16]
    path = posixpath.join(directory, f"trained-{options.index}-{_options_tag(options)}-{digest}.faiss")
    _write_index(index, path)
    beam.metrics.Metrics.counter("retrieve", "index_trainings").inc()
    add_stage_time("index", start)
    log.info("trained a %s index on %d sentences in %.1fs", options.index, len(vectors), time.perf_counter() - start)
    return path


def add_shard_to_index(files: CorpusFiles, trained_path: str, cache_gb: float | None = None) -> CorpusFiles:
    """Fill a copy of the trained index with one shard's vectors (in id order, so index row i is
    the shard's row i) and write it beside the shard."""
    start = time.perf_counter()
    index = _read_index_bytes(trained_path)
    local, lease = local_copy(files, cache_gb)
    with lease or contextlib.nullcontext():  # the cached copy is kept while its vectors are read
        vectors = load_corpus(local).vectors
        for row in range(0, len(vectors), INDEX_CHUNK_ROWS):
            index.add(np.ascontiguousarray(vectors[row:row + INDEX_CHUNK_ROWS], dtype=np.float32))
        del vectors  # unmapped before the lease ends
    trained = posixpath.basename(trained_path)[len("trained-"):-len(".faiss")]
    path = posixpath.join(files.directory, f"index-{files.fingerprint}-{trained}.faiss")
    _write_index(index, path)
    add_stage_time("index", start)
    beam.metrics.Metrics.counter("retrieve", "shards_indexed").inc()
    return replace(files, index_path=path)


class TrainIndexOnce(beam.PTransform):
    """((sentence_id, text), vector) -> a singleton: the path of an IVF / IVF-PQ index trained on
    the `train_rows` sentences of smallest `training_rank`, on one worker, once per run."""

    def __init__(self, directory: str, options: RetrieveOptions):
        super().__init__()
        self._directory, self._options = directory, options

    def expand(self, rows):
        directory, options = self._directory, self._options
        return (rows
                | "TrainingRank" >> beam.Map(lambda row: (training_rank(row[0][0]), row[1]))
                # a combiner: each worker keeps its smallest ranks, one worker merges them
                | "TrainingSample" >> beam.combiners.Top.Of(options.train_rows, key=lambda e: e[0], reverse=True)
                | "Train" >> beam.Map(train_once, directory, options))


class ShardCorpus(beam.PTransform):
    """((sentence_id, text), vector) -> a StageOutput: main one CorpusFiles per corpus shard,
    written under `directory` (and, unless the index is flat, with its index file); nothing
    rejected or counted. No worker holds more than one shard. `row_count`: a singleton
    PCollection of the number of rows, where it is known upstream."""

    def __init__(self, directory: str, options: RetrieveOptions = RetrieveOptions(), row_count=None):
        super().__init__()
        self._directory, self._options, self._row_count = directory, options, row_count

    def expand(self, rows):
        shard_rows = self._options.corpus_shard_rows
        # Given the count from upstream (the sentences, before embedding), the rows flow on into
        # their shard's accumulator; counting the rows themselves would make the runner store
        # every embedded row (pickled one by one) until the count is known.
        count = self._row_count or rows | "CountCorpus" >> beam.combiners.Count.Globally()
        shards = (rows
                  | "KeyByShard" >> beam.Map(lambda row, n: (corpus_shard_of(row[0][0], n, shard_rows), row),
                                             n=beam.pvalue.AsSingleton(count))
                  | "CollectShard" >> beam.CombinePerKey(CollectCorpus(spill_dir=self._directory))
                  | "ShardFiles" >> beam.Values())
        if self._options.index != "flat":
            trained = rows | "TrainIndexOnce" >> TrainIndexOnce(self._directory, self._options)
            shards = shards | "IndexShard" >> beam.Map(add_shard_to_index, trained_path=beam.pvalue.AsSingleton(trained),
                                                            cache_gb=self._options.corpus_cache_gb)
        return stage_output(shards)


# ---------------------------------------------------------------------------------------------
# Search: query batches x corpus shards, merged per query


def _load_searcher(shard: CorpusFiles, options: RetrieveOptions, run: str | None = None):
    start = time.perf_counter()
    local, lease = local_copy(shard, options.corpus_cache_gb, run)  # once for the corpus and its index
    loaded = replace(load_corpus(local), holds=lease)  # the lease lives as long as the searcher's corpus
    searcher = make_searcher(loaded, options, load_index(local) if local.index_path else None)
    log.info("loaded a %s searcher over %d sentences on %s in %.1fs", options.index, len(loaded), searcher.device,
             time.perf_counter() - start)
    return loaded, searcher


class _SearchShard(beam.DoFn):
    """(corpus shard, (keys, queries)) -> (key, (score, sentence_id, text)) per candidate of the
    shard's exact top-K. One shard per worker process at a time, shared by its threads; the
    previous one is let go before the next is loaded (LatestShared), so a process never holds
    two shards' cache leases while it waits for room in the machine's corpus cache. It is let go
    when the bundle ends, too (and on teardown): a process that gets no more search elements
    holds no shard, so the cache must hold one shard per search running, not one per process.
    The next bundle maps the shard again from the machine's copy (0.13 s for a flat 2M-row shard,
    docs/benchmarks.md: against about a minute to search one query batch in it), without matching
    its remote files again (kept per process for the run: match_shard_files).

    A searcher on the GPU (its `device`, where it really runs: --device cuda with ivf/ivfpq and
    no usable faiss-gpu searches on the CPU) keeps its shard between bundles: it copies the whole
    shard to the device, which costs more than a batch's search there, and a GPU worker runs one
    process per GPU (so the cache holds one shard per GPU)."""

    def __init__(self, options: RetrieveOptions):
        self._options = options
        self._shared = LatestShared()
        # this run's token (pickled with the DoFn, so the same in every process): the key under
        # which a process keeps the shards' remote matches (match_shard_files)
        self._run = uuid.uuid4().hex
        self._keeps_shard = False  # whether the searcher last used runs on the GPU (_keeps_shard_between_bundles)

    @staticmethod
    def _keeps_shard_between_bundles(searcher) -> bool:
        """The one rule: keep a shard between bundles where its searcher runs on the GPU."""
        return searcher.device.startswith("cuda")

    def finish_bundle(self):
        if not self._keeps_shard:
            self._shared.release()

    def teardown(self):
        self._shared.release()

    def process(self, element):
        shard, (keys, queries) = element
        if len(shard) == 0:
            return
        start = time.perf_counter()
        corpus, searcher = self._shared.acquire(lambda: _load_searcher(shard, self._options, self._run),
                                                tag=f"{shard.fingerprint}:{shard.index_path}:{self._options}")
        self._keeps_shard = self._keeps_shard_between_bundles(searcher)
        if hasattr(searcher, "search_ranked"):
            indices, scores = searcher.search_ranked(queries, self._options.k)
        else:
            candidates = searcher.search(queries, candidates_for(self._options, len(corpus)))
            indices, scores = rank_candidates(queries, candidates, corpus, self._options.k)
        results = [(key, (float(score), corpus.ids[i], corpus.texts[i]))
                   for key, query_indices, query_scores in zip(keys, indices, scores)
                   for i, score in zip(query_indices, query_scores) if i < len(corpus)]
        add_stage_time("retrieve", start)  # before yielding: downstream work is not this stage's
        beam.metrics.Metrics.counter("retrieve", "shard_searches").inc(len(keys))
        yield from results


def _pair_with_shards(batch, shards):
    """A query batch once per corpus shard (in a fixed order); none, counted, without a corpus."""
    shards = [s for s in shards if len(s)]
    if not shards:
        beam.metrics.Metrics.counter("retrieve", "queries_without_corpus").inc(len(batch[0]))
    beam.metrics.Metrics.counter("retrieve", "queries").inc(len(batch[0]) if shards else 0)
    for shard in sorted(shards, key=lambda s: s.fingerprint):
        yield shard, batch


def _candidate_order(candidate) -> tuple:
    score, sentence_id, _ = candidate
    return hit_order(score, sentence_id)


def _ranked_hits(element):
    key, candidates = element  # best first (Top with reverse=True: smallest order key first)
    return key, [hit_dict(rank, sentence_id, text, score) for rank, (score, sentence_id, text) in enumerate(candidates)]


class RetrieveTopK(beam.PTransform):
    """(query_key, embedding) -> a StageOutput: main (query_key, [{rank, sentence_id, sentence,
    score}] * K); nothing rejected or counted.

    `corpus` is a PCollection of corpus shards (CorpusFiles: ShardCorpus's main)."""

    def __init__(self, corpus, options: RetrieveOptions = RetrieveOptions()):
        super().__init__()
        self._corpus = corpus
        self._options = options

    def expand(self, queries):
        hits = (queries
                # Full batches: FAISS's flat search leaves BLAS for batches under 20 queries, and
                # BatchElements' adaptive sizes start at 1 (several times slower per query).
                | "BatchQueries" >> beam.BatchElements(min_batch_size=self._options.batch_size,
                                                       max_batch_size=self._options.batch_size)
                # Search waits for the corpus, so its input is materialised: one array per batch
                # crosses that boundary, not a pickled array per query.
                | "StackQueries" >> beam.Map(_stack_queries)
                | "PairWithShards" >> beam.FlatMap(_pair_with_shards, shards=beam.pvalue.AsList(self._corpus))
                # the S searches of one batch go to any workers, not one after another on this one
                | "SpreadPairs" >> beam.Reshuffle()
                | "SearchShard" >> beam.ParDo(_SearchShard(self._options))
                # the K best of every shard's K best: the K best of the whole corpus
                | "MergeShards" >> beam.combiners.Top.PerKey(self._options.k, key=_candidate_order, reverse=True)
                | "RankHits" >> beam.Map(_ranked_hits))
        return stage_output(hits)
