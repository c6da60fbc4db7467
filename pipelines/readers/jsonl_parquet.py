"""Detections as JSON Lines (.jsonl/.json, .gz) or Parquet rows (our detections schema, or a
user's file with the required columns)."""
from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa

import schemas
from pipelines.deadletter import Rejected, rejection, rejection_for
from pipelines.files import UnreadableFile, decode_line, iter_parquet_rows, open_parquet, read_lines
from pipelines.readers.detection_record import validate_detection


class ParseDetectionsFile(beam.DoFn):
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
