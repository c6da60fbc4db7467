"""One copy per worker process of a heavy object (spaCy pipeline, word vectors, a search index),
shared by every DoFn instance and thread of that process through Beam's `Shared`."""
from __future__ import annotations

import threading
import uuid

from apache_beam.utils.shared import Shared


class _Holder:  # Shared keeps a weak reference, which plain objects (dicts, arrays) cannot take
    def __init__(self, value):
        self.value = value


def acquire_shared(shared: Shared, make, tag: str):
    """The process's object under `tag`, made by `make()` the first time."""
    return shared.acquire(lambda: _Holder(make()), tag=tag).value


class LatestShared:
    """One object per process under the latest tag, shared by every DoFn instance and thread of
    the process (like Shared with a changing tag), except that the previous object is let go
    *before* the next one is made, not after: an object that holds a scarce resource (a corpus
    shard's cache lease, corpus_cache.py) never has its successor wait for room it holds itself.
    A thread still using the previous object keeps it until it is done."""

    _slots: dict = {}  # handle key -> _Slot, per process
    _slots_lock = threading.Lock()

    def __init__(self):
        self._key = uuid.uuid4().hex  # pickled with the DoFn: every copy of it shares the slot

    def acquire(self, make, tag):
        with LatestShared._slots_lock:
            slot = LatestShared._slots.setdefault(self._key, _Slot())
        with slot.lock:
            if slot.value is None or slot.tag != tag:
                slot.value = slot.tag = None  # dropped first (freed now unless a thread still uses it)
                slot.value, slot.tag = make(), tag
            return slot.value


class _Slot:
    def __init__(self):
        self.lock = threading.Lock()
        self.value = self.tag = None
