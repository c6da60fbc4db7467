"""RetrieveTopK: top-K corpus sentences per query embedding, by cosine similarity.

The corpus (ids, texts, normalised embeddings) is gathered by CollectCorpus, sorted by sentence
id so index positions do not depend on how the corpus was read. With a spill folder (the
pipeline's staging folder) it is written there once, as a float32 .npy and an Arrow file, and
only their names travel as the side input: a side input of hundreds of MB is encoded, sized
object by object by the runner's state cache, and decoded per worker, which cost more than the
search itself (bench/pipeline.py, `overhead`). Workers memory-map the vectors, from a copy on
the machine's disk where the folder is remote (one per machine, not per process). The index is
built once per worker process (shared across its threads). Results do not depend on batch
order: the searcher returns K + margin candidates, which are re-scored exactly and ordered by
(score, sentence_id); see search.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import pickle
import posixpath
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils.shared import Shared

from pipelines.io import is_local
from pipelines.metrics import add_stage_time
from pipelines.options import RetrieveOptions
from pipelines.search import Corpus, candidate_count, hits_of, make_searcher, rank_candidates
from pipelines.shards import write_bytes, write_whole
from pipelines.sharing import acquire_shared

log = logging.getLogger(__name__)


class CorpusCoder(beam.coders.Coder):
    """An in-memory corpus side input as one pickle (protocol 5: the vector array as a single
    buffer), rather than Beam's element-wise encoding of its fields."""

    def encode(self, value: Corpus) -> bytes:
        return pickle.dumps(value, protocol=5)

    def decode(self, encoded: bytes) -> Corpus:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(Corpus, CorpusCoder)


@dataclass(frozen=True)
class CorpusFiles:
    """A corpus written to `directory`: what reaches the workers instead of its vectors."""
    directory: str
    fingerprint: str
    size: int

    def __len__(self) -> int:
        return self.size

    @property
    def vectors_path(self) -> str:
        return posixpath.join(self.directory, f"corpus-{self.fingerprint}.npy")

    @property
    def rows_path(self) -> str:
        return posixpath.join(self.directory, f"corpus-{self.fingerprint}.arrow")


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


CACHE_CHUNK_BYTES = 8 << 20  # a remote corpus file is copied this much at a time, never read whole


def load_corpus(files: CorpusFiles) -> Corpus:
    """The spilled corpus, its vectors memory-mapped (read-only). A remote folder (gs://) is first
    copied to this machine once: Dataflow runs an SDK process per vCPU, and each would otherwise
    hold its own copy of the vectors in memory."""
    vectors_path, rows_path = files.vectors_path, files.rows_path
    if not is_local(vectors_path):
        vectors_path, rows_path = cache_locally(files)
    vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
    rows = pa.ipc.open_file(pa.memory_map(rows_path)).read_all()
    if len(rows) != files.size or len(vectors) != files.size:
        raise ValueError(f"corpus files {files.vectors_path} / {files.rows_path} hold {len(vectors)} vectors and "
                         f"{len(rows)} rows, expected {files.size}: written by another run?")
    return Corpus(rows.column("sentence_id").to_pylist(), rows.column("text").to_pylist(), vectors, files.fingerprint)


def corpus_cache_dir(files: CorpusFiles) -> str:
    """This machine's cache folder for a remote corpus. The fingerprint covers only the sentence
    ids (another embedding model gives the same one), so the remote files' path, size and time
    are in the key too: a rewritten file is never served from a stale copy."""
    remote = [files.vectors_path, files.rows_path]
    stamps = [(m.path, m.size_in_bytes, m.last_updated_in_seconds)
              for result in FileSystems.match(remote) for m in result.metadata_list]
    source = hashlib.sha1(repr(stamps).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "vlp-data-corpus", f"{files.fingerprint}-{source}")


def cache_locally(files: CorpusFiles) -> tuple[str, str]:
    """Local copies of the corpus files (vectors, rows), downloaded by one process of this machine
    while the others wait on the folder's lock; a copy appears under its name only when complete."""
    cache = corpus_cache_dir(files)
    os.makedirs(cache, exist_ok=True)
    local = []
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        for remote in (files.vectors_path, files.rows_path):
            path = os.path.join(cache, posixpath.basename(remote))
            if not os.path.exists(path):
                _download(remote, path)
            local.append(path)
    return local[0], local[1]


def _download(remote: str, path: str) -> None:
    start = time.perf_counter()
    partial = f"{path}.partial"  # one name will do: only the lock holder writes
    with FileSystems.open(remote, compression_type=CompressionTypes.UNCOMPRESSED) as source, \
            open(partial, "wb") as target:
        shutil.copyfileobj(source, target, CACHE_CHUNK_BYTES)
    os.replace(partial, path)
    log.info("corpus file %s copied to %s in %.1fs", remote, path, time.perf_counter() - start)


class CollectCorpus(beam.CombineFn):
    """((sentence_id, text), vector) elements -> one Corpus sorted by sentence_id, or with
    `spill_dir` the CorpusFiles it was written to.

    Accumulators are columns (ids, texts, one stacked array), pickled whole between stages:
    Beam's default coder would pickle every row's vector separately."""

    def __init__(self, spill_dir: str | None = None):
        super().__init__()
        self._spill_dir = spill_dir

    def default_type_hints(self):  # so an in-memory Corpus side input travels with CorpusCoder
        from apache_beam.typehints.decorators import IOTypeHints
        hints = super().default_type_hints() or IOTypeHints.empty()
        return hints.with_output_types(CorpusFiles if self._spill_dir else Corpus)

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

    def extract_output(self, acc):
        ids, texts, vectors = self.compact(acc)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        ids, texts = [ids[i] for i in order], [texts[i] for i in order]
        arrived = vectors[0] if vectors else np.zeros((0, 0), np.float32)
        fingerprint = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        if self._spill_dir and ids:  # gathered into id order as they are written
            return spill_corpus(Corpus(ids, texts, arrived, fingerprint), self._spill_dir, order=np.asarray(order))
        return Corpus(ids, texts, np.take(arrived, order, axis=0), fingerprint)  # one copy, in id order


def _stack_queries(batch) -> tuple[list, np.ndarray]:
    """[(key, vector)] -> (keys, float32 [n, dim])."""
    return [key for key, _ in batch], np.stack([np.asarray(vector, dtype=np.float32) for _, vector in batch])


class _SearchBatch(beam.DoFn):
    def __init__(self, options: RetrieveOptions):
        self._options = options
        self._shared = Shared()
        self._loaded = None  # (corpus, searcher) of this process
        self._loaded_for = None
        self._lock = threading.Lock()

    def _corpus_and_searcher(self, corpus: Corpus | CorpusFiles):
        with self._lock:
            if self._loaded_for != corpus.fingerprint:
                def build():
                    start = time.perf_counter()
                    loaded = load_corpus(corpus) if isinstance(corpus, CorpusFiles) else corpus
                    searcher = make_searcher(loaded, self._options)
                    log.info("built %s index over %d sentences in %.1fs", self._options.index, len(loaded),
                             time.perf_counter() - start)
                    return loaded, searcher

                self._loaded = acquire_shared(self._shared, build, tag=f"{corpus.fingerprint}:{self._options}")
                self._loaded_for = corpus.fingerprint
            return self._loaded

    def process(self, batch, corpus: Corpus | CorpusFiles):
        keys, queries = batch
        if len(corpus) == 0:
            beam.metrics.Metrics.counter("retrieve", "queries_without_corpus").inc(len(keys))
            return
        start = time.perf_counter()
        corpus, searcher = self._corpus_and_searcher(corpus)
        if hasattr(searcher, "search_ranked"):
            indices, scores = searcher.search_ranked(queries, self._options.k)
        else:
            candidates = searcher.search(queries, candidate_count(self._options.k, len(corpus)))
            indices, scores = rank_candidates(queries, candidates, corpus, self._options.k)
        results = [(key, hits_of(query_indices, query_scores, corpus))
                   for key, query_indices, query_scores in zip(keys, indices, scores)]
        add_stage_time("retrieve", start)  # before yielding: downstream work is not this stage's
        beam.metrics.Metrics.counter("retrieve", "queries").inc(len(keys))
        yield from results


class RetrieveTopK(beam.PTransform):
    """(query_key, embedding) -> (query_key, [{rank, sentence_id, sentence, score}] * K).

    `corpus` is a singleton PCollection of Corpus or CorpusFiles (from CollectCorpus)."""

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
                # Search waits for the corpus, so its input is materialised: one array per batch
                # crosses that boundary, not a pickled array per query.
                | "StackQueries" >> beam.Map(_stack_queries)
                | "Search" >> beam.ParDo(_SearchBatch(self._options), corpus=beam.pvalue.AsSingleton(self._corpus)))
