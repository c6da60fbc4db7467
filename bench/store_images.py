"""What `build-retrieval --store-images` costs per image: time (one core) and shard bytes.

    python bench/store_images.py                 # 64 images, sizes 224 / 384 / 512, median of 3

Inputs: bench/data.py's JPEGs derived from the bundled photos (crops and rescales, 300 to 1,000
pixels a side, as photos of web corpora are). Per image:
- **decode**: `pipelines.detect.decode_image` of the file (Pillow, EXIF orientation, RGB): what
  `--image-root` adds per image; with `--images` the detector's decode is reused, so it is free;
- **store**: `schemas.corpus.encode_image` at each `--image-size` (resize + JPEG), from the
  decoded pixels: what `--store-images` adds in either mode;
- **bytes** of the stored `{key}.jpg`, beside a sample's region features at the default 36
  regions x 1280 float16 (92 kB), the member that dominates a shard without images.
Writes bench/results/store_images_cpu.json.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.data import write_images  # noqa: E402
from bench.env import device_name, write_result  # noqa: E402
from pipelines.detect import decode_image  # noqa: E402
from schemas.corpus import encode_image  # noqa: E402

FEATURE_BYTES = 36 * 1280 * 2 + 128  # a sample's feats.npy at 36 regions of the bundled detector


def per_image_ms(work, items, repeats: int) -> float:
    """Median over `repeats` passes of the mean milliseconds per item."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            work(item)
        runs.append((time.perf_counter() - start) * 1000 / len(items))
    return statistics.median(runs)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sizes", default="224,384,512")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        paths = sorted(glob.glob(write_images(folder, args.images)))
        files = [open(p, "rb").read() for p in paths]
    pixels = [decode_image(data) for data in files]
    sides = sorted(max(p.shape[:2]) for p in pixels)
    result = {
        "device": device_name(),
        "command": "python " + " ".join(sys.argv),
        "images": len(files),
        "longer_side_min_median_max": [sides[0], int(statistics.median(sides)), sides[-1]],
        "decode_ms_per_image": per_image_ms(decode_image, files, args.repeats),
        "sizes": {},
    }
    print(f"decode (--image-root only): {result['decode_ms_per_image']:.1f} ms/image")
    for size in map(int, args.sizes.split(",")):
        stored = [encode_image(p, size) for p in pixels]
        mean_bytes = statistics.mean(map(len, stored))
        ms = per_image_ms(lambda p: encode_image(p, size), pixels, args.repeats)
        result["sizes"][size] = {"store_ms_per_image": ms, "images_per_s_per_core": 1000 / ms,
                                 "mean_bytes": mean_bytes, "bytes_per_feature_bytes": mean_bytes / FEATURE_BYTES,
                                 "gb_per_million_images": mean_bytes * 1e6 / 1e9}
        print(f"--image-size {size}: store {ms:.1f} ms/image ({1000 / ms:.0f}/s a core), "
              f"{mean_bytes / 1000:.1f} kB/image ({mean_bytes / FEATURE_BYTES:.2f} x the region features)")
    write_result("store_images_cpu", result)
    return result


if __name__ == "__main__":
    main()
