"""One copy per worker process of a heavy object (spaCy pipeline, word vectors, a search index),
shared by every DoFn instance and thread of that process through Beam's `Shared`."""
from __future__ import annotations

import threading
import uuid
import weakref

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
    A thread still using the previous object keeps it until it is done.

    Each copy of the handle (one per deserialised DoFn instance) that acquires the object is a
    user of it until it calls `release()` (the DoFn's finish_bundle and teardown): when the last
    user lets go, the object is dropped too, so an idle process holds nothing (a process that
    stops receiving elements would otherwise keep the last shard's lease until it exits)."""

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
                slot.users.clear()  # the previous object's users hold it themselves while they need it
                slot.value, slot.tag = make(), tag
            slot.users.add(self)
            return slot.value

    def release(self) -> None:
        """This handle is done with the object for now (its bundle ended): the object is dropped
        when no other handle of the process uses it; the next `acquire` makes it again."""
        slot = LatestShared._slots.get(self._key)  # the empty slot stays: a lock and a set
        if slot is None:
            return
        with slot.lock:
            slot.users.discard(self)
            if not slot.users:
                slot.value = slot.tag = None

    @property
    def held(self) -> bool:
        """Whether the process holds an object under this handle's key (for tests and logs)."""
        slot = LatestShared._slots.get(self._key)
        return slot is not None and slot.value is not None


class _Slot:
    def __init__(self):
        self.lock = threading.Lock()
        self.value = self.tag = None
        self.users = weakref.WeakSet()  # the handles using `value`; a handle garbage collected counts no more
