"""Issue 17, the pipeline's side: absurd finite values, mixed feature widths and duplicates
named at both places (docs/reliability.md lists each class with its test)."""
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipelines.deadletter import message
from pipelines.build import OneFeatureWidth, corpus_feature_width
from pipelines.readers.detection_record import BOXES_CLIPPED, validate_detection
from pipelines.readers.detections import ReadDetections

from .conftest import write_jsonl

IMAGE = {"image_id": "a.jpg", "width": 100, "height": 50, "labels": ["sofa"], "scores": [0.9]}


# 2. Absurd finite values: boxes are checked against the image, features and scores against the
# range the shards and tables store.

def test_a_box_a_little_outside_the_image_is_clipped_and_counted():
    det = validate_detection({**IMAGE, "boxes": [[-2, -1, 103, 52]]})  # within 5% of each side
    assert det["boxes"] == [[0.0, 0.0, 100.0, 50.0]] and det[BOXES_CLIPPED] == 1
    inside = validate_detection({**IMAGE, "boxes": [[0, 0, 100, 50]]})
    assert inside[BOXES_CLIPPED] == 0


@pytest.mark.parametrize("box, message", [
    ([0, 0, 1e30, 10], "box outside the image: boxes[1] = [0.0, 0.0, 1e+30, 10.0] for a 100x50 image"),
    ([-20, 0, 10, 10], "box outside the image: boxes[1] = [-20.0, 0.0, 10.0, 10.0]"),
    ([0, 0, 10, 60], "box outside the image: boxes[1] = [0.0, 0.0, 10.0, 60.0]"),
    ([10, 10, 10, 20], "box without area: boxes[1] = [10.0, 10.0, 10.0, 20.0]"),
    ([30, 10, 20, 20], "box without area: boxes[1]"),
    ([101, 0, 104, 10], "box without area: boxes[1]"),  # within the tolerance, but nothing inside the image
])
def test_a_box_far_outside_or_without_area_is_rejected_naming_it(box, message):
    record = {**IMAGE, "boxes": [[0, 0, 10, 10], box], "labels": ["sofa", "cat"], "scores": [0.9, 0.8]}
    with pytest.raises(ValueError) as err:
        validate_detection(record)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("change, message", [
    ({"features": [[1e30, 0.0]]}, "features beyond the float16 range the shards store: features[0][0] = 1e+30"),
    ({"scores": [1e39]}, "field 'scores' is beyond the float32 range the tables store: scores[0] = 1e+39"),
    ({"width": 1e30}, "width/height must be positive int32 values"),
])
def test_values_the_corpus_cannot_store_are_rejected(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        validate_detection({**IMAGE, "boxes": [[0, 0, 10, 10]], **change})


def test_read_detections_dead_letters_absurd_boxes_and_counts_the_clipped(pipeline, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {**IMAGE, "boxes": [[0, 0, 10, 10]]},
        {**IMAGE, "image_id": "clipped.jpg", "boxes": [[-1, 0, 10, 10]]},
        {**IMAGE, "image_id": "absurd.jpg", "boxes": [[0, 0, 1e30, 10]]},
    ])
    out = pipeline | ReadDetections(path)
    assert_that(out.main | beam.Map(lambda d: (d["image_id"], d["boxes"], BOXES_CLIPPED in d)),
                equal_to([("a.jpg", [[0, 0, 10, 10]], False), ("clipped.jpg", [[0, 0, 10, 10]], False)]),
                label="kept")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(":")[0])),
                equal_to([(f"{path}:3", "box outside the image")]), label="rejected")
    assert_that(out.counts, equal_to([(BOXES_CLIPPED, 1)]), label="counts")
    pipeline.run()


def test_precomputed_regions_are_sorted_by_score_and_capped_at_max_regions(pipeline, tmp_path):
    """The trainer keeps the first max_regions regions: precomputed detections are put highest
    score first (ties by label) and capped, features alike, as the detector's are; the dropped counted."""
    boxes = [[0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 30, 30], [0, 0, 40, 40]]
    path = write_jsonl(tmp_path / "d.jsonl", [{**IMAGE, "boxes": boxes, "labels": ["cup", "sofa", "cat", "dog"],
                                              "scores": [0.1, 0.9, 0.5, 0.5],
                                              "features": [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]}])
    out = pipeline | ReadDetections(path, max_regions=3)
    assert_that(out.main | beam.Map(lambda d: (d["labels"], d["scores"], d["boxes"], d["features"][:, 0].tolist())),
                equal_to([(["sofa", "cat", "dog"], [0.9, 0.5, 0.5], [boxes[1], boxes[2], boxes[3]], [2.0, 3.0, 4.0])]))
    assert_that(out.counts, equal_to([("regions_over_max", 1)]), label="counts")
    pipeline.run()


def test_a_reason_is_a_stable_class_one_stats_key_and_counter_per_kind_of_fault(pipeline, tmp_path):
    """Values, indices and ids go in the dead letter's detail, never in its reason: six bad records
    of three kinds are three keys in stats.json and three Beam counters, not six."""
    from apache_beam.metrics.metric import MetricsFilter

    from pipelines.build import _reject_stats

    box = {"boxes": [[0, 0, 10, 10], [0, 0, 5, 5]], "scores": [0.9, 0.8]}
    path = write_jsonl(tmp_path / "d.jsonl", [
        {**IMAGE, **box, "image_id": "l0.jpg", "labels": [7, "cat"]},
        {**IMAGE, **box, "image_id": "l1.jpg", "labels": ["cat", ""]},
        {**IMAGE, **box, "image_id": "w.jpg", "labels": ["a", "b"], "width": 0},
        {**IMAGE, **box, "image_id": "h.jpg", "labels": ["a", "b"], "height": -3},
        {**IMAGE, **box, "image_id": {"a": 1}, "labels": ["a", "b"]},
        {**IMAGE, **box, "image_id": ["x: y"], "labels": ["a", "b"]},
    ])
    out = pipeline | ReadDetections(path)
    assert_that(out.rejected | beam.FlatMap(_reject_stats) | beam.Keys() | beam.Distinct(), equal_to([
        "rejected/read_detections: a label must be a non-empty string",
        "rejected/read_detections: width/height must be positive int32 values",
        "rejected/read_detections: field 'image_id' must be a non-empty string"]))
    assert_that(out.rejected | "Details" >> beam.Map(lambda r: r["detail"].split(" = ")[0].split(", got")[0]),
                equal_to(["labels[0]", "labels[1]", "got 0x50", "got 100x-3", "got {'a': 1}", "got ['x: y']"]),
                label="details")
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("rejected"))["counters"]
    assert sorted({c.key.metric.name for c in counters}) == [
        "read_detections: a label must be a non-empty string", "read_detections: field 'image_id' must be a non-empty string",
        "read_detections: width/height must be positive int32 values"]


# 3. One feature width per corpus, chosen the same way whatever the order or the workers.

def test_the_corpus_width_is_the_most_common_ties_to_the_smaller():
    assert corpus_feature_width([(2048, 3), (1280, 5)]) == 1280
    assert corpus_feature_width([(2048, 4), (1280, 4)]) == 1280
    assert corpus_feature_width([(1280, 4), (2048, 4)]) == 1280
    assert corpus_feature_width([]) is None


def test_images_of_another_feature_width_are_dead_lettered_with_both_widths(pipeline):
    def detection(image_id, width):
        return {"image_id": image_id, "features": np.zeros((2, width), np.float32)}

    checked = (pipeline | beam.Create([detection("a", 8), detection("b", 8), detection("c", 4)])
               | OneFeatureWidth())
    assert_that(checked.main | beam.Map(lambda d: d["image_id"]), equal_to(["a", "b"]), label="kept")
    assert_that(checked.rejected | beam.Map(lambda r: (r["source"], message(r).split(" (")[0])),
                equal_to([("c", "feature width differs from the corpus's: 4, expected 8")]), label="rejected")
    pipeline.run()


# 8. A duplicate image_id names both occurrences.

def test_a_duplicate_image_id_names_both_files_and_lines(pipeline, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{**IMAGE, "boxes": [[0, 0, 10, 10]]}])
    second = write_jsonl(tmp_path / "b.jsonl", ["", {**IMAGE, "boxes": [[0, 0, 20, 20]]}])
    out = pipeline | ReadDetections(f"{tmp_path}/*.jsonl")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], message(r))),
                equal_to([(f"{second}:2", f"duplicate image_id: 'a.jpg' also at {first}:1, which is kept")]))
    pipeline.run()


# 4. A pickled word-vector file runs code when loaded: refused unless the user vouches for it.

class _Payload:
    """Unpickling this creates the file named by `marker`: what a crafted .kv could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_kv_file_is_refused_without_the_trust_flag_and_nothing_runs(tmp_path):
    import pickle

    from pipelines.link import load_word_vectors
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "vectors.kv"
    crafted.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="a pickle: loading it runs any code.*word2vec binary.*--trust-pickled-vectors"):
        load_word_vectors(str(crafted))
    assert not marker.exists()


def test_build_refuses_a_kv_file_before_the_pipeline_runs(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main
    (tmp_path / "vectors.kv").write_bytes(b"not even read")
    (tmp_path / "d.jsonl").write_text("")  # inputs that exist: the input checks come first
    (tmp_path / "t.txt").write_text("")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", str(tmp_path / "d.jsonl"), "--text",
                                       str(tmp_path / "t.txt"), "--output", str(tmp_path / "out"),
                                       "--word-vectors", str(tmp_path / "vectors.kv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is a gensim .kv file, a pickle" in result.output and "running" not in result.output


# 6. Edges of the output folder: refused before anything runs, in one line; a half-published
# folder is recognised by any reader.

def _build(tmp_path, output, *extra, detections=None, text=None):
    from click.testing import CliRunner

    from pipelines.cli import main
    if detections is None:
        detections = write_jsonl(tmp_path / "d.jsonl", [{**IMAGE, "boxes": [[0, 0, 10, 10]]}])
    if text is None:
        text = tmp_path / "t.txt"
        text.write_text("A woman sits on a red sofa.\n")
    return CliRunner().invoke(main, ["build-retrieval", "--detections", str(detections), "--text", str(text),
                                     "--output", str(output), "--no-shards", "--k", "1", *extra])


def _refused_in_one_line(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "running build-retrieval" not in result.output
    (line,) = result.output.strip().splitlines()
    assert message in line, line


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path):
    from .test_publish import tree, write
    users = {"stats.json": "my own stats", "shards/README.txt": "my notes"}
    write(str(tmp_path / "mine"), users)
    result = _build(tmp_path, tmp_path / "mine")
    _refused_in_one_line(result, "is not empty and was not written by vlp-data")
    assert "--overwrite" in result.output
    assert tree(str(tmp_path / "mine")) == users


def test_overwrite_takes_a_users_folder_and_marks_it_ours(tmp_path):
    from pipelines import build
    from .test_publish import write
    write(str(tmp_path / "mine"), {"notes.txt": "kept"})
    with pytest.raises(build.OutputError):
        build.claim_output(str(tmp_path / "mine"))
    build.claim_output(str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / build.OUTPUT_MARKER).exists()
    build.claim_output(str(tmp_path / "mine"))  # ours from now on: no flag needed
    build.claim_output(str(tmp_path / "new" / "folder"))  # a new folder is made and marked
    assert (tmp_path / "new" / "folder" / build.OUTPUT_MARKER).exists()


def test_an_output_that_is_a_file_fails_in_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    _refused_in_one_line(_build(tmp_path, tmp_path / "out"), "is a file, not a folder")
    _refused_in_one_line(_build(tmp_path, tmp_path / "out" / "sub"), "cannot be written: [Errno 20] Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_fails_in_one_line(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    _refused_in_one_line(_build(tmp_path, tmp_path / "ro"), "cannot be written: [Errno 13] Permission denied")


def test_an_output_on_a_read_only_filesystem_fails_in_one_line(tmp_path, monkeypatch):
    from pipelines import build

    def read_only(path, *_, **__):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(build.FileSystems, "create", read_only)
    _refused_in_one_line(_build(tmp_path, tmp_path / "out"), "cannot be written: [Errno 30] Read-only file system")


def test_an_input_glob_that_matches_nothing_fails_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "*.jsonl"
    _refused_in_one_line(_build(tmp_path, tmp_path / "out", detections=missing),
                         f"--detections '{missing}': matches no file")
    _refused_in_one_line(_build(tmp_path, tmp_path / "out", text=f"{tmp_path}/t*.txt,{tmp_path}/none-*.txt"),
                         f"--text '{tmp_path}/none-*.txt': matches no file")


def test_a_reader_recognises_a_half_published_corpus(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipelines import build
    from pipelines.cli import main
    from schemas.corpus import HalfPublishedError, check_published

    from .test_publish import EXPECTED, staged_run, tree
    out = staged_run(tmp_path)
    check_published(out)  # staged but not publishing: the old corpus is whole
    real_replace = os.replace

    calls = []

    def killed_after_the_first_move(src, dst):  # the first replace puts the journal in place
        calls.append(dst)
        if len(calls) == 2:
            monkeypatch.setattr(build.os, "replace", _killed)
        real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", killed_after_the_first_move)
    with pytest.raises(KeyboardInterrupt):
        build.publish(out, build.BUILD_ENTRIES)
    monkeypatch.setattr(build.os, "replace", real_replace)
    with pytest.raises(HalfPublishedError, match="half-published.*vlp-data finish-publish"):
        check_published(out)
    result = CliRunner().invoke(main, ["finish-publish", out])
    assert result.exit_code == 0 and "finished the interrupted publish" in result.output
    check_published(out)
    assert tree(out) == EXPECTED


def _killed(*_):
    raise KeyboardInterrupt("killed")


def test_a_damaged_publish_journal_is_dropped_not_a_dead_end(tmp_path):
    """The journal is written whole (a temporary file renamed) before anything moves; one damaged
    anyway is dropped with a warning, so finish-publish and the next build do not crash on it and
    the folder reads again (it still holds the earlier run)."""
    from click.testing import CliRunner

    from pipelines.cli import main
    from schemas.corpus import PUBLISH_JOURNAL, STAGING, check_published

    from .test_publish import staged_run, tree
    out = staged_run(tmp_path)
    before = tree(out)
    with open(os.path.join(out, STAGING, PUBLISH_JOURNAL), "w") as f:
        f.write('{"entries": ["sha')  # cut short
    result = CliRunner().invoke(main, ["finish-publish", out])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    check_published(out)  # no journal: readable again
    assert tree(out) == before
