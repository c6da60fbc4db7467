"""The embedding store (`--embeddings DIR`): corpus embeddings kept by (model fingerprint,
sentence_id) in Parquet files, reused by later builds.

DIR/<fingerprint>/embeddings-<digest>.parquet (schemas.EMBEDDINGS: sentence_id, vector). The
fingerprint covers the model folder's files and what else changes a vector (device kind, fp16 on
CUDA, the encoder backend, the versions of the libraries that compute it and, for an ONNX backend,
what its file is made with: encoding.encoder_parts), so another model never reads this one's
vectors; sentence ids are content hashes of the text (io.stable_id), so an id always means the
same text. A build reads the store, embeds only the sentences it lacks, and adds those as new
files (named by their ids' digest: a retried or repeated write gives the same file). A stored
vector is the one the first build computed: a later build with the same corpus and settings
writes the same outputs.

The launcher names the folder (the store is read before any vector is made), but workers make
the vectors, and a worker image may have other versions than the launcher. So every worker that
embeds for a build with a store (the query strings' embedding too: queries and stored vectors
must come from one encoder) computes the parts of the encoder it loads and, where they are not
the launcher's, refuses before it loads or embeds anything, in one line naming each differing
part (embed.SentenceTransformerHandler). Why refuse rather than let a worker write under its own
fingerprint: the launcher would still read the launcher's folder, mixing those vectors with the
worker's, and never find the worker's, embedding them again on every run; refusing keeps one
encoder per folder and reruns byte-identical. Each file also records the parts it was made with
(Parquet metadata `encoder`); a file whose record is missing or not its folder's is skipped and
counted, never read.
"""
from __future__ import annotations

import hashlib
import io
import json
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
from pipelines.encoding import encoder_fingerprint, encoder_parts
from pipelines.files import open_file
from pipelines.options import EmbedOptions
from pipelines.shards import write_bytes
from pipelines.stages import stage_output

log = logging.getLogger(__name__)

STORE_FILE_ROWS = 100_000  # new embeddings per store file, about
NAMESPACE = "embedding_store"  # Beam counters: sentences_reused, sentences_embedded, unreadable_files


ENCODER_KEY = b"encoder"  # a store file's Parquet metadata: the JSON encoder_parts it was made with


def model_fingerprint(options: EmbedOptions) -> str:
    """The store folder of `options`' encoder as this process loads it (encoding.encoder_parts)."""
    return encoder_fingerprint(encoder_parts(options))


def _check_encoder_record(schema: pa.Schema, fingerprint: str, path: str) -> None:
    """A store file must say it was made by the encoder its folder is named for."""
    recorded = (schema.metadata or {}).get(ENCODER_KEY)
    if recorded is None:
        raise ValueError(f"{path}: no encoder record in the file metadata (not written by this version of vlp-data)")
    parts = json.loads(recorded)
    if encoder_fingerprint(parts) != fingerprint:
        raise ValueError(f"{path}: made by encoder {encoder_fingerprint(parts)} ({parts}), not this folder's {fingerprint}")


def _store_rows(readable, fingerprint: str):
    """A store file -> (sentence_id, vector); an unreadable or foreign file (another schema, or
    another encoder's record) is skipped and counted (its sentences are embedded again), never
    trusted."""
    path = readable.metadata.path
    try:
        with open_file(path) as f:
            table = pq.read_table(io.BytesIO(f.read()))
        schemas.check_version(table.schema, path)
        schemas.check_fields(table.schema, schemas.EMBEDDINGS, path)
        _check_encoder_record(table.schema, fingerprint, path)
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


def _store_file(element, folder: str, parts: dict[str, str]):
    """(file number, [(id, vector)]) -> one Parquet file in the store, named by its ids' digest,
    recording the encoder `parts` its vectors were made with (the folder's; every embedding worker
    checked its own against them)."""
    _, rows = element
    rows = sorted(rows, key=lambda r: r[0])
    ids = [sentence_id for sentence_id, _ in rows]
    schema = schemas.EMBEDDINGS.with_metadata({**schemas.EMBEDDINGS.metadata,
                                               ENCODER_KEY: json.dumps(parts, sort_keys=True).encode("utf-8")})
    table = pa.table({"sentence_id": pa.array(ids, pa.string()),
                      "vector": pa.array([np.asarray(v, np.float32) for _, v in rows], pa.list_(pa.float32()))},
                     schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:20]
    write_bytes(posixpath.join(folder, f"embeddings-{digest}.parquet"), buffer.getvalue())
    beam.metrics.Metrics.counter(NAMESPACE, "files_written").inc()


class EmbedCorpus(beam.PTransform):
    """(sentence_id, text) -> a StageOutput: main ((sentence_id, text), vector); nothing rejected
    or counted (the store's own Beam counters say how many were reused). With a store folder,
    vectors found there under this model's fingerprint are reused and only the others embedded
    (then stored), by workers whose encoder has this fingerprint (others refuse: see the module
    doc); without one, this is EmbedSentences."""

    def __init__(self, options: EmbedOptions, store: str | None = None):
        super().__init__()
        self._options, self._store = options, store
        # with a store, the launcher's encoder parts: the folder's name, and what every worker
        # that embeds for this build (the queries' too: Retrieve passes it on) checks its own against
        self.store_encoder = encoder_parts(options) if store else None

    def expand(self, sentences):
        keyed = sentences | "KeyByIdText" >> beam.Map(lambda st: (st, st[1]))
        if not self._store:
            return stage_output(keyed | "Embed" >> EmbedSentences(self._options))
        parts = self.store_encoder
        fingerprint = encoder_fingerprint(parts)
        folder = posixpath.join(self._store, fingerprint)
        stored = (sentences.pipeline
                  | "StorePattern" >> beam.Create([posixpath.join(folder, "*.parquet")])
                  | "MatchStore" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
                  | "OpenStore" >> fileio.ReadMatches()
                  | "StoreRows" >> beam.FlatMap(_store_rows, fingerprint))
        split = ({"text": sentences, "stored": stored}
                 | "JoinStore" >> beam.CoGroupByKey()
                 | "SplitByStore" >> beam.FlatMap(_split_by_store).with_outputs("missing", main="reused"))
        embedded = (split.missing
                    | "CountEmbedded" >> beam.Map(_count_embedded)
                    | "KeyMissing" >> beam.Map(lambda st: (st, st[1]))
                    | "Embed" >> EmbedSentences(self._options, expect_encoder=parts))
        # counted before embedding (one vector each): counting the embedded rows would make the
        # runner hold every vector until the count is known
        count = split.missing | "CountNew" >> beam.combiners.Count.Globally()
        _ = (embedded
             | "ToStoreFile" >> beam.Map(lambda row, n: (group_of(row[0][0], n, STORE_FILE_ROWS), (row[0][0], row[1])),
                                         n=beam.pvalue.AsSingleton(count))
             | "GroupStoreFile" >> beam.GroupByKey()
             | "WriteStoreFile" >> beam.Map(_store_file, folder, parts))
        return stage_output((split.reused, embedded) | "ReusedAndNew" >> beam.Flatten())


def _count_embedded(sentence):
    beam.metrics.Metrics.counter(NAMESPACE, "sentences_embedded").inc()
    return sentence
