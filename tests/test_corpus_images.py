"""The stored image of a sample (schemas.corpus: IMAGE_MEMBER, encode_image, image_member) and the
version-2 schema that carries it; version-1 shards (no images) still read."""
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import schemas
from schemas.corpus import (IMAGE_MEMBER, IMAGE_SIZE_FIELD, decode_members, encode_image, image_member,
                            sample_key, sample_members, stored_image_size, tar_bytes)


def _pixels(height, width, seed=0):
    """A smooth gradient with noise: compresses like a photo, not like pure noise or a flat image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _sample(image_id="img.0.jpg", image_size=None, version=schemas.SCHEMA_VERSION):
    sample = {"schema_version": version, "image_id": image_id, "width": 600, "height": 400,
              "boxes": [[0.0, 0.0, 600.0, 400.0]], "tags": ["sofa"], "scores": [0.9],
              "sentences": [{"sentence_id": "s", "text": "a sofa", "rank": 0, "score": 0.5, "phrases": []}]}
    if image_size is not None:
        sample[IMAGE_SIZE_FIELD] = list(image_size)
    return sample


@pytest.mark.parametrize("width, height, size, expected", [
    (600, 400, 384, (384, 256)),     # landscape: the longer side becomes size
    (400, 600, 384, (256, 384)),     # portrait
    (1000, 1000, 384, (384, 384)),
    (5000, 3, 384, (384, 1)),        # a sliver keeps at least one pixel
    (300, 200, 384, (300, 200)),     # never enlarged
    (384, 100, 384, (384, 100)),
])
def test_stored_image_size_keeps_the_aspect_and_never_enlarges(width, height, size, expected):
    assert stored_image_size(width, height, size) == expected


def test_stored_image_size_refuses_empty_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        stored_image_size(0, 10, 384)


def test_encode_image_is_deterministic_sized_and_free_of_metadata():
    pixels = _pixels(400, 600)
    data = encode_image(pixels, 384)
    assert data == encode_image(pixels.copy(), 384)
    assert data == encode_image(Image.fromarray(pixels), 384)  # a Pillow image gives the same bytes
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (384, 256) and image.mode == "RGB"
        assert not {"exif", "icc_profile", "comment", "progressive", "dpi"} & set(image.info)
        assert [layer[1:3] for layer in image.layer] == [(2, 2), (1, 1), (1, 1)]  # 4:2:0 chroma
        decoded = np.asarray(image, dtype=np.float32)
    # the content survives (a JPEG at quality 90 of the resized pixels, not some other image)
    reference = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(decoded - reference).mean() < 8
    assert encode_image(pixels, 200) != data


def test_encode_image_drops_a_source_files_metadata_and_alpha():
    """A Pillow image opened from a file with a comment and an ICC profile: neither reaches the
    stored bytes, which equal those of its bare pixels; RGBA and grey arrays become RGB."""
    pixels = _pixels(50, 80)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", comment=b"camera", icc_profile=b"\0" * 200)
    with Image.open(buffer) as opened:
        assert "comment" in opened.info and "icc_profile" in opened.info
        assert encode_image(opened, 384) == encode_image(np.asarray(opened.convert("RGB")), 384)
    rgba = np.concatenate([pixels, np.full((50, 80, 1), 7, np.uint8)], axis=2)
    assert encode_image(rgba) == encode_image(pixels)
    grey = pixels[:, :, 0]
    assert encode_image(grey) == encode_image(np.repeat(grey[:, :, None], 3, axis=2))
    with pytest.raises(ValueError, match="uint8"):
        encode_image(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_image(np.zeros((0, 5, 3), np.uint8))


def _shard(tmp_path, samples):
    members = []
    for sample, image in samples:
        members += sample_members(sample_key(sample["image_id"]), sample, np.ones((1, 4), np.float16), image)
    path = tmp_path / "corpus-000000.tar"
    path.write_bytes(tar_bytes(members))
    return str(path)


def test_a_shard_with_images_reads_back_with_bare_webdataset(tmp_path):
    data = encode_image(_pixels(400, 600), 384)
    url = _shard(tmp_path, [(_sample("a.jpg", (384, 256)), data), (_sample("b.jpg"), None)])
    raws = {json.loads(raw["json"])["image_id"]: raw for raw in wds.WebDataset(url, shardshuffle=False)}
    with_image, without = raws["a.jpg"], raws["b.jpg"]
    assert image_member(with_image) == data and image_member(without) is None
    meta, feats = decode_members(with_image)
    schemas.validate_sample(meta, feats)
    with Image.open(io.BytesIO(image_member(with_image))) as image:
        assert list(image.size) == meta[IMAGE_SIZE_FIELD] == [384, 256]
    decoded = [s for s in wds.WebDataset(url, shardshuffle=False).decode("rgb8") if IMAGE_MEMBER in s]
    assert [s[IMAGE_MEMBER].shape for s in decoded] == [(256, 384, 3)]  # webdataset's own decoder reads it


def test_sample_members_needs_image_size_exactly_with_an_image():
    data = encode_image(_pixels(40, 60))
    assert [name.split(".", 1)[1] for name, _ in sample_members("k", _sample(image_size=(60, 40)), np.ones((1, 4)), data)] \
        == ["json", "feats.npy", IMAGE_MEMBER]
    with pytest.raises(ValueError, match="image_size must be given exactly when the image is"):
        sample_members("k", _sample(), np.ones((1, 4)), data)
    with pytest.raises(ValueError, match="image_size must be given exactly when the image is"):
        sample_members("k", _sample(image_size=(60, 40)), np.ones((1, 4)))


def test_image_member_names_the_shard_and_key_of_a_bad_member():
    raw = {"__url__": "shards/corpus-000003.tar", "__key__": "abc", IMAGE_MEMBER: b""}
    with pytest.raises(ValueError, match=r"shards/corpus-000003.tar:abc: jpg member is not a JPEG \(0 bytes"):
        image_member(raw)
    png = io.BytesIO()
    Image.fromarray(_pixels(4, 4)).save(png, format="PNG")
    with pytest.raises(ValueError, match="corpus-000003.tar:abc: jpg member is not a JPEG"):
        image_member({**raw, IMAGE_MEMBER: png.getvalue()})


def test_version_1_shards_without_images_still_read(tmp_path):
    """A shard written before images (schema_version 1, no image_size, no jpg member) decodes and
    validates as before; a version this code does not know is refused, naming it."""
    url = _shard(tmp_path, [(_sample("old.jpg", version=1), None)])
    raw = next(iter(wds.WebDataset(url, shardshuffle=False)))
    meta, feats = decode_members(raw)
    schemas.validate_sample(meta, feats)
    assert meta["schema_version"] == 1 and image_member(raw) is None
    with pytest.raises(schemas.SchemaError, match="schema_version 3 but this code reads version 1 or 2"):
        schemas.validate_sample(_sample(version=3))


def test_validate_sample_checks_image_size():
    schemas.validate_sample(_sample(image_size=(384, 256)))
    for bad in ([384, 0], [384, 256, 3], [384]):
        with pytest.raises(schemas.SchemaError):
            schemas.validate_sample(_sample(image_size=bad))


def test_manifests_written_before_the_images_column_read_it_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"shard": "shards/corpus-000000.tar", "samples": 3, "bytes": 10, "sha256": "x"}
    old_schema = pa.schema([f for f in schemas.MANIFEST if f.name != "images"],
                           metadata={**schemas.MANIFEST.metadata, schemas.VERSION_KEY: b"1"})
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), tmp_path / "manifest.parquet")
    assert schemas.read_table(str(tmp_path / "manifest.parquet"), schemas.MANIFEST).to_pylist() == [{**row, "images": None}]
