"""StableBatches: batches whose composition depends on the data only, not on the runner.

Models that batch (padding, matrix shapes) can change the last bits of a result, and so a
near-tie, with the company an element keeps. Grouping by content hash into a number of groups
that follows the input count, and sorting each group, makes every element's batch the same in
every run with any number of workers.
"""
from __future__ import annotations

import hashlib

import apache_beam as beam


def group_of(key, count: int, group_size: int) -> int:
    """A deterministic group for a key: content hash modulo the number of groups."""
    groups = max(1, -(-count // group_size))
    return int(hashlib.sha1(repr(key).encode("utf-8")).hexdigest()[:8], 16) % groups


class StableBatches(beam.PTransform):
    """(key, value) -> lists of (key, value), about `group_size` long, sorted by key."""

    def __init__(self, group_size: int):
        super().__init__()
        self._group_size = max(1, group_size)

    def expand(self, keyed):
        group_size = self._group_size
        count = keyed | "Count" >> beam.combiners.Count.Globally()
        return (keyed
                | "AssignGroup" >> beam.Map(lambda kv, n: (group_of(kv[0], n, group_size), kv),
                                            n=beam.pvalue.AsSingleton(count))
                | "Group" >> beam.GroupByKey()
                | "SortGroup" >> beam.MapTuple(lambda _, items: sorted(items, key=lambda kv: repr(kv[0]))))
