"""The embedding store (`--embeddings DIR`): corpus embeddings kept by (model fingerprint,
sentence_id) in Parquet files, reused by later builds.

DIR/<fingerprint>/embeddings-<digest>.parquet (schemas.EMBEDDINGS: sentence_id, vector). The
fingerprint covers the model folder's files and what else changes a vector (device kind, fp16 on
CUDA, the encoder backend and, for an ONNX one, its file's versions and settings), so another model
never reads this one's vectors; sentence ids are content hashes of the text (io.stable_id), so an
id always means the same text. A build reads the store, embeds only the sentences it lacks, and
adds those as new files (named by their ids' digest: a retried or repeated write gives the same
file). A stored vector is the one the first build computed: a later build with the same corpus
and settings writes the same outputs.
"""
from __future__ import annotations

import hashlib
import io
import logging
import posixpath

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio

import schemas
from pipelines.batching import group_of
from pipelines.embed import EmbedSentences
from pipelines.files import open_file
from pipelines.fingerprint import folder_digest
from pipelines.onnx_encoder import ONNX_BACKENDS, export_tag
from pipelines.options import EmbedOptions
from pipelines.shards import write_bytes
from pipelines.stages import stage_output

log = logging.getLogger(__name__)

STORE_FILE_ROWS = 100_000  # new embeddings per store file, about
NAMESPACE = "embedding_store"  # Beam counters: sentences_reused, sentences_embedded, unreadable_files


def model_fingerprint(options: EmbedOptions) -> str:
    """What a stored vector depends on: the model's files, and how it runs (CPU float32, or CUDA
    in float16 / float32; the encoder backend: torch, onnx, onnx-int8 or onnx-smoothquant). For an
    ONNX backend also what its ONNX file depends on (the exporter's format and versions,
    onnxruntime's, SmoothQuant's alpha and calibration text): the tag its cache key carries, so a
    new ONNX file never mixes its vectors with the old one's."""
    from pipelines.encoding import default_sbert_path
    folder = options.model or default_sbert_path()
    cuda = options.device.startswith("cuda")
    backend = options.resolved_backend()
    runs = {"device": "cuda" if cuda else "cpu", "fp16": bool(options.fp16 and cuda), "backend": backend}
    if backend in ONNX_BACKENDS:
        runs["onnx_file"] = export_tag(backend)  # what the ONNX file depends on: a new file, new vectors
    return hashlib.sha256(f"{folder_digest(folder)}|{sorted(runs.items())}".encode()).hexdigest()[:32]


def _store_rows(readable):
    """A store file -> (sentence_id, vector); an unreadable or foreign file is skipped and counted
    (its sentences are embedded again), never trusted."""
    path = readable.metadata.path
    try:
        with open_file(path) as f:
            table = pq.read_table(io.BytesIO(f.read()))
        schemas.check_version(table.schema, path)
        schemas.check_fields(table.schema, schemas.EMBEDDINGS, path)
    except (OSError, ValueError, pa.ArrowException) as err:
        log.warning("embedding store file %s skipped: %s", path, err)
        beam.metrics.Metrics.counter(NAMESPACE, "unreadable_files").inc()
        return
    vectors = table.column("vector").combine_chunks()
    flat = vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = vectors.offsets.to_numpy()
    for i, sentence_id in enumerate(table.column("sentence_id").to_pylist()):
        yield sentence_id, flat[offsets[i]:offsets[i + 1]]


def _split_by_store(element):
    """(sentence_id, {text, stored}) -> ((id, text), vector) for a stored one, else (id, text)
    to the `missing` output. Stored ids that are not in this corpus are ignored."""
    sentence_id, grouped = element
    if not grouped["text"]:
        return
    text = grouped["text"][0]
    if grouped["stored"]:
        # the same id in two files (two builds adding it at once): the same choice in every run
        vector = min(grouped["stored"], key=lambda v: np.asarray(v, np.float32).tobytes())
        beam.metrics.Metrics.counter(NAMESPACE, "sentences_reused").inc()
        yield (sentence_id, text), np.asarray(vector, np.float32)
    else:
        yield beam.pvalue.TaggedOutput("missing", (sentence_id, text))


def _store_file(element, folder: str):
    """(file number, [(id, vector)]) -> one Parquet file in the store, named by its ids' digest."""
    _, rows = element
    rows = sorted(rows, key=lambda r: r[0])
    ids = [sentence_id for sentence_id, _ in rows]
    table = pa.table({"sentence_id": pa.array(ids, pa.string()),
                      "vector": pa.array([np.asarray(v, np.float32) for _, v in rows], pa.list_(pa.float32()))},
                     schema=schemas.EMBEDDINGS)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:20]
    write_bytes(posixpath.join(folder, f"embeddings-{digest}.parquet"), buffer.getvalue())
    beam.metrics.Metrics.counter(NAMESPACE, "files_written").inc()


class EmbedCorpus(beam.PTransform):
    """(sentence_id, text) -> a StageOutput: main ((sentence_id, text), vector); nothing rejected
    or counted (the store's own Beam counters say how many were reused). With a store folder,
    vectors found there under this model's fingerprint are reused and only the others embedded
    (then stored); without one, this is EmbedSentences."""

    def __init__(self, options: EmbedOptions, store: str | None = None):
        super().__init__()
        self._options, self._store = options, store

    def expand(self, sentences):
        keyed = sentences | "KeyByIdText" >> beam.Map(lambda st: (st, st[1]))
        if not self._store:
            return stage_output(keyed | "Embed" >> EmbedSentences(self._options))
        folder = posixpath.join(self._store, model_fingerprint(self._options))
        stored = (sentences.pipeline
                  | "StorePattern" >> beam.Create([posixpath.join(folder, "*.parquet")])
                  | "MatchStore" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
                  | "OpenStore" >> fileio.ReadMatches()
                  | "StoreRows" >> beam.FlatMap(_store_rows))
        split = ({"text": sentences, "stored": stored}
                 | "JoinStore" >> beam.CoGroupByKey()
                 | "SplitByStore" >> beam.FlatMap(_split_by_store).with_outputs("missing", main="reused"))
        embedded = (split.missing
                    | "CountEmbedded" >> beam.Map(_count_embedded)
                    | "KeyMissing" >> beam.Map(lambda st: (st, st[1]))
                    | "Embed" >> EmbedSentences(self._options))
        # counted before embedding (one vector each): counting the embedded rows would make the
        # runner hold every vector until the count is known
        count = split.missing | "CountNew" >> beam.combiners.Count.Globally()
        _ = (embedded
             | "ToStoreFile" >> beam.Map(lambda row, n: (group_of(row[0][0], n, STORE_FILE_ROWS), (row[0][0], row[1])),
                                         n=beam.pvalue.AsSingleton(count))
             | "GroupStoreFile" >> beam.GroupByKey()
             | "WriteStoreFile" >> beam.Map(_store_file, folder))
        return stage_output((split.reused, embedded) | "ReusedAndNew" >> beam.Flatten())


def _count_embedded(sentence):
    beam.metrics.Metrics.counter(NAMESPACE, "sentences_embedded").inc()
    return sentence
