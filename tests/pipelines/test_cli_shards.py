"""`vlp-data build-retrieval --images` end to end: shards, side tables, stats, determinism, bad files."""
import glob
import hashlib
import json
import os

import numpy as np
import pytest
import skimage.data
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import schemas
from pipelines.cli import main
from pipelines.sample import SAMPLE_DIR


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    left, right, _ = skimage.data.stereo_motorcycle()
    for name, array in (("coffee.jpg", skimage.data.coffee()), ("moto_left.jpg", left), ("moto_right.png", right),
                        ("camera.png", np.stack([skimage.data.camera()] * 3, -1)),
                        ("flat.png", np.full((120, 160, 3), 90, np.uint8))):
        Image.fromarray(array).save(images / name)
    (images / "corrupt.jpg").write_bytes((images / "coffee.jpg").read_bytes()[:500])
    (images / "zero.jpg").write_bytes(b"")
    (images / "notes.webp").write_text("not an image")
    return str(images / "*"), os.path.join(SAMPLE_DIR, "scenes.txt")


def run(inputs, out, *extra):
    images, text = inputs
    result = CliRunner().invoke(main, ["build-retrieval", "--images", images, "--text", text, "--output", str(out),
                                       "--k", "3", "--samples-per-shard", "2", *extra])
    assert result.exit_code == 0, result.output
    return result


def shard_bytes(out):
    return [open(p, "rb").read() for p in sorted(glob.glob(f"{out}/shards/*.tar"))]


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run(inputs, out)
    return out, result


def test_shards_read_back_with_bare_webdataset_and_validate(built):
    out, result = built
    shards = sorted(glob.glob(f"{out}/shards/*.tar"))
    assert [os.path.basename(p) for p in shards] == ["corpus-000000.tar", "corpus-000001.tar"]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert sorted(s["json"]["image_id"] for s in samples) == ["camera.png", "coffee.jpg", "moto_left.jpg", "moto_right.png"]
    for s in samples:
        meta, feats = s["json"], s["feats.npy"]
        schemas.validate_sample(meta, feats, where=s["__key__"])
        assert s["__key__"] == hashlib.sha1(meta["image_id"].encode()).hexdigest()[:16]
        assert feats.shape == (len(meta["boxes"]), 1280)
        assert [x["rank"] for x in meta["sentences"]] == [0, 1, 2]
    coffee = next(s["json"] for s in samples if s["json"]["image_id"] == "coffee.jpg")
    assert "cup" in coffee["tags"]
    assert "coffee" in coffee["sentences"][0]["text"].lower() or "cup" in coffee["sentences"][0]["text"].lower()
    linked = [p for x in coffee["sentences"] for p in x["phrases"] if p["region"] is not None]
    assert any(coffee["tags"][p["region"]] == "cup" and "cup" in p["words"] for p in linked)


def test_stats_manifest_and_side_tables_match_the_shards(built):
    out, _ = built
    samples = list(wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False).decode())
    stats = json.loads((out / "stats.json").read_text())
    phrases = [p for s in samples for x in s["json"]["sentences"] for p in x["phrases"]]
    assert stats["images_in"] == 8 and stats["images_out"] == len(samples) == 4
    assert stats["rejected"] == {"detect: cannot decode image": 1, "detect: empty file (0 bytes)": 1,
                                 "detect: no region above the confidence threshold": 1,
                                 "detect: not an image (Pillow cannot identify it)": 1}
    assert stats["link_rate"] == round(sum(p["region"] is not None for p in phrases) / len(phrases), 6)
    assert stats["phrases_per_sentence"] == round(len(phrases) / (3 * len(samples)), 6)
    manifest = schemas.read_table(str(out / "manifest.parquet"), schemas.MANIFEST).to_pylist()
    assert sum(r["samples"] for r in manifest) == 4 and [r["samples"] for r in manifest] == [2, 2]
    for row in manifest:
        data = (out / row["shard"]).read_bytes()
        assert len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
    links = [r for f in sorted(glob.glob(f"{out}/links/*.parquet")) for r in schemas.read_table(f, schemas.LINKS).to_pylist()]
    assert len(links) == len(phrases)
    assert sum(r["region"] is not None for r in links) == sum(p["region"] is not None for p in phrases)
    vocab = json.loads((out / "tag_vocab.json").read_text())
    assert vocab["tags"] == sorted({t for s in samples for t in s["json"]["tags"]})
    rejected = [json.loads(line) for path in sorted((out / "rejected" / "build").glob("*.jsonl")) for line in open(path)]
    assert sorted(os.path.basename(r["source"]) for r in rejected) == ["corrupt.jpg", "flat.png", "notes.webp", "zero.jpg"]


def test_two_workers_give_byte_identical_shards(built, inputs, tmp_path):
    out, _ = built
    two = tmp_path / "two"
    run(inputs, two, "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert shard_bytes(two) == shard_bytes(out)
    assert (two / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()
    assert (two / "stats.json").read_bytes() == (out / "stats.json").read_bytes()


def test_an_object_store_output_holds_the_same_files_as_a_local_one(built, inputs):
    """--output on an object store (gs:// on Dataflow): no folders, a rename per object. Twice
    into the same place: every file as the local run wrote it, no staging left, nothing doubled."""
    from . import objectstore

    out, _ = built
    store = "objstore://bucket/out"
    objectstore.OBJECTS.clear()
    try:
        run(inputs, store)
        run(inputs, store)  # a rerun replaces the entries
        remote = {name: objectstore.OBJECTS[f"{store}/{name}"] for name in objectstore.names(store + "/")}
    finally:
        objectstore.OBJECTS.clear()
    local = {os.path.relpath(p, out): open(p, "rb").read()  # the output marker too
             for p in glob.glob(f"{out}/**/*", recursive=True, include_hidden=True) if os.path.isfile(p)}
    assert sorted(remote) == sorted(local)
    for name in local:
        assert remote[name] == local[name], name
