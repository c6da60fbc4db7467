"""An in-memory object store registered with Beam as `objstore://`, for code that must work on
GCS / S3: no directories (a "folder" is a name prefix, `exists` is true only for objects),
rename is copy + delete per object, and deleting a name that matches no object does nothing."""
from __future__ import annotations

import io
import time

from apache_beam.io.filesystem import CompressionTypes, FileMetadata, FileSystem

SCHEME = "objstore"
OBJECTS: dict[str, bytes] = {}  # class-wide: Beam makes a new FileSystem instance per call
# When each object was last written (GCS's `updated`): a rewritten object gets a new time, so a
# cache keyed by (path, size, time) never serves the content of an earlier run of the same size.
UPDATED: dict[str, float] = {}


def _store(path: str, data: bytes) -> None:
    OBJECTS[path] = data
    UPDATED[path] = time.time()


class _Upload(io.BytesIO):
    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def close(self):
        if not self.closed:
            _store(self._path, self.getvalue())  # visible only once complete, like an upload
        super().close()


class ObjectStoreFileSystem(FileSystem):
    @classmethod
    def scheme(cls):
        return SCHEME

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for path, data in sorted(OBJECTS.items()):
            if path.startswith(dir_or_prefix):
                yield FileMetadata(path, len(data), UPDATED.get(path, 0.0))

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return _Upload(path)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        if path not in OBJECTS:
            raise FileNotFoundError(path)
        return io.BytesIO(OBJECTS[path])

    def copy(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            _store(destination, OBJECTS[source])

    def rename(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            _store(destination, OBJECTS.pop(source))

    def exists(self, path):
        return path in OBJECTS

    def size(self, path):
        return len(OBJECTS[path])

    def last_updated(self, path):
        return UPDATED.get(path, 0.0)

    def checksum(self, path):
        return str(hash(OBJECTS[path]))

    def metadata(self, path):
        return FileMetadata(path, len(OBJECTS[path]), UPDATED.get(path, 0.0))

    def delete(self, paths):
        for path in paths:
            if path.endswith("/"):  # as GCS: a trailing slash deletes everything under it
                for name in [p for p in OBJECTS if p.startswith(path)]:
                    del OBJECTS[name]
                continue
            for match in self.match([path])[0].metadata_list:
                del OBJECTS[match.path]


def put(path: str, data: bytes = b"x") -> None:
    _store(path, data)


def names(prefix: str) -> list[str]:
    return sorted(p[len(prefix):] for p in OBJECTS if p.startswith(prefix))
