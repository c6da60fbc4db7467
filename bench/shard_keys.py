"""The shard boundaries of WriteShards: the keys gathered on one worker vs counted and cut per key range.

    python bench/shard_keys.py                  # 1,000,000 keys, 1,000 samples a shard, median of 3

Both compute `sorted(keys)[::samples_per_shard]` (checked equal) in a Beam pipeline (FnApiRunner,
one process) over the keys of N images:
- **gathered**: `ToList` of every key, sorted on one worker (what WriteShards did before);
- **by range** (`pipelines.shards.ShardBoundaries`): keys counted per range of their first three
  characters, grouped per range, each range cut at the global ranks that start a shard; one worker
  holds only the range counts and the boundaries.
Reports wall time and the largest single element either way holds on one worker (pickled bytes and
Python objects' size, measured from the same objects), the figure that grows with the corpus.
Writes bench/results/shard_keys_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402

from bench.env import device_name, write_result  # noqa: E402
from pipelines.shards import ShardBoundaries, key_range, range_offsets  # noqa: E402
from schemas.corpus import sample_key  # noqa: E402


def gathered(keys, per_shard: int):
    return (keys | "AllKeys" >> beam.combiners.ToList()
            | "Cut" >> beam.Map(lambda ks: sorted(ks)[::per_shard]))


def by_range(keys, per_shard: int):
    return keys | ShardBoundaries(per_shard)


def timed_run(cut, keys: list[str], per_shard: int) -> tuple[float, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "boundaries.pkl")  # the runner pickles the pipeline's functions

        def save(boundaries):
            with open(out, "wb") as f:
                pickle.dump(boundaries, f)

        start = time.perf_counter()
        with beam.Pipeline(runner="FnApiRunner") as p:
            _ = cut(p | beam.Create(keys, reshuffle=False), per_shard) | beam.Map(save)
        seconds = time.perf_counter() - start
        with open(out, "rb") as f:
            return seconds, pickle.load(f)


def object_mb(obj) -> float:
    """A list/dict of strings (and ints) in memory: the container plus its items."""
    items = list(obj.items()) if isinstance(obj, dict) else obj
    size = sys.getsizeof(obj) + sum(sys.getsizeof(x) for item in items
                                    for x in (item if isinstance(item, tuple) else (item,)))
    return size / 2**20


def largest_elements(keys: list[str], boundaries: list[str]) -> dict:
    ranges: dict[str, list[str]] = {}
    for key in keys:
        ranges.setdefault(key_range(key), []).append(key)
    counts = [(name, len(ks)) for name, ks in ranges.items()]
    largest_range = max(ranges.values(), key=len)
    held = {"range_counts": counts, "range_offsets": range_offsets(counts),
            "largest_range": largest_range, "boundaries": boundaries}
    return {
        "gathered": {"all_keys": {"pickled_mb": len(pickle.dumps(keys)) / 2**20, "objects_mb": object_mb(keys)}},
        "by_range": {name: {"pickled_mb": len(pickle.dumps(obj)) / 2**20, "objects_mb": object_mb(obj),
                            "items": len(obj)} for name, obj in held.items()},
        "ranges": len(ranges),
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    keys = [sample_key(f"images/{i:09d}.jpg") for i in range(args.keys)]
    expected = sorted(keys)[::args.samples_per_shard]
    times: dict[str, list[float]] = {"gathered": [], "by_range": []}
    for _ in range(args.repeats):
        for name, cut in (("gathered", gathered), ("by_range", by_range)):
            seconds, boundaries = timed_run(cut, keys, args.samples_per_shard)
            assert boundaries == expected, f"{name}: boundaries differ from sorted(keys)[::per_shard]"
            times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s")
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "device": device_name(),
        "command": "python " + " ".join(sys.argv),
        "keys": args.keys,
        "samples_per_shard": args.samples_per_shard,
        "seconds": times,
        "median_seconds": median,
        "by_range_over_gathered": median["by_range"] / median["gathered"],
        "largest_elements": largest_elements(keys, expected),
    }
    write_result("shard_keys_cpu", result)
    return result


if __name__ == "__main__":
    main()
