"""Decode + resize of a stored image, per core: what the loader does per sample for a patch model
(`model.visual=patches|both`), with each candidate library.

    python bench/decode.py                        # images as --store-images stores them (longer side 384)
    python bench/decode.py --stored 0             # the photos at their own size (up to 1411 px)

Input: the bundled photos (scikit-image's astronaut, coffee, chelsea, rocket, hubble_deep_field,
immunohistochemistry, retina; scikit-learn's china and flower), each re-encoded by
`schemas.corpus.encode_image` at `--stored` px on the longer side (the pipeline's bytes), plus a
crop of each at 2/3 of its size: 18 JPEGs. Each candidate decodes them and resizes the whole image
to the model's square (`--sizes`, default 384 the `base` patch config, 224, 128 the `debug` one),
uint8 RGB out.

Candidates:
- `pil`: Pillow, full decode, `resize(BILINEAR)`;
- `pil_draft`: Pillow with `Image.draft`, which makes libjpeg decode at a reduced DCT scale (1/2,
  1/4, 1/8) while the result stays >= the target, then the resize;
- `opencv`: `cv2.imdecode` (libjpeg-turbo), BGR -> RGB, `cv2.resize` (the loader's `resize_square`:
  bilinear, area averaging where a side shrinks 2x or more);
- `opencv_reduced`: the same with `IMREAD_REDUCED_COLOR_2/4/8` when the scaled image stays >= the target;
- `simplejpeg_opencv`: simplejpeg (libjpeg-turbo, PyPI wheel) with `min_width/min_height` (the
  reduced DCT scale) and fast DCT/upsampling, then `cv2.resize`: `vlp_train.visual.load_pixels`, the loader's;
- `simplejpeg_pil`: the same decode, Pillow's resize;
- `pyturbojpeg`: PyTurboJPEG with scaling_factor, when it imports (it needs the system's
  libturbojpeg; not a dependency of this project).

Every candidate's output is compared with `pil`'s (mean absolute difference, of 255) so a fast one
that decodes worse is seen. One thread (OpenCV told so; the others are single-threaded), median
over `--repeats` passes of each candidate's mean time per image (and the fastest pass: on a
machine shared with other work, the closest to the uncontended cost); the candidates take turns
within each pass, so a change in the machine's load falls on all of them alike. Also timed: normalising one
image in the worker (float32, CHW, ImageNet mean/std) against shipping the uint8 (what the
trainer does: the patch embedding normalises on the device), and the bytes each puts through the
workers' shared memory. Writes bench/results/decode_cpu.json.

The projection for the 8,000 samples/s target (base, 384 px) is the loader's per-worker rate with
images from `python bench/train.py --only loader --visual patches` (decode included) x 16 cores;
docs/benchmarks.md gives both.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.env import device_name, write_result  # noqa: E402

TARGET_SAMPLES_PER_S = 8000
CORES = 16  # the GPU node's


def photos() -> dict[str, np.ndarray]:
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    named = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                                     "immunohistochemistry", "retina")}
    named.update(zip(("china", "flower"), load_sample_images().images))
    out = {}
    for name, image in named.items():
        out[name] = image
        h, w = image.shape[:2]
        out[name + "_crop"] = image[h // 6:h // 6 + 2 * h // 3, w // 6:w // 6 + 2 * w // 3]
    return out


def encoded(stored: int) -> list[bytes]:
    from schemas.corpus import encode_image
    return [encode_image(image, stored or max(image.shape[:2])) for image in photos().values()]


# -- the candidates: bytes -> uint8 [size, size, 3] -------------------------------------------------

def pil(data: bytes, size: int, draft: bool = False) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        if draft:
            image.draft("RGB", (size, size))
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _cv2_resize(array: np.ndarray, size: int) -> np.ndarray:
    from vlp_train.visual import resize_square  # the loader's resize, so the decoders are compared alone
    return resize_square(array, size)


def opencv(data: bytes, size: int, reduced: bool = False) -> np.ndarray:
    import cv2
    flag = cv2.IMREAD_COLOR
    if reduced:
        import simplejpeg
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        for factor, reduced_flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                     (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if width // factor >= size and height // factor >= size:
                flag = reduced_flag
                break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    return _cv2_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)


def simplejpeg_opencv(data: bytes, size: int) -> np.ndarray:
    from vlp_train.visual import load_pixels
    return load_pixels(data, size)


def simplejpeg_pil(data: bytes, size: int) -> np.ndarray:
    import simplejpeg
    from PIL import Image
    array = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                   min_width=size, min_height=size)
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


def _turbo():
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        return TurboJPEG(), TJPF_RGB
    except Exception as err:  # the package or the system library missing
        return err, None


def pyturbojpeg(data: bytes, size: int, _state={}) -> np.ndarray:  # noqa: B006 (a cache)
    if "jpeg" not in _state:
        _state["jpeg"], _state["format"] = _turbo()
    jpeg = _state["jpeg"]
    if isinstance(jpeg, Exception):
        raise jpeg
    width, height, _, _ = jpeg.decode_header(data)
    factor = next(((1, f) for f in (8, 4, 2) if width // f >= size and height // f >= size), (1, 1))
    array = jpeg.decode(data, pixel_format=_state["format"], scaling_factor=factor)
    return _cv2_resize(array, size)


CANDIDATES = {"pil": pil, "pil_draft": lambda d, s: pil(d, s, draft=True), "opencv": opencv,
              "opencv_reduced": lambda d, s: opencv(d, s, reduced=True), "simplejpeg_opencv": simplejpeg_opencv,
              "simplejpeg_pil": simplejpeg_pil, "pyturbojpeg": pyturbojpeg}


def time_per_image(fn, images: list[bytes], size: int, repeats: int, warm: bool = True) -> list[float]:
    """Mean microseconds per image of each of `repeats` passes (after one pass of warm-up)."""
    if warm:
        for data in images:
            fn(data, size)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            fn(data, size)
        passes.append((time.perf_counter() - start) / len(images) * 1e6)
    return passes


def normalise_in_worker(pixels: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((pixels.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", type=int, default=384, help="longer side the corpus stores (0: the photo's own)")
    parser.add_argument("--sizes", default="384,224,128", help="the model's square sides")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=None, help="comma list of candidates")
    parser.add_argument("--results-name", default=None)
    args = parser.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)
    images = encoded(args.stored)
    sizes = [int(s) for s in args.sizes.split(",")]
    chosen = args.only.split(",") if args.only else list(CANDIDATES)
    load = os.getloadavg()[0]
    result = {"device": device_name("cpu"), "command": "python " + " ".join(["bench/decode.py", *(argv or sys.argv[1:])]),
              "threads": 1, "load_average_at_start": load, "stored_longer_side": args.stored or "original",
              "images": len(images), "mean_jpeg_kb": statistics.mean(len(d) for d in images) / 1024,
              "repeats": args.repeats, "us_per_image": {}, "images_per_s_per_core": {}, "mean_abs_diff_vs_pil": {},
              "skipped": {}}
    runnable = {}
    for name in chosen:
        try:
            CANDIDATES[name](images[0], sizes[0])
            runnable[name] = CANDIDATES[name]
        except Exception as err:  # a candidate that does not run here (pyturbojpeg without libturbojpeg)
            result["skipped"][name] = f"{type(err).__name__}: {err}"
            print(f"{name}: skipped ({result['skipped'][name]})")
    # passes outermost, candidates in turn within each: on a machine shared with other work, every
    # candidate sees the same drift in load, so their medians compare
    keys = [(name, size) for size in sizes for name in runnable]
    passes = {key: [] for key in keys}
    for _ in range(args.repeats):
        for name, size in keys:
            passes[(name, size)] += time_per_image(runnable[name], images, size, 1, warm=False)
    for name, size in keys:
        fn, us, key = runnable[name], statistics.median(passes[(name, size)]), f"{name}@{size}"
        diff = statistics.mean(float(np.abs(fn(d, size).astype(np.int16) - pil(d, size).astype(np.int16)).mean())
                               for d in images)
        result["us_per_image"][key] = us
        result.setdefault("fastest_pass_us_per_image", {})[key] = min(passes[(name, size)])
        result["images_per_s_per_core"][key] = 1e6 / us
        result["mean_abs_diff_vs_pil"][key] = diff
        print(f"{key:28s} {us:8.0f} us/image (fastest pass {min(passes[(name, size)]):6.0f})  {1e6 / us:7.0f} "
              f"images/s/core  |diff| vs pil {diff:.2f}")
    pixels = simplejpeg_opencv(images[0], 384)
    normalise = statistics.median(time_per_image(lambda d, s: normalise_in_worker(pixels), [b""] * 50, 384, args.repeats))
    result["normalise_in_worker_us_384"] = normalise
    result["bytes_per_image_384"] = {"uint8": int(pixels.nbytes), "float32": int(pixels.nbytes * 4)}
    print(f"normalising a 384 image in the worker: {normalise:.0f} us; {pixels.nbytes / 2**10:.0f} KiB uint8 vs "
          f"{pixels.nbytes * 4 / 2**10:.0f} KiB float32 per image through the workers' shared memory")
    result["projection_note"] = (f"decode+resize alone, per core x {CORES} cores, against {TARGET_SAMPLES_PER_S} samples/s; "
                                 "the loader's whole per-sample cost is bench/train.py --only loader --visual patches")
    result["decode_only_projection_samples_per_s"] = {k: v * CORES for k, v in result["images_per_s_per_core"].items()}
    name = args.results_name or ("decode_cpu" if args.stored == 384 else f"decode_cpu_stored{args.stored or 'orig'}")
    write_result(name, result)
    return result


if __name__ == "__main__":
    main()
