"""`vlp-data convert-detections`: VinVL / Oscar TSV detections -> the Parquet `vlp-data detect`
writes, which `vlp-train finetune --detections` reads."""
from __future__ import annotations

import glob
import json

import numpy as np
import pytest
from click.testing import CliRunner

import schemas
from pipelines.cli import main
from tests.pipelines.test_readers_detections import _oscar_vinvl_files


def test_vinvl_files_convert_to_detections_the_finetune_harness_reads(tmp_path):
    from vlp_train.finetune.regions import DetectionIndex, detection_files, load_regions

    vinvl = tmp_path / "vinvl"
    vinvl.mkdir()
    feats = _oscar_vinvl_files(vinvl)
    with pytest.raises(ValueError, match="vlp-data convert-detections"):  # the harness names the way
        detection_files(str(vinvl / "train.label.tsv"))

    out = tmp_path / "det"
    result = CliRunner().invoke(main, ["convert-detections", "--detections", str(vinvl / "train.yaml"),
                                       "--output", str(out), "--max-regions", "1"])
    assert result.exit_code == 0, result.output
    (table,) = glob.glob(f"{out}/detections/*.parquet")
    rows = {r["image_id"]: r for r in schemas.read_table(table, schemas.DETECTIONS).to_pylist()}
    assert sorted(rows) == ["img1", "img2"]
    assert rows["img1"]["labels"] == ["shirt"]  # highest score first, capped at --max-regions
    np.testing.assert_allclose(rows["img1"]["features"], feats["img1"][1:, :2048], rtol=1e-6)
    rejected = [json.loads(line) for path in glob.glob(f"{out}/rejected/detect/*.jsonl") for line in open(path)]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in rejected) == ["train.label.tsv:3", "train.label.tsv:4"]
    stats = json.load(open(out / "detect_stats.json"))  # the reader's counts reach the run's stats
    assert stats["detections"] == 2 and stats["rejected_total"] == 2
    assert (stats["regions_over_max"], stats["boxes_clipped"]) == (1, 0)  # img1's second region, over --max-regions 1
    assert set(stats["rejected"]) == {f"read_detections: {r['reason']}" for r in rejected}

    index = DetectionIndex(f"{out}/detections/*.parquet")
    regions = load_regions(index, {"img1", "img2"}, max_regions=36)
    assert (regions["img2"].width, regions["img2"].height) == (64, 80)
    np.testing.assert_allclose(regions["img1"].feats, feats["img1"][1:, :2048].astype(np.float16))
