"""One copy per worker process of a heavy object (spaCy pipeline, word vectors, a search index),
shared by every DoFn instance and thread of that process through Beam's `Shared`."""
from __future__ import annotations

from apache_beam.utils.shared import Shared


class _Holder:  # Shared keeps a weak reference, which plain objects (dicts, arrays) cannot take
    def __init__(self, value):
        self.value = value


def acquire_shared(shared: Shared, make, tag: str):
    """The process's object under `tag`, made by `make()` the first time."""
    return shared.acquire(lambda: _Holder(make()), tag=tag).value
