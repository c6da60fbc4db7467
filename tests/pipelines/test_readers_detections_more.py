"""Detections readers, continued: malformed VinVL lines, duplicates kept deterministically, strings
where lists belong, byte-order marks, Parquet schema checks and corrupt files. Each rejection is asserted by its
source (file[:line]) and reason."""
import base64
import gzip
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from click.testing import CliRunner

import schemas
from pipelines.deadletter import message
from pipelines.cli import main
from pipelines.files import stable_id
from pipelines.readers.detection_record import validate_detection
from pipelines.readers.detections import ReadDetections, _first_per_image
from pipelines.readers.vinvl import join_vinvl

from .conftest import SOFA_SENTENCES, write_jsonl

GOOD = {"image_id": "a.jpg", "width": 640, "height": 480,
        "boxes": [[0, 0, 10, 10], [5, 5, 50, 50], [1, 1, 2, 2]],
        "labels": ["sofa", "woman", "sofa"], "scores": [0.5, 0.9, 0.7]}


def _sources_and_reasons(rejected):
    return rejected | beam.Map(lambda r: (r["source"], message(r)))


def _prediction_line(image_id, label, width=200):
    objects = [{"rect": [0, 0, 20, 30], "class": label, "conf": 0.9}]
    return f"{image_id}\t" + json.dumps({"objects": objects, "image_h": 100, "image_w": width}) + "\n"


def _features_line(image_id, feats):
    return f"{image_id}\t{len(feats)}\t" + base64.b64encode(feats.astype(np.float32).tobytes()).decode() + "\n"


# 1. A VinVL prediction whose JSON is not an object used to crash the job (AttributeError).

def test_vinvl_prediction_that_is_not_an_object_is_dead_lettered(pipeline, tmp_path):
    path = tmp_path / "predictions.tsv"
    path.write_text(_prediction_line("img1", "man") + "img2\t[1, 2]\n" + "img3\t42\n" + "img4\tnull\n"
                    + 'img5\t{"objects": "man"}\n')
    out = pipeline | ReadDetections(str(path))
    assert_that(out.main | beam.Map(lambda d: d["image_id"]), equal_to(["img1"]), label="kept")
    reason = "bad VinVL line: the prediction must be a JSON object, got "
    assert_that(_sources_and_reasons(out.rejected),
                equal_to([(f"{path}:2", reason + "list"), (f"{path}:3", reason + "int"), (f"{path}:4", reason + "NoneType"),
                          (f"{path}:5", "bad VinVL line: 'objects' must be a list of JSON objects")]), label="rejected")
    pipeline.run()


# 2. VinVL duplicates: the first line by (file, line) wins in every run; every other line is dead-lettered.

def test_vinvl_duplicates_and_unpaired_lines_are_dead_lettered(pipeline, tmp_path):
    pred, feat = tmp_path / "predictions.tsv", tmp_path / "features.tsv"
    first, second = np.full((1, 4), 1.0), np.full((1, 4), 2.0)
    pred.write_text(_prediction_line("img1", "man") + _prediction_line("img1", "dog") + _prediction_line("img2", "cat"))
    feat.write_text(_features_line("img1", first) + _features_line("img1", second) + _features_line("img3", first))
    out = pipeline | ReadDetections(str(pred))

    def check(dets):
        (det,) = dets
        assert det["image_id"] == "img1" and det["labels"] == ["man"]
        np.testing.assert_array_equal(det["features"], first)

    assert_that(out.main | beam.combiners.ToList(), lambda got: check(got[0]), label="kept")
    assert_that(_sources_and_reasons(out.rejected), equal_to([
        (f"{pred}:2", f"duplicate image_id: 'img1' in VinVL predictions also at {pred}:1, which is kept"),
        (f"{feat}:2", f"duplicate image_id: 'img1' in VinVL features also at {feat}:1, which is kept"),
        (f"{pred}:3", "VinVL prediction without a features line: image_id 'img2'"),
        (f"{feat}:3", "VinVL features without a prediction line: image_id 'img3'"),
    ]), label="rejected")
    pipeline.run()


def _outputs(results):
    """(detections, [(source, reason)]) from a FlatMap function's yields (a detection may come
    with its file:line, as (where, detection))."""
    results = list(results)
    kept = [r[1] if isinstance(r, tuple) else r for r in results if not isinstance(r, beam.pvalue.TaggedOutput)]
    rejected = [(r.value["source"], message(r.value)) for r in results if isinstance(r, beam.pvalue.TaggedOutput)]
    return kept, rejected


def test_join_vinvl_keeps_the_same_line_whatever_the_group_order():
    def prediction(line, label):
        return (("p.tsv", line), {"image_id": "img1", "width": 10, "height": 10, "boxes": [[0, 0, 1, 1]],
                                  "labels": [label], "scores": [0.5]}, True)

    predictions = [prediction(10, "dog"), prediction(9, "man")]  # line 9 < line 10, not "9" > "10"
    features = [(("f.tsv", 2), np.full((1, 4), 2.0, np.float32)), (("f.tsv", 1), np.full((1, 4), 1.0, np.float32))]
    for order in (1, -1):
        kept, rejected = _outputs(join_vinvl(("img1", {"predictions": predictions[::order], "features": features[::order]})))
        assert [(d["labels"], d["features"][0, 0]) for d in kept] == [(["man"], 1.0)]
        assert rejected == [("p.tsv:10", "duplicate image_id: 'img1' in VinVL predictions also at p.tsv:9, which is kept"),
                            ("f.tsv:2", "duplicate image_id: 'img1' in VinVL features also at f.tsv:1, which is kept")]


# 3. A string where a list belongs used to be split into characters.

@pytest.mark.parametrize("change, message", [
    ({"labels": "cat"}, "field 'labels' must be a list: labels is str 'cat'"),
    ({"boxes": "abc"}, "field 'boxes' must be a list: boxes is str"),
    ({"scores": "0.5"}, "field 'scores' must be a list: scores is str"),
    ({"labels": {"a": 1, "b": 2, "c": 3}}, "field 'labels' must be a list: labels is dict"),
    ({"boxes": ["0123", [0, 0, 1, 1], [0, 0, 1, 1]]}, "field 'boxes' must be a list: boxes[0] is str"),
    ({"boxes": [[0, 0, 1, float("nan")], [0, 0, 1, 1], [0, 0, 1, 1]]}, "field 'boxes' must be a finite number: boxes[0] = nan"),
    ({"labels": ["sofa", 7, "sofa"]}, "a label must be a non-empty string: labels[1] = 7"),
    ({"scores": [0.1, float("inf"), 0.2]}, "field 'scores' must be a finite number: scores[1] = inf"),
    ({"features": "abc"}, "field 'features' must be a list: features is str"),
    ({"features": [[1.0, 2.0], [1.0], [1.0, 2.0]]}, "field 'features' must be a [regions, dim] array of numbers"),
    ({"width": 640.5}, "field 'width' must be an integer: width = 640.5"),
    ({"height": -1}, "must be positive"),
])
def test_validate_detection_rejects_wrong_types_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_detection({**GOOD, **change})


def test_validate_detection_accepts_numpy_boxes_and_features():
    det = validate_detection({**GOOD, "boxes": np.array(GOOD["boxes"], np.float32), "features": np.ones((3, 2))})
    assert det["boxes"][1] == [5.0, 5.0, 50.0, 50.0] and det["features"].dtype == np.float32


def test_string_labels_are_dead_lettered_with_file_and_line(pipeline, tmp_path):
    path = write_jsonl(tmp_path / "dets.jsonl", [{**GOOD, "image_id": "ok.jpg"}, {**GOOD, "labels": "cat"}])
    out = pipeline | ReadDetections(path)
    assert_that(out.main | beam.Map(lambda d: d["image_id"]), equal_to(["ok.jpg"]), label="kept")
    assert_that(_sources_and_reasons(out.rejected),
                equal_to([(f"{path}:2", "field 'labels' must be a list: labels is str 'cat'")]), label="rejected")
    pipeline.run()


# 4. A UTF-8 byte-order mark opening a file must not stick to the first record.

def test_byte_order_mark_does_not_stick_to_detection_ids(pipeline, tmp_path):
    vinvl = tmp_path / "predictions.tsv"
    vinvl.write_bytes(b"\xef\xbb\xbf" + _prediction_line("img1", "man").encode())
    jsonl = tmp_path / "dets.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    out = pipeline | ReadDetections(f"{vinvl},{jsonl}")
    assert_that(out.main | beam.Map(lambda d: d["image_id"]), equal_to(["img1", "a.jpg"]), label="ids")
    assert_that(out.rejected, equal_to([]), label="none rejected")
    pipeline.run()


# 5. Parquet detections: our files must be this schema version with DETECTIONS' columns; a user's own
#    file needs the required columns; rows are still validated one by one.

def _ours(rows, version=schemas.SCHEMA_VERSION):
    schema = schemas.DETECTIONS.with_metadata({**schemas.DETECTIONS.metadata, schemas.VERSION_KEY: str(version).encode()})
    return pa.Table.from_pylist(rows, schema=schema)


def test_parquet_detections_are_checked_against_the_schema(pipeline, tmp_path):
    feats = np.ones((3, 2)).tolist()
    pq.write_table(_ours([{**GOOD, "image_id": "ours.jpg", "features": feats}]), tmp_path / "ours.parquet")
    pq.write_table(_ours([{**GOOD, "image_id": "future.jpg", "features": feats}], version=3), tmp_path / "future.parquet")
    wrong_type = pa.Table.from_pylist([{**GOOD, "image_id": "wrongtype.jpg", "features": feats}],
                                      schema=schemas.DETECTIONS.set(1, pa.field("width", pa.int64())))
    pq.write_table(wrong_type, tmp_path / "wrongtype.parquet")
    user = pa.Table.from_pylist([{**GOOD, "image_id": "user.jpg", "camera": "x"},       # int64/double, no features
                                 {**GOOD, "image_id": "userbad.jpg", "labels": ["sofa"]}])
    pq.write_table(user, tmp_path / "user.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in GOOD.items() if k not in ("labels", "scores")}]),
                   tmp_path / "nolabels.parquet")
    out = pipeline | ReadDetections(f"{tmp_path}/*.parquet")
    assert_that(out.main | beam.Map(lambda d: (d["image_id"], d["features"] is None)),
                equal_to([("ours.jpg", False), ("user.jpg", True)]), label="kept")
    assert_that(_sources_and_reasons(out.rejected), equal_to([
        (f"{tmp_path}/future.parquet", "wrong schema: schema_version 3 but this code reads version 1 or 2"),
        (f"{tmp_path}/wrongtype.parquet", "wrong schema: wrong column type(s) width: int64 (expected int32)"),
        (f"{tmp_path}/nolabels.parquet", "wrong schema: missing column(s) ['labels', 'scores']; detections need "
                                         "['image_id', 'width', 'height', 'boxes', 'labels', 'scores'] and optionally 'features'"),
        (f"{tmp_path}/user.parquet:row 1", "boxes/labels/scores lengths differ: 3/1/3"),
    ]), label="rejected")
    pipeline.run()


def test_run_whose_every_detections_file_is_rejected_fails_with_zero_valid_images(tmp_path):
    pq.write_table(_ours([{**GOOD, "features": None}], version=3), tmp_path / "future.parquet")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(SOFA_SENTENCES) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", str(tmp_path / "future.parquet"),
                                       "--text", str(text), "--output", str(tmp_path / "out"), "--no-shards"])
    assert result.exit_code == 1
    assert "zero valid images" in result.output


# 6. Duplicates that differ only in their features are picked by content, not arrival order.

def test_first_per_image_picks_by_features_too():
    records = [(f"d.jsonl:{v:.0f}", validate_detection({**GOOD, "features": np.full((3, 2), v)})) for v in (1.0, 2.0)]
    picks = set()
    for order in (1, -1):
        kept, rejected = _outputs(_first_per_image(("a.jpg", records[::order])))
        (det,) = kept
        picks.add(float(det["features"][0, 0]))
        assert rejected == [("d.jsonl:1", "duplicate image_id: 'a.jpg' also at d.jsonl:2, which is kept")]
    assert len(picks) == 1


# 7. Corrupt or truncated files are dead-lettered under their own name; the other files go on.

def test_truncated_gzip_keeps_the_lines_before_and_names_the_file(pipeline, tmp_path):
    ids = [f"img{i:04d}-{stable_id(str(i))}.jpg" for i in range(300)]
    data = gzip.compress("".join(json.dumps({**GOOD, "image_id": i}) + "\n" for i in ids).encode())
    truncated = tmp_path / "dets.jsonl.gz"
    truncated.write_bytes(data[:len(data) // 2])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    out = pipeline | ReadDetections(f"{truncated},{tmp_path}/broken.parquet")

    def a_prefix_of_the_ids(got):
        got = sorted(got)
        assert got and got == ids[:len(got)], got[:3]

    assert_that(out.main | beam.Map(lambda d: d["image_id"]) | beam.combiners.ToList(),
                lambda lists: a_prefix_of_the_ids(lists[0]), label="kept")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(":")[0])),
                equal_to([(str(truncated), "unreadable file"),
                          (f"{tmp_path}/broken.parquet", "unreadable Parquet file")]), label="rejected")
    pipeline.run()
