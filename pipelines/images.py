"""ReadImages: image files (jpg/png/webp) or WebDataset tars of images -> (image_id, bytes, source).

image_id of a plain file = its path relative to the pattern's base directory (the part before the
first wildcard), e.g. 'a/*.jpg' gives 'x.jpg' for 'a/x.jpg'. image_id of a tar member (the
img2dataset layout: KEY.jpg beside KEY.json / KEY.txt) = '<tar file name>/<member name>', e.g.
'00000.tar/000000012.jpg'. Non-image members are skipped and counted; unreadable tars are
dead-lettered.
"""
from __future__ import annotations

import posixpath
import re
import tarfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import REJECTED, rejection
from pipelines.io import MatchAll, split_patterns

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_EXTENSIONS = (".tar",)
IMAGES = "images"


def base_directory(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return head if head.endswith("/") else posixpath.dirname(head)


class _ReadImageFile(beam.DoFn):
    def __init__(self, patterns: list[str]):
        self._bases = [base_directory(p) for p in patterns]

    def _image_id(self, path: str) -> str:
        for base in sorted(self._bases, key=len, reverse=True):
            if base and path.startswith(base):
                return path[len(base):].lstrip("/")
        return posixpath.basename(path)

    def process(self, path):
        lower = path.lower()
        if lower.endswith(TAR_EXTENSIONS):
            yield from self._tar(path)
        elif lower.endswith(IMAGE_EXTENSIONS):
            with FileSystems.open(path) as f:
                data = f.read()
            beam.metrics.Metrics.counter("read_images", "images").inc()
            yield self._image_id(path), data, path
        else:
            beam.metrics.Metrics.counter("read_images", "skipped_not_image").inc()
            yield rejection("read_images", path, "not an image or tar file (by extension)")

    def _tar(self, path):
        tar_name = posixpath.basename(path)
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
                    yield f"{tar_name}/{member.name}", data, f"{path}:{member.name}"
        except (tarfile.TarError, EOFError, OSError) as err:
            yield rejection("read_images", path, f"unreadable tar: {err}")


class ReadImages(beam.PTransform):
    """Returns a DoOutputsTuple: `.images` (image_id, bytes, source) and `.rejected`."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        return (pbegin
                | "MatchImages" >> MatchAll(self._pattern)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadImageFiles" >> beam.ParDo(_ReadImageFile(split_patterns(self._pattern))).with_outputs(
                    REJECTED, main=IMAGES))
