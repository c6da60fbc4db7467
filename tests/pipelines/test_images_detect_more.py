"""Review fixes: unique image ids, decode/detector failures dead-lettered, feature-layer checks,
float16 saturation, and the sample images written atomically."""
import io
import os
import struct
import tarfile

import apache_beam as beam
import cv2
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import skimage.data
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.deadletter import message
from pipelines.detect import FEATURE_DIM, DetectRegions, YoloDetector, bundled_model_files, decode_image, to_float16
from pipelines.images import ReadImages
from pipelines.options import DetectOptions
from pipelines.sample import prepare_sample


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _counter(result, name):
    counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in counters)


# ---------------------------------------------------------------------------------------------
# ReadImages: ids


def test_two_img2dataset_folders_and_same_named_files_get_distinct_ids(pipeline, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _tar(tmp_path / folder / "00000.tar", [("000001.jpg", f"{folder}-one".encode()), ("000001.json", b"{}")])
        (tmp_path / folder / "x.jpg").write_bytes(f"{folder}-x".encode())
    out = pipeline | ReadImages(",".join(f"{tmp_path}/{f}/*.{ext}" for f in ("a", "b") for ext in ("tar", "jpg")))
    assert_that(out.main | beam.Map(lambda e: (e[0], e[1])),
                equal_to([("a/00000.tar/000001.jpg", b"a-one"), ("b/00000.tar/000001.jpg", b"b-one"),
                          ("a/x.jpg", b"a-x"), ("b/x.jpg", b"b-x")]), label="images")
    assert_that(out.rejected, equal_to([]), label="rejected")
    pipeline.run()


def test_img2dataset_sidecar_files_are_skipped_not_rejected_as_images(pipeline, tmp_path):
    """img2dataset's "files" layout: KEY.jpg beside KEY.json and KEY.txt, a .parquet and _stats.json
    per shard. The sidecars are not images: never dead-lettered, so never counted in images_in."""
    (tmp_path / "000001.jpg").write_bytes(b"one")
    for name in ("000001.json", "000001.txt", "00000.parquet", "00000_stats.json"):
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    out = pipeline | ReadImages(f"{tmp_path}/*")
    assert_that(out.main | beam.Map(lambda e: e[0]), equal_to(["000001.jpg"]), label="images")
    assert_that(out.rejected | beam.Map(lambda r: os.path.basename(r["source"])), equal_to(["notes.pdf"]),
                label="rejected")
    result = pipeline.run()
    result.wait_until_finish()
    assert _counter(result, "skipped_sidecars") == 4


def test_a_repeated_image_id_is_kept_once_and_the_rest_dead_lettered(pipeline, tmp_path):
    # A tar may hold one name twice (tar --append): same id, same source; the smaller bytes win.
    _tar(tmp_path / "00000.tar", [("000001.jpg", b"second"), ("000002.jpg", b"two"), ("000001.jpg", b"first")])
    out = pipeline | ReadImages(f"{tmp_path}/*.tar")
    assert_that(out.main | beam.Map(lambda e: (e[0], e[1], os.path.basename(e[2]))),
                equal_to([("00000.tar/000001.jpg", b"first", "00000.tar:000001.jpg"),
                          ("00000.tar/000002.jpg", b"two", "00000.tar:000002.jpg")]), label="images")
    source = f"{tmp_path}/00000.tar:000001.jpg"
    assert_that(out.rejected | beam.Map(lambda r: (r["stage"], r["source"], message(r))),
                equal_to([("read_images", source, f"duplicate image_id: '00000.tar/000001.jpg' also at {source}, which is kept")]),
                label="rejected")
    result = pipeline.run()
    result.wait_until_finish()
    assert _counter(result, "duplicate_image_id") == 1 and _counter(result, "images") == 3


# ---------------------------------------------------------------------------------------------
# decode_image: whatever Pillow raises on a bad file becomes a ValueError naming it


def _jpeg_with_exif_tag(tag: int) -> bytes:
    """A JPEG with EXIF orientation 6 whose ASCII 'Make' entry is relabelled as `tag`: Pillow
    reads it, then fails re-packing it in exif_transpose (the value is a string)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"
    data = exif.tobytes()
    make = struct.pack(">HH", 0x010F, 2) if b"MM" in data[:8] else struct.pack("<HH", 0x010F, 2)
    relabelled = struct.pack(">HH", tag, 2) if b"MM" in data[:8] else struct.pack("<HH", tag, 2)
    assert data.count(make) == 1
    return _jpeg(np.zeros((20, 40, 3), np.uint8), exif=data.replace(make, relabelled))


@pytest.mark.parametrize("tag, expected", [(0x0142, "undecodable image: struct.error: "),  # TileWidth: LONG
                                           (0x013F, "undecodable image: TypeError: ")])   # chromaticities: RATIONAL
def test_malformed_exif_is_a_value_error(tag, expected):
    with pytest.raises(ValueError) as caught:
        decode_image(_jpeg_with_exif_tag(tag))
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize("error, expected", [
    (KeyError(274), "undecodable image: KeyError: 274"),
    (IndexError("tuple index out of range"), "undecodable image: IndexError: tuple index out of range"),
    (EOFError("no more data"), "undecodable image: EOFError: no more data"),
    (ValueError("bad rational"), "undecodable image: ValueError: bad rational"),
    (struct.error("unpack requires a buffer of 4 bytes"), "undecodable image: struct.error: unpack requires a buffer of 4 bytes"),
])
def test_any_decode_failure_is_a_value_error_naming_it(monkeypatch, error, expected):
    def broken(image):
        raise error
    monkeypatch.setattr(PIL.ImageOps, "exif_transpose", broken)
    with pytest.raises(ValueError) as caught:
        decode_image(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    assert str(caught.value) == expected


def test_a_wrong_argument_type_is_not_taken_for_a_bad_file():
    with pytest.raises(TypeError):
        decode_image("a path, not bytes")


# ---------------------------------------------------------------------------------------------
# DetectRegions: one bad image never stops the job


def test_detect_regions_dead_letters_decode_detector_and_nan_failures(pipeline, monkeypatch):
    real_detect = YoloDetector.detect

    def flaky_detect(self, image):
        if image.shape[:2] == (50, 70):
            raise cv2.error("OpenCV(4.14.0) resize.cpp:4208: error: (-215:Assertion failed) !dsize.empty()")
        if image.shape[:2] == (60, 80):
            return {"width": 80, "height": 60, "boxes": [[0.0, 0.0, 10.0, 10.0]], "labels": ["cup"], "scores": [0.9],
                    "features": np.full((1, FEATURE_DIM), np.nan, np.float16)}
        return real_detect(self, image)

    monkeypatch.setattr(YoloDetector, "detect", flaky_detect)
    images = [("coffee.jpg", _jpeg(skimage.data.coffee()), "coffee.jpg"),
              ("exif.jpg", _jpeg_with_exif_tag(0x0142), "exif.jpg"),
              ("opencv.jpg", _jpeg(np.zeros((50, 70, 3), np.uint8)), "opencv.jpg"),
              ("nan.jpg", _jpeg(np.zeros((60, 80, 3), np.uint8)), "nan.jpg")]
    out = pipeline | beam.Create(images) | DetectRegions(DetectOptions())
    assert_that(out.main | beam.Map(lambda d: d["image_id"]), equal_to(["coffee.jpg"]), label="detections")
    assert_that(out.rejected | beam.Map(lambda r: (r["stage"], r["source"], message(r).split(": ")[:2])),
                equal_to([("detect", "exif.jpg", ["undecodable image", "struct.error"]),
                          ("detect", "opencv.jpg", ["detector failed", "cv2.error"]),
                          ("detect", "nan.jpg", ["non-finite region features (NaN) from the detector"])]),
                label="rejected")
    result = pipeline.run()
    result.wait_until_finish()
    assert [_counter(result, name) for name in ("undecodable", "detector_failed", "non_finite_features", "images")] \
        == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# YoloDetector: feature layers checked at load; float16 saturates


def _custom_model(tmp_path, convs: int, filters: int):
    """A Darknet cfg of `convs` 1x1 batch-norm leaky convs of `filters` each, then a YOLO head,
    with all-zero weights; conv i's activation is OpenCV layer 'leaky_{i + 1}'."""
    lines = ["[net]", "width=416", "height=416", "channels=3", ""]
    floats, channels = 0, 3
    for _ in range(convs):
        lines += ["[convolutional]", "batch_normalize=1", f"filters={filters}", "size=1", "stride=1", "pad=0",
                  "activation=leaky", ""]
        floats += 4 * filters + filters * channels
        channels = filters
    lines += ["[convolutional]", "filters=255", "size=1", "stride=1", "pad=0", "activation=linear", "",
              "[yolo]", "mask=0,1,2", "anchors=10,14, 23,27, 37,58", "classes=80", "num=3", ""]
    floats += 255 + 255 * channels
    cfg, weights = tmp_path / "custom.cfg", tmp_path / "custom.weights"
    cfg.write_text("\n".join(lines))
    weights.write_bytes(struct.pack("<iiiQ", 0, 2, 0, 0) + bytes(4 * floats))
    return DetectOptions(cfg=str(cfg), weights=str(weights), names=bundled_model_files()[2])


def test_a_cfg_without_the_feature_layers_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"custom.cfg has no layer leaky_9, leaky_13: region features pool from"):
        YoloDetector(_custom_model(tmp_path, convs=2, filters=8))


def test_a_cfg_with_other_feature_widths_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"\{'leaky_9': 8, 'leaky_13': 8\} channels, 16 in all; region features "
                                         r"must be 1280-d"):
        YoloDetector(_custom_model(tmp_path, convs=13, filters=8))


def test_to_float16_saturates_instead_of_overflowing():
    out = to_float16(np.array([[1e6, -1e6, 70000.0, 1.5]], np.float32))
    assert out.dtype == np.float16 and np.isfinite(out.astype(np.float32)).all()
    assert out.tolist() == [[65504.0, -65504.0, 65504.0, 1.5]]


def test_huge_activations_give_finite_region_features():
    detector = YoloDetector(DetectOptions())
    rows = np.zeros((1, 85), np.float32)
    rows[0, :4] = 0.5  # a box over the middle half of the letterbox
    rows[0, 5] = 0.9   # class 0, above the 0.25 threshold
    maps = [(np.full((256, 26, 26), 1e6, np.float32), 16), (np.full((1024, 13, 13), -1e6, np.float32), 32)]
    found = detector._decode(rows, 416, 416, 1.0, 0, 0, maps)
    assert found["features"].shape == (1, FEATURE_DIM)
    assert np.isfinite(found["features"].astype(np.float32)).all()
    assert set(found["features"][0, :256].tolist()) == {65504.0} and set(found["features"][0, 256:].tolist()) == {-65504.0}


# ---------------------------------------------------------------------------------------------
# prepare_sample: an interrupted write leaves no truncated image behind


def test_an_interrupted_sample_write_is_redone_by_the_next_run(tmp_path, monkeypatch):
    real_save = PIL.Image.Image.save

    def save_half_then_fail(image, fp, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(image, buffer, format="PNG")
        with open(fp, "wb") as f:
            f.write(buffer.getvalue()[:200])
        raise OSError("No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        prepare_sample(str(tmp_path))
    monkeypatch.setattr(PIL.Image.Image, "save", real_save)
    assert os.listdir(tmp_path / "images") == [] and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    prepare_sample(str(tmp_path))
    names = sorted(os.listdir(tmp_path / "images"))
    assert len(names) == 14 * 19 and "astronaut.png" in names and "coffee_crop50_r1c1.png" in names
    assert decode_image((tmp_path / "images" / "astronaut.png").read_bytes()).shape == (512, 512, 3)
