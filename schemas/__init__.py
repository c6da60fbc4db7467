"""Arrow schemas of every table and shard sample, versioned.

The one source of truth: writers build their tables with these schemas, readers check them.
Every Parquet file carries ``schema_version`` in its key-value metadata (`read_table` checks it).

Versioning: SCHEMA_VERSION changes when code of one version could misread a file of another (a
column or sample field removed, renamed or retyped, or its meaning changed, or a member added that
older readers would silently ignore); readers refuse a version not in READ_VERSIONS, naming it. A
nullable column added to a table is not such a change: it is listed in ADDED_COLUMNS, and a file
written before it reads it as null (a column not listed there and missing from a file is an error
naming it).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
# What each version changed; this code reads all of them (a version-1 file reads as a version-2
# file without images).
#   1: region features only.
#   2: a sample may carry its image: the `{key}.jpg` shard member and the sample field
#      `image_size` [w, h] (schemas.corpus.IMAGE_MEMBER); the manifest's `images` column.
READ_VERSIONS = (1, 2)
VERSION_KEY = b"schema_version"


def _versioned(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), b"table": name.encode()})


BOX = pa.list_(pa.float32(), 4)

# Object detections of one image (input table, and the output of `vlp-data detect`).
DETECTIONS = _versioned("detections", [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("boxes", pa.list_(BOX), nullable=False),
    pa.field("labels", pa.list_(pa.string()), nullable=False),
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
    # [regions][dim]; null when the detections carry no region features.
    pa.field("features", pa.list_(pa.list_(pa.float32())), nullable=True),
])

# The cleaned, de-duplicated text corpus. sentence_id = first 16 hex digits of sha1(text).
SENTENCES = _versioned("sentences", [
    pa.field("sentence_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])

# The embedding store (pipelines/store.py, `--embeddings DIR`): a sentence's corpus embedding
# (L2-normalised float32), in DIR/<model fingerprint>/embeddings-*.parquet. Not a corpus output.
EMBEDDINGS = _versioned("embeddings", [
    pa.field("sentence_id", pa.string(), nullable=False),
    pa.field("vector", pa.list_(pa.float32()), nullable=False),
])

# Top-K sentences per image; rank 0 is the best; score is the cosine similarity; query is the
# tag string the image searched with (schemas.corpus.tag_query; null in files written before it).
RETRIEVALS = _versioned("retrievals", [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("sentence_id", pa.string(), nullable=False),
    pa.field("sentence", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("query", pa.string(), nullable=True),
])

# One row per noun phrase of a retrieved sentence of an image; region is null when unlinked.
LINKS = _versioned("links", [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("sentence_id", pa.string(), nullable=False),
    pa.field("phrase", pa.string(), nullable=False),
    pa.field("start", pa.int32(), nullable=False),
    pa.field("end", pa.int32(), nullable=False),
    pa.field("region", pa.int32(), nullable=True),
    pa.field("tag", pa.string(), nullable=True),
    pa.field("similarity", pa.float32(), nullable=False),
])

# One row per WebDataset shard; images: how many of its samples carry their image (`{key}.jpg`),
# null in manifests written before version 2 (their shards have none).
MANIFEST = _versioned("manifest", [
    pa.field("shard", pa.string(), nullable=False),
    pa.field("samples", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("images", pa.int64(), nullable=True),
])

# The `{key}.json` of a shard sample, as an Arrow struct (docs/corpus-format.md).
PHRASE = pa.struct([
    pa.field("text", pa.string(), nullable=False),
    pa.field("start", pa.int32(), nullable=False),
    pa.field("end", pa.int32(), nullable=False),
    pa.field("words", pa.list_(pa.string())),
    pa.field("region", pa.int32(), nullable=True),
    pa.field("tag", pa.string(), nullable=True),
    pa.field("similarity", pa.float32()),
])
SAMPLE_SENTENCE = pa.struct([
    pa.field("sentence_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("phrases", pa.list_(PHRASE)),
])
SAMPLE = _versioned("sample", [
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("boxes", pa.list_(BOX), nullable=False),
    pa.field("tags", pa.list_(pa.string()), nullable=False),
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
    pa.field("sentences", pa.list_(SAMPLE_SENTENCE), nullable=False),
    # [w, h] of the stored `{key}.jpg` (boxes stay in width x height); absent without an image.
    pa.field("image_size", pa.list_(pa.int32(), 2), nullable=True),
])

TABLES = {s.metadata[b"table"].decode(): s for s in (DETECTIONS, SENTENCES, RETRIEVALS, LINKS, MANIFEST, SAMPLE)}

# Nullable columns added to a table within this SCHEMA_VERSION: files written before lack them.
ADDED_COLUMNS = {"retrievals": ("query",), "manifest": ("images",)}


class SchemaError(ValueError):
    """A table or sample does not match its schema; the message names the file and the problem."""


def check_version(schema: pa.Schema, where: str) -> None:
    found = (schema.metadata or {}).get(VERSION_KEY)
    if found is None:
        raise SchemaError(f"{where}: no schema_version in the file metadata (not written by vlp-data?)")
    if not found.isdigit() or int(found) not in READ_VERSIONS:
        raise SchemaError(f"{where}: schema_version {found.decode(errors='replace')} but this code reads "
                          f"{_versions_read()}")


def _versions_read() -> str:
    return "version " + " or ".join(map(str, READ_VERSIONS))


def added_columns(expected: pa.Schema) -> tuple[str, ...]:
    """The columns of `expected` that files of this version written before them may lack."""
    table = (expected.metadata or {}).get(b"table", b"").decode()
    return ADDED_COLUMNS.get(table, ())


def check_fields(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in actual}
    missing = sorted(set(want) - set(have) - set(added_columns(expected)))
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}")
    wrong = [f"{n}: {have[n]} (expected {t})" for n, t in want.items() if n in have and not have[n].equals(t)]
    if wrong:
        raise SchemaError(f"{where}: wrong column type(s) " + "; ".join(wrong))


def read_table(path: str, expected: pa.Schema) -> pa.Table:
    """Read one Parquet file written by vlp-data, checking its version and columns; a column added
    after the file was written (ADDED_COLUMNS) reads as null."""
    schema = pq.read_schema(path)
    check_version(schema, path)
    check_fields(schema, expected, path)
    return pq.read_table(path, schema=expected)


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def check_sample_types(samples: list[dict], where: str = "samples") -> None:
    """Arrow's conversion of the samples to SAMPLE: types and nesting, and no null among the
    regions' boxes, box coordinates, tags and scores (Arrow's list items are nullable, so a null
    passes the conversion; the converted arrays count their nulls, so this costs next to nothing).
    A list at once costs about a seventh per sample of one at a time (the loader checks a batch,
    then a bad batch sample by sample to name the culprit)."""
    try:
        table = pa.Table.from_pylist(samples, schema=SAMPLE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError, AttributeError) as err:
        raise SchemaError(f"{where}: does not match the sample schema: {err}") from err
    boxes = pc.list_flatten(table.column("boxes"))
    nulls = {"boxes": boxes.null_count + pc.list_flatten(boxes).null_count,
             "tags": pc.list_flatten(table.column("tags")).null_count,
             "scores": pc.list_flatten(table.column("scores")).null_count}
    held = [name for name, count in nulls.items() if count]
    if held:
        raise SchemaError(f"{where}: {', '.join(held)} hold a null")


def float16_nonfinite(feats: np.ndarray) -> bool:
    """Whether a float16 array holds inf or nan: the values whose exponent bits are all ones. A
    bit test is much faster than np.isfinite, which has no fast path for float16 (bench/loader_parts.py)."""
    return bool(((feats.view(np.uint16) & 0x7C00) == 0x7C00).any())


def validate_sample(sample: dict, feats=None, where: str = "sample", types_checked: bool = False) -> None:
    """Check a shard sample dict (and its feature array) against SAMPLE and its invariants.
    `types_checked`: check_sample_types (types, and no null region) already passed for this
    sample (in a batch)."""
    if not isinstance(sample, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(sample).__name__}")
    if not types_checked:
        check_sample_types([sample], where)
    missing = [f.name for f in SAMPLE if not f.nullable and sample.get(f.name) is None]
    if missing:
        raise SchemaError(f"{where}: missing field(s) {missing}")
    extra = set(sample) - set(SAMPLE.names)
    if extra:
        raise SchemaError(f"{where}: unknown field(s) {sorted(extra)}")
    if sample["schema_version"] not in READ_VERSIONS:
        raise SchemaError(f"{where}: schema_version {sample['schema_version']} but this code reads {_versions_read()}")
    image_size = sample.get("image_size")
    if image_size is not None and not all(isinstance(v, int) and v > 0 for v in image_size):
        raise SchemaError(f"{where}: image_size {image_size} is not two positive pixel counts")
    sentence_fields = {f.name for f in SAMPLE_SENTENCE}
    phrase_fields = {f.name for f in PHRASE}
    for s in sample["sentences"]:
        # Arrow's list items are nullable, and it reads an empty list or a list of (key, value)
        # pairs as a struct: a null or non-object sentence or phrase, or a null phrase list,
        # passes the type check
        if not isinstance(s, dict) or not isinstance(s.get("phrases"), list) \
                or not all(isinstance(p, dict) for p in s["phrases"]):
            raise SchemaError(f"{where}: sentences hold a null or a non-object")
        # Arrow ignores unknown keys inside nested structs: check those by hand.
        extra = set(s) - sentence_fields or {k for p in s["phrases"] for k in p} - phrase_fields
        if extra:
            raise SchemaError(f"{where}: unknown field(s) {sorted(extra)} in sentence {s.get('sentence_id')}")
    n = len(sample["boxes"])
    if not (len(sample["tags"]) == len(sample["scores"]) == n):
        raise SchemaError(f"{where}: boxes/tags/scores lengths differ ({n}, {len(sample['tags'])}, {len(sample['scores'])})")
    if feats is not None:
        if feats.ndim != 2 or feats.shape[0] != n:
            raise SchemaError(f"{where}: feats shape {feats.shape} does not match {n} regions")
        if str(feats.dtype) != "float16":
            raise SchemaError(f"{where}: feats dtype {feats.dtype}, expected float16")
        if float16_nonfinite(feats):
            raise SchemaError(f"{where}: feats hold inf or nan")
    for s in sample["sentences"]:
        for p in s["phrases"]:
            if s["text"][p["start"]:p["end"]] != p["text"]:
                raise SchemaError(f"{where}: phrase {p['text']!r} does not match its span in {s['sentence_id']}")
            if p["region"] is not None and not 0 <= p["region"] < n:
                raise SchemaError(f"{where}: phrase {p['text']!r} links to region {p['region']} of {n}")
