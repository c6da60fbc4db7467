"""ReadImages: image files (jpg/png/webp) or WebDataset tars of images -> (image_id, bytes, source).

image_id of a plain file = its path relative to the base directory that all patterns share (the
part before the first wildcard; for one pattern, that pattern's own), e.g. 'a/*.jpg' gives
'x.jpg' for 'a/x.jpg', and 'd/a/*.jpg,d/b/*.jpg' gives 'a/x.jpg' and 'b/x.jpg'. image_id of a
tar member (the img2dataset layout: KEY.jpg beside KEY.json / KEY.txt) = the tar's id by the same
rule + '/' + member name, e.g. '00000.tar/000000012.jpg', or 'a/00000.tar/000000012.jpg' for
two img2dataset folders. Ids are then made unique: of the images sharing an id (a tar holding
one member name twice, a directory named like a tar) the one with the smallest source is kept
and each other one is dead-lettered with reason "duplicate image_id". Non-image members are
skipped and counted, as are img2dataset's sidecar files beside plain images (.json, .txt, .parquet);
other files and unreadable tars are dead-lettered.

Stored images (`build-retrieval --store-images`): `stored_image` makes the bytes of a sample's
`{key}.jpg` (schemas.corpus.encode_image) from the pixels the detector saw; with `--images` the
detector's worker does so (pipelines.detect), with precomputed detections `ReadStoredImages` reads
each image from `--image-root` by `image_root_candidates`. Only the resized JPEG travels on with
the detection (STORED_IMAGE); the full-size pixels are dropped in the worker that decoded them.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import duplicate_rejection, rejection, rejection_for
from pipelines.files import MatchAll, split_patterns
from pipelines.stages import split_rejected, stage_output
from schemas.corpus import encode_image, stored_image_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_EXTENSIONS = (".tar",)
# What img2dataset writes beside the images and tars (KEY.json / KEY.txt per image, a .parquet
# and _stats.json per shard): skipped and counted, never dead-lettered as images.
SIDECAR_EXTENSIONS = (".json", ".txt", ".parquet")


def base_directory(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return head if head.endswith("/") else posixpath.dirname(head)


def _directory_parts(directory: str) -> list[str]:
    """'/d/a/' -> ['', 'd', 'a']; 'gs://b/' -> ['gs:', '', 'b']; '' -> []."""
    if not directory:
        return []
    return (directory[:-1] if directory.endswith("/") else directory).split("/")


def common_base_directory(patterns: list[str]) -> str:
    """The deepest directory above every pattern's base, with a trailing '/'; '' if none."""
    parts = [_directory_parts(base_directory(p)) for p in patterns]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return "/".join(common) + "/" if common else ""


class _ReadImageFile(beam.DoFn):
    def __init__(self, patterns: list[str]):
        # One base for all patterns: 'a/00000.tar' and 'b/00000.tar' keep their folder in the id.
        self._base = common_base_directory(patterns)

    def _image_id(self, path: str) -> str:
        if path.startswith(self._base):
            return path[len(self._base):].lstrip("/")
        return posixpath.basename(path)  # not expected; a clash is dead-lettered downstream

    def process(self, path):
        lower = path.lower()
        if lower.endswith(TAR_EXTENSIONS):
            yield from self._tar(path)
        elif lower.endswith(IMAGE_EXTENSIONS):
            with FileSystems.open(path) as f:
                data = f.read()
            beam.metrics.Metrics.counter("read_images", "images").inc()
            yield self._image_id(path), data, path
        elif lower.endswith(SIDECAR_EXTENSIONS):  # img2dataset's captions and metadata: not images, not rejects
            beam.metrics.Metrics.counter("read_images", "skipped_sidecars").inc()
        else:
            beam.metrics.Metrics.counter("read_images", "skipped_not_image").inc()
            yield rejection("read_images", path, "not an image or tar file (by extension)")

    def _tar(self, path):
        tar_id = self._image_id(path)
        try:
            with FileSystems.open(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if not member.name.lower().endswith(IMAGE_EXTENSIONS):
                        beam.metrics.Metrics.counter("read_images", "tar_members_not_image").inc()
                        continue
                    data = tar.extractfile(member).read()
                    beam.metrics.Metrics.counter("read_images", "images").inc()
                    yield f"{tar_id}/{member.name}", data, f"{path}:{member.name}"
        except (tarfile.TarError, EOFError, OSError) as err:
            yield rejection("read_images", path, "unreadable tar", detail=str(err))


def _keep_one_per_image_id(element):
    """(image_id, [(source, bytes)]) -> the image with the smallest source; the others rejected.

    Choosing by source (then bytes: a tar may hold one name twice), not by arrival order, keeps
    the output the same on every run."""
    image_id, copies = element
    copies = sorted(copies)
    kept_source, data = copies[0]
    yield image_id, data, kept_source
    for source, _ in copies[1:]:
        beam.metrics.Metrics.counter("read_images", "duplicate_image_id").inc()
        yield duplicate_rejection("read_images", source, image_id, kept_source)


class ReadImages(beam.PTransform):
    """A StageOutput: main (image_id, bytes, source), ids unique; dead letters; no counts."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        images, unreadable = split_rejected(
            pbegin
            | "MatchImages" >> MatchAll(self._pattern)
            | "SpreadFiles" >> beam.Reshuffle(),
            "ReadImageFiles", _ReadImageFile(split_patterns(self._pattern)))
        # Grouping by id also spreads a tar's members over workers for detection.
        unique, duplicates = split_rejected(
            images
            | "KeyByImageId" >> beam.Map(lambda image: (image[0], (image[2], image[1])))
            | "GroupByImageId" >> beam.GroupByKey(),
            "KeepOnePerImageId", _keep_one_per_image_id)
        return stage_output(unique, rejected=(unreadable, duplicates))


# ---------------------------------------------------------------------------------------------
# Stored images

STORED_IMAGE = "_image"  # (JPEG bytes, [w, h]) of the stored image: with a detection, then its sample, until written
STORE_STAGE = "store_images"


def stored_image(pixels, size: int) -> tuple[bytes, list[int]]:
    """RGB uint8 [h, w, 3] as the detector saw it -> (the `{key}.jpg` bytes, their [w, h])."""
    height, width = pixels.shape[:2]
    return encode_image(pixels, size), list(stored_image_size(width, height, size))


def image_root_candidates(root: str, image_id: str) -> list[str]:
    """The files an image id may name under --image-root, tried in this order: ROOT/{image_id}
    itself (ids from `vlp-data detect` and most JSONL are file names, 'a/x.jpg'), then with each
    image extension appended (bare ids such as VinVL's '391895': ROOT/391895.jpg, .jpeg, .png,
    .webp). ValueError for an id that could name a file outside ROOT (absolute, or a '..' part)."""
    parts = image_id.split("/")
    if image_id.startswith("/") or "://" in image_id or any(p in ("..", ".") for p in parts) or "\\" in image_id:
        raise ValueError(f"image id {image_id!r} is not a plain relative path, so it names no file under --image-root")
    base = posixpath.join(root, image_id)
    return [base] + [base + ext for ext in IMAGE_EXTENSIONS]


def aspect_matches(file_size: tuple[int, int], detection_size: tuple[int, int]) -> bool:
    """Whether an image file of `file_size` (w, h) shows the image of `detection_size`, maybe
    resized: the larger of the two, scaled to the smaller one's width (or else its height), has
    the other side within a pixel of the smaller one's (a resize rounds each side). A rotated or
    cropped file, or another image, fails (boxes map by the ratio of the sides)."""
    (sw, sh), (bw, bh) = sorted([tuple(file_size), tuple(detection_size)], key=lambda wh: wh[0] * wh[1])
    return abs(bh * sw / bw - sh) <= 1 or abs(bw * sh / bh - sw) <= 1


class _ReadStoredImage(beam.DoFn):
    """A detection -> the same with STORED_IMAGE, its image read from --image-root; a missing,
    undecodable or mismatched image is dead-lettered (stage store_images) and the detection dropped."""

    def __init__(self, root: str, size: int):
        self._root, self._size = root.rstrip("/") or "/", size

    def process(self, detection):
        from pipelines.detect import decode_image  # not at the top: detect imports this module

        image_id = detection["image_id"]
        try:
            candidates = image_root_candidates(self._root, image_id)
        except ValueError as err:
            yield rejection(STORE_STAGE, image_id, "image id is not a relative path", detail=str(err))
            return
        path = next((c for c in candidates if FileSystems.exists(c)), None)
        if path is None:
            beam.metrics.Metrics.counter(STORE_STAGE, "missing").inc()
            hint = " (a tar member's id: build from the tars with --images instead)" if ".tar/" in image_id else ""
            yield rejection(STORE_STAGE, image_id, "image file not found under --image-root",
                            detail=f"tried {', '.join(candidates)}{hint}")
            return
        try:
            with FileSystems.open(path) as f:
                pixels = decode_image(f.read())
        except (ValueError, OSError) as err:
            beam.metrics.Metrics.counter(STORE_STAGE, "undecodable").inc()
            yield rejection_for(STORE_STAGE, path, err, "undecodable image")
            return
        file_size = (pixels.shape[1], pixels.shape[0])
        if not aspect_matches(file_size, (detection["width"], detection["height"])):
            beam.metrics.Metrics.counter(STORE_STAGE, "aspect_differs").inc()
            yield rejection(STORE_STAGE, path, "image aspect differs from the detection's width and height",
                            detail=f"file {file_size[0]}x{file_size[1]}, detection of {image_id!r} "
                                   f"{detection['width']}x{detection['height']}")
            return
        stored = stored_image(pixels, self._size)
        del pixels  # only the resized JPEG travels on
        beam.metrics.Metrics.counter(STORE_STAGE, "images").inc()
        yield {**detection, STORED_IMAGE: stored}


class ReadStoredImages(beam.PTransform):
    """Detections -> a StageOutput: main the detections with STORED_IMAGE, their image read from
    `root` and stored at `size`; the dead letters of those whose image could not be; no counts."""

    def __init__(self, root: str, size: int):
        super().__init__()
        self._root, self._size = root, size

    def expand(self, detections):
        stored, rejected = split_rejected(detections, "ReadStoredImage", _ReadStoredImage(self._root, self._size))
        return stage_output(stored, rejected)
