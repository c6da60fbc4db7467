"""The one stage-output shape (pipelines/stages.py) and how the build gathers it: every dead
letter any step makes reaches the dead-letter writer, every count reaches stats.json."""
import apache_beam as beam
import pytest
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing.util import assert_that, equal_to

from pipelines import build
from pipelines.deadletter import COUNTS, REJECTED, rejection
from pipelines.options import BuildOptions, DetectOptions, LinkOptions, RetrieveOptions
from pipelines.stages import StageOutput, split_rejected, stage_output


def _odd_rejected(n):
    if n % 2:
        yield rejection("test", str(n), "odd")
    else:
        yield n


class _Halve(beam.PTransform):
    """A stage that rejects and counts nothing."""

    def expand(self, numbers):
        return stage_output(numbers | "Halve" >> beam.Map(lambda n: n // 2))


class _Count(beam.PTransform):
    """A stage that counts."""

    def expand(self, numbers):
        return stage_output(numbers, counts=numbers | "Count" >> beam.Map(lambda _: ("halved", 1)))


class _HalveEven(beam.PTransform):
    """A stage of its own dead letters and two stages."""

    def expand(self, numbers):
        even, odd = split_rejected(numbers, "Even", _odd_rejected)
        halved = even | "Halve" >> _Halve()
        counted = halved.main | "Count" >> _Count()
        return stage_output(counted.main, odd, parts=[halved, counted])


def test_a_stage_gathers_its_parts_dead_letters_and_counts_and_empty_ones_are_empty(pipeline):
    out = pipeline | beam.Create([1, 2, 3, 4]) | _HalveEven()
    assert isinstance(out, StageOutput)
    assert_that(out.main, equal_to([1, 2]), label="main")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"])), equal_to([("1", "odd"), ("3", "odd")]),
                label="rejected")
    assert_that(out.counts, equal_to([("halved", 1), ("halved", 1)]), label="counts")
    bare = pipeline | "Bare" >> beam.Create([7])
    empty = bare | "Alone" >> _Halve()
    assert_that(empty.main, equal_to([3]), label="alone")
    assert_that(empty.rejected, equal_to([]), label="no rejects")
    assert_that(empty.counts, equal_to([]), label="no counts")
    # ... and are the pipeline's one empty PCollection, which reads nothing of the stage's main
    again = empty.main | "Again" >> _Halve()
    assert empty.rejected is empty.counts is again.rejected is again.counts is out.rejected.pipeline._vlp_stage_empty
    assert id(bare) not in _upstream(empty.rejected.producer) | {id(pc) for pc in empty.rejected.producer.inputs}
    pipeline.run()


def _upstream(node) -> set:
    """The ids of every PCollection `node` reads, directly or through the steps before it."""
    seen, todo = set(), list(node.inputs) + [side.pvalue for side in node.side_inputs]
    while todo:
        pc = todo.pop()
        if id(pc) in seen:
            continue
        seen.add(id(pc))
        if pc.producer is not None:
            todo += list(pc.producer.inputs) + [side.pvalue for side in pc.producer.side_inputs]
    return seen


def _tagged_outputs_and_writer(pipeline, writer: str):
    """Every leaf step's outputs tagged REJECTED / COUNTS, and the step whose full label is `writer`."""
    class Visitor(PipelineVisitor):
        def __init__(self):
            self.tagged, self.writer = {REJECTED: [], COUNTS: []}, {}

        def visit_transform(self, node):
            for tag, pc in node.outputs.items():
                if tag in self.tagged:
                    self.tagged[tag].append((node.full_label, pc))
            self.writer[node.full_label] = node

        def enter_composite_transform(self, node):
            self.writer[node.full_label] = node

    visitor = Visitor()
    pipeline.visit(visitor)
    return visitor.tagged, visitor.writer[writer]


def _build_options(tmp_path, case: str) -> BuildOptions:
    common = dict(output=str(tmp_path / "out"), text=str(tmp_path / "t.txt"))
    if case == "images":
        return BuildOptions(images=str(tmp_path / "*.jpg"), store_images=True, **common)
    if case == "detections, no shards":
        return BuildOptions(detections=str(tmp_path / "d.jsonl"), shards=False, **common)
    return BuildOptions(detections=str(tmp_path / "d.jsonl"), store_images=True, image_root=str(tmp_path),
                        embeddings=str(tmp_path / "store"), link=LinkOptions(word_vectors="train"),
                        retrieve=RetrieveOptions(index="ivf"), **common)


@pytest.mark.parametrize("case", ["images", "detections, no shards", "detections, shards, every option"])
def test_every_dead_letter_reaches_the_writer_and_every_count_the_stats(tmp_path, case):
    """Built, not run: whatever step makes dead letters or counts, the build gathers them from
    the stages' outputs into rejected/ and stats.json (a stage's rejects are never left behind)."""
    pipeline = build.build_retrieval_pipeline(_build_options(tmp_path, case), [])
    tagged, rejected_writer = _tagged_outputs_and_writer(pipeline, "WriteRejected")
    _, stats_writer = _tagged_outputs_and_writer(pipeline, "WriteStats")
    assert tagged[REJECTED] and tagged[COUNTS]
    written, counted = _upstream(rejected_writer), _upstream(stats_writer)
    assert [label for label, pc in tagged[REJECTED] if id(pc) not in written] == []
    assert [label for label, pc in tagged[REJECTED] + tagged[COUNTS] if id(pc) not in counted] == []


@pytest.mark.parametrize("command", ["detect", "convert-detections"])
def test_every_dead_letter_of_detect_and_convert_reaches_the_writer_and_every_count_their_stats(tmp_path, command):
    if command == "detect":
        pipeline = build.build_detect_pipeline(str(tmp_path / "*.jpg"), str(tmp_path / "out"), DetectOptions(), [])
    else:
        pipeline = build.build_convert_detections_pipeline(str(tmp_path / "d.jsonl"), str(tmp_path / "out"), 36, [])
    tagged, writer = _tagged_outputs_and_writer(pipeline, "WriteRejected")
    _, stats_writer = _tagged_outputs_and_writer(pipeline, "WriteStats")
    assert tagged[REJECTED]
    if command == "convert-detections":  # ReadDetections counts clipped boxes and regions over --max-regions
        assert tagged[COUNTS]
    written, counted = _upstream(writer), _upstream(stats_writer)
    assert [label for label, pc in tagged[REJECTED] if id(pc) not in written] == []
    assert [label for label, pc in tagged[REJECTED] + tagged[COUNTS] if id(pc) not in counted] == []
