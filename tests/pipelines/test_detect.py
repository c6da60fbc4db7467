"""DetectRegions / YoloDetector (real YOLOv3-tiny) and ReadImages."""
import io
import tarfile

import apache_beam as beam
import numpy as np
import pytest
import skimage.data
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.detect import FEATURE_DIM, DetectRegions, YoloDetector, decode_image, roi_align
from pipelines.images import ReadImages
from pipelines.options import DetectOptions


@pytest.fixture(scope="module")
def detector():
    return YoloDetector(DetectOptions())


def _jpeg(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("photo, expected", [("coffee", "cup"), (None, "motorbike")])
def test_detector_finds_the_expected_coco_class(detector, photo, expected):
    image = skimage.data.coffee() if photo else skimage.data.stereo_motorcycle()[0]
    found = detector.detect(image)
    assert expected in found["labels"]
    n = len(found["boxes"])
    assert found["features"].shape == (n, FEATURE_DIM) and found["features"].dtype == np.float16
    assert np.isfinite(found["features"].astype(np.float32)).all() and np.abs(found["features"]).sum() > 0
    h, w = image.shape[:2]
    assert (found["width"], found["height"]) == (w, h)
    for x1, y1, x2, y2 in found["boxes"]:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert found["scores"] == sorted(found["scores"], reverse=True) and min(found["scores"]) >= 0.25
    assert n <= 36


def test_max_regions_and_threshold_are_respected():
    image = skimage.data.camera()
    loose = YoloDetector(DetectOptions(conf_threshold=0.05)).detect(np.stack([image] * 3, -1))
    capped = YoloDetector(DetectOptions(conf_threshold=0.05, max_regions=1)).detect(np.stack([image] * 3, -1))
    assert len(loose["boxes"]) > 1 and len(capped["boxes"]) == 1
    assert capped["boxes"][0] == loose["boxes"][0]


def test_exif_orientation_is_applied():
    image = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode_image(_jpeg(image, exif=exif.tobytes())).shape[:2] == (40, 20)
    assert decode_image(_jpeg(image)).shape[:2] == (20, 40)


def test_roi_align_on_a_hand_made_map():
    fmap = np.arange(16, dtype=np.float32).reshape(1, 4, 4)  # value = 4 * row + col
    # a box over whole cells (1..3 x 1..3): samples at 1.25..2.75 in cell units -> the mean is the centre value
    np.testing.assert_allclose(roi_align(fmap, np.array([[1.0, 1.0, 3.0, 3.0]])), [[4 * 1.5 + 1.5]])
    # a box inside one cell's centre region samples that cell's neighbourhood bilinearly: linear map -> exact
    out = roi_align(fmap, np.array([[0.5, 0.5, 1.5, 1.5]]), grid=2)
    xs = ys = np.array([0.75, 1.25]) - 0.5
    np.testing.assert_allclose(out, [[np.mean([4 * y + x for y in ys for x in xs])]])
    assert roi_align(fmap, np.zeros((0, 4))).shape == (0, 1)


def test_detect_regions_counts_and_dead_letters_bad_images(pipeline):
    good = ("coffee.jpg", _jpeg(skimage.data.coffee()), "coffee.jpg")
    corrupt = ("broken.jpg", _jpeg(skimage.data.coffee())[:300], "broken.jpg")
    empty = ("empty.jpg", b"", "empty.jpg")
    text = ("notes.png", b"this is not an image at all", "notes.png")
    grey = ("grey.png", _jpeg(np.full((200, 200, 3), 128, np.uint8)), "grey.png")
    out = pipeline | beam.Create([good, corrupt, empty, text, grey]) | DetectRegions(DetectOptions())
    assert_that(out.main | beam.Map(lambda d: (d["image_id"], "cup" in d["labels"], d["features"].shape[1])),
                equal_to([("coffee.jpg", True, FEATURE_DIM)]), label="detections")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(" (")[0].split(":")[0])),
                equal_to([("broken.jpg", "cannot decode image"), ("empty.jpg", "empty file"),
                          ("notes.png", "not an image"), ("grey.png", "no region above the confidence threshold")]),
                label="rejected")
    pipeline.run()


def test_read_images_from_folders_and_tars(pipeline, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"jpeg-bytes")
    (tmp_path / "a" / "readme.pdf").write_text("not an image")
    with tarfile.open(tmp_path / "a" / "00000.tar", "w") as tar:
        for name, data in (("000001.jpg", b"one"), ("000001.json", b"{}"), ("000002.png", b"two")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "a" / "bad.tar").write_bytes(b"not a tar" * 100)
    out = pipeline | ReadImages(f"{tmp_path}/a/*")
    assert_that(out.main | beam.Map(lambda e: (e[0], e[1])),
                equal_to([("x.jpg", b"jpeg-bytes"), ("00000.tar/000001.jpg", b"one"), ("00000.tar/000002.png", b"two")]),
                label="images")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"].rsplit("/", 1)[1], r["reason"].split(":")[0])),
                equal_to([("readme.pdf", "not an image or tar file (by extension)"), ("bad.tar", "unreadable tar")]),
                label="rejected")
    pipeline.run()
