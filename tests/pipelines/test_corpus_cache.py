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

from pipelines import corpus_cache, retrieve
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
    monkeypatch.setattr(corpus_cache, "CACHE_CHUNK_BYTES", 1024)
    return f"{SCHEME}://staging"


def _corpus(fingerprint: str, seed: int = 0, size: int = 50) -> Corpus:
    vectors = np.random.default_rng(seed).random((size, 16), dtype=np.float32)
    return Corpus([f"s{i:03d}" for i in range(size)], [f"text {i}" for i in range(size)], vectors, fingerprint)


def _assert_mapped_equal(loaded: Corpus, original: Corpus):
    assert isinstance(loaded.vectors, np.memmap) and not loaded.vectors.flags.owndata
    np.testing.assert_array_equal(loaded.vectors, original.vectors)
    assert loaded.ids == original.ids and loaded.texts == original.texts


def _cache_entries(tmp_path):
    """The cache's folders (one per copied shard), not its lock file."""
    root = tmp_path / "machine-tmp" / "vlp-data-corpus"
    return sorted(name for name in os.listdir(root) if (root / name).is_dir())


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
    monkeypatch.setattr(retrieve, "corpus_cache_dir", lambda f, *found: resolved.append(f) or cache_dir(f, *found))
    loaded, searcher = _load_searcher(indexed, options)
    assert resolved == [indexed]
    _assert_mapped_equal(loaded, original)
    assert searcher is not None


# ---------------------------------------------------------------------------------------------
# The bounded cache: least recently used shards evicted, never one a process is using

HOLD_SCRIPT = """
import sys, tempfile
import numpy as np
sys.path.insert(0, {worktree!r})
from tests.pipelines.test_corpus_cache import FakeRemoteFileSystem
from pipelines.retrieve import CorpusFiles, load_corpus
FakeRemoteFileSystem.root = {root!r}
tempfile.tempdir = {machine_tmp!r}
corpus = load_corpus(CorpusFiles({directory!r}, {fingerprint!r}, {size}), {cache_gb!r})
print("held", flush=True)
sys.stdin.readline()  # until the parent has evicted what it could
print(float(np.asarray(corpus.vectors, dtype=np.float64).sum()), flush=True)
"""


def _other_process(tmp_path, files, cache_gb):
    """A second process of this machine that loads `files` through the cache and keeps it mapped
    until told to go on; it then prints the sum of the vectors it still maps."""
    import subprocess
    import sys
    script = HOLD_SCRIPT.format(worktree=os.getcwd(), root=FakeRemoteFileSystem.root,
                                machine_tmp=str(tmp_path / "machine-tmp"), directory=files.directory,
                                fingerprint=files.fingerprint, size=files.size, cache_gb=cache_gb)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _shards(remote, count=3, size=200):
    corpora = [_corpus(f"fp{n}", seed=n, size=size) for n in range(count)]
    return corpora, [spill_corpus(corpus, remote) for corpus in corpora]


def _cap_gb_for(tmp_path, files, shards: float) -> float:
    """A cap of `shards` times the cache folder of `files` (loaded once to measure it), in GiB."""
    load_corpus(files)
    (entry,) = _cache_entries(tmp_path)
    folder = tmp_path / "machine-tmp" / "vlp-data-corpus" / entry
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return shards * size / corpus_cache.GIB


def _cached(tmp_path) -> list[str]:
    """The fingerprints of the shards in the cache."""
    return sorted(entry.split("-")[0] for entry in _cache_entries(tmp_path))


def test_a_full_cache_evicts_the_least_recently_used_shard(remote, tmp_path):
    """Cap of 2 shards, 3 used in turn: each new one evicts the one used longest ago (a use
    refreshes the stamp on disk, so another process's use counts too), not the one used last."""
    corpora, (a, b, c) = _shards(remote)
    cap = _cap_gb_for(tmp_path, a, 2.5)
    load_corpus(b, cap)
    load_corpus(a, cap)  # a used after b: b is now the least recently used
    assert _cached(tmp_path) == ["fp0", "fp1"]
    opened = len(FakeRemoteFileSystem.opened)
    _assert_mapped_equal(load_corpus(c, cap), corpora[2])
    assert _cached(tmp_path) == ["fp0", "fp2"]  # b evicted, a kept
    assert len(FakeRemoteFileSystem.opened) == opened + 2  # c copied, nothing else

    # another process (a rerun, say) uses a: its stamp on disk makes c the least recently used
    child = _other_process(tmp_path, a, cap)
    child.communicate("go\n")
    assert child.returncode == 0
    load_corpus(b, cap)
    assert _cached(tmp_path) == ["fp0", "fp1"]


def test_a_shard_in_use_by_another_process_is_never_evicted(remote, tmp_path):
    corpora, (a, b, c) = _shards(remote)
    cap = _cap_gb_for(tmp_path, a, 2.5)  # a copied, and unused since: the least recently used
    child = _other_process(tmp_path, a, cap)  # ... but mapped by another process of the machine
    try:
        load_corpus(b, cap)
        _assert_mapped_equal(load_corpus(c, cap), corpora[2])
        assert _cached(tmp_path) == ["fp0", "fp2"]  # b evicted instead of a
    finally:
        out, _ = child.communicate("go\n")
    assert child.returncode == 0 and float(out) == float(corpora[0].vectors.astype(np.float64).sum())


def test_a_shard_evicted_and_copied_again_searches_the_same(remote, tmp_path):
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _load_searcher
    from pipelines.search import candidates_for, rank_candidates

    corpora, shards = _shards(remote)
    options = RetrieveOptions(k=5, corpus_cache_gb=_cap_gb_for(tmp_path, shards[0], 2.5))
    queries = np.random.default_rng(9).random((7, 16), dtype=np.float32)

    def search(files):
        corpus, searcher = _load_searcher(files, options)
        indices, scores = rank_candidates(queries, searcher.search(queries, candidates_for(options, len(corpus))),
                                          corpus, options.k)
        return [[(corpus.ids[i], float(s)) for i, s in zip(row, row_scores)] for row, row_scores in zip(indices, scores)]

    first = [search(files) for files in shards]  # the third evicts the first
    assert "fp0" not in _cached(tmp_path)
    opened = len(FakeRemoteFileSystem.opened)
    assert search(shards[0]) == first[0]  # copied again (evicting the second), the same hits
    assert len(FakeRemoteFileSystem.opened) == opened + 2 and _cached(tmp_path) == ["fp0", "fp2"]


def test_a_cache_held_by_other_users_fails_clearly_after_waiting(remote, tmp_path, monkeypatch):
    corpora, (a, b, c) = _shards(remote)
    cap = _cap_gb_for(tmp_path, a, 2.5)
    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 0.0)
    held = [load_corpus(a, cap), load_corpus(b, cap)]  # both mapped (each holds its lease)
    with pytest.raises(corpus_cache.CorpusCacheFull) as failure:
        load_corpus(c, cap)
    message = str(failure.value)
    assert c.vectors_path in message and "other processes are using" in message and "--corpus-cache-gb" in message
    assert f"{int(cap * corpus_cache.GIB):,} bytes" in message and os.path.join("machine-tmp", "vlp-data-corpus") in message
    assert _cached(tmp_path) == ["fp0", "fp1", "fp2"]  # nothing evicted (c's folder: empty, evictable)
    held.pop()  # b let go: its room is free again
    _assert_mapped_equal(load_corpus(c, cap), corpora[2])
    assert _cached(tmp_path) == ["fp0", "fp2"]


def test_a_shard_bigger_than_the_cap_fails_at_once(remote, tmp_path, monkeypatch):
    corpora, (a,) = _shards(remote, count=1)
    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 3600.0)

    def no_wait(seconds):
        raise AssertionError("waited for room that could never be made")
    monkeypatch.setattr(corpus_cache.time, "sleep", no_wait)
    with pytest.raises(corpus_cache.CorpusCacheFull, match=r"is [\d,]+ bytes, more than the corpus cache's cap of 1,073 bytes"):
        load_corpus(a, 1073 / corpus_cache.GIB)


def test_a_sharded_search_over_a_small_cache_evicts_counts_and_finds_the_same(remote, tmp_path, monkeypatch):
    """RetrieveTopK over 3 remote shards with room for one at a time: the shards are evicted and
    copied again as the search moves between them (counted in the search stage's Beam counters),
    and the hits are those of the whole corpus searched at once. The search lets its previous
    shard go before it loads the next, so it never waits for room it holds itself."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.cli import corpus_cache_line, counter_totals
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import RetrieveTopK, ShardCorpus

    from .conftest import RUNNER, whole_corpus_hits

    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 0.0)  # room is never held: no waiting
    rows, dim = 300, 64
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"s{i:04d}" for i in range(rows)]
    queries = vectors[:40] + 0.3 * rng.standard_normal((40, dim)).astype(np.float32)
    expected = [(f"q{j:03d}", hits) for j, hits in
                enumerate(whole_corpus_hits(Corpus(ids, [f"text of {i}" for i in ids], vectors), queries, 5))]
    # a little over half the corpus: more than any one shard, less than two
    options = RetrieveOptions(k=5, corpus_shard_rows=100, batch_size=8,
                              corpus_cache_gb=0.6 * rows * dim * 4 / corpus_cache.GIB)
    pipeline = TestPipeline(runner=RUNNER)
    shards = (pipeline | "Corpus" >> beam.Create([((i, f"text of {i}"), v) for i, v in zip(ids, vectors)])
              | ShardCorpus(f"{remote}/_corpus", options)).main
    hits = (pipeline | "Queries" >> beam.Create([(f"q{j:03d}", q) for j, q in enumerate(queries)])
            | RetrieveTopK(shards, options)).main
    assert_that(hits, equal_to(expected))
    result = pipeline.run()
    result.wait_until_finish()
    counters = counter_totals(result, "retrieve")
    assert counters["corpus_cache_evictions"] >= 1 and counters["corpus_cache_evicted_bytes"] > 0
    assert counters["corpus_cache_downloads"] >= 3
    assert corpus_cache_line(result) == (f"  corpus cache: {counters['corpus_cache_downloads']} shard copies to "
                                         f"workers, {counters['corpus_cache_evictions']} evicted "
                                         f"({counters['corpus_cache_evicted_bytes'] / 2 ** 30:.2f} GiB freed)")
    assert len(_cache_entries(tmp_path)) <= 2


def test_users_cycling_over_more_shards_than_fit_never_lose_a_file(remote, tmp_path, monkeypatch):
    """Three users (threads: each opens its own lock files, so they contend as processes do) use
    three shards in turn through a cache with room for two: a user waits for room rather than
    evicting a shard another one maps, finds every file of its shard in place while it holds it,
    and reads the right vectors."""
    corpora, shards = _shards(remote)
    cap = _cap_gb_for(tmp_path, shards[0], 2.5)
    monkeypatch.setattr(corpus_cache, "ROOM_POLL_SECONDS", 0.001)
    errors = []

    def user(first):
        try:
            for step in range(6):
                n = (first + step) % 3
                corpus = load_corpus(shards[n], cap)
                time.sleep(0.002)  # others run meanwhile
                for path in (shards[n].vectors_path, shards[n].rows_path):  # still in place while held
                    assert os.path.exists(os.path.join(corpus.holds.folder, os.path.basename(path))), path
                _assert_mapped_equal(corpus, corpora[n])
                del corpus
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(_cache_entries(tmp_path)) <= 2


# ---------------------------------------------------------------------------------------------
# A failed or killed copy: the retry counts the folder as its complete files only

def _remote_files(tmp_path, names=("a.bin", "b.bin"), size=100_000) -> dict:
    """Remote files of `size` bytes each, as lease_copies takes them (remote path -> size)."""
    store = tmp_path / "store" / "staging"
    store.mkdir(parents=True, exist_ok=True)
    for name in names:
        (store / name).write_bytes(os.urandom(size))
    return {f"{SCHEME}://staging/{name}": size for name in names}


def _cache_folder(tmp_path, name="shard") -> str:
    return str(tmp_path / "machine-tmp" / "vlp-data-corpus" / name)


def test_a_copy_that_failed_midway_is_retried_within_a_cap_of_one_and_a_quarter_shards(remote, tmp_path, monkeypatch):
    """A download that fails on the shard's second file (the first one copied) leaves no room
    reserved: the retry copies the missing file under a cap of 1.25 shards, and no other
    process is waited for (there is none)."""
    remotes = _remote_files(tmp_path)
    cap_gb = 250_000 / corpus_cache.GIB
    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 0.0)  # a wrongly held room fails now, not in 10 min
    folder = _cache_folder(tmp_path)
    download, calls = corpus_cache._download, []

    def failing_second(source, path):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("connection reset by the store")
        download(source, path)

    monkeypatch.setattr(corpus_cache, "_download", failing_second)
    with pytest.raises(OSError, match="connection reset"):
        corpus_cache.lease_copies(folder, remotes, cap_gb)
    left = sorted(os.listdir(folder))
    monkeypatch.setattr(corpus_cache, "_download", download)
    with corpus_cache.lease_copies(folder, remotes, cap_gb) as lease:
        assert sorted(n for n in os.listdir(lease.folder) if n.endswith(".bin")) == ["a.bin", "b.bin"]
        assert os.path.getsize(os.path.join(folder, "b.bin")) == 100_000
    assert FakeRemoteFileSystem.opened == [f"{SCHEME}://staging/a.bin", f"{SCHEME}://staging/b.bin"]
    assert left == [".fill.lock", ".use.lock", "a.bin"]  # the failed copy left no room reserved
    assert not os.path.exists(os.path.join(folder, corpus_cache.RESERVED))


def test_a_partial_file_left_by_a_killed_copy_is_not_counted(remote, tmp_path, monkeypatch):
    """A process killed mid-copy (SIGKILL: no clean-up) leaves `a.bin.partial` and `.reserved`:
    the next filler deletes both and copies the shard under a cap of 1.25 shards."""
    remotes = _remote_files(tmp_path)
    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 0.0)
    folder = _cache_folder(tmp_path)
    os.makedirs(folder)
    with open(os.path.join(folder, "a.bin.partial"), "wb") as f:
        f.write(b"\0" * 90_000)
    with open(os.path.join(folder, corpus_cache.RESERVED), "w") as f:
        f.write("200000")
    with corpus_cache.lease_copies(folder, remotes, 250_000 / corpus_cache.GIB):
        assert sorted(n for n in os.listdir(folder) if not n.startswith(".")) == ["a.bin", "b.bin"]
    assert os.path.getsize(os.path.join(folder, "a.bin")) == 100_000


# ---------------------------------------------------------------------------------------------
# An idle search process holds no shard

IDLE_SEARCH_SCRIPT = """
import sys, tempfile
import numpy as np
sys.path.insert(0, {worktree!r})
from tests.pipelines.test_corpus_cache import FakeRemoteFileSystem
from pipelines.options import RetrieveOptions
from pipelines.retrieve import CorpusFiles, _SearchShard
FakeRemoteFileSystem.root = {root!r}
tempfile.tempdir = {machine_tmp!r}
search = _SearchShard(RetrieveOptions(k=3, corpus_cache_gb={cache_gb!r}))
search.setup()
search.start_bundle()
queries = np.random.default_rng(5).random((4, 16), dtype=np.float32)
hits = list(search.process((CorpusFiles({directory!r}, {fingerprint!r}, {size}), (["q0", "q1", "q2", "q3"], queries))))
assert len(hits) == 12, hits
search.finish_bundle()  # the bundle is over; no more elements come to this process
print("idle", flush=True)
sys.stdin.readline()
search.teardown()
"""


def test_an_idle_search_process_holds_no_shard(remote, tmp_path, monkeypatch):
    """Another process searched shard X through _SearchShard and its bundle ended: it gets no
    more elements but lives on. With room for 1.5 shards, this process copies Y at once (X is
    evicted), without waiting for that process to exit."""
    import subprocess
    import sys

    corpora, (x, y) = _shards(remote, count=2)
    cap = _cap_gb_for(tmp_path, x, 1.5)
    monkeypatch.setattr(corpus_cache, "ROOM_WAIT_SECONDS", 0.0)  # room held by the idle process: fail now
    script = IDLE_SEARCH_SCRIPT.format(worktree=os.getcwd(), root=FakeRemoteFileSystem.root,
                                       machine_tmp=str(tmp_path / "machine-tmp"), directory=x.directory,
                                       fingerprint=x.fingerprint, size=x.size, cache_gb=cap)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "idle"
        _assert_mapped_equal(load_corpus(y, cap), corpora[1])
        assert _cached(tmp_path) == ["fp1"]  # X evicted: nobody held it
    finally:
        child.communicate("go\n")
    assert child.returncode == 0


def test_a_latest_shared_object_lives_while_a_handle_of_the_process_uses_it():
    """Two copies of one handle (two DoFn instances of a process): the object is dropped when
    the last of them releases it, and made again by the next acquire; a new tag replaces it."""
    import pickle

    from pipelines.sharing import LatestShared

    first = LatestShared()
    second = pickle.loads(pickle.dumps(first))
    made = []

    def make(name):
        made.append(name)
        return [name]

    value = first.acquire(lambda: make("x"), tag="x")
    assert second.acquire(lambda: make("x"), tag="x") is value and made == ["x"]
    first.release()
    assert second.held  # still used by the second
    second.release()
    assert not first.held and not second.held
    first.acquire(lambda: make("x"), tag="x")
    assert made == ["x", "x"]
    second.acquire(lambda: make("y"), tag="y")  # another shard: the first's x is let go
    first.release()
    assert second.held and made == ["x", "x", "y"]  # the first was no user of y
    second.release()
    assert not second.held


# ---------------------------------------------------------------------------------------------
# Between bundles: what a search keeps (a GPU searcher's shard, the remote files' match) and
# what it lets go (a CPU searcher's shard, for the cache's eviction)


def _bundle(search, shard, queries) -> list:
    """One bundle of _SearchShard with one element: its hits, best first per query."""
    search.start_bundle()
    hits = list(search.process((shard, ([f"q{i}" for i in range(len(queries))], queries))))
    search.finish_bundle()
    return sorted(hits, key=lambda hit: (hit[0], -hit[1][0], hit[1][1]))


def _expected(corpus: Corpus, queries, k: int) -> list:
    """The exact top-k of `corpus`, in _bundle's order (scores as the search rounds them)."""
    from pipelines.options import RetrieveOptions
    from pipelines.search import FaissSearcher, candidate_count, rank_candidates

    found = FaissSearcher(corpus.vectors, RetrieveOptions()).search(queries, candidate_count(k, len(corpus)))
    indices, scores = rank_candidates(queries, found, corpus, k)
    hits = [(f"q{q}", (float(score), corpus.ids[i], corpus.texts[i]))
            for q, (row, row_scores) in enumerate(zip(indices, scores)) for i, score in zip(row, row_scores)]
    return sorted(hits, key=lambda hit: (hit[0], -hit[1][0], hit[1][1]))


@pytest.fixture
def matches(monkeypatch):
    """The remote paths of each FileSystems.match call of the search (a gs:// round trip each)."""
    calls = []
    real = retrieve.FileSystems.match
    monkeypatch.setattr(retrieve.FileSystems, "match",
                        lambda paths, *a, **kw: calls.append(tuple(paths)) or real(paths, *a, **kw))
    return calls


def test_a_search_process_matches_a_remote_shard_once_per_run_yet_lets_it_go_each_bundle(remote, tmp_path, matches):
    """Each bundle's end lets the shard go (so the cache may evict it) and the next bundle maps
    it again, but its remote files are matched in the process's first bundle only; a shard
    evicted meanwhile is copied again from what was matched, and searches the same."""
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _SearchShard

    corpora, (x, y) = _shards(remote, count=2)
    options = RetrieveOptions(k=3, corpus_cache_gb=_cap_gb_for(tmp_path, x, 1.5))  # room for one shard
    queries = np.random.default_rng(5).random((4, 16), dtype=np.float32)
    search = _SearchShard(options)
    search.setup()
    matches.clear()
    opened = len(FakeRemoteFileSystem.opened)
    for _ in range(3):
        assert _bundle(search, x, queries) == _expected(corpora[0], queries, 3)
        assert not search._shared.held  # let go at the bundle's end, as before
    assert matches == [tuple(x.paths)]  # one round trip, not one per bundle
    assert len(FakeRemoteFileSystem.opened) == opened  # copied by _cap_gb_for already: not again

    assert _bundle(search, y, queries) == _expected(corpora[1], queries, 3)  # evicts x
    assert _cached(tmp_path) == ["fp1"]
    assert _bundle(search, x, queries) == _expected(corpora[0], queries, 3)  # copied again (evicts y)
    assert _cached(tmp_path) == ["fp0"] and len(FakeRemoteFileSystem.opened) == opened + 4
    assert matches == [tuple(x.paths), tuple(y.paths)]  # the copy again needed no new match
    search.teardown()

    another_run = _SearchShard(options)  # a new pipeline: its own matches
    assert _bundle(another_run, x, queries) == _expected(corpora[0], queries, 3)
    assert matches == [tuple(x.paths), tuple(y.paths), tuple(x.paths)]


def test_a_later_run_in_the_same_process_searches_a_rewritten_shard_not_its_earlier_copy(remote, tmp_path, matches):
    """Two runs in one process (DirectRunner, a worker pool) into the same staging folder: the
    second wrote the same shard names (same ids, another embedding model). Its search matches
    them again, so the cache folder's key sees the new files and the new vectors are searched."""
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _SearchShard

    queries = np.random.default_rng(5).random((4, 16), dtype=np.float32)
    first = _corpus("fp0", seed=0, size=200)
    files = spill_corpus(first, remote)
    assert _bundle(_SearchShard(RetrieveOptions(k=3)), files, queries) == _expected(first, queries, 3)

    second = _corpus("fp0", seed=1, size=200)
    rewritten = spill_corpus(second, remote)
    assert rewritten == files  # the same names: only the files' times and contents tell them apart
    stored = os.path.join(FakeRemoteFileSystem.root, "staging", os.path.basename(files.vectors_path))
    os.utime(stored, (time.time() + 10, time.time() + 10))  # a later write, whatever the clock's resolution
    hits = _bundle(_SearchShard(RetrieveOptions(k=3)), rewritten, queries)
    assert hits == _expected(second, queries, 3) != _expected(first, queries, 3)
    assert len(_cache_entries(tmp_path)) == 2


def test_a_cuda_search_that_falls_back_to_the_cpu_lets_its_shard_go_like_a_cpu_search(tmp_path, monkeypatch):
    """--device cuda --index ivf without a usable faiss-gpu searches on the CPU: the shard is
    mapped again cheaply, so the bundle's end lets it go (the cache may evict it), as on --device cpu."""
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _SearchShard, add_shard_to_index, train_once
    from pipelines.search import faiss_gpu_available

    if faiss_gpu_available():
        pytest.skip("faiss-gpu sees a GPU here: the ivf search does not fall back")
    corpus = _corpus("f1", size=200)
    options = RetrieveOptions(k=3, device="cuda", index="ivf", nlist=4, nprobe=4)  # every list probed: exact
    sample = [(f"r{i:03d}", v) for i, v in enumerate(corpus.vectors)]
    shard = add_shard_to_index(spill_corpus(corpus, str(tmp_path)), train_once(sample, str(tmp_path), options))
    queries = np.random.default_rng(5).random((4, 16), dtype=np.float32)
    loaded = []
    load = retrieve._load_searcher
    monkeypatch.setattr(retrieve, "_load_searcher", lambda *args: loaded.append(load(*args)) or loaded[-1])
    search = _SearchShard(options)
    search.setup()
    assert _bundle(search, shard, queries) == _expected(corpus, queries, 3)
    (_, searcher), = loaded
    assert searcher.device == "cpu"  # what the search really ran on
    assert not search._shared.held  # let go at the bundle's end, as a CPU search
    search.teardown()


def test_a_flat_cuda_search_without_a_cuda_device_fails_in_one_line():
    import torch

    from pipelines.options import RetrieveOptions
    from pipelines.search import faiss_gpu_available, make_searcher

    if torch.cuda.is_available() or faiss_gpu_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(RuntimeError, match="--device cuda was given but torch sees no CUDA device"):
        make_searcher(_corpus("f1"), RetrieveOptions(device="cuda"))


def test_a_searcher_on_the_gpu_keeps_its_shard_between_bundles_and_one_on_the_cpu_does_not(tmp_path, monkeypatch):
    """The rule reads the searcher's own device: a GPU searcher copied the whole shard to the
    device, which costs more than searching a batch there. (No GPU here: a stand-in searcher
    that says it runs on cuda, beside the real CPU one.)"""
    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _SearchShard
    from pipelines.search import FaissSearcher

    corpus = _corpus("f1")
    files = spill_corpus(corpus, str(tmp_path))
    queries = np.random.default_rng(5).random((2, 16), dtype=np.float32)

    class OnTheGpu(FaissSearcher):
        def __init__(self, vectors, options):
            super().__init__(vectors, options)
            self.device = "cuda"

    for make, device, kept in ((FaissSearcher, "cpu", False), (OnTheGpu, "cuda", True)):
        monkeypatch.setattr(retrieve, "make_searcher",
                            lambda loaded, options, index=None, make=make: make(loaded.vectors, options))
        search = _SearchShard(RetrieveOptions(k=3, device=device))
        assert _bundle(search, files, queries) == _expected(corpus, queries, 3)
        assert search._shared.held is kept, device
        search.teardown()  # the process ends: let go either way
        assert not search._shared.held
