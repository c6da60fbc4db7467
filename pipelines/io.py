"""Readers: detections (JSONL / Parquet / VinVL TSV), the text corpus, and images (see images.py).

Every reader names the file and line/row of a bad record and sends it to the dead-letter output
(`deadletter.REJECTED`) with the reason; valid records go on. Globs and comma-separated lists of
paths are accepted, local or on any Beam filesystem (gs://...).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import math
import posixpath
import re

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import REJECTED, rejection
from pipelines.options import TextOptions

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Files


def split_patterns(pattern: str) -> list[str]:
    """'a/*.jsonl,b.parquet' -> ['a/*.jsonl', 'b.parquet']."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty input path")
    return parts


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


def open_file(path: str):
    """A binary stream; .gz is decompressed."""
    compression = CompressionTypes.GZIP if path.endswith(".gz") else CompressionTypes.UNCOMPRESSED
    return FileSystems.open(path, compression_type=compression)


def stable_id(text: str, digits: int = 16) -> str:
    """A content-addressed id: the same text gets the same id in every run."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:digits]


# ---------------------------------------------------------------------------------------------
# Detections


def tags_of(labels: list[str], scores: list[float]) -> list[str]:
    """Labels de-duplicated, highest score first, ties broken by label: the query's tag order."""
    best: dict[str, float] = {}
    for label, score in zip(labels, scores):
        if label not in best or score > best[label]:
            best[label] = score
    return sorted(best, key=lambda label: (-best[label], label))


def _number(value, field: str, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field '{field}' must be a finite number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"field '{field}' must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def validate_detection(record) -> dict:
    """A clean detection dict from a raw record, or ValueError naming the field that is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("image_id", "width", "height", "boxes", "labels", "scores"):
        if field not in record or record[field] is None:
            raise ValueError(f"missing field '{field}'")
    image_id = record["image_id"]
    if not isinstance(image_id, str) or not image_id.strip():
        raise ValueError(f"field 'image_id' must be a non-empty string, got {image_id!r}")
    width = _number(record["width"], "width", integer=True)
    height = _number(record["height"], "height", integer=True)
    if width <= 0 or height <= 0:
        raise ValueError(f"width/height must be positive, got {width}x{height}")
    boxes, labels, scores = (list(record[f]) for f in ("boxes", "labels", "scores"))
    if not (len(boxes) == len(labels) == len(scores)):
        raise ValueError(f"boxes/labels/scores lengths differ: {len(boxes)}/{len(labels)}/{len(scores)}")
    clean_boxes = []
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
            raise ValueError(f"boxes[{i}] must be [x1, y1, x2, y2], got {box!r}")
        clean_boxes.append([_number(v, f"boxes[{i}]") for v in box])
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels[{i}] must be a non-empty string, got {label!r}")
    clean_scores = [_number(s, f"scores[{i}]") for i, s in enumerate(scores)]
    features = record.get("features")
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(boxes):
            raise ValueError(f"features must be [regions, dim] with {len(boxes)} regions, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or infinity")
    return {"image_id": image_id, "width": width, "height": height, "boxes": clean_boxes,
            "labels": [label.strip() for label in labels], "scores": clean_scores, "features": features}


class _ParseDetectionsFile(beam.DoFn):
    """One detections file -> its records. JSON Lines (.jsonl/.json, .gz) or Parquet rows."""

    def process(self, path):
        if path.endswith(".parquet"):
            yield from self._parquet(path)
        else:
            yield from self._jsonl(path)

    def _emit(self, raw, where):
        try:
            yield validate_detection(raw)
        except (ValueError, TypeError) as err:
            yield rejection("read_detections", where, str(err), raw)

    def _jsonl(self, path):
        with open_file(path) as f:
            for line_no, line in enumerate(iter(f.readline, b""), start=1):
                where = f"{path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except UnicodeDecodeError:
                    yield rejection("read_detections", where, "not valid UTF-8", line[:200].decode("latin-1"))
                    continue
                except json.JSONDecodeError as err:
                    yield rejection("read_detections", where, f"malformed JSON: {err}", line.decode("utf-8", "replace"))
                    continue
                yield from self._emit(raw, where)

    def _parquet(self, path):
        with FileSystems.open(path) as f:
            table = pq.read_table(io.BytesIO(f.read()))
        for row_no, raw in enumerate(table.to_pylist()):
            yield from self._emit(raw, f"{path}:row {row_no}")


# VinVL: predictions.tsv is `image_id \t {"objects": [{"rect", "class", "conf"}], "image_h", "image_w"}`;
# features.tsv is `image_id \t num_boxes \t base64(float32[num_boxes, 2054])`, 2048 visual dims
# followed by 6 box-geometry dims. The trainer computes its own geometry, so we keep the 2048.
VINVL_VISUAL_DIM = 2048


def _is_vinvl_features(path: str) -> bool:
    return "feature" in posixpath.basename(path)


class _ParseVinvlFile(beam.DoFn):
    FEATURES = "vinvl_features"

    def process(self, path):
        with open_file(path) as f:
            for line_no, line in enumerate(iter(f.readline, b""), start=1):
                where = f"{path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    cols = line.decode("utf-8").rstrip("\r\n").split("\t")
                    if _is_vinvl_features(path):
                        yield beam.pvalue.TaggedOutput(self.FEATURES, self._features(cols))
                    else:
                        yield self._prediction(cols)
                except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
                    yield rejection("read_detections", where, f"bad VinVL line: {err}", line[:300].decode("utf-8", "replace"))

    @staticmethod
    def _prediction(cols):
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        image_id, payload = cols[0], json.loads(cols[1])
        objects = payload.get("objects", [])
        return {"image_id": image_id, "width": payload.get("image_w"), "height": payload.get("image_h"),
                "boxes": [o["rect"] for o in objects], "labels": [o["class"] for o in objects],
                "scores": [o.get("conf", 1.0) for o in objects]}

    @staticmethod
    def _features(cols):
        if len(cols) != 3:
            raise ValueError(f"expected 3 tab-separated columns, got {len(cols)}")
        image_id, num_boxes = cols[0], int(cols[1])
        flat = np.frombuffer(base64.b64decode(cols[2]), dtype=np.float32)
        if num_boxes <= 0 or flat.size % num_boxes:
            raise ValueError(f"{flat.size} floats do not split into {num_boxes} boxes")
        feats = flat.reshape(num_boxes, -1)
        return image_id, feats[:, :VINVL_VISUAL_DIM] if feats.shape[1] > VINVL_VISUAL_DIM else feats


def _join_vinvl(element):
    image_id, grouped = element
    predictions, features = grouped["predictions"], grouped["features"]
    if not predictions:
        yield rejection("read_detections", image_id, "VinVL features without a prediction line")
        return
    for raw in predictions[1:]:
        yield rejection("read_detections", image_id, "duplicate image_id in VinVL predictions", raw)
    raw = dict(predictions[0], features=features[0] if features else None)
    try:
        yield validate_detection(raw)
    except (ValueError, TypeError) as err:
        yield rejection("read_detections", image_id, str(err), {k: v for k, v in raw.items() if k != "features"})


def _first_per_image(element):
    """Duplicate image ids: keep one deterministically (the smallest record), dead-letter the rest."""
    image_id, records = element
    records = sorted(records, key=lambda r: json.dumps({k: v for k, v in r.items() if k != "features"}, sort_keys=True))
    yield records[0]
    for dup in records[1:]:
        yield rejection("read_detections", image_id, "duplicate image_id", {k: v for k, v in dup.items() if k != "features"})


class ReadDetections(beam.PTransform):
    """Detections from JSON Lines, Parquet or VinVL TSV files -> (valid detection dicts, rejected).

    Returns a dict {"detections": PCollection[dict], "rejected": PCollection[dict]}.
    A detection dict has image_id, width, height, boxes, labels, scores and features
    (float32 [regions, dim] or None). A VinVL predictions.tsv picks up features.tsv beside it.
    """

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        files = pbegin | "MatchDetections" >> MatchAll(self._pattern)
        tsv = files | "TsvFiles" >> beam.Filter(lambda p: p.endswith((".tsv", ".tsv.gz")))
        other = files | "OtherFiles" >> beam.Filter(lambda p: not p.endswith((".tsv", ".tsv.gz")))

        plain = (other | "Spread" >> beam.Reshuffle()
                 | "ParseDetections" >> beam.ParDo(_ParseDetectionsFile()).with_outputs(REJECTED, main="ok"))

        # VinVL: a predictions file also reads the features file beside it, once.
        vinvl_files = (tsv | "WithFeatureFiles" >> beam.FlatMap(_with_sibling_features)
                       | "DistinctTsv" >> beam.Distinct())
        vinvl = vinvl_files | "ParseVinvl" >> beam.ParDo(_ParseVinvlFile()).with_outputs(
            _ParseVinvlFile.FEATURES, REJECTED, main="predictions")
        joined = ({"predictions": vinvl.predictions | "KeyPred" >> beam.Map(lambda d: (d["image_id"], d)),
                   "features": vinvl[_ParseVinvlFile.FEATURES]}
                  | "JoinVinvl" >> beam.CoGroupByKey()
                  | "MergeVinvl" >> beam.FlatMap(_join_vinvl).with_outputs(REJECTED, main="ok"))

        unique = ((plain.ok, joined.ok) | "AllDetections" >> beam.Flatten()
                  | "ByImage" >> beam.Map(lambda d: (d["image_id"], d))
                  | "GroupImage" >> beam.GroupByKey()
                  | "Dedupe" >> beam.FlatMap(_first_per_image).with_outputs(REJECTED, main="ok"))
        rejected = ((plain[REJECTED], vinvl[REJECTED], joined[REJECTED], unique[REJECTED])
                    | "DetectionRejects" >> beam.Flatten())
        counted = unique.ok | "CountImages" >> beam.Map(_count, "read_detections", "images")
        return {"detections": counted, "rejected": rejected}


def _with_sibling_features(path: str):
    yield path
    if _is_vinvl_features(path):
        return
    base = posixpath.basename(path)
    sibling = posixpath.join(posixpath.dirname(path), base.replace("predictions", "features"))
    if sibling != path and FileSystems.exists(sibling):
        yield sibling


def _count(element, namespace: str, name: str):
    beam.metrics.Metrics.counter(namespace, name).inc()
    return element


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
        with open_file(path) as f:
            for line_no, raw in enumerate(iter(f.readline, b""), start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield rejection("read_text", f"{path}:{line_no}", f"not valid UTF-8: {err.reason} at byte {err.start}",
                                    raw[:200].decode("utf-8", "replace"))
                    continue
                if not self._paragraphs:
                    yield line, f"{path}:{line_no}"
                elif line.strip():
                    block_start = block_start or line_no
                    block.append(line)
                elif block:
                    yield " ".join(block), f"{path}:{block_start}"
                    block, block_start = [], 0
        if block:
            yield " ".join(block), f"{path}:{block_start}"
        yield _counted("lines", line_no)

    def _parquet(self, path):
        with FileSystems.open(path) as f:
            data = io.BytesIO(f.read())
        names = pq.read_schema(data).names
        if "text" not in names:
            yield rejection("read_text", path, f"Parquet file has no 'text' column (columns: {names})")
            return
        texts = pq.read_table(data, columns=["text"]).column("text").to_pylist()
        yield _counted("lines", len(texts))
        for row_no, text in enumerate(texts):
            if text is None or not isinstance(text, str):
                yield rejection("read_text", f"{path}:row {row_no}", f"'text' is not a string: {text!r}")
            else:
                yield text, f"{path}:row {row_no}"


class _SplitSentences(beam.DoFn):
    """Paragraphs -> sentences with spaCy's statistical sentence splitter (senter), batched."""

    def __init__(self, spacy_model: str, batch_size: int = 64):
        self._spacy_model, self._batch_size = spacy_model, batch_size

    def setup(self):
        import spacy
        # senter alone is much faster than the parser and is what en_core_web_* ship for this.
        self._nlp = spacy.load(self._spacy_model, exclude=["ner", "lemmatizer", "parser", "attribute_ruler", "tagger"])
        if "senter" in self._nlp.disabled:
            self._nlp.enable_pipe("senter")
        if not self._nlp.has_pipe("senter"):
            self._nlp.add_pipe("sentencizer")

    def process(self, batch):
        texts = [normalise_whitespace(text) for text, _ in batch]
        for (_, source), doc in zip(batch, self._nlp.pipe(texts, batch_size=self._batch_size)):
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
        yield rejection("read_text", source, f"over-long: {len(text)} characters > max {options.max_chars}", text)
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
                     | "SplitSentences" >> beam.ParDo(_SplitSentences(self._options.spacy_model)))
        cleaned = lines | "Clean" >> beam.FlatMap(_clean, self._options).with_outputs(REJECTED, COUNTS, main="ok")
        unique = (cleaned.ok
                  | "GroupText" >> beam.GroupByKey()
                  | "OnePerText" >> beam.FlatMap(_one_per_text).with_outputs(COUNTS, main="ok"))
        rejected = (read[REJECTED], cleaned[REJECTED]) | "TextRejects" >> beam.Flatten()
        counts = (read[COUNTS], cleaned[COUNTS], unique[COUNTS]) | "TextCounts" >> beam.Flatten()
        return {"sentences": unique.ok, "rejected": rejected, "counts": counts}
