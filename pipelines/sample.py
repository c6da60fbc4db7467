"""The bundled sample: real photos from scikit-image / scikit-learn / matplotlib, crops of them,
and real English text.

Images come from the installed packages (no download): 14 photos, and of each a fixed grid of 18
crops (half and 70% of each side, at 3 x 3 positions), since the bundled YOLOv3-tiny finds an
object in only 6 of the whole photos but in about a quarter of the crops (a crop enlarges its
objects and leaves others out). The crops the detector finds nothing in are dead-lettered like any
other image. The text is the project's own scene descriptions (`sample/scenes.txt`) plus gensim's
bundled Lee news corpus, so the retrieval has both relevant sentences and distractors.
"""
from __future__ import annotations

import itertools
import os

import numpy as np

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "sample")
# (file name, loader) of the photos; grey ones are converted to RGB.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera", "clock", "coins",
                   "hubble_deep_field")


def _photos():
    import skimage.data
    from sklearn.datasets import load_sample_images

    for name in _SKIMAGE_PHOTOS:
        yield f"{name}.png", getattr(skimage.data, name)()
    left, right, _ = skimage.data.stereo_motorcycle()
    yield "motorcycle_left.png", left
    yield "motorcycle_right.png", right
    sklearn_images = load_sample_images()
    for path, image in zip(sklearn_images.filenames, sklearn_images.images):
        yield os.path.basename(path), image


def _matplotlib_photo(name: str) -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data(name)) as image:
        return np.asarray(image.convert("RGB"))


CROP_FRACTIONS = (0.5, 0.7)  # crop side / photo side
CROP_POSITIONS = 3           # per axis: left/top, centre, right/bottom


def _crops(name: str, image: np.ndarray):
    """The fixed grid of crops of one photo: (file name, pixels)."""
    stem = os.path.splitext(name)[0]
    height, width = image.shape[:2]
    for fraction in CROP_FRACTIONS:
        crop_h, crop_w = int(height * fraction), int(width * fraction)
        for row in range(CROP_POSITIONS):
            for col in range(CROP_POSITIONS):
                top = (height - crop_h) * row // (CROP_POSITIONS - 1)
                left = (width - crop_w) * col // (CROP_POSITIONS - 1)
                yield (f"{stem}_crop{round(fraction * 100)}_r{row}c{col}.png",
                       image[top:top + crop_h, left:left + crop_w])


def sample_images():
    """Every image of the sample: the photos, then their crops. (file name, RGB uint8 pixels).
    Grace Hopper is added here, not in _photos(), which bench/data.py derives its inputs from."""
    photos = itertools.chain(_photos(), [("grace_hopper.jpg", _matplotlib_photo("grace_hopper.jpg"))])
    for name, image in photos:
        image = _to_rgb_uint8(image)
        yield name, image
        yield from _crops(name, image)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.clip(image * (255 if image.max() <= 1 else 1), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _save_atomically(image: np.ndarray, path: str, scratch_dir: str) -> None:
    """Write to a temp file in scratch_dir, then rename: an interrupted run leaves no truncated
    image at `path` for the next run to skip over and reuse. scratch_dir is outside the images
    glob and on the same filesystem (os.replace cannot cross filesystems)."""
    from PIL import Image

    temp = os.path.join(scratch_dir, f".partial-{os.getpid()}-{os.path.basename(path)}")
    try:
        Image.fromarray(_to_rgb_uint8(image)).save(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def prepare_sample(directory: str) -> tuple[str, str]:
    """Write the sample images and text under `directory`; returns (images glob, text paths)."""
    from gensim.test.utils import datapath

    images_dir = os.path.join(directory, "images")
    text_dir = os.path.join(directory, "text")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(text_dir, exist_ok=True)
    for name, image in sample_images():
        path = os.path.join(images_dir, name)
        if not os.path.exists(path):  # complete: files only ever appear by rename
            _save_atomically(image, path, directory)
    # One sentence a line; a blank line after each makes it its own paragraph for
    # --split-sentences, so every sentence keeps its own line number as its source.
    with open(os.path.join(SAMPLE_DIR, "scenes.txt"), encoding="utf-8") as src, \
            open(os.path.join(text_dir, "scenes.txt"), "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(line.strip() + "\n\n")
    # The Lee corpus has one news article per line: a blank line after each makes it a paragraph
    # for --split-sentences.
    with open(datapath("lee_background.cor"), encoding="utf-8") as src, \
            open(os.path.join(text_dir, "lee_background.txt"), "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(line.strip() + "\n\n")
    return os.path.join(images_dir, "*"), os.path.join(text_dir, "*.txt")
