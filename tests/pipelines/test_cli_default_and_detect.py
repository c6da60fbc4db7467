"""The embedded default (`vlp-data build-retrieval --k 5` with no inputs) and `vlp-data detect`
feeding `build-retrieval --detections`."""
import glob
import json
import os

import numpy as np
import skimage.data
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import schemas
from pipelines.cli import main
from pipelines.show import describe


def test_no_inputs_runs_the_bundled_sample_end_to_end(tmp_path):
    out = tmp_path / "vlp-out"
    result = CliRunner().invoke(main, ["build-retrieval", "--k", "5", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "using the bundled sample" in result.output
    stats = json.loads((out / "stats.json").read_text())
    # 9 scikit-image photos, the stereo pair, 2 scikit-learn photos, matplotlib's Grace Hopper; 18 crops of each
    assert stats["images_in"] == 14 * 19
    assert stats["images_out"] >= 50 and stats["images_out"] + stats["rejected_total"] == stats["images_in"]
    assert stats["sentences"] > 2000 and stats["k"] == 5
    samples = list(wds.WebDataset(sorted(glob.glob(f"{out}/shards/*.tar")), shardshuffle=False).decode())
    assert len(samples) == stats["images_out"]
    by_id = {s["json"]["image_id"]: s for s in samples}
    coffee = by_id["coffee.png"]["json"]
    assert "cup" in coffee["tags"] and len(coffee["sentences"]) == 5
    assert "cup" in coffee["sentences"][0]["text"].lower() or "coffee" in coffee["sentences"][0]["text"].lower()
    for s in samples:
        schemas.validate_sample(s["json"], s["feats.npy"], where=s["__key__"])
    shown = describe(str(out))  # the first sample of the first shard, readable
    first = samples[0]["json"]
    assert f"images out: {stats['images_out']}, sentences in corpus: {stats['sentences']}" in shown
    assert f"image {first['image_id']} ({first['width']}x{first['height']})" in shown
    assert f"#0 ({first['sentences'][0]['score']:.3f}) {first['sentences'][0]['text']}" in shown


def test_detect_then_build_from_its_detections(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(skimage.data.coffee()).save(images / "coffee.jpg")
    Image.fromarray(skimage.data.stereo_motorcycle()[0]).save(images / "motorcycle.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["detect", "--images", str(images / "*"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    (table,) = glob.glob(f"{out}/detections/*.parquet")
    rows = {r["image_id"]: r for r in schemas.read_table(table, schemas.DETECTIONS).to_pylist()}
    assert sorted(rows) == ["coffee.jpg", "motorcycle.png"]
    assert "cup" in rows["coffee.jpg"]["labels"]
    assert np.asarray(rows["coffee.jpg"]["features"]).shape == (len(rows["coffee.jpg"]["boxes"]), 1280)
    (rejected,) = [json.loads(line) for line in open(out / "rejected" / "detect" / "rejected-00000-of-00001.jsonl")]
    assert rejected["source"].endswith("broken.jpg") and rejected["stage"] == "detect"
    detect_stats = json.load(open(out / "detect_stats.json"))
    assert (detect_stats["detections"], detect_stats["rejected_total"]) == (2, 1)

    text = tmp_path / "t.txt"
    text.write_text("A cup of coffee on a saucer.\nA motorcycle parked in a garage.\nThe bank raised rates.\n")
    result = CliRunner().invoke(main, ["build-retrieval", "--detections", table, "--text", str(text),
                                       "--output", str(out), "--k", "2", "--samples-per-shard", "10"])
    assert result.exit_code == 0, result.output
    assert os.path.exists(table)  # the detections it read were left in place
    assert glob.glob(f"{out}/rejected/detect/*.jsonl") and glob.glob(f"{out}/rejected/build/*.jsonl")  # both kept
    assert json.load(open(out / "detect_stats.json")) == detect_stats and os.path.exists(out / "stats.json")
    samples = list(wds.WebDataset(glob.glob(f"{out}/shards/*.tar"), shardshuffle=False).decode())
    coffee = next(s for s in samples if s["json"]["image_id"] == "coffee.jpg")
    assert coffee["json"]["sentences"][0]["text"] == "A cup of coffee on a saucer."
    assert coffee["feats.npy"].shape == (len(rows["coffee.jpg"]["boxes"]), 1280)
