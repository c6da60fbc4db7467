"""Readers: detections (JSONL / Parquet / VinVL TSV, both layouts), the text corpus, and images (see images.py).

Every reader names the file and line/row of a bad record and sends it to the dead-letter output
(`deadletter.REJECTED`) with the reason; valid records go on. A corrupt or truncated file, or a
Parquet file with the wrong schema, is dead-lettered under its own name. Globs and comma-separated
lists of paths are accepted, local or on any Beam filesystem (gs://...).
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import logging
import math
import posixpath
import re
import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.deadletter import REJECTED, Rejected, duplicate_rejection, rejection, rejection_for
from pipelines.options import DetectOptions, TextOptions
from schemas.corpus import normalise_label

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Files


def split_patterns(pattern: str) -> list[str]:
    """'a/*.jsonl,b.parquet' -> ['a/*.jsonl', 'b.parquet']."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty input path")
    return parts


def check_patterns_match(flag: str, pattern: str) -> None:
    """Before a run: FileNotFoundError naming each pattern of `pattern` that matches no file
    (MatchAll would fail the same way, but only once the pipeline runs, inside a Beam trace)."""
    unmatched = [p for p in split_patterns(pattern) if not FileSystems.match([p])[0].metadata_list]
    if unmatched:
        raise FileNotFoundError(f"{flag} {', '.join(map(repr, unmatched))}: matches no file")


class MatchAll(beam.PTransform):
    """All files matching one or more patterns; a pattern that matches nothing fails the run."""

    def __init__(self, pattern: str):
        super().__init__()
        self._patterns = split_patterns(pattern)

    def expand(self, pbegin):
        return (pbegin
                | beam.Create(self._patterns)
                | fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
                | beam.Map(lambda m: m.path)
                | "DistinctFiles" >> beam.Distinct())


def is_local(path: str) -> bool:
    """A path on this machine's filesystem, not an object store URL (gs://, s3://, ...)."""
    return "://" not in path


class UnreadableFile(Rejected):
    """A file that cannot be read (corrupt, truncated, not the format its name says)."""


@contextlib.contextmanager
def open_file(path: str):
    """A binary stream; .gz is decompressed by Python's gzip, which (unlike Beam's reader) notices a
    truncated file and checks the CRC instead of silently returning what it got."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        if not path.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f


def read_lines(path: str):
    """(line number from 1, raw bytes) per line. A corrupt or truncated file raises UnreadableFile
    after the lines read so far; readers keep those and dead-letter the file."""
    line_no = 0
    try:
        with open_file(path) as f:
            for line_no, line in enumerate(iter(f.readline, b""), start=1):
                yield line_no, line
    except (OSError, EOFError, zlib.error) as err:
        raise UnreadableFile("unreadable file", f"stopped after line {line_no}: {err}") from err


def decode_line(raw: bytes, line_no: int) -> str:
    """UTF-8 text of a line. A byte-order mark opening the file is dropped (utf-8-sig): it is not
    whitespace, so it would otherwise stick to the first record."""
    return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")


_PARQUET_ERRORS = (pa.ArrowException, OSError)


PARQUET_BATCH_ROWS = 512  # rows decoded at a time: a detections file with features can be many GB


@contextlib.contextmanager
def open_parquet(path: str):
    """A Parquet file from any Beam filesystem, read on demand (its footer now, pages as rows are
    asked for) rather than loaded whole; UnreadableFile when it is not valid Parquet."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        try:
            parquet = pq.ParquetFile(f)
        except _PARQUET_ERRORS as err:
            raise UnreadableFile("unreadable Parquet file", str(err)) from err
        yield parquet


def iter_parquet_rows(parquet: pq.ParquetFile, columns: list[str]):
    """The rows as dicts, PARQUET_BATCH_ROWS at a time; UnreadableFile at the first damaged page
    (a valid footer does not mean valid pages), after the rows before it."""
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    except _PARQUET_ERRORS as err:
        raise UnreadableFile("unreadable Parquet file", str(err)) from err


def stable_id(text: str, digits: int = 16) -> str:
    """A content-addressed id: the same text gets the same id in every run."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:digits]


# ---------------------------------------------------------------------------------------------
# Detections


def _is_finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # JSON allows integers of any length; past a float's range they are not numbers we keep
        return False


def _number(value, field: str, integer: bool = False):
    # numpy scalars count: a box given as an np.ndarray holds np.float32, not float.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not _is_finite(value):
        raise Rejected(f"field '{_base(field)}' must be a finite number", f"{field} = {value!r:.60}")
    if integer and int(value) != value:
        raise Rejected(f"field '{_base(field)}' must be an integer", f"{field} = {value!r:.60}")
    return int(value) if integer else float(value)


def _sequence(value, field: str) -> list:
    """A list from a list, tuple or array. A string is rejected: list("cat") would pass as three labels."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return list(value)
    raise Rejected(f"field '{_base(field)}' must be a list", f"{field} is {type(value).__name__} {value!r:.60}")


def _base(field: str) -> str:
    """'boxes[3]' -> 'boxes': a reason class names the field, its detail the element."""
    return field.split("[", 1)[0]


def _features_array(features, regions: int) -> np.ndarray:
    _sequence(features, "features")
    try:
        features = np.asarray(features, dtype=np.float32)
    except (ValueError, TypeError) as err:  # ragged rows, strings
        raise Rejected("field 'features' must be a [regions, dim] array of numbers", str(err)) from err
    if features.ndim != 2 or features.shape[0] != regions:
        raise Rejected("features must be [regions, dim], a row per region", f"{regions} regions, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise Rejected("features contain NaN or infinity")
    too_large = np.abs(features) > FLOAT16_MAX
    if too_large.any():
        region, column = (int(i) for i in np.argwhere(too_large)[0])
        raise Rejected("features beyond the float16 range the shards store",
                       f"features[{region}][{column}] = {float(features[region, column]):.6g} (|x| must be at most "
                       f"{FLOAT16_MAX:g})")
    return features


# Boxes against their image: detectors round and pad, so a corner a little outside the image is
# clipped to it (and counted); one further out, or a box with no area, is nonsense that would
# poison every loss (a coordinate of 1e30), so the record is dead-lettered naming the box.
BOX_TOLERANCE = 0.05  # how far past an edge a corner may be, as a fraction of the image's side
BOXES_CLIPPED = "boxes_clipped"  # a validated detection's count of clipped boxes, for stats.json
FLOAT16_MAX = float(np.finfo(np.float16).max)  # shards store region features as float16
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the schemas store scores as float32
INT32_MAX = 2**31 - 1  # the schemas store width and height as int32


def fit_boxes_to_image(boxes: list[list[float]], width: int, height: int) -> tuple[list[list[float]], int]:
    """(boxes clipped to the image, how many were clipped), or ValueError naming the first box
    that is further than BOX_TOLERANCE outside the image or has no area inside it."""
    fitted, clipped = [], 0
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = box
        slack_x, slack_y = BOX_TOLERANCE * width, BOX_TOLERANCE * height
        if not (-slack_x <= x1 <= width + slack_x and -slack_x <= x2 <= width + slack_x
                and -slack_y <= y1 <= height + slack_y and -slack_y <= y2 <= height + slack_y):
            raise Rejected("box outside the image", f"boxes[{i}] = {box} for a {width}x{height} image "
                                                    f"(more than {BOX_TOLERANCE:.0%} of a side past an edge)")
        inside = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                  min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        if not (inside[2] > inside[0] and inside[3] > inside[1]):
            raise Rejected("box without area", f"boxes[{i}] = {box} (x2 > x1 and y2 > y1 inside the "
                                               f"{width}x{height} image are needed)")
        clipped += inside != box
        fitted.append(inside)
    return fitted, clipped


def validate_detection(record) -> dict:
    """A clean detection dict from a raw record, or ValueError naming the field that is wrong."""
    if not isinstance(record, dict):
        raise Rejected("expected a JSON object", f"got {type(record).__name__}")
    for field in ("image_id", "width", "height", "boxes", "labels", "scores"):
        if field not in record or record[field] is None:
            raise Rejected(f"missing field '{field}'")
    image_id = record["image_id"]
    if not isinstance(image_id, str) or not image_id.strip():
        raise Rejected("field 'image_id' must be a non-empty string", f"got {image_id!r:.60}")
    width = _number(record["width"], "width", integer=True)
    height = _number(record["height"], "height", integer=True)
    if not (0 < width <= INT32_MAX and 0 < height <= INT32_MAX):
        raise Rejected("width/height must be positive int32 values", f"got {width}x{height}")
    boxes, labels, scores = (_sequence(record[f], f) for f in ("boxes", "labels", "scores"))
    if not (len(boxes) == len(labels) == len(scores)):
        raise Rejected("boxes/labels/scores lengths differ", f"{len(boxes)}/{len(labels)}/{len(scores)}")
    clean_boxes = []
    for i, box in enumerate(boxes):
        box = _sequence(box, f"boxes[{i}]")
        if len(box) != 4:
            raise Rejected("a box must be [x1, y1, x2, y2]", f"boxes[{i}] = {box!r:.80}")
        clean_boxes.append([_number(v, f"boxes[{i}]") for v in box])
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise Rejected("a label must be a non-empty string", f"labels[{i}] = {label!r:.60}")
    clean_scores = [_number(s, f"scores[{i}]") for i, s in enumerate(scores)]
    for i, score in enumerate(clean_scores):
        if abs(score) > FLOAT32_MAX:
            raise Rejected("field 'scores' is beyond the float32 range the tables store", f"scores[{i}] = {score!r}")
    fitted_boxes, clipped = fit_boxes_to_image(clean_boxes, width, height)
    features = record.get("features")
    if features is not None:
        features = _features_array(features, len(boxes))
    return {"image_id": image_id, "width": width, "height": height, "boxes": fitted_boxes,
            "labels": [normalise_label(label) for label in labels], "scores": clean_scores, "features": features,
            BOXES_CLIPPED: clipped}


def region_order(scores, labels, boxes) -> list[int]:
    """Region indices in the corpus's order: highest score first, ties by label, then by box. The
    detector orders its regions so, and precomputed detections are put so (`keep_top_regions`):
    the trainer keeps the first `max_regions`."""
    return sorted(range(len(scores)), key=lambda j: (-float(scores[j]), labels[j], tuple(boxes[j])))


def keep_top_regions(detection: dict, max_regions: int) -> tuple[dict, int]:
    """(the detection with its regions in `region_order`, at most `max_regions` of them, features
    alike; how many regions were dropped)."""
    order = region_order(detection["scores"], detection["labels"], detection["boxes"])
    kept = order[:max_regions]
    features = detection.get("features")
    return ({**detection, "boxes": [detection["boxes"][j] for j in kept],
             "labels": [detection["labels"][j] for j in kept], "scores": [detection["scores"][j] for j in kept],
             "features": None if features is None else features[kept]},
            len(order) - len(kept))


class _ParseDetectionsFile(beam.DoFn):
    """One detections file -> (file:line or file:row, detection) per valid record. JSON Lines
    (.jsonl/.json, .gz) or Parquet rows."""

    def process(self, path):
        if path.endswith(".parquet"):
            yield from self._parquet(path)
        else:
            yield from self._jsonl(path)

    def _emit(self, raw, where):
        try:
            yield where, validate_detection(raw)
        except (ValueError, TypeError) as err:
            yield rejection_for("read_detections", where, err, "invalid detection record", raw)

    def _jsonl(self, path):
        try:
            for line_no, line in read_lines(path):
                where = f"{path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    raw = json.loads(decode_line(line, line_no))
                except UnicodeDecodeError:
                    yield rejection("read_detections", where, "not valid UTF-8", line[:200].decode("latin-1"))
                    continue
                except ValueError as err:  # JSONDecodeError, or an integer of more digits than Python converts
                    yield rejection("read_detections", where, "malformed JSON", line.decode("utf-8", "replace"),
                                    detail=str(err))
                    continue
                yield from self._emit(raw, where)
        except UnreadableFile as err:
            yield rejection_for("read_detections", path, err, "unreadable file")

    def _parquet(self, path):
        try:
            with open_parquet(path) as parquet:
                columns = detections_columns(parquet.schema_arrow)
                for row_no, raw in enumerate(iter_parquet_rows(parquet, columns)):
                    yield from self._emit(raw, f"{path}:row {row_no}")
        except Rejected as err:
            # the whole file (unreadable, or of the wrong schema), or the rest of it after a damaged page;
            # other files go on
            yield rejection_for("read_detections", path, err, WRONG_SCHEMA)


REQUIRED_DETECTION_COLUMNS = ("image_id", "width", "height", "boxes", "labels", "scores")


WRONG_SCHEMA = "wrong schema"


def detections_columns(schema: pa.Schema) -> list[str]:
    """The columns to read from a detections Parquet file, or Rejected (wrong schema). A file stamped with our
    schema_version was written by vlp-data: it must be this version with schemas.DETECTIONS' columns.
    A user's own file needs only the required columns; its rows are checked one by one."""
    if schemas.VERSION_KEY in (schema.metadata or {}):
        try:
            schemas.check_version(schema, WRONG_SCHEMA)
            schemas.check_fields(schema, schemas.DETECTIONS, WRONG_SCHEMA)
        except schemas.SchemaError as err:  # 'wrong schema: what is wrong'
            raise Rejected(WRONG_SCHEMA, str(err).split(": ", 1)[1]) from err
        return schemas.DETECTIONS.names
    missing = [c for c in REQUIRED_DETECTION_COLUMNS if c not in schema.names]
    if missing:
        raise Rejected(WRONG_SCHEMA, f"missing column(s) {missing}; detections need "
                                     f"{list(REQUIRED_DETECTION_COLUMNS)} and optionally 'features'")
    return [c for c in (*REQUIRED_DETECTION_COLUMNS, "features") if c in schema.names]


# VinVL comes in two layouts, read alike (one join per image):
# - scene_graph_benchmark's output: predictions.tsv is
#   `image_id \t {"objects": [{"rect", "class", "conf"}], "image_h", "image_w"}`; features.tsv is
#   `image_id \t num_boxes \t base64(float32[num_boxes, 2054])`.
# - the Oscar/VinVL distribution (the downloadable datasets): X.label.tsv is
#   `image_id \t [{"class", "conf", "rect"}, ...]`; X.feature.tsv is
#   `image_id \t {"num_boxes": n, "features": base64(float32[n, 2054])}`; X.hw.tsv is
#   `image_id \t [{"height": h, "width": w}]` (the image size, which the labels lack); an X.yaml may
#   name the three files (keys label, feature, hw). Given a label file, or the yaml, the other
#   files are read too.
# Features are 2048 visual dims followed by 6 box-geometry dims. The trainer computes its own
# geometry, so we keep the 2048.
VINVL_VISUAL_DIM = 2048
OSCAR_LABELS, OSCAR_FEATURES, OSCAR_HW = ".label.tsv", ".feature.tsv", ".hw.tsv"
OSCAR_YAML_KEYS = {"label": OSCAR_LABELS, "feature": OSCAR_FEATURES, "hw": OSCAR_HW}


def _stem(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def _oscar_kind(path: str) -> str | None:
    """'.label.tsv' / '.feature.tsv' / '.hw.tsv' for a file of the Oscar/VinVL distribution, else None."""
    return next((kind for kind in (OSCAR_LABELS, OSCAR_FEATURES, OSCAR_HW) if _stem(path).endswith(kind)), None)


def _is_vinvl_features(path: str) -> bool:
    kind = _oscar_kind(path)
    return kind == OSCAR_FEATURES if kind else "feature" in posixpath.basename(path)


def _existing(path: str) -> str | None:
    return path if FileSystems.exists(path) else None


def _sibling_features(path: str) -> str | None:
    """The features file beside a predictions.tsv (features.tsv) or an X.label.tsv (X.feature.tsv)."""
    if _oscar_kind(path) == OSCAR_LABELS:
        return _existing(path.replace(OSCAR_LABELS, OSCAR_FEATURES))
    if _oscar_kind(path):
        return None
    base = posixpath.basename(path)
    sibling = posixpath.join(posixpath.dirname(path), base.replace("predictions", "features"))
    return sibling if sibling != path and FileSystems.exists(sibling) else None


def _oscar_yaml_files(path: str) -> list[str]:
    """The label, feature and hw files an Oscar/VinVL X.yaml names (relative to its folder), or
    UnreadableFile when it is not such a yaml."""
    import yaml

    try:
        with open_file(path) as f:
            config = yaml.safe_load(f.read())
    except (OSError, yaml.YAMLError) as err:
        raise UnreadableFile("unreadable yaml", str(err)) from err
    named = {key: config.get(key) for key in OSCAR_YAML_KEYS} if isinstance(config, dict) else {}
    if not named.get("label"):
        raise UnreadableFile("yaml names no VinVL label file", f"expected keys {sorted(OSCAR_YAML_KEYS)}")
    folder = posixpath.dirname(path)
    return [posixpath.join(folder, name) for name in named.values() if isinstance(name, str)]


def _where(line: tuple[str, int]) -> str:
    return f"{line[0]}:{line[1]}"


class _ParseVinvlFile(beam.DoFn):
    """A VinVL TSV file (either layout) -> per line (image_id, ((path, line_no), ...)) for the join:
    predictions or labels (record, has_features_file) on the main output, features (float32
    array) on FEATURES, image sizes ((width, height)) on SIZES. The (path, line_no) lets the join
    pick among duplicates the same way in every run."""
    FEATURES = "vinvl_features"
    SIZES = "vinvl_sizes"

    def process(self, path):
        oscar = _oscar_kind(path)
        is_features = _is_vinvl_features(path)
        # A predictions file with a features file beside it promises features for each of its images.
        has_features_file = not is_features and _sibling_features(path) is not None
        try:
            for line_no, line in read_lines(path):
                if not line.strip():
                    continue
                try:
                    cols = decode_line(line, line_no).rstrip("\r\n").split("\t")
                    if oscar == OSCAR_HW:
                        image_id, size = self._oscar_size(cols)
                        yield beam.pvalue.TaggedOutput(self.SIZES, (image_id, ((path, line_no), size)))
                    elif is_features:
                        image_id, feats = self._oscar_features(cols) if oscar else self._features(cols)
                        yield beam.pvalue.TaggedOutput(self.FEATURES, (image_id, ((path, line_no), feats)))
                    else:
                        record = self._oscar_labels(cols) if oscar else self._prediction(cols)
                        yield record["image_id"], ((path, line_no), record, has_features_file)
                except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
                    yield rejection("read_detections", f"{path}:{line_no}", "bad VinVL line",
                                    line[:300].decode("utf-8", "replace"), detail=str(err))
        except UnreadableFile as err:
            yield rejection_for("read_detections", path, err, "unreadable file")

    @staticmethod
    def _prediction(cols):
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        image_id, payload = cols[0], json.loads(cols[1])
        if not isinstance(payload, dict):
            raise ValueError(f"the prediction must be a JSON object, got {type(payload).__name__}")
        return {"image_id": image_id, "width": payload.get("image_w"), "height": payload.get("image_h"),
                **_ParseVinvlFile._objects(payload.get("objects", []))}

    @staticmethod
    def _objects(objects) -> dict:
        """boxes, labels and scores of a list of {"rect", "class", "conf"} objects."""
        if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
            raise ValueError("'objects' must be a list of JSON objects")
        return {"boxes": [o["rect"] for o in objects], "labels": [o["class"] for o in objects],
                "scores": [o.get("conf", 1.0) for o in objects]}

    @classmethod
    def _oscar_labels(cls, cols):
        """X.label.tsv: image_id, a JSON list of objects; the size comes from X.hw.tsv in the join."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        return {"image_id": cols[0], "width": None, "height": None, **cls._objects(json.loads(cols[1]))}

    @staticmethod
    def _oscar_size(cols):
        """X.hw.tsv: image_id, [{"height": h, "width": w}] (a bare object is taken too)."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        payload = json.loads(cols[1])
        if isinstance(payload, list) and len(payload) == 1:
            payload = payload[0]
        if not isinstance(payload, dict):
            raise ValueError("the size must be [{\"height\": h, \"width\": w}]")
        return cols[0], (payload["width"], payload["height"])

    @classmethod
    def _oscar_features(cls, cols):
        """X.feature.tsv: image_id, {"num_boxes": n, "features": base64 float32}."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        payload = json.loads(cols[1])
        if not isinstance(payload, dict):
            raise ValueError(f"the features must be a JSON object, got {type(payload).__name__}")
        return cols[0], cls._decode_features(payload["num_boxes"], payload["features"])

    @classmethod
    def _features(cls, cols):
        if len(cols) != 3:
            raise ValueError(f"expected 3 tab-separated columns, got {len(cols)}")
        return cols[0], cls._decode_features(cols[1], cols[2])

    @staticmethod
    def _decode_features(num_boxes, encoded) -> np.ndarray:
        """float32 [num_boxes, dim] from base64, the visual dims only."""
        if not isinstance(num_boxes, (int, str)) or isinstance(num_boxes, bool) or not isinstance(encoded, str):
            raise ValueError("num_boxes must be an integer and the features a base64 string")
        num_boxes = int(num_boxes)
        flat = np.frombuffer(base64.b64decode(encoded), dtype=np.float32)
        if num_boxes <= 0 or flat.size % num_boxes:
            raise ValueError(f"{flat.size} floats do not split into {num_boxes} boxes")
        feats = flat.reshape(num_boxes, -1)
        return feats[:, :VINVL_VISUAL_DIM] if feats.shape[1] > VINVL_VISUAL_DIM else feats


def _join_vinvl(element):
    """One image's VinVL lines -> (file:line, detection). Among duplicates the first by (file, line) wins,
    so every run keeps the same one; each other line is dead-lettered, as is an unpaired line."""
    image_id, grouped = element
    predictions = sorted(grouped["predictions"], key=lambda p: p[0])
    features = sorted(grouped["features"], key=lambda f: f[0])
    sizes = sorted(grouped.get("sizes", ()), key=lambda s: s[0])
    for kind, lines in (("predictions", predictions), ("features", features), ("sizes", sizes)):
        for line in lines[1:]:
            yield duplicate_rejection("read_detections", _where(line[0]), image_id, _where(lines[0][0]), f"VinVL {kind}",
                                      line[1] if kind == "predictions" else None)
    if not predictions:
        if features:  # a size line alone is metadata of an image without labels: nothing to read
            yield rejection("read_detections", _where(features[0][0]), "VinVL features without a prediction line",
                            detail=f"image_id {image_id!r}")
        return
    line, record, has_features_file = predictions[0]
    if has_features_file and not features:
        yield rejection("read_detections", _where(line), "VinVL prediction without a features line", record,
                        detail=f"image_id {image_id!r}")
        return
    if record["width"] is None:  # Oscar/VinVL labels: the size is in X.hw.tsv
        if not sizes:
            yield rejection("read_detections", _where(line), "VinVL labels without an image size", record,
                            detail=f"no line for image_id {image_id!r} in a {OSCAR_HW} beside {line[0]}")
            return
        record = dict(record, width=sizes[0][1][0], height=sizes[0][1][1])
    try:
        yield _where(line), validate_detection(dict(record, features=features[0][1] if features else None))
    except (ValueError, TypeError) as err:
        yield rejection_for("read_detections", _where(line), err, "invalid detection record", record)


def _features_digest(features) -> str:
    if features is None:
        return ""
    array = np.ascontiguousarray(features, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def _dedupe_key(record) -> tuple[str, str]:
    """Records that differ only in features must still sort the same way in every run."""
    without_features = {k: v for k, v in record.items() if k != "features"}
    return json.dumps(without_features, sort_keys=True), _features_digest(record["features"])


def _first_per_image(element):
    """Duplicate image ids: keep one deterministically (the smallest record, then the first
    file:line of identical ones), dead-letter the rest, each naming where the kept one is."""
    image_id, located = element
    located = sorted(located, key=lambda wd: (_dedupe_key(wd[1]), wd[0]))
    kept_where, kept = located[0]
    yield kept
    for where, dup in located[1:]:
        yield duplicate_rejection("read_detections", where, image_id, kept_where,
                                  record={k: v for k, v in dup.items() if k not in ("features", BOXES_CLIPPED)})


REGIONS_DROPPED = "regions_over_max"  # stats.json: regions of precomputed detections beyond --max-regions


def _finish_detection(detection: dict, max_regions: int):
    """The detection's regions put in the corpus's order and capped at `max_regions` (as the
    detector does), then counted: the clipped boxes and the dropped regions for stats.json; the
    detection goes on without the clipped count."""
    detection = dict(detection)
    clipped = detection.pop(BOXES_CLIPPED)
    detection, dropped = keep_top_regions(detection, max_regions)
    beam.metrics.Metrics.counter("read_detections", "images").inc()
    for name, n in ((BOXES_CLIPPED, clipped), (REGIONS_DROPPED, dropped)):
        if n:
            beam.metrics.Metrics.counter("read_detections", name).inc(n)
            yield beam.pvalue.TaggedOutput(COUNTS, (name, n))
    yield detection


class ReadDetections(beam.PTransform):
    """Detections from JSON Lines, Parquet or VinVL TSV files -> (valid detection dicts, rejected).

    Returns a dict {"detections": PCollection[dict], "rejected": PCollection[dict], "counts":
    PCollection[(name, n)] (boxes clipped to their image, regions beyond `max_regions`)}. A
    detection dict has image_id, width, height, boxes, labels, scores and features (float32
    [regions, dim] or None), its regions highest score first, at most `max_regions` of them. A
    VinVL predictions.tsv picks up features.tsv beside it; an Oscar/VinVL X.label.tsv its X.feature.tsv and
    X.hw.tsv, an X.yaml the files it names.
    """

    def __init__(self, pattern: str, max_regions: int = DetectOptions.max_regions):
        super().__init__()
        self._pattern, self._max_regions = pattern, max_regions

    def expand(self, pbegin):
        files = pbegin | "MatchDetections" >> MatchAll(self._pattern)
        tsv = files | "TsvFiles" >> beam.Filter(lambda p: p.endswith((".tsv", ".tsv.gz")))
        yaml_files = files | "YamlFiles" >> beam.Filter(lambda p: p.endswith(YAML_EXTENSIONS))
        other = files | "OtherFiles" >> beam.Filter(lambda p: not p.endswith((".tsv", ".tsv.gz", *YAML_EXTENSIONS)))

        plain = (other | "Spread" >> beam.Reshuffle()
                 | "ParseDetections" >> beam.ParDo(_ParseDetectionsFile()).with_outputs(REJECTED, main="ok"))

        # VinVL: a predictions (or label) file also reads the features (and size) files beside it,
        # a yaml the files it names; each file once.
        vinvl_files = ((tsv, yaml_files) | "VinvlFiles" >> beam.Flatten()
                       | "WithFeatureFiles" >> beam.FlatMap(_with_sibling_files).with_outputs(REJECTED, main="ok"))
        vinvl = (vinvl_files.ok | "DistinctTsv" >> beam.Distinct()
                 | "ParseVinvl" >> beam.ParDo(_ParseVinvlFile()).with_outputs(
                     _ParseVinvlFile.FEATURES, _ParseVinvlFile.SIZES, REJECTED, main="predictions"))
        joined = ({"predictions": vinvl.predictions, "features": vinvl[_ParseVinvlFile.FEATURES],
                   "sizes": vinvl[_ParseVinvlFile.SIZES]}
                  | "JoinVinvl" >> beam.CoGroupByKey()
                  | "MergeVinvl" >> beam.FlatMap(_join_vinvl).with_outputs(REJECTED, main="ok"))

        unique = ((plain.ok, joined.ok) | "AllDetections" >> beam.Flatten()
                  | "ByImage" >> beam.Map(lambda located: (located[1]["image_id"], located))
                  | "GroupImage" >> beam.GroupByKey()
                  | "Dedupe" >> beam.FlatMap(_first_per_image).with_outputs(REJECTED, main="ok"))
        rejected = ((plain[REJECTED], vinvl_files[REJECTED], vinvl[REJECTED], joined[REJECTED], unique[REJECTED])
                    | "DetectionRejects" >> beam.Flatten())
        counted = unique.ok | "CountImages" >> beam.FlatMap(_finish_detection, self._max_regions).with_outputs(
            COUNTS, main="ok")
        return {"detections": counted.ok, "rejected": rejected, "counts": counted[COUNTS]}


YAML_EXTENSIONS = (".yaml", ".yml")


def _with_sibling_files(path: str):
    """A VinVL file and the files read with it: a predictions file's features file; an X.label.tsv's
    X.feature.tsv and X.hw.tsv; the files an X.yaml names (the yaml itself is not parsed again)."""
    if path.endswith(YAML_EXTENSIONS):
        try:
            named = _oscar_yaml_files(path)
        except UnreadableFile as err:
            yield rejection_for("read_detections", path, err, "unreadable yaml")
            return
        for named_path in named:
            yield from _with_sibling_files(named_path)
        return
    yield path
    sibling = None if _is_vinvl_features(path) else _sibling_features(path)
    if sibling:
        yield sibling
    if _oscar_kind(path) == OSCAR_LABELS:
        size = _existing(path.replace(OSCAR_LABELS, OSCAR_HW))
        if size:
            yield size


# ---------------------------------------------------------------------------------------------
# Text corpus

_WHITESPACE = re.compile(r"\s+")


def normalise_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


COUNTS = "counts"  # tagged output of (counter name, n) pairs that end up in stats.json


def _counted(name: str, n: int = 1):
    beam.metrics.Metrics.counter("read_text", name).inc(n)
    return beam.pvalue.TaggedOutput(COUNTS, (f"text_{name}", n))


class _ReadTextFile(beam.DoFn):
    """A corpus file -> (text, source) per line (.txt/.txt.gz), row (.parquet `text`), or
    paragraph (with split_sentences: blank-line separated blocks, for book-like text)."""

    def __init__(self, paragraphs: bool):
        self._paragraphs = paragraphs

    def process(self, path):
        if path.endswith(".parquet"):
            yield from self._parquet(path)
            return
        block, block_start, line_no = [], 0, 0
        try:
            for line_no, raw in read_lines(path):
                try:
                    line = decode_line(raw, line_no)
                except UnicodeDecodeError as err:
                    yield rejection("read_text", f"{path}:{line_no}", "not valid UTF-8",
                                    raw[:200].decode("utf-8", "replace"), detail=f"{err.reason} at byte {err.start}")
                    continue
                if not self._paragraphs:
                    yield line, f"{path}:{line_no}"
                elif line.strip():
                    block_start = block_start or line_no
                    block.append(line)
                elif block:
                    yield " ".join(block), f"{path}:{block_start}"
                    block, block_start = [], 0
        except UnreadableFile as err:  # the lines before the damage are kept
            yield rejection_for("read_text", path, err, "unreadable file")
        if block:
            yield " ".join(block), f"{path}:{block_start}"
        yield _counted("lines", line_no)

    def _parquet(self, path):
        rows = 0
        try:
            with open_parquet(path) as parquet:
                names = parquet.schema_arrow.names
                if "text" not in names:
                    yield rejection("read_text", path, "Parquet file has no 'text' column", detail=f"columns {names}")
                    return
                for row_no, row in enumerate(iter_parquet_rows(parquet, ["text"])):
                    rows, text = row_no + 1, row["text"]
                    if text is None or not isinstance(text, str):
                        yield rejection("read_text", f"{path}:row {row_no}", "'text' is not a string", detail=f"{text!r:.200}")
                    else:
                        yield text, f"{path}:row {row_no}"
        except UnreadableFile as err:  # the rows before the damage are kept
            yield rejection_for("read_text", path, err, "unreadable file")
        yield _counted("lines", rows)


SPACY_MAX_CHARS = 1_000_000  # spaCy's nlp.max_length: a longer text raises E088 instead of being split

# Where an over-long paragraph may be cut, best first: after a line break, after any whitespace.
_CUT_POINTS = (re.compile(r"(?<=\n)"), re.compile(r"(?<=\s)"))


def cut_for_spacy(text: str, limit: int, cut_points=_CUT_POINTS) -> list[str]:
    """`text` as pieces of at most `limit` characters that join back to it: cut after line breaks
    where that is enough, else after whitespace, else (an unbroken run of characters) anywhere.
    Depends only on the text, so the sentences do not depend on how paragraphs were batched."""
    if len(text) <= limit:
        return [text]
    if not cut_points:
        return [text[start:start + limit] for start in range(0, len(text), limit)]
    pieces, current, current_len = [], [], 0
    for unit in cut_points[0].split(text):
        for part in cut_for_spacy(unit, limit, cut_points[1:]):
            if current_len + len(part) > limit:  # full: start the next piece
                pieces.append("".join(current))
                current, current_len = [], 0
            current.append(part)
            current_len += len(part)
    if current:
        pieces.append("".join(current))
    return pieces


class _SplitSentences(beam.DoFn):
    """Paragraphs -> sentences with spaCy's statistical sentence splitter (senter), batched.
    A paragraph over spaCy's length limit (a book without blank lines) is cut into pieces under
    it, each split on its own, and counted: a sentence may break where a piece ends."""

    def __init__(self, spacy_model: str, batch_size: int = 64, max_chars: int | None = None):
        self._spacy_model, self._batch_size = spacy_model, batch_size
        self._max_chars = max_chars or SPACY_MAX_CHARS

    def setup(self):
        import spacy
        # senter alone is much faster than the parser and is what en_core_web_* ship for this.
        self._nlp = spacy.load(self._spacy_model, exclude=["ner", "lemmatizer", "parser", "attribute_ruler", "tagger"])
        if "senter" in self._nlp.disabled:
            self._nlp.enable_pipe("senter")
        if not self._nlp.has_pipe("senter"):
            self._nlp.add_pipe("sentencizer")
        self._nlp.max_length = self._max_chars

    def process(self, batch):
        pieces = []  # (text, source), over-long paragraphs cut first
        for text, source in batch:
            cut = cut_for_spacy(text, self._max_chars)
            if len(cut) > 1:
                log.warning("paragraph at %s has %d characters, over spaCy's limit of %d: cut into %d pieces "
                            "at line breaks or spaces before sentence splitting", source, len(text),
                            self._max_chars, len(cut))
                yield _counted("paragraphs_cut")
            pieces += [(piece, source) for piece in cut]
        texts = [normalise_whitespace(text) for text, _ in pieces]  # only shortens: still under the limit
        for (_, source), doc in zip(pieces, self._nlp.pipe(texts, batch_size=self._batch_size)):
            for sent in doc.sents:
                yield sent.text, source


def _clean(element, options: TextOptions):
    """Normalise whitespace; drop empty lines (counted) and over-long ones (counted, dead-lettered)."""
    text, source = element
    text = normalise_whitespace(text)
    if len(text) < options.min_chars:
        yield _counted("dropped_empty")
        return
    if len(text) > options.max_chars:
        yield _counted("dropped_overlong")
        yield rejection("read_text", source, "over-long", text, detail=f"{len(text)} characters > max {options.max_chars}")
        return
    yield text, source


def _one_per_text(element):
    text, sources = element
    duplicates = len(list(sources)) - 1
    if duplicates:
        yield _counted("dropped_duplicate", duplicates)
    beam.metrics.Metrics.counter("read_text", "sentences").inc()
    yield stable_id(text), text


class ReadCorpus(beam.PTransform):
    """Text corpus files -> {"sentences": (sentence_id, text) unique, "rejected": dead letters,
    "counts": (name, n) pairs: lines read, dropped empty / over-long / duplicate}."""

    def __init__(self, pattern: str, options: TextOptions = TextOptions()):
        super().__init__()
        self._pattern, self._options = pattern, options

    def expand(self, pbegin):
        read = (pbegin | "MatchText" >> MatchAll(self._pattern)
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadText" >> beam.ParDo(_ReadTextFile(self._options.split_sentences)).with_outputs(
                    REJECTED, COUNTS, main="ok"))
        lines = read.ok
        if self._options.split_sentences:
            lines = (lines | "BatchParagraphs" >> beam.BatchElements(min_batch_size=8, max_batch_size=256)
                     | "SplitSentences" >> beam.ParDo(_SplitSentences(self._options.spacy_model)).with_outputs(
                         COUNTS, main="ok"))
            split_counts = (lines[COUNTS],)
            lines = lines.ok
        else:
            split_counts = ()
        cleaned = lines | "Clean" >> beam.FlatMap(_clean, self._options).with_outputs(REJECTED, COUNTS, main="ok")
        unique = (cleaned.ok
                  | "GroupText" >> beam.GroupByKey()
                  | "OnePerText" >> beam.FlatMap(_one_per_text).with_outputs(COUNTS, main="ok"))
        rejected = (read[REJECTED], cleaned[REJECTED]) | "TextRejects" >> beam.Flatten()
        counts = (read[COUNTS], *split_counts, cleaned[COUNTS], unique[COUNTS]) | "TextCounts" >> beam.Flatten()
        return {"sentences": unique.ok, "rejected": rejected, "counts": counts}
