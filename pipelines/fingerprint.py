"""The content digest of a model folder, hashed once per machine rather than in every process.

Every process that loads an ONNX backend (each SDK worker process's model load) and the launcher
(the embedding store's fingerprint) need the digest of the model folder's files; hashing a
bert-base folder takes seconds. The digest is remembered under the cache folder by the folder's
file listing with each file's size, mtime, ctime and inode: a file written, added, removed,
renamed or replaced changes that listing, so the folder is hashed again; an unchanged folder costs
one stat per file. No Beam and no torch here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

log = logging.getLogger(__name__)

CACHE_ENV = "VLP_CACHE_DIR"  # where exports and digests are kept; default ~/.cache/vlp-data
_IN_PROCESS: dict[str, str] = {}  # listing key -> digest


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vlp-data")


def _model_files(folder: str) -> list[tuple[str, str]]:
    """(relative path, path) of every file of the folder in a fixed order; dot-files and
    dot-folders (caches, editors' files) are left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            out.append((os.path.relpath(path, folder), path))
    return out


def hash_files(files: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for relative, path in files:
        digest.update(relative.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def listing_key(folder: str, files: list[tuple[str, str]]) -> str:
    """What the remembered digest is valid for: the folder's path and each file's name and stat."""
    listing = hashlib.sha256(os.path.realpath(folder).encode("utf-8"))
    for relative, path in files:
        st = os.stat(path)
        listing.update(f"\0{relative}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
                       .encode("utf-8"))
    return listing.hexdigest()


def folder_digest(folder: str, cache_dir: str | None = None) -> str:
    """sha256 over every file of a model folder (relative path and content): a copy of the folder
    elsewhere has the same digest, any changed file another. Remembered in this process and under
    `cache_dir` (default `cache_root()`/digests) by `listing_key`."""
    files = _model_files(folder)
    key = listing_key(folder, files)
    if key in _IN_PROCESS:
        return _IN_PROCESS[key]
    store = os.path.join(cache_dir or cache_root(), "digests")
    remembered = os.path.join(store, key)
    try:
        with open(remembered, encoding="ascii") as f:
            digest = f.read().strip()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            _IN_PROCESS[key] = digest
            return digest
    except OSError:
        pass
    digest = hash_files(files)
    _IN_PROCESS[key] = digest
    try:  # written whole then renamed: a reader never sees half a digest
        os.makedirs(store, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store, prefix=".", delete=False, encoding="ascii") as f:
            f.write(digest)
        os.replace(f.name, remembered)
    except OSError as err:  # a read-only home: the digest is still right, only not remembered
        log.warning("could not remember the digest of %s under %s: %s", folder, store, err)
    return digest
