"""The WebDataset sample format on disk: keys, the two members of a sample, deterministic tar
bytes. No Beam here: the trainer's tests and benchmarks write shards with it on any machine."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np

_TAR_MTIME = 0  # fixed member metadata: identical inputs give identical bytes


def sample_key(image_id: str) -> str:
    """WebDataset keys may not contain dots; image ids may. Also spreads images over shards."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:16]


def encode_sample(sample: dict, feats: np.ndarray) -> tuple[bytes, bytes]:
    """The two members of one sample: canonical JSON and a float16 .npy (no pickle)."""
    meta = json.dumps(sample, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(feats, dtype=np.float16), allow_pickle=False)
    return meta, buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
