"""The one shape of a stage's output, which every stage of the pipelines returns.

A stage (a composite transform that turns the build's records into others: reading, detecting,
embedding, retrieving, making and linking samples, writing shards) returns a `StageOutput`:
`main`, what it makes; `rejected`, its dead letters (pipelines.deadletter records); `counts`,
(stats key, n) pairs that the build sums into stats.json. A stage with nothing to reject or
count returns the pipeline's one empty PCollection (`empty`) for them, so an assembly reads
every stage the same way: `.main` on to the next stage, every `.rejected` into the one
dead-letter writer, every `.counts` into the stats.

A stage says so in its docstring, not by annotating expand `-> StageOutput`: Beam reads that
annotation as an output type hint and warns that it is not a PCollection.

Helpers that make a side input (a trained index or word vectors, shard boundaries) or write
files (WriteTable, WriteFiles) are not stages: they reject and count nothing, and return their
PCollection.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam

from pipelines.deadletter import REJECTED

MAIN = "main"  # the main output's tag where a step also has a REJECTED output


class StageOutput(NamedTuple):
    main: beam.PCollection      # what the stage makes
    rejected: beam.PCollection  # dead letters (deadletter.rejection records)
    counts: beam.PCollection    # (stats.json key, n) pairs, summed over the run


_EMPTY = "_vlp_stage_empty"  # the attribute of a pipeline that holds its one empty PCollection


def empty(pipeline: beam.Pipeline) -> beam.PCollection:
    """The pipeline's one empty PCollection, made on first use and shared by every stage with
    nothing to reject or count: it reads none of the stage's elements (an empty output made from
    `main` by a FlatMap that passes nothing still visits each of them, 74M sentences for
    EmbedCorpus at BookCorpus size), and one Create([]) for the whole graph, not one per stage,
    each of which costs the local runner a stage of its own."""
    pcoll = getattr(pipeline, _EMPTY, None)
    if pcoll is None:
        pcoll = pipeline | "NothingRejectedOrCounted" >> beam.Create([])
        setattr(pipeline, _EMPTY, pcoll)
    return pcoll


def _one(pcolls: tuple, main: beam.PCollection, name: str) -> beam.PCollection:
    """Several PCollections flattened into one, or (none but the shared empty one) the shared
    empty one; the Flatten's label `name`-based, so within the calling composite it is its own."""
    made = getattr(main.pipeline, _EMPTY, None)
    pcolls = tuple(pc for pc in pcolls if pc is not made)
    if not pcolls:
        return empty(main.pipeline)
    if len(pcolls) == 1:
        return pcolls[0]
    return pcolls | f"All{name}" >> beam.Flatten()


def stage_output(main: beam.PCollection, rejected=(), counts=(), parts: Iterable[StageOutput] = ()) -> StageOutput:
    """The StageOutput of a composite, called once in its expand (the labels it adds are the
    composite's): `rejected` and `counts` a PCollection
    or a sequence of them (flattened; none: empty); `parts`, the stage outputs it was made of,
    whose dead letters and counts are this stage's too."""
    parts = tuple(parts)
    rejected = ((rejected,) if isinstance(rejected, beam.PCollection) else tuple(rejected))
    counts = ((counts,) if isinstance(counts, beam.PCollection) else tuple(counts))
    return StageOutput(main,
                       _one(tuple(part.rejected for part in parts) + rejected, main, "Rejected"),
                       _one(tuple(part.counts for part in parts) + counts, main, "Counts"))


def split_outputs(pcoll: beam.PCollection, label: str, tags: tuple[str, ...], fn, *args, **kwargs) -> tuple:
    """`pcoll | label >> FlatMap(fn, ...)` (a ParDo where `fn` is a DoFn) whose outputs tagged
    `tags` (e.g. REJECTED, COUNTS) are kept apart: (main, *those outputs in `tags`' order)."""
    step = beam.ParDo(fn, *args, **kwargs) if isinstance(fn, beam.DoFn) else beam.FlatMap(fn, *args, **kwargs)
    outputs = pcoll | label >> step.with_outputs(*tags, main=MAIN)
    return (outputs[MAIN], *(outputs[tag] for tag in tags))


def split_rejected(pcoll: beam.PCollection, label: str, fn, *args, **kwargs):
    """`pcoll | label >> FlatMap(fn, ...)` (a ParDo where `fn` is a DoFn) whose dead letters
    (deadletter.rejection) are kept apart: (main, rejected)."""
    return split_outputs(pcoll, label, (REJECTED,), fn, *args, **kwargs)
