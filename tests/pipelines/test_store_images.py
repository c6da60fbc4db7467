"""`build-retrieval --store-images`: each sample's `{key}.jpg`, from --images (the detector's decode)
or from --image-root (precomputed detections), deterministic, dead letters for images it cannot store."""
import glob
import io
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import webdataset as wds
from apache_beam.testing.util import assert_that, equal_to
from click.testing import CliRunner
from PIL import Image

import schemas
from pipelines.cli import main
from pipelines.detect import decode_image
from pipelines.images import STORED_IMAGE, ReadStoredImages, aspect_matches, image_root_candidates
from pipelines.sample import SAMPLE_DIR
from schemas.corpus import IMAGE_MEMBER, encode_image, image_member, stored_image_size
from tests.image_corpus import build_image_corpus, photo_inputs, write_image_corpus


def test_image_root_candidates_try_the_id_then_each_extension():
    assert image_root_candidates("/r", "a/x.jpg") == ["/r/a/x.jpg", "/r/a/x.jpg.jpg", "/r/a/x.jpg.jpeg",
                                                      "/r/a/x.jpg.png", "/r/a/x.jpg.webp"]
    assert image_root_candidates("gs://b/imgs", "391895")[:2] == ["gs://b/imgs/391895", "gs://b/imgs/391895.jpg"]
    for unsafe in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "./x.jpg", "gs://other/x.jpg", "a\\..\\x.jpg"):
        with pytest.raises(ValueError, match="not a plain relative path"):
            image_root_candidates("/r", unsafe)


@pytest.mark.parametrize("file_size, detection_size, same", [
    ((600, 400), (600, 400), True),
    ((300, 200), (600, 400), True),     # a downscaled copy
    ((299, 200), (600, 400), True),     # ... whose resize rounded a side
    ((1000, 667), (600, 400), True),    # an upscaled one
    ((400, 600), (600, 400), False),    # rotated
    ((600, 300), (600, 400), False),    # cropped
    ((512, 512), (512, 300), False),
])
def test_aspect_matches_allows_a_resize_but_not_a_rotation_or_crop(file_size, detection_size, same):
    assert aspect_matches(file_size, detection_size) is same
    assert aspect_matches(detection_size, file_size) is same


def _detection(image_id, width, height):
    return {"image_id": image_id, "width": width, "height": height, "boxes": [[0.0, 0.0, 1.0, 1.0]],
            "labels": ["cup"], "scores": [0.9], "features": np.ones((1, 4), np.float16)}


def test_read_stored_images_from_a_root_and_dead_letter_what_it_cannot_store(pipeline, tmp_path):
    """An id naming a file, a bare id found by its extension; a missing file, an undecodable one,
    one of another aspect and an id leaving the root are dead-lettered with their reason."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    photo = np.asarray(Image.open(io.BytesIO(_png(200, 100))))
    Image.fromarray(photo).save(root / "a" / "x.jpg")
    Image.fromarray(photo[:50, :50]).save(root / "391895.png")
    Image.fromarray(photo).save(root / "rotated.png")
    (root / "bad.jpg").write_bytes(b"not an image")
    detections = [_detection("a/x.jpg", 200, 100), _detection("391895", 100, 100),  # the file is half size
                  _detection("missing.jpg", 10, 10), _detection("bad.jpg", 10, 10),
                  _detection("rotated.png", 100, 200), _detection("../x.jpg", 10, 10)]
    stored = pipeline | beam.Create(detections) | ReadStoredImages(str(root), 64)
    expected_x = (encode_image(decode_image((root / "a" / "x.jpg").read_bytes()), 64), [64, 32])
    expected_bare = (encode_image(decode_image((root / "391895.png").read_bytes()), 64), [50, 50])
    assert_that(stored.main | beam.Map(lambda d: (d["image_id"], d[STORED_IMAGE][0], d[STORED_IMAGE][1], d["labels"])),
                equal_to([("a/x.jpg", *expected_x, ["cup"]), ("391895", *expected_bare, ["cup"])]), label="stored")
    assert_that(stored.rejected | beam.Map(lambda r: (r["stage"], os.path.basename(r["source"]), r["reason"])),
                equal_to([("store_images", "missing.jpg", "image file not found under --image-root"),
                          ("store_images", "bad.jpg", "not an image (Pillow cannot identify it)"),
                          ("store_images", "rotated.png", "image aspect differs from the detection's width and height"),
                          ("store_images", "x.jpg", "image id is not a relative path")]), label="rejected")
    pipeline.run()


def _png(width, height):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("flags, message", [
    (["--image-root", "{root}", "--images", "{images}"], "--image-root goes with --detections"),
    (["--detections", "{det}", "--image-root", "{root}"], "--image-root is read only with --store-images"),
    (["--detections", "{det}", "--store-images"], "needs --image-root DIR"),
    (["--images", "{images}", "--store-images", "--no-shards"], "cannot go with --no-shards"),
    (["--detections", "{det}", "--store-images", "--image-root", "{root}/nowhere"], "is not a folder"),
    (["--images", "{images}", "--store-images", "--image-size", "8"], "--image-size"),
])
def test_store_images_flags_are_checked_before_anything_runs(tmp_path, flags, message):
    (tmp_path / "det.jsonl").write_text("")
    values = {"root": str(tmp_path), "images": str(tmp_path / "*.jpg"), "det": str(tmp_path / "det.jsonl")}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build-retrieval", "--text", os.path.join(SAMPLE_DIR, "scenes.txt"),
                                       "--output", str(out), *[f.format(**values) for f in flags]])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()  # refused before the output folder is claimed


def test_the_fixture_corpus_carries_images_that_match_its_boxes(tmp_path):
    """tests/image_corpus.write_image_corpus: every sample's JPEG at its image_size, the pixels
    under each region in its tag's colour; the same arguments give the same bytes."""
    from tests.image_corpus import TAG_COLOURS

    shards = sorted(glob.glob(write_image_corpus(str(tmp_path / "a"), n_images=6, per_shard=4)))
    again = sorted(glob.glob(write_image_corpus(str(tmp_path / "b"), n_images=6, per_shard=4)))
    assert [open(p, "rb").read() for p in shards] == [open(p, "rb").read() for p in again]
    manifest = schemas.read_table(str(tmp_path / "a" / "manifest.parquet"), schemas.MANIFEST).to_pylist()
    assert [(r["samples"], r["images"]) for r in manifest] == [(4, 4), (2, 2)]
    for raw in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(raw["json"])
        schemas.validate_sample(meta)
        with Image.open(io.BytesIO(image_member(raw))) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        assert [pixels.shape[1], pixels.shape[0]] == meta["image_size"] == [64, 48]
        # the last region is drawn on top: the centre of its box shows its colour (or half of it)
        x1, y1, x2, y2 = meta["boxes"][-1]
        sx, sy = meta["image_size"][0] / meta["width"], meta["image_size"][1] / meta["height"]
        centre = pixels[int((y1 + y2) / 2 * sy), int((x1 + x2) / 2 * sx)]
        colour = np.array(TAG_COLOURS[meta["tags"][-1]])
        assert min(np.abs(centre - colour).max(), np.abs(centre - colour // 2).max(),
                   np.abs(centre - (colour + colour // 2) // 2).max()) < 60, (centre, colour)


def _shard_samples(out):
    return {raw["__key__"]: raw for raw in wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False)}


@pytest.mark.slow
def test_store_images_from_images_is_deterministic_for_any_worker_count(tmp_path):
    """--images --store-images --image-size 200: every sample carries the photo as the detector
    decoded it, resized and encoded by schemas.corpus.encode_image; the manifest counts them; a
    second build with two worker processes writes byte-identical shards."""
    out = build_image_corpus(str(tmp_path / "one"), image_size=200)
    images_dir = os.path.join(tmp_path, "one", "images")
    samples = _shard_samples(out)
    assert len(samples) == 4
    for raw in samples.values():
        meta = json.loads(raw["json"])
        schemas.validate_sample(meta, where=raw["__key__"])
        data = image_member(raw)
        original = decode_image(open(os.path.join(images_dir, meta["image_id"]), "rb").read())
        assert data == encode_image(original, 200)
        assert meta["image_size"] == list(stored_image_size(meta["width"], meta["height"], 200))
        with Image.open(io.BytesIO(data)) as image:
            assert list(image.size) == meta["image_size"] and max(image.size) == 200
    manifest = schemas.read_table(f"{out}/manifest.parquet", schemas.MANIFEST).to_pylist()
    assert [(r["samples"], r["images"]) for r in manifest] == [(2, 2), (2, 2)]
    two = build_image_corpus(str(tmp_path / "two"), image_size=200,
                             extra=("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    for name in ("manifest.parquet", *(f"shards/corpus-00000{i}.tar" for i in range(2))):
        assert open(f"{two}/{name}", "rb").read() == open(f"{out}/{name}", "rb").read(), name


@pytest.mark.slow
def test_store_images_from_an_image_root_with_precomputed_detections(tmp_path):
    """`vlp-data detect`, then build-retrieval --detections --image-root: the stored image is the
    same bytes as from --images; a missing file and a file of another aspect are dead-lettered,
    counted, and their images left out of the shards."""
    images, text = photo_inputs(str(tmp_path / "images"))
    runner = CliRunner()
    detected = runner.invoke(main, ["detect", "--images", images, "--output", str(tmp_path / "det")])
    assert detected.exit_code == 0, detected.output
    root = tmp_path / "root"
    root.mkdir()
    for name in ("coffee.jpg", "moto_right.png"):
        (root / name).write_bytes((tmp_path / "images" / name).read_bytes())
    camera = np.asarray(Image.open(tmp_path / "images" / "camera.png"))
    Image.fromarray(camera[:, :300]).save(root / "camera.png")  # cropped: not the detection's image
    out = tmp_path / "out"
    result = runner.invoke(main, ["build-retrieval", "--detections", str(tmp_path / "det" / "detections" / "*.parquet"),
                                  "--image-root", str(root), "--store-images", "--text", text, "--output", str(out),
                                  "--k", "3", "--image-size", "128"])
    assert result.exit_code == 0, result.output
    samples = _shard_samples(out)
    by_id = {json.loads(raw["json"])["image_id"]: raw for raw in samples.values()}
    assert sorted(by_id) == ["coffee.jpg", "moto_right.png"]
    for image_id, raw in by_id.items():
        assert raw[IMAGE_MEMBER] == encode_image(decode_image((root / image_id).read_bytes()), 128)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images_out"] == 2
    assert stats["rejected"]["store_images: image file not found under --image-root"] == 1
    assert stats["rejected"]["store_images: image aspect differs from the detection's width and height"] == 1
    rejected = [json.loads(line) for path in sorted((out / "rejected" / "build").glob("*.jsonl")) for line in open(path)]
    assert sorted((os.path.basename(r["source"]), r["stage"]) for r in rejected if r["stage"] == "store_images") == \
        [("camera.png", "store_images"), ("moto_left.jpg", "store_images")]
