"""The pixels of a downstream dataset's images, for a model that sees them (model.visual patches or
both): the image files under the folder `--images` (data.images) names, matched to the dataset's
image keys by the same rule as the detections' image_id values (`formats.images.match_images`:
paths compared from the end, extensions dropped), and decoded as pre-training decodes them
(`visual.load_pixels`: the whole image resized to the model's image_size square, uint8 HWC;
normalised on the device by the patch embedding).

A file that cannot be decoded is found when a split is read (`image_problem`, a check without a
decode) and its examples left out, counted and reported like those of a missing file: decided once,
on the main rank of a DDP run and sent to the others (`ImageFolder.damaged`), so every rank keeps the
same examples and takes the same steps, and each file is read once. A file that cannot be read at
all (an I/O error, permissions) stops the run with its path: it is not counted as damaged."""
from __future__ import annotations

import io
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
    def damaged(files: dict[str, str], what: str, dist_info=None) -> dict[str, str]:
        """image key -> why its file cannot be decoded (`image_problem`), of `files` (key -> file).
        Under DDP (`dist_info`) the main rank checks and the others take its answer: a check on every
        rank could differ between them (a transient read error on one) and then the ranks' example
        counts, and their steps, would too (a hang until run.dist_timeout_s)."""
        from tqdm import tqdm

        from vlp_train.distributed import main_rank_decides

        def check() -> dict[str, str]:
            found = {}
            for key, path in tqdm(files.items(), desc=f"{what}: checking image files", unit="image", leave=False,
                                  disable=len(files) < 1000):
                problem = image_problem(path)
                if problem is not None:
                    found[key] = problem
            return found
        return main_rank_decides(dist_info, f"{what}: checking image files", check)


def image_problem(path: str) -> str | None:
    """Why the image file `path` cannot be decoded, found without decoding it; None when nothing is
    found. PIL reads its header and verifies what the format can be verified by without a decode (a
    PNG's chunks and checksums, to the end); a JPEG (known by its content, as load_pixels knows it)
    must also hold its end-of-image marker after its first scan's data: a file cut short (an
    interrupted copy) has a whole header and fails only at decode (libjpeg-turbo: "Premature end of
    JPEG file"). About 0.15-0.3 ms a JPEG, 0.4 ms a PNG, against 3 ms for a decode (docs/benchmarks.md,
on a loaded 2-core machine). What passes
    and still fails to decode (scan data damaged inside a whole file) stops the run with its name
    (read_pixels). A file that cannot be read (permissions, I/O error, a stale network mount) is no
    damaged image: OSError naming it, not a problem counted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()  # read once: the checks below work on these bytes, never on the file again
    except OSError as err:
        raise OSError(f"--images {path}: the image file cannot be read ({err.strerror or err}): not a damaged "
                      "image, so the run stops rather than leave it out") from err
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as err:  # a damaged file raises anything from the codec, as it would at decode
        return f"{type(err).__name__}: {err}"
    if data[:3] == JPEG_START:
        scan_data = first_scan_data(data)
        if isinstance(scan_data, str):
            return scan_data
        # in scan data 0xFF is followed by 0x00 or a restart marker, and between scans come marker
        # segments: the first FFD9 after the first scan's start is the end of the image
        if data.find(b"\xff\xd9", scan_data) < 0:
            return "a JPEG without its end-of-image marker (the file is cut short)"
    return None


JPEG_START = b"\xff\xd8\xff"  # SOI and a marker's first byte: what load_pixels decodes as a JPEG
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length follows them


def first_scan_data(data: bytes) -> int | str:
    """The offset of a JPEG's first scan data (just after its first SOS segment), found by walking
    its marker segments from SOI (FF xx and a 2-byte length each, fill bytes FF FF allowed, standalone
    markers without a length); or why it has none. Walked here rather than taken from PIL's file
    position: Pillow's MPO plugin seeks back to 0 after open, and an EXIF thumbnail in a header
    segment holds an FFD9 of its own, so a cut-short camera MPO passed."""
    pos = 2
    while True:
        if pos >= len(data):
            return "a JPEG cut short in its header (no scan data)"
        if data[pos] != 0xFF:  # libjpeg-turbo fails on these too: "extraneous bytes before marker"
            return f"a JPEG with bytes that are no marker at offset {pos} of its header"
        while pos < len(data) and data[pos] == 0xFF:  # the marker's FF and any fill bytes
            pos += 1
        if pos >= len(data):
            return "a JPEG cut short in its header (no scan data)"
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return f"a JPEG with marker FF{marker:02X} before its first scan (no image data)"
        if pos + 2 > len(data):
            return "a JPEG cut short in its header (no scan data)"
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return f"a JPEG with a segment length of {length} at offset {pos} of its header"
        pos += length
        if marker == 0xDA:  # SOS: its segment (the scan's header) ends where the scan data begins
            return pos if pos <= len(data) else "a JPEG cut short in its header (no scan data)"


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
