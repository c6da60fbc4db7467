"""The image files' check when a fine-tuning split is read (`finetune.pixels.image_problem`: PIL's
header + verify, a JPEG's end-of-image marker; no decode) against the decode every epoch repeats
(`visual.load_pixels`, the loader's), per image on one core.

    python bench/image_check.py                   # 300 JPEGs at 640 x 480 (COCO's size), 300 PNGs
    python bench/image_check.py --images 500 --repeats 5

Input: generated images (smooth colour ramps + noise, as photos compress roughly: ~130 KB a JPEG
at quality 90), written to a temporary folder; the files are in the page cache when timed (a run
over a dataset on disk reads each file once more for the check; that I/O is not measured here).
Median over `--repeats` passes of the mean time per image, and the fastest pass. Writes
bench/results/image_check_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_train.finetune.pixels import image_problem
from vlp_train.visual import load_pixels

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_images(folder: str, count: int, kind: str) -> list[str]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        ramp = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, ((xx + yy) * (i % 3 + 1)) % 256], -1)
        pixels = np.clip(ramp + rng.normal(0, 12, ramp.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i}.{'jpg' if kind == 'JPEG' else 'png'}")
        Image.fromarray(pixels).save(path, kind, **({"quality": 90} if kind == "JPEG" else {}))
        paths.append(path)
    return paths


def per_image_ms(paths: list[str], work, repeats: int) -> dict:
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            work(path)
        passes.append((time.perf_counter() - started) / len(paths) * 1e3)
    return {"median_ms": statistics.median(passes), "fastest_ms": min(passes)}


def decode(size: int):
    def run(path: str):
        with open(path, "rb") as f:
            load_pixels(f.read(), size)
    return run


def check(path: str):
    if image_problem(path) is not None:
        raise AssertionError(f"{path}: a whole image failed the check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images of each kind")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-name", default="image_check_cpu")
    args = parser.parse_args()
    result = {"images": args.images, "repeats": args.repeats, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("JPEG", "PNG"):
            os.makedirs(os.path.join(folder, kind))
            paths = write_images(os.path.join(folder, kind), args.images, kind)
            result[kind] = {"mean_kb": float(np.mean([os.path.getsize(p) for p in paths]) / 1024),
                            "check": per_image_ms(paths, check, args.repeats),
                            **{f"decode_{size}": per_image_ms(paths, decode(size), args.repeats)
                               for size in (384, 224)}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.results_name}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
