"""Deterministic outputs: WebDataset shards, Parquet side tables, JSON files, dead letters.

Every file is written whole to a temporary name and renamed into place, and its content depends
only on the inputs (rows sorted, fixed tar metadata, shard assignment by key order), so a retried
bundle or a run with more workers produces the same bytes and cannot leave duplicates.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import time
import uuid
from bisect import bisect_right

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.metrics import add_stage_time
from pipelines.options import ShardOptions
from pipelines.stages import stage_output
from schemas.corpus import sample_key, sample_members, tar_bytes

SHARD_PATTERN = "corpus-%06d.tar"


PARTIAL_FILE = re.compile(r"\.tmp-[0-9a-f]{32}$")  # write_whole's temporary names


def is_partial(path: str) -> bool:
    """A temporary file of write_whole: left behind only when a worker died before the rename
    (its retry wrote the file again under another name)."""
    return PARTIAL_FILE.search(path) is not None


def write_whole(path: str, write) -> None:
    """`write(file)` into a temporary name, then rename it into place: a retried bundle rewrites
    the same file, and a reader never sees half of one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp) as f:
        write(f)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_bytes(path: str, data: bytes) -> None:
    write_whole(path, lambda f: f.write(data))


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(schemas.table_from_rows(rows, schema), buffer, compression="zstd")
    return buffer.getvalue()


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Parquet tables


def _stable_bucket(key: str, buckets: int) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % buckets


def table_files(rows: int, rows_per_file: int) -> int:
    """How many files a table of `rows` rows is written as: enough for about `rows_per_file` each."""
    return max(1, -(-rows // rows_per_file))


class WriteFiles(beam.PTransform):
    """Elements -> FOLDER/stem-00000-of-0000N.ext, each file made by `render(its elements sorted
    by sort_key) -> bytes`; every one of the N files is written, even when empty. Outputs the
    written paths.

    N comes from the element count (about `per_file` a file, by a stable hash of the sort key),
    so the files depend on the data alone and each is written by its own worker: a 10-million-row
    table (or millions of dead letters) is not gathered, sorted and written by one."""

    def __init__(self, folder: str, stem: str, sort_key, per_file: int, render, extension: str):
        super().__init__()
        self._folder, self._stem, self._sort_key, self._per_file = folder, stem, sort_key, max(1, per_file)
        self._render, self._extension = render, extension

    def expand(self, rows):
        stem, sort_key, per_file = self._stem, self._sort_key, self._per_file
        files = (rows | f"Count{stem}" >> beam.combiners.Count.Globally()
                 | f"Files{stem}" >> beam.Map(table_files, per_file))
        every_file = files | f"EveryFile{stem}" >> beam.FlatMap(lambda n: [(i, None) for i in range(n)])
        keyed = rows | f"Bucket{stem}" >> beam.Map(
            lambda r, n: (_stable_bucket(str(sort_key(r)), n), r), n=beam.pvalue.AsSingleton(files))
        return ((keyed, every_file) | f"AllFiles{stem}" >> beam.Flatten()
                | f"Group{stem}" >> beam.GroupByKey()
                | f"Write{stem}" >> beam.Map(self._write, n=beam.pvalue.AsSingleton(files)))

    def _write(self, file_rows, n):
        index, rows = file_rows
        rows = sorted((r for r in rows if r is not None), key=self._sort_key)
        path = posixpath.join(self._folder, f"{self._stem}-{index:05d}-of-{n:05d}.{self._extension}")
        write_bytes(path, self._render(rows))
        return path


class WriteTable(WriteFiles):
    """Rows (dicts) -> DIR/name/name-00000-of-0000N.parquet (see WriteFiles), about
    `rows_per_file` rows a file, each file's rows sorted by `sort_key`."""

    def __init__(self, directory: str, name: str, schema: pa.Schema, sort_key, rows_per_file: int):
        super().__init__(posixpath.join(directory, name), name, sort_key, rows_per_file,
                         lambda rows: parquet_bytes(rows, schema), "parquet")


class WriteSingleFile(beam.PTransform):
    """All elements -> one file at `path`, made by `render(sorted elements) -> bytes`."""

    def __init__(self, path: str, render, sort_key=None):
        super().__init__()
        self._path, self._render, self._sort_key = path, render, sort_key

    def expand(self, elements):
        path, render, sort_key = self._path, self._render, self._sort_key

        def write(all_elements):
            write_bytes(path, render(sorted(all_elements, key=sort_key) if sort_key else list(all_elements)))
            return path

        return (elements | "Gather" >> beam.combiners.ToList()
                | "WriteFile" >> beam.Map(write))


def rejected_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def rejected_sort_key(record: dict):
    return (record["stage"], record["source"], record["reason"], record.get("detail") or "", record.get("record") or "")


# ---------------------------------------------------------------------------------------------
# WebDataset shards


class _WriteShard(beam.DoFn):
    def __init__(self, directory: str):
        self._directory = directory

    def process(self, element):
        shard_index, keyed_samples = element
        start = time.perf_counter()
        members, samples, images = [], 0, 0
        for key, (sample, feats, *image) in sorted(keyed_samples, key=lambda kv: kv[0]):
            image = image[0] if image else None  # the stored JPEG (--store-images), else None
            members += sample_members(key, sample, feats, image)
            samples, images = samples + 1, images + (image is not None)
        data = tar_bytes(members)
        name = SHARD_PATTERN % shard_index
        write_bytes(posixpath.join(self._directory, "shards", name), data)
        add_stage_time("shards", start)
        beam.metrics.Metrics.counter("shards", "bytes").inc(len(data))
        beam.metrics.Metrics.counter("shards", "samples").inc(samples)  # the build's progress
        yield {"shard": f"shards/{name}", "samples": samples, "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "images": images}


# Keys are cut into ranges by their first characters (16**3 = 4,096 ranges for the hex keys): a
# key's range orders it before every key of a later range, so a key's rank over the corpus is the
# number of keys in earlier ranges plus its rank in its own. Counting, ranking and the cut then run
# on all workers; one worker holds only the range counts and the shard boundaries.
KEY_RANGE_CHARS = 3


def key_range(key: str) -> str:
    return key[:KEY_RANGE_CHARS]


def range_offsets(range_counts: list[tuple[str, int]]) -> dict[str, int]:
    """(range, number of keys) -> range: the number of keys in all earlier ranges."""
    offsets, total = {}, 0
    for name, count in sorted(range_counts):
        offsets[name] = total
        total += count
    return offsets


def shard_firsts_in_range(range_keys, offset: int, per_shard: int) -> list[str]:
    """The keys of one range that start a shard: global rank (offset + rank in the range) a
    multiple of `per_shard`."""
    keys = sorted(range_keys)
    first = -offset % per_shard  # the rank in this range of its first shard start
    return keys[first::per_shard]


def shard_of(key: str, boundaries: list[str]) -> int:
    """The shard holding `key`: the last one whose first key is not after it."""
    return max(0, bisect_right(boundaries, key) - 1)


class ShardBoundaries(beam.PTransform):
    """Keys -> a singleton PCollection: the sorted first key of each shard when the sorted keys
    are cut every `per_shard`, i.e. `sorted(keys)[::per_shard]`, without gathering the keys on
    one worker (70 MB of Python strings a million keys there, by bench/shard_keys.py)."""

    def __init__(self, per_shard: int):
        super().__init__()
        self._per_shard = per_shard

    def expand(self, keys):
        per_shard = self._per_shard
        by_range = keys | "ByRange" >> beam.Map(lambda k: (key_range(k), k))
        offsets = (by_range
                   | "One" >> beam.MapTuple(lambda name, _: (name, 1))
                   | "CountPerRange" >> beam.CombinePerKey(sum)
                   | "RangeCounts" >> beam.combiners.ToList()
                   | "Offsets" >> beam.Map(range_offsets))
        return (by_range
                | "GroupRange" >> beam.GroupByKey()
                | "FirstsInRange" >> beam.FlatMap(
                    lambda grouped, offsets: shard_firsts_in_range(grouped[1], offsets[grouped[0]], per_shard),
                    offsets=beam.pvalue.AsSingleton(offsets))
                | "Firsts" >> beam.combiners.ToList()
                | "Sorted" >> beam.Map(sorted))


class WriteShards(beam.PTransform):
    """(sample dict, float16 features[, stored JPEG bytes or None]) -> DIR/shards/corpus-%06d.tar;
    a StageOutput: main the manifest rows, counts ("shards", 1) per shard, nothing rejected.

    Samples are ordered by key (sha1 of image_id) over the whole corpus and cut into shards of
    `samples_per_shard`, so the shard contents depend on the data alone, not on the workers."""

    def __init__(self, directory: str, options: ShardOptions = ShardOptions()):
        super().__init__()
        self._directory, self._options = directory, options

    def expand(self, samples):
        per_shard = self._options.samples_per_shard
        keyed = samples | "Key" >> beam.Map(lambda sf: (sample_key(sf[0]["image_id"]), sf))
        # Every worker gets the first key of each shard, not every key: 1 / samples_per_shard of
        # the side input (10,000 keys instead of 10 million for a 10M-image corpus).
        boundaries = keyed | "Keys" >> beam.Keys() | "ShardBoundaries" >> ShardBoundaries(per_shard)

        def assign(element, firsts):
            return shard_of(element[0], firsts), element

        manifest = (keyed
                    | "AssignShard" >> beam.Map(assign, firsts=beam.pvalue.AsSingleton(boundaries))
                    | "GroupShard" >> beam.GroupByKey()
                    | "WriteShard" >> beam.ParDo(_WriteShard(self._directory)))
        return stage_output(manifest, counts=manifest | "CountShards" >> beam.Map(lambda _: ("shards", 1)))
