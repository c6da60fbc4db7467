"""Files on any Beam filesystem (local or gs://...): input patterns (globs, comma lists) and their
matching, line and Parquet reading that notices damage (`UnreadableFile`), and content ids."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import zlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import Rejected


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
