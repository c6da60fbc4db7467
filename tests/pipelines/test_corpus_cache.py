"""A corpus spilled to a remote folder (gs:// on Dataflow) is copied once per machine into a local
cache and memory-mapped, instead of being read whole into every SDK process. A LocalFileSystem
under its own scheme stands in for the object store."""
import os
import tempfile
import threading
import time

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

from pipelines import retrieve
from pipelines.retrieve import load_corpus, spill_corpus
from pipelines.search import Corpus

SCHEME = "fakeremote"


class _CountedReads:
    """A remote file that records the size of each read: a whole-file read shows up as -1."""

    def __init__(self, raw, reads: list, delay: float):
        self._raw, self._reads, self._delay = raw, reads, delay

    def read(self, size=-1):
        self._reads.append(size)
        time.sleep(self._delay)  # a slow store: gives other processes time to collide
        return self._raw.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


class FakeRemoteFileSystem(LocalFileSystem):
    """fakeremote://name -> root/name; not local as far as load_corpus can tell."""
    root = ""
    opened: list = []  # remote paths opened for reading
    reads: list = []   # sizes asked of read()
    delay = 0.0

    @classmethod
    def scheme(cls):
        return SCHEME

    def _local(self, path):
        return os.path.join(self.root, path[len(SCHEME) + 3:])

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        self.opened.append(path)
        return _CountedReads(super().open(self._local(path), *args, **kwargs), self.reads, self.delay)

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def exists(self, path):
        return super().exists(self._local(path))

    def delete(self, paths):
        for path in paths:
            os.remove(self._local(path))

    def metadata(self, path):
        local = self._local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """The remote folder's URL; the machine's temp folder (the cache's home) is under tmp_path."""
    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(tmp_path / "store"))
    monkeypatch.setattr(FakeRemoteFileSystem, "opened", [])
    monkeypatch.setattr(FakeRemoteFileSystem, "reads", [])
    (tmp_path / "machine-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine-tmp"))
    monkeypatch.setattr(retrieve, "CACHE_CHUNK_BYTES", 1024)
    return f"{SCHEME}://staging"


def _corpus(fingerprint: str, seed: int = 0, size: int = 50) -> Corpus:
    vectors = np.random.default_rng(seed).random((size, 16), dtype=np.float32)
    return Corpus([f"s{i:03d}" for i in range(size)], [f"text {i}" for i in range(size)], vectors, fingerprint)


def _assert_mapped_equal(loaded: Corpus, original: Corpus):
    assert isinstance(loaded.vectors, np.memmap) and not loaded.vectors.flags.owndata
    np.testing.assert_array_equal(loaded.vectors, original.vectors)
    assert loaded.ids == original.ids and loaded.texts == original.texts


def _cache_entries(tmp_path):
    return sorted(os.listdir(tmp_path / "machine-tmp" / "vlp-data-corpus"))


def test_remote_corpus_is_copied_once_in_chunks_and_memory_mapped(remote, tmp_path):
    original = _corpus("f1")
    files = spill_corpus(original, remote)
    _assert_mapped_equal(load_corpus(files), original)
    assert sorted(FakeRemoteFileSystem.opened) == sorted([files.vectors_path, files.rows_path])
    assert os.path.getsize(os.path.join(FakeRemoteFileSystem.root, "staging", os.path.basename(files.vectors_path))) > 1024
    assert FakeRemoteFileSystem.reads and all(0 < size <= 1024 for size in FakeRemoteFileSystem.reads)  # streamed

    _assert_mapped_equal(load_corpus(files), original)  # the next process of this machine
    assert len(FakeRemoteFileSystem.opened) == 2  # served from the cache, not copied again
    (entry,) = _cache_entries(tmp_path)
    assert entry.startswith("f1-")
    assert not [n for n in os.listdir(tmp_path / "machine-tmp" / "vlp-data-corpus" / entry) if n.endswith(".partial")]


def test_another_fingerprint_or_a_rewritten_file_gets_its_own_cache_entry(remote, tmp_path):
    first, second = _corpus("f1", seed=0), _corpus("f2", seed=1, size=30)
    first_files, second_files = spill_corpus(first, remote), spill_corpus(second, remote)
    _assert_mapped_equal(load_corpus(first_files), first)
    _assert_mapped_equal(load_corpus(second_files), second)
    assert len(_cache_entries(tmp_path)) == 2

    # Same ids (so the same fingerprint), other vectors: another embedding model, same staging folder.
    rewritten = _corpus("f1", seed=2)
    files = spill_corpus(rewritten, remote)
    stored = os.path.join(FakeRemoteFileSystem.root, "staging", os.path.basename(files.vectors_path))
    os.utime(stored, (time.time() + 10, time.time() + 10))  # a later write, whatever the clock's resolution
    _assert_mapped_equal(load_corpus(files), rewritten)
    assert len(_cache_entries(tmp_path)) == 3


def test_processes_loading_at_once_download_once(remote, monkeypatch):
    original = _corpus("f1")
    files = spill_corpus(original, remote)
    monkeypatch.setattr(FakeRemoteFileSystem, "delay", 0.002)
    loaded, errors = [], []

    def load():  # a flock is held per open file, so threads contend like processes do
        try:
            loaded.append(load_corpus(files))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(loaded) == 4
    for corpus in loaded:
        _assert_mapped_equal(corpus, original)
    assert len(FakeRemoteFileSystem.opened) == 2  # one download of each file, the others waited


def test_a_remote_shard_index_is_copied_with_the_shard_and_memory_mapped(remote, tmp_path):
    import faiss

    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import add_shard_to_index, load_index, train_once

    original = _corpus("f1", size=200)
    files = spill_corpus(original, remote)
    trained = train_once([(f"r{i:03d}", v) for i, v in enumerate(original.vectors)], remote,
                         RetrieveOptions(index="ivf", nlist=4))
    indexed = add_shard_to_index(files, trained)
    assert indexed.index_path.startswith(remote) and indexed.index_path in indexed.paths
    index = load_index(indexed)
    assert index.ntotal == 200
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists), faiss.OnDiskInvertedLists)
    (entry,) = _cache_entries(tmp_path)
    assert os.path.basename(indexed.index_path) in os.listdir(tmp_path / "machine-tmp" / "vlp-data-corpus" / entry)


def test_a_remote_shard_and_its_index_are_localised_once_for_a_search(remote, tmp_path, monkeypatch):
    """The searcher of a remote indexed shard works out the local copies once (one match of the
    remote folder, one lock), not once for the corpus and again for its index."""
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _load_searcher, add_shard_to_index, train_once

    original = _corpus("f2", size=200)
    options = RetrieveOptions(index="ivf", nlist=4, nprobe=4)
    files = spill_corpus(original, remote)
    indexed = add_shard_to_index(files, train_once([(f"r{i:03d}", v) for i, v in enumerate(original.vectors)],
                                                   remote, options))
    resolved = []
    cache_dir = retrieve.corpus_cache_dir
    monkeypatch.setattr(retrieve, "corpus_cache_dir", lambda f: resolved.append(f) or cache_dir(f))
    loaded, searcher = _load_searcher(indexed, options)
    assert resolved == [indexed]
    _assert_mapped_equal(loaded, original)
    assert searcher is not None
