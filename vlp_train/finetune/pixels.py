"""The pixels of a downstream dataset's images, for a model that sees them (model.visual patches or
both): the image files under the folder `--images` (data.images) names, matched to the dataset's
image keys by the same rule as the detections' image_id values (`formats.images.match_images`:
paths compared from the end, extensions dropped), and decoded as pre-training decodes them
(`visual.load_pixels`: the whole image resized to the model's image_size square, uint8 HWC;
normalised on the device by the patch embedding).

A file that cannot be decoded is found when a split is read (`image_problem`, a check without a
decode) and its examples left out, counted and reported like those of a missing file: decided once,
from the files alone, so every rank of a DDP run keeps the same examples and takes the same steps."""
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

    @staticmethod
    def damaged(files: dict[str, str], what: str) -> dict[str, str]:
        """image key -> why its file cannot be decoded (`image_problem`), of `files` (key -> file)."""
        from tqdm import tqdm

        found = {}
        for key, path in tqdm(files.items(), desc=f"{what}: checking image files", unit="image", leave=False,
                              disable=len(files) < 1000):
            problem = image_problem(path)
            if problem is not None:
                found[key] = problem
        return found


def image_problem(path: str) -> str | None:
    """Why the image file `path` cannot be decoded, found without decoding it; None when nothing is
    found. PIL reads its header and verifies what the format can be verified by without a decode (a
    PNG's chunks and checksums, to the end); a JPEG (known by its content, as load_pixels knows it)
    must also hold its end-of-image marker after its scan data: a file cut short (an interrupted
    copy) has a whole header and fails only at decode (libjpeg-turbo: "Premature end of JPEG file").
    About 0.1 ms an image against 3 ms for a decode (docs/benchmarks.md). What passes and still
    fails to decode (scan data damaged inside a whole file) stops the run with its name (read_pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            with Image.open(f) as image:
                kind = image.format
                # PIL stops reading a JPEG at its first scan's data: an embedded thumbnail's
                # markers (in an APP segment) lie before it and do not count
                scan_data = f.tell()
                image.verify()
            if kind in ("JPEG", "MPO"):
                f.seek(scan_data)
                # in scan data 0xFF is followed by 0x00 or a restart marker: the first FFD9 is the end
                if b"\xff\xd9" not in f.read():
                    return "a JPEG without its end-of-image marker (the file is cut short)"
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as err:  # a damaged file raises anything from the codec, as it would at decode
        return f"{type(err).__name__}: {err}"
    return None


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
