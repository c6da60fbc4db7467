"""The pixels of a downstream dataset's images, for a model that sees them (model.visual patches or
both): the image files under the folder `--images` (data.images) names, matched to the dataset's
image keys by the same rule as the detections' image_id values (`formats.images.match_images`:
paths compared from the end, extensions dropped), and decoded as pre-training decodes them
(`visual.load_pixels`: the whole image resized to the model's image_size square, uint8 HWC;
normalised on the device by the patch embedding)."""
from __future__ import annotations

import os

import numpy as np

# what counts as an image file in the folder (the formats the releases ship: COCO/Flickr30K JPEGs,
# easy-VQA PNGs, NLVR2 .png files that are often JPEGs inside: load_pixels decodes by content)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class ImageFolder:
    """The image files under `root` (walked once), by their path relative to it."""

    def __init__(self, root: str):
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--images {root}: no such folder (the folder of the dataset's images)")
        self.root = root
        self.files: dict[str, str] = {}  # relative path (posix) -> file
        for folder, _, names in os.walk(root, followlinks=True):
            for name in names:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(folder, name)
                    self.files[os.path.relpath(path, root).replace(os.sep, "/")] = path
        if not self.files:
            raise FileNotFoundError(f"--images {root}: no image file ({', '.join(IMAGE_EXTENSIONS)}) in it or below")

    def match(self, keys: list[str], what: str) -> dict[str, str]:
        """dataset image key -> its file; images without a file are reported (count and examples),
        none matching stops with names from both sides (formats.images.NoImagesMatched)."""
        from vlp_train.finetune.formats.images import match_reported

        relative = match_reported(keys, self.files, what, "image file",
                                  other=f"image files under --images {self.root}",
                                  hint="give --images the folder that holds the dataset's own image files")
        return {key: self.files[rel] for key, rel in relative.items()}


def read_pixels(path: str, size: int, example: str) -> np.ndarray:
    """An image file -> uint8 [size, size, 3] as pre-training decodes it; a file that cannot be read
    or decoded stops with its name and the example (or image) that needs it."""
    from vlp_train.visual import load_pixels

    try:
        with open(path, "rb") as f:
            data = f.read()
        return load_pixels(data, size)
    except (OSError, ValueError) as err:
        raise ValueError(f"--images {path} (the image of {example}): {err}") from None
