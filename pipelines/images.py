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
"""
from __future__ import annotations

import posixpath
import re
import tarfile
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import REJECTED, duplicate_rejection, rejection
from pipelines.io import MatchAll, split_patterns

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_EXTENSIONS = (".tar",)
# What img2dataset writes beside the images and tars (KEY.json / KEY.txt per image, a .parquet
# and _stats.json per shard): skipped and counted, never dead-lettered as images.
SIDECAR_EXTENSIONS = (".json", ".txt", ".parquet")
IMAGES = "images"


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


class ImagesRead(NamedTuple):
    images: beam.PCollection    # (image_id, bytes, source), one per image_id
    rejected: beam.PCollection  # dead-letter records


class ReadImages(beam.PTransform):
    """Returns ImagesRead: `.images` (image_id, bytes, source), ids unique, and `.rejected`."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        read = (pbegin
                | "MatchImages" >> MatchAll(self._pattern)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadImageFiles" >> beam.ParDo(_ReadImageFile(split_patterns(self._pattern))).with_outputs(
                    REJECTED, main=IMAGES))
        # Grouping by id also spreads a tar's members over workers for detection.
        unique = (read[IMAGES]
                  | "KeyByImageId" >> beam.Map(lambda image: (image[0], (image[2], image[1])))
                  | "GroupByImageId" >> beam.GroupByKey()
                  | "KeepOnePerImageId" >> beam.FlatMap(_keep_one_per_image_id).with_outputs(REJECTED, main=IMAGES))
        rejected = (read[REJECTED], unique[REJECTED]) | "AllReadRejected" >> beam.Flatten()
        return ImagesRead(unique[IMAGES], rejected)
