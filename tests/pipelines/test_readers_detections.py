"""Detections readers (pipelines/readers/: JSONL / Parquet / VinVL) and their dead letters; tag order."""
import base64
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipelines.readers.detection_record import validate_detection
from pipelines.readers.detections import ReadDetections
from schemas.corpus import normalise_label, tag_order

from .conftest import write_jsonl

GOOD = {"image_id": "a.jpg", "width": 640, "height": 480,
        "boxes": [[0, 0, 10, 10], [5, 5, 50, 50], [1, 1, 2, 2]],
        "labels": ["sofa", "woman", "sofa"], "scores": [0.5, 0.9, 0.7]}


def _essentials(d):
    return (d["image_id"], tuple(d["labels"]), d["features"] is None)


def test_tags_deduplicated_by_best_score_then_label():
    assert tag_order(["sofa", "woman", "sofa", "lamp", "cup"], [0.5, 0.9, 0.7, 0.7, 0.9]) == ["cup", "woman", "lamp", "sofa"]
    assert tag_order([], []) == []


def test_labels_are_normalised_by_one_rule_so_case_makes_no_second_tag():
    assert normalise_label(" Dining \t Table ") == "dining table"
    # 'Person' and 'person' were two tags of one query
    assert tag_order(["Person", "person", "CUP"], [0.9, 0.95, 0.5]) == ["person", "cup"]
    det = validate_detection({"image_id": "a.jpg", "width": 10, "height": 10, "boxes": [[0, 0, 5, 5], [1, 1, 6, 6]],
                              "labels": ["Person", " TV  monitor"], "scores": [0.9, 0.8]})
    assert det["labels"] == ["person", "tv monitor"]


@pytest.mark.parametrize("change, message", [
    ({"image_id": None}, "missing field 'image_id'"),
    ({"labels": ["sofa"]}, "lengths differ: 3/1/3"),
    ({"width": 0}, "must be positive"),
    ({"boxes": [[0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]}, "a box must be [x1, y1, x2, y2]: boxes[0] = [0, 0, 1]"),
    ({"scores": [0.1, "high", 0.2]}, "field 'scores' must be a finite number: scores[1] = 'high'"),
    ({"features": [[1.0, 2.0]]}, "features must be [regions, dim], a row per region: 3 regions, got shape"),
])
def test_validate_detection_names_the_bad_field(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_detection({**GOOD, **change})


def test_read_detections_jsonl_and_parquet_with_dead_letters(pipeline, tmp_path):
    jsonl = write_jsonl(tmp_path / "dets.jsonl", [
        GOOD,
        '{"image_id": "broken.jpg", "width": ',                        # malformed JSON
        {k: v for k, v in GOOD.items() if k != "labels"} | {"image_id": "nolabels.jpg"},  # missing field
        {**GOOD, "image_id": "mismatch.jpg", "scores": [0.1]},         # length mismatch
        {**GOOD, "image_id": "a.jpg", "width": 999},                   # duplicate image id
    ])
    features = np.arange(6, dtype=np.float32).reshape(3, 2)
    pq.write_table(pa.Table.from_pylist([{**GOOD, "image_id": "b.jpg", "features": features.tolist()}]),
                   tmp_path / "more.parquet")
    out = pipeline | ReadDetections(f"{jsonl},{tmp_path}/*.parquet")
    assert_that(out.main | beam.Map(_essentials),
                # regions highest score first (keep_top_regions)
                equal_to([("a.jpg", ("woman", "sofa", "sofa"), True), ("b.jpg", ("woman", "sofa", "sofa"), False)]),
                label="valid")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(":")[0])),
                equal_to([(f"{jsonl}:2", "malformed JSON"), (f"{jsonl}:3", "missing field 'labels'"),
                          (f"{jsonl}:4", "boxes/labels/scores lengths differ"), (f"{jsonl}:5", "duplicate image_id")]),
                label="rejected")
    pipeline.run()


def test_read_detections_vinvl_tsv_pairs_features(pipeline, tmp_path):
    objects = [{"rect": [0, 0, 20, 30], "class": "man", "conf": 0.9}, {"rect": [5, 5, 40, 40], "class": "shirt", "conf": 0.6}]
    (tmp_path / "predictions.tsv").write_text(
        "img1\t" + json.dumps({"objects": objects, "image_h": 100, "image_w": 200}) + "\n"
        + "img2\tnot-json\n")
    feats = np.random.default_rng(0).random((2, 2054), dtype=np.float32)
    (tmp_path / "features.tsv").write_text("img1\t2\t" + base64.b64encode(feats.tobytes()).decode() + "\n")
    out = pipeline | ReadDetections(str(tmp_path / "predictions.tsv"))

    def check(dets):
        (det,) = dets
        assert det["image_id"] == "img1" and det["width"] == 200 and det["height"] == 100
        assert det["labels"] == ["man", "shirt"]
        np.testing.assert_array_equal(det["features"], feats[:, :2048])  # 6 geometry dims dropped

    assert_that(out.main | beam.combiners.ToList(), lambda got: check(got[0]), label="vinvl")
    assert_that(out.rejected | beam.Map(lambda r: r["source"]), equal_to([f"{tmp_path}/predictions.tsv:2"]),
                label="bad line")
    pipeline.run()


def _oscar_vinvl_files(folder, with_yaml=True):
    """The Oscar/VinVL distribution layout (e.g. coco_caption/): train.label.tsv, train.feature.tsv,
    train.hw.tsv and train.yaml, as downloaded. img3 has labels but no size line, img4 labels but no
    features line, img5 a size line only."""
    rng = np.random.default_rng(0)
    labels = {"img1": [{"class": "Man", "conf": 0.6, "rect": [0.0, 0.0, 20.0, 30.0]},
                       {"class": "shirt", "conf": 0.9, "rect": [5.0, 5.0, 40.0, 40.0]}],
              "img2": [{"class": "dog", "conf": 0.8, "rect": [1.0, 2.0, 50.0, 60.0]}],
              "img3": [{"class": "cat", "conf": 0.7, "rect": [0.0, 0.0, 5.0, 5.0]}],
              "img4": [{"class": "cup", "conf": 0.5, "rect": [0.0, 0.0, 5.0, 5.0]}]}
    feats = {"img1": rng.random((2, 2054), dtype=np.float32), "img2": rng.random((1, 2054), dtype=np.float32),
             "img3": rng.random((1, 2054), dtype=np.float32)}
    sizes = {"img1": (200, 100), "img2": (64, 80), "img4": (10, 10), "img5": (3, 3)}
    (folder / "train.label.tsv").write_text("".join(f"{i}\t{json.dumps(o)}\n" for i, o in labels.items()))
    (folder / "train.feature.tsv").write_text("".join(
        f"{i}\t" + json.dumps({"num_boxes": len(f), "features": base64.b64encode(f.tobytes()).decode()}) + "\n"
        for i, f in feats.items()))
    (folder / "train.hw.tsv").write_text("".join(f"{i}\t" + json.dumps([{"height": h, "width": w}]) + "\n"
                                                for i, (w, h) in sizes.items()))
    if with_yaml:
        (folder / "train.yaml").write_text("img: train.img.tsv\nhw: train.hw.tsv\nlabel: train.label.tsv\n"
                                           "feature: train.feature.tsv\ncaption: train_caption.json\n")
    return feats


@pytest.mark.parametrize("given", ["train.label.tsv", "train.yaml", "*.tsv"])
def test_read_detections_of_the_oscar_vinvl_distribution(pipeline, tmp_path, given):
    """X.label.tsv / X.feature.tsv (JSON with num_boxes and base64 features) / X.hw.tsv / X.yaml:
    given the label file, the yaml, or all of them, the files are read together."""
    feats = _oscar_vinvl_files(tmp_path)
    out = pipeline | ReadDetections(str(tmp_path / given))

    def check(dets):
        got = {d["image_id"]: d for d in dets}
        assert sorted(got) == ["img1", "img2"]
        img1 = got["img1"]
        assert (img1["width"], img1["height"]) == (200, 100) and img1["labels"] == ["shirt", "man"]  # by score
        np.testing.assert_array_equal(img1["features"], feats["img1"][::-1, :2048])  # regions re-ordered alike
        assert (got["img2"]["width"], got["img2"]["height"]) == (64, 80)

    assert_that(out.main | beam.combiners.ToList(), lambda got: check(got[0]), label="oscar")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"].rsplit("/", 1)[1], r["reason"])), equal_to([
        ("train.label.tsv:3", "VinVL labels without an image size"),
        ("train.label.tsv:4", "VinVL prediction without a features line")]), label="rejected")
    pipeline.run()


def test_missing_detections_file_fails_clearly(pipeline, tmp_path):
    _ = pipeline | ReadDetections(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(Exception, match="nothing-"):
        pipeline.run()
