"""The model folder's digest is hashed once per machine (remembered by the files' stats) and made
again whenever the folder changes."""
import os

import pytest

from pipelines import fingerprint
from pipelines.fingerprint import folder_digest


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 16)
    return folder


@pytest.fixture
def hashed(monkeypatch):
    """The folders whose files were read (hashed), one entry per hashing."""
    calls = []
    real = fingerprint.hash_files
    monkeypatch.setattr(fingerprint, "hash_files", lambda files: calls.append(files) or real(files))
    monkeypatch.setattr(fingerprint, "_IN_PROCESS", {})
    return calls


def _new_process(monkeypatch):
    monkeypatch.setattr(fingerprint, "_IN_PROCESS", {})


def test_the_digest_is_hashed_once_and_reused_by_other_processes(model, tmp_path, hashed, monkeypatch):
    cache = str(tmp_path / "cache")
    digest = folder_digest(str(model), cache)
    assert len(hashed) == 1 and len(digest) == 64
    assert folder_digest(str(model), cache) == digest and len(hashed) == 1  # this process remembers it
    _new_process(monkeypatch)
    assert folder_digest(str(model), cache) == digest and len(hashed) == 1  # another process reads it
    _new_process(monkeypatch)
    assert folder_digest(str(model), str(tmp_path / "other-cache")) == digest and len(hashed) == 2  # another machine


@pytest.mark.parametrize("change", ["rewrite same size", "add file", "remove file", "rename file", "replace file"])
def test_any_change_to_the_folder_hashes_it_again(model, tmp_path, hashed, monkeypatch, change):
    cache = str(tmp_path / "cache")
    weights = model / "sub" / "weights.bin"
    before = folder_digest(str(model), cache)
    stat = os.stat(weights)
    if change == "rewrite same size":  # even with the old mtime put back (cp -p, rsync -t)
        weights.write_bytes(b"\x00" * 15 + b"\x01")
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif change == "add file":
        (model / "tokenizer.json").write_text("{}")
    elif change == "remove file":
        os.remove(model / "config.json")
    elif change == "rename file":
        os.rename(weights, model / "sub" / "weights2.bin")
    else:  # a new file of the same content and mtime moved over the old one
        other = tmp_path / "w.bin"
        other.write_bytes(b"\x00" * 16)
        os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(other, weights)
    _new_process(monkeypatch)
    after = folder_digest(str(model), cache)
    assert len(hashed) == 2
    assert (after == before) == (change == "replace file")  # the same bytes give the same digest


def test_a_damaged_remembered_digest_is_not_trusted(model, tmp_path, hashed, monkeypatch):
    cache = tmp_path / "cache"
    digest = folder_digest(str(model), str(cache))
    (remembered,) = (cache / "digests").iterdir()
    remembered.write_text("not a digest")
    _new_process(monkeypatch)
    assert folder_digest(str(model), str(cache)) == digest and len(hashed) == 2


def test_an_unwritable_cache_still_gives_the_digest(model, tmp_path, hashed):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    assert folder_digest(str(model), str(blocked)) == folder_digest(str(model), str(tmp_path / "ok"))
