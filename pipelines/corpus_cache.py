"""This machine's cache of remote corpus shards: a bounded folder of local copies with
least-recently-used eviction, safe across the machine's processes.

A remote (gs://) corpus shard is copied once per machine into `<tmp>/vlp-data-corpus/<name>/`
and memory-mapped by every SDK process that searches it. Without a bound, a worker that searches
many shards over a job fills its disk (a BookCorpus corpus is 37 shards of 3.1 GB; a Dataflow
batch worker has a 25 GB boot disk by default). Here the cache is held under a cap
(`--corpus-cache-gb`, default half the cache filesystem) and the free disk: before a shard is
copied, the least recently used folders that no process is using are deleted until it fits.

Locks (fcntl.flock, so a process that dies releases its locks; threads each open their own lock
files, so they contend like processes):
- `<root>/.cache.lock`, exclusive: held while a process takes a lease, reserves room for a
  download or evicts. Evictions and room reservations are serialised by it; downloads are not
  (they run outside it, in parallel for different shards).
- `<folder>/.use.lock`, shared: held by every process using the folder's files, from before it
  looks at them until it no longer maps them (a `Lease`: the searcher's lifetime) and by the
  process downloading into the folder. An evictor takes it exclusively, without waiting, under
  the cache lock: a folder in use is skipped, never deleted under its users, and no process can
  find a folder half deleted (leases are taken under the cache lock too).
- `<folder>/.fill.lock`, exclusive: held by the process downloading into the folder; others that
  want the same files wait on it instead of downloading them again.

`<folder>/.used` is the last-use stamp (its mtime, set on every lease: access times are often
not kept); `<folder>/.reserved` the folder's full size while a download fills it, so room
reserved by one process is not handed out twice (removed when the download ends, copied or not).
The fill lock's holder is the folder's only writer: on taking it, it deletes the `.partial`
files and `.reserved` an earlier holder left (one killed mid-copy), so a retry counts the
folder as its complete files only.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

CACHE_CHUNK_BYTES = 8 << 20  # a remote file is copied this much at a time, never read whole
GIB = 1 << 30  # --corpus-cache-gb is in GiB, as Dataflow's --disk_size_gb
# Without --corpus-cache-gb: this share of the cache filesystem. On a Dataflow worker the temp
# folder is on the boot disk, which also holds the OS, the SDK container image and other stages'
# temp files; half of a 25 GB disk keeps 4 flat shards of 2M rows (3.1 GB each).
DEFAULT_DISK_SHARE = 0.5
# How long a copy waits for room held by other processes' leases (a search of one query batch
# against a 2M-row shard takes about a minute on one vCPU, docs/scale.md) before it fails.
ROOM_WAIT_SECONDS = 600.0
ROOM_POLL_SECONDS = 2.0

CACHE_LOCK, USE_LOCK, FILL_LOCK, USED_STAMP, RESERVED = ".cache.lock", ".use.lock", ".fill.lock", ".used", ".reserved"
PARTIAL_SUFFIX = ".partial"  # a file being copied; renamed into place when complete


class CorpusCacheFull(OSError):
    """A corpus shard cannot be copied to this machine: bigger than the cache's cap, or the rest
    of the cache is in use by other processes (or the disk is full) for longer than the wait."""


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), "vlp-data-corpus")


def cap_bytes(cap_gb: float | None, root: str) -> int:
    """The cache's cap: `cap_gb` GiB, or DEFAULT_DISK_SHARE of the filesystem `root` is on."""
    if cap_gb is not None:
        return int(cap_gb * GIB)
    disk = os.statvfs(root)
    return int(disk.f_blocks * disk.f_frsize * DEFAULT_DISK_SHARE)


class Lease:
    """A shared hold on a cache folder: while it is held, no process evicts the folder. Released
    by `release()`, on leaving a `with` block, or when the lease is garbage collected (its lock
    file closes), so the object whose files it guards can carry it (Corpus.holds)."""

    def __init__(self, folder: str, use_lock):
        self.folder = folder
        self._use_lock = use_lock

    def release(self) -> None:
        if self._use_lock is not None:
            self._use_lock.close()  # closing the file drops its flock
            self._use_lock = None

    @property
    def held(self) -> bool:
        return self._use_lock is not None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


@contextmanager
def _locked(path: str, mode: int) -> Iterator:
    with open(path, "a") as f:
        fcntl.flock(f, mode)  # released when the file closes, also if this process dies
        yield f


def _try_flock(f, mode: int) -> bool:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lease_copies(folder: str, remotes: Mapping[str, int], cap_gb: float | None = None, name: str = "") -> Lease:
    """A lease on `folder` (under cache_root()) holding a copy of each remote file of `remotes`
    (remote path -> size in bytes), each under its base name: copied there first where missing,
    by one process of the machine while the others wanting them wait, after making room under the
    cap. `name` says what is copied (the shard), for errors."""
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    cap = cap_bytes(cap_gb, root)
    name = name or next(iter(remotes), folder)
    deadline = time.monotonic() + ROOM_WAIT_SECONDS
    use = None
    try:
        while True:
            with _locked(os.path.join(root, CACHE_LOCK), fcntl.LOCK_EX):
                if use is None or not os.path.isdir(folder):
                    if use is not None:
                        use.close()
                    os.makedirs(folder, exist_ok=True)
                    use = open(os.path.join(folder, USE_LOCK), "a")
                    # Evictors take it exclusively only under the cache lock, which this process holds.
                    fcntl.flock(use, fcntl.LOCK_SH)
                missing = {remote: size for remote, size in remotes.items()
                           if not os.path.exists(os.path.join(folder, os.path.basename(remote)))}
                if not missing:
                    _stamp(folder)
                    lease, use = Lease(folder, use), None
                    return lease
                fill = open(os.path.join(folder, FILL_LOCK), "a")
                downloading = _try_flock(fill, fcntl.LOCK_EX)
                room = True
                if downloading:
                    try:
                        # The fill lock's holder is the folder's only writer: what an earlier
                        # holder left (a .partial of a killed copy, its .reserved) is stale.
                        _clear_stale_fill(folder)
                        need = sum(missing.values())
                        room = _make_room(root, folder, need, cap, name, deadline)
                        if room:
                            _write_reserved(folder, _folder_bytes(folder) + need)
                    except BaseException:
                        fill.close()
                        raise
            if not room:  # held by other processes' leases: wait outside the cache lock, then look again
                fill.close()
                time.sleep(ROOM_POLL_SECONDS)
                continue
            if not downloading:  # another process is copying these files: wait for it, then look again
                fcntl.flock(fill, fcntl.LOCK_SH)
                fill.close()
                continue
            try:
                for remote in missing:
                    _download(remote, os.path.join(folder, os.path.basename(remote)))
                beam.metrics.Metrics.counter("retrieve", "corpus_cache_downloads").inc()
            finally:
                # copied or not, the folder is now its files: a failed copy's room is not held
                # for a download that no longer runs (the retry reserves again)
                _remove(os.path.join(folder, RESERVED))
                fill.close()
    finally:
        if use is not None:
            use.close()


def _stamp(folder: str) -> None:
    """Mark the folder used now (its LRU order): the mtime of its USED_STAMP file."""
    path = os.path.join(folder, USED_STAMP)
    with open(path, "a"):
        pass
    now = time.time_ns()  # the fine clock: the kernel stamps files with a coarse one (a tick)
    os.utime(path, ns=(now, now))


def _last_used(folder: str) -> float:
    """When the folder was last leased; a folder without a stamp (an interrupted first copy, or an
    older layout) counts from its own mtime."""
    for path in (os.path.join(folder, USED_STAMP), folder):
        try:
            return os.stat(path).st_mtime
        except FileNotFoundError:
            continue
    return 0.0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _clear_stale_fill(folder: str) -> None:
    """Under the folder's fill lock: delete what an earlier holder that failed or was killed left
    behind, so the folder counts as its complete files only (a .partial would count as bytes, and
    only a download of that same file would ever overwrite it)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file(follow_symlinks=False):
                _remove(entry.path)
    _remove(os.path.join(folder, RESERVED))


def _folder_bytes(folder: str) -> int:
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return total


def _read_reserved(folder: str) -> int:
    try:
        with open(os.path.join(folder, RESERVED)) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_reserved(folder: str, size: int) -> None:
    with open(os.path.join(folder, RESERVED), "w") as f:
        f.write(str(size))


def _folders(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]


def _make_room(root: str, folder: str, need: int, cap: int, name: str, deadline: float) -> bool:
    """Under the cache lock: evict least recently used folders no process is using until `need`
    more bytes fit under `cap` and on the disk. False when they do not fit yet because of
    folders in use (the caller waits and tries again); CorpusCacheFull when they never will, or
    the wait is over."""
    whole = _folder_bytes(folder) + need
    if whole > cap:  # never fits, whatever is evicted: say so now
        raise CorpusCacheFull(
            f"corpus shard {name} is {whole:,} bytes, more than the corpus cache's cap of {cap:,} bytes "
            f"({cap / GIB:.2f} GiB, cache folder {root}): raise --corpus-cache-gb (and the worker's "
            f"--disk_size_gb) or lower --corpus-shard-rows")
    while True:
        sizes = {path: (_folder_bytes(path), _read_reserved(path)) for path in _folders(root)}  # one scan a pass
        usage = {path: max(written, reserved) for path, (written, reserved) in sizes.items()}
        # bytes other downloads have reserved but not written yet: not free on the disk either
        pending = sum(max(0, reserved - written) for path, (written, reserved) in sizes.items() if path != folder)
        disk = os.statvfs(root)
        free = disk.f_bavail * disk.f_frsize - pending
        if sum(usage.values()) + need <= cap and need <= free:
            return True
        victims = sorted((path for path in usage if path != folder), key=lambda p: (_last_used(p), p))
        if not any(_evict(path, usage[path]) for path in victims):  # any() stops at the first evicted
            break
    if time.monotonic() < deadline:
        return False
    short = (f"the cap of {cap:,} bytes ({cap / GIB:.2f} GiB)" if sum(usage.values()) + need > cap
             else f"the {max(0, free):,} bytes free on its disk")
    raise CorpusCacheFull(
        f"no room to copy corpus shard {name} ({need:,} bytes) into the corpus cache {root}: with the "
        f"{sum(usage.values()):,} bytes there that other processes are using it does not fit in {short}, and "
        f"nothing could be evicted for {ROOM_WAIT_SECONDS:.0f}s: raise --corpus-cache-gb (and the worker's "
        f"--disk_size_gb) or lower --corpus-shard-rows")


def _evict(folder: str, size: int) -> bool:
    """Delete `folder` if no process holds it (its use lock taken exclusively, without waiting)."""
    try:
        use = open(os.path.join(folder, USE_LOCK), "a")
    except FileNotFoundError:  # gone already
        return False
    with use:
        if not _try_flock(use, fcntl.LOCK_EX):
            return False  # in use: skipped
        last_used = _last_used(folder)
        shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(folder):  # not ours to delete (permissions): not counted as room, never retried in a loop
        log.warning("corpus cache: could not delete %s", folder)
        return False
    beam.metrics.Metrics.counter("retrieve", "corpus_cache_evictions").inc()
    beam.metrics.Metrics.counter("retrieve", "corpus_cache_evicted_bytes").inc(size)
    log.info("corpus cache: evicted %s (%d bytes freed; last used %s)", folder, size,
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_used)))
    return True


def _download(remote: str, path: str) -> None:
    start = time.perf_counter()
    partial = path + PARTIAL_SUFFIX  # one name will do: only the fill lock's holder writes
    try:
        with FileSystems.open(remote, compression_type=CompressionTypes.UNCOMPRESSED) as source, \
                open(partial, "wb") as target:
            shutil.copyfileobj(source, target, CACHE_CHUNK_BYTES)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    log.info("corpus file %s copied to %s in %.1fs", remote, path, time.perf_counter() - start)
