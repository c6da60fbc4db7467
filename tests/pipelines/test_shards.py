"""WriteShards / WriteTable: deterministic bytes, exact shard sizes, bare-webdataset readable."""
import glob

import apache_beam as beam
import numpy as np
import pytest
import webdataset as wds

import schemas
from pipelines.options import ShardOptions
from pipelines.shards import (ShardBoundaries, WriteShards, WriteTable, key_range, range_offsets, sample_key,
                              shard_firsts_in_range, shard_of)

from .conftest import RUNNER


def _samples(n):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sample = {"schema_version": 1, "image_id": f"img.{i}.jpg", "width": 100, "height": 80,
                  "boxes": [[1.0, 2.0, 30.0, 40.0]], "tags": ["cat"], "scores": [0.75],
                  "sentences": [{"sentence_id": "s1", "text": "a cat", "rank": 0, "score": 0.5,
                                 "phrases": [{"text": "a cat", "start": 0, "end": 5, "words": ["cat"],
                                              "region": 0, "tag": "cat", "similarity": 1.0}]}]}
        out.append((sample, rng.random((1, 8)).astype(np.float16)))
    return out


def _write(tmp_path, name, samples, per_shard, shuffle_seed):
    order = np.random.default_rng(shuffle_seed).permutation(len(samples))
    with beam.Pipeline(runner=RUNNER) as p:
        manifest = (p | beam.Create([samples[i] for i in order]) | WriteShards(str(tmp_path / name), ShardOptions(per_shard))).main
        _ = manifest | beam.combiners.ToList() | beam.Map(lambda rows: (tmp_path / f"{name}.rows").write_text(repr(sorted(r["shard"] for r in rows))))
    return sorted(glob.glob(str(tmp_path / name / "shards" / "*.tar")))


def test_shards_are_deterministic_sized_and_readable(tmp_path):
    samples = _samples(23)
    first = _write(tmp_path, "a", samples, per_shard=10, shuffle_seed=1)
    second = _write(tmp_path, "b", samples, per_shard=10, shuffle_seed=2)
    assert [p.rsplit("/", 1)[1] for p in first] == ["corpus-000000.tar", "corpus-000001.tar", "corpus-000002.tar"]
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]

    read = list(wds.WebDataset(first, shardshuffle=False).decode())
    assert len(read) == 23
    keys = [s["__key__"] for s in read]
    assert keys == sorted(sample_key(f"img.{i}.jpg") for i in range(23))  # sorted across shards
    by_id = {s["image_id"]: (s, f) for s, f in samples}
    for s in read:
        original, feats = by_id[s["json"]["image_id"]]
        assert s["json"] == original
        np.testing.assert_array_equal(s["feats.npy"], feats)
        schemas.validate_sample(s["json"], s["feats.npy"])


def _boundaries_by_range(keys, per_shard):
    """ShardBoundaries' arithmetic without Beam: count, offset and cut each key range."""
    ranges = {}
    for key in keys:
        ranges.setdefault(key_range(key), []).append(key)
    offsets = range_offsets([(name, len(ks)) for name, ks in ranges.items()])
    return sorted(k for name, ks in ranges.items() for k in shard_firsts_in_range(ks, offsets[name], per_shard))


def test_shard_boundaries_by_range_are_the_sorted_keys_cut_every_shard_size():
    keys = [sample_key(f"img{i}.jpg") for i in range(20_000)]  # ~5 keys in each of the 4,096 ranges
    ranked = sorted(keys)
    assert max(len([k for k in keys if key_range(k) == r]) for r in {key_range(k) for k in keys[:50]}) > 1
    for per_shard in (1, 2, 3, 7, 10, 999, 1000, 19_999, 20_000, 50_000):
        boundaries = _boundaries_by_range(keys, per_shard)
        assert boundaries == ranked[::per_shard]
        assert len(boundaries) == -(-len(keys) // per_shard)  # what every worker holds: one key a shard
        assert [shard_of(k, boundaries) for k in ranked] == [i // per_shard for i in range(len(ranked))]


def test_shard_boundaries_transform_matches_on_any_keys(tmp_path):
    # Ids whose keys share ranges (sample keys of 3,000 images) and plain strings of other lengths.
    keys = [sample_key(f"img{i}.jpg") for i in range(3000)] + ["a", "ab", "abc", "abcd", "abc0", "b", ""]
    with beam.Pipeline(runner=RUNNER) as p:
        for per_shard in (1, 7, 1000):
            _ = (p | f"Keys{per_shard}" >> beam.Create(keys[::-1])
                 | f"Cut{per_shard}" >> ShardBoundaries(per_shard)
                 | f"Save{per_shard}" >> beam.Map(lambda b, n=per_shard: (tmp_path / f"{n}.txt").write_text(repr(b))))
        _ = p | beam.Create([]) | "Empty" >> ShardBoundaries(5) | beam.Map(lambda b: (tmp_path / "empty.txt").write_text(repr(b)))
    for per_shard in (1, 7, 1000):
        assert eval((tmp_path / f"{per_shard}.txt").read_text()) == sorted(keys)[::per_shard]
    assert eval((tmp_path / "empty.txt").read_text()) == []


@pytest.mark.parametrize("rows, per_file, files", [(12, 5, 3), (12, 100, 1), (0, 5, 1)])
def test_write_table_file_count_follows_the_rows_and_every_file_is_sorted(tmp_path, rows, per_file, files):
    rows = [{"sentence_id": f"s{i:02d}", "text": f"t{i}"} for i in range(rows)]
    written = {}
    for name, order in (("a", rows[::-1]), ("b", rows)):  # any input order: the same bytes
        with beam.Pipeline(runner=RUNNER) as p:
            _ = p | beam.Create(order) | WriteTable(str(tmp_path / name), "sentences", schemas.SENTENCES,
                                                    lambda r: r["sentence_id"], rows_per_file=per_file)
        written[name] = sorted(glob.glob(str(tmp_path / name / "sentences" / "*.parquet")))
    assert [p.rsplit("/", 1)[1] for p in written["a"]] == [f"sentences-{i:05d}-of-{files:05d}.parquet" for i in range(files)]
    assert [open(p, "rb").read() for p in written["a"]] == [open(p, "rb").read() for p in written["b"]]
    got = [schemas.read_table(f, schemas.SENTENCES).to_pylist() for f in written["a"]]  # empty files have the schema
    assert sorted(r["sentence_id"] for t in got for r in t) == [r["sentence_id"] for r in rows]
    assert all(t == sorted(t, key=lambda r: r["sentence_id"]) for t in got)
