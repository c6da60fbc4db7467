"""ReadCorpus: text corpus files (lines, Parquet rows, or paragraphs split into sentences by
spaCy) -> unique cleaned sentences with content ids, dead letters and counts."""
from __future__ import annotations

import logging
import re

import apache_beam as beam

from pipelines.deadletter import COUNTS, REJECTED, rejection, rejection_for
from pipelines.files import MatchAll, UnreadableFile, decode_line, iter_parquet_rows, open_parquet, read_lines, stable_id
from pipelines.options import TextOptions
from pipelines.stages import split_outputs, stage_output

log = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")


def normalise_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


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
    """Text corpus files -> a StageOutput: main (sentence_id, text), unique; the dead letters;
    counts (name, n): lines read, dropped empty / over-long / duplicate."""

    def __init__(self, pattern: str, options: TextOptions = TextOptions()):
        super().__init__()
        self._pattern, self._options = pattern, options

    def expand(self, pbegin):
        lines, read_rejected, read_counts = split_outputs(
            pbegin | "MatchText" >> MatchAll(self._pattern) | "SpreadFiles" >> beam.Reshuffle(), "ReadText",
            (REJECTED, COUNTS), _ReadTextFile(self._options.split_sentences))
        counts = [read_counts]
        if self._options.split_sentences:
            lines, split_counts = split_outputs(
                lines | "BatchParagraphs" >> beam.BatchElements(min_batch_size=8, max_batch_size=256),
                "SplitSentences", (COUNTS,), _SplitSentences(self._options.spacy_model))
            counts.append(split_counts)
        cleaned, clean_rejected, clean_counts = split_outputs(lines, "Clean", (REJECTED, COUNTS), _clean, self._options)
        unique, unique_counts = split_outputs(cleaned | "GroupText" >> beam.GroupByKey(), "OnePerText", (COUNTS,),
                                              _one_per_text)
        return stage_output(unique, (read_rejected, clean_rejected), (*counts, clean_counts, unique_counts))
