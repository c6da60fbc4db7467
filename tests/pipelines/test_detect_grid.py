"""`vlp-data detect --regions grid`: the whole image plus an N x N grid, pooled from the detector's
feature maps, for images where a detector finds nothing (easy-vqa's synthetic shapes)."""
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from pipelines.cli import main
from pipelines.detect import FEATURE_DIM, GRID_LABEL, YoloDetector, grid_boxes
from pipelines.readers.detection_record import region_order, validate_detection
from pipelines.options import DetectOptions


def shape_image(corner: str) -> np.ndarray:
    """A 64 x 64 white image with a red disc in the top-left or bottom-right third (easy-vqa-like)."""
    image = Image.new("RGB", (64, 64), "white")
    x, y = (4, 4) if corner == "top-left" else (46, 46)
    ImageDraw.Draw(image).ellipse([x, y, x + 14, y + 14], fill=(220, 20, 20))
    return np.asarray(image)


@pytest.fixture(scope="module")
def grid_detector():
    return YoloDetector(DetectOptions(regions="grid", grid_size=3))


def test_grid_regions_tile_the_image_and_pool_its_content(grid_detector):
    found = grid_detector.detect(shape_image("top-left"))
    assert len(found["boxes"]) == 10 and found["boxes"][0] == [0.0, 0.0, 64.0, 64.0]
    assert found["labels"] == [GRID_LABEL] * 10 and found["scores"][0] == 1.0 and set(found["scores"][1:]) == {0.5}
    cells = found["boxes"][1:]
    assert sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in cells) == pytest.approx(64 * 64, abs=1)
    # already in the corpus's region order: readers (build-retrieval, fine-tuning) keep it as it is
    assert region_order(found["scores"], found["labels"], found["boxes"]) == list(range(10))
    features = found["features"].astype(np.float32)
    assert features.shape == (10, FEATURE_DIM) and np.isfinite(features).all()
    # the features follow the content: the cell holding the disc changes when the disc moves, an empty one hardly
    other = grid_detector.detect(shape_image("bottom-right"))["features"].astype(np.float32)
    top_left = cells.index(next(b for b in cells if b[0] == 0 and b[1] == 0)) + 1
    empty_middle = cells.index(next(b for b in cells if 20 < b[0] < 30 and 20 < b[1] < 30)) + 1
    moved = np.linalg.norm(features[top_left] - other[top_left])
    assert moved > 2 * np.linalg.norm(features[empty_middle] - other[empty_middle])
    # a grid record is a valid detection for every reader of the pipeline
    assert validate_detection({"image_id": "train/images/0.png", **found})["labels"] == [GRID_LABEL] * 10


def test_grid_boxes_and_the_region_cap():
    assert grid_boxes(90, 60, 2) == [[0, 0, 90, 60], [0, 0, 45, 30], [45, 0, 90, 30], [0, 30, 45, 60], [45, 30, 90, 60]]
    exact = YoloDetector(DetectOptions(regions="grid", grid_size=3, max_regions=10)).detect(shape_image("top-left"))
    assert len(exact["boxes"]) == 10 and exact["boxes"][0] == [0.0, 0.0, 64.0, 64.0]  # a grid that just fits
    # a grid larger than the cap is refused where the options are made, for any caller (the CLI
    # used to check it alone, and code that built the options got a grid with cells dropped)
    with pytest.raises(ValueError, match=r"regions='grid' \(--regions grid\) with grid_size=3 \(--grid-size 3\) makes "
                                         r"10 regions an image, more than max_regions=4 \(--max-regions 4\)"):
        DetectOptions(regions="grid", grid_size=3, max_regions=4)
    assert DetectOptions(grid_size=6, max_regions=4).grid_size == 6  # the grid size matters with regions grid only
    for bad, message in (({"grid_size": 0}, r"grid_size=0 \(--grid-size 0\): at least 1"),
                         ({"max_regions": 0}, r"max_regions=0 \(--max-regions 0\): at least 1"),
                         ({"regions": "cells"}, r"regions='cells' \(--regions cells\): one of detected, grid")):
        with pytest.raises(ValueError, match=message):
            DetectOptions(**bad)


def test_cli_refuses_a_grid_larger_than_max_regions(tmp_path):
    result = CliRunner().invoke(main, ["detect", "--images", str(tmp_path / "*.png"), "--output", str(tmp_path / "o"),
                                       "--regions", "grid", "--grid-size", "6", "--max-regions", "36"])
    assert result.exit_code == 2 and "37 regions" in result.output and "(--max-regions 36)" in result.output
