"""pipelines/readers/text.py: ReadCorpus reads lines, Parquet rows or paragraphs split into
sentences, cleans and deduplicates them, and dead-letters what it cannot read."""
import gzip

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from pipelines.files import stable_id
from pipelines.readers import text as text_reader
from pipelines.readers.text import ReadCorpus, cut_for_spacy
from pipelines.options import TextOptions


def test_read_corpus_cleans_dedupes_and_dead_letters(pipeline, tmp_path):
    (tmp_path / "a.txt").write_bytes(
        b"A  woman   sits on a sofa.\n\n   \nA woman sits on a sofa.\n" + b"\xff\xfe broken\n" + b"x" * 40 + b"\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("A cat sleeps.\n")
    pq.write_table(pa.Table.from_pylist([{"text": "A dog runs."}, {"text": None}]), tmp_path / "c.parquet")
    out = pipeline | ReadCorpus(f"{tmp_path}/*.txt*,{tmp_path}/c.parquet", TextOptions(max_chars=30))
    texts = ["A woman sits on a sofa.", "A cat sleeps.", "A dog runs."]
    assert_that(out.main, equal_to([(stable_id(t), t) for t in texts]), label="sentences")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"].rsplit("/", 1)[1], r["reason"].split(":")[0])),
                equal_to([("a.txt:5", "not valid UTF-8"), ("a.txt:6", "over-long"), ("c.parquet:row 1", "'text' is not a string")]),
                label="rejected")
    assert_that(out.counts | beam.CombinePerKey(sum),
                equal_to([("text_lines", 9), ("text_dropped_empty", 2), ("text_dropped_duplicate", 1),
                          ("text_dropped_overlong", 1)]), label="counts")
    pipeline.run()


def test_split_sentences_on_book_like_paragraphs(pipeline, tmp_path):
    (tmp_path / "book.txt").write_text(
        "It was a hot evening. The young man walked\nslowly towards the bridge.\n\n"
        "He was not afraid. He was thinking.\n")
    out = pipeline | ReadCorpus(str(tmp_path / "book.txt"), TextOptions(split_sentences=True))
    assert_that(out.main | beam.Values(),
                equal_to(["It was a hot evening.", "The young man walked slowly towards the bridge.",
                          "He was not afraid.", "He was thinking."]))
    pipeline.run()


# A UTF-8 byte-order mark opening a file must not stick to the first record.
def test_byte_order_mark_does_not_defeat_text_deduplication(pipeline, tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffA cat sleeps.\nA cat sleeps.\n".encode("utf-8"))
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write("\ufeffA dog runs.\n".encode("utf-8"))
    (tmp_path / "c.txt").write_text("A dog runs.\n", encoding="utf-8")
    out = pipeline | ReadCorpus(f"{tmp_path}/*.txt*")
    assert_that(out.main, equal_to([(stable_id(t), t) for t in ["A cat sleeps.", "A dog runs."]]), label="sentences")
    assert_that(out.counts | beam.CombinePerKey(sum),
                equal_to([("text_lines", 4), ("text_dropped_duplicate", 2)]), label="counts")
    pipeline.run()


# Corrupt or truncated files are dead-lettered under their own name; the other files go on.
def test_corrupt_gzip_and_parquet_text_files_are_dead_lettered(pipeline, tmp_path):
    (tmp_path / "good.txt").write_text("A cat sleeps.\n", encoding="utf-8")
    (tmp_path / "garbage.txt.gz").write_bytes(b"this is not gzip\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    out = pipeline | ReadCorpus(f"{tmp_path}/*.txt*,{tmp_path}/broken.parquet")
    assert_that(out.main | beam.Values(), equal_to(["A cat sleeps."]), label="sentences")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(":")[0])),
                equal_to([(f"{tmp_path}/garbage.txt.gz", "unreadable file"),
                          (f"{tmp_path}/broken.parquet", "unreadable Parquet file")]), label="rejected")
    pipeline.run()


def test_parquet_damaged_mid_file_keeps_the_rows_before_and_names_the_file(pipeline, tmp_path):
    # Parquet is read a batch of rows at a time, not loaded whole: a damaged page in the third
    # row group costs the rows from the batch it falls in, not the file
    texts = [f"Caption number {i} shows a cat." for i in range(1800)]
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=600, compression="zstd")
    start = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 40:start + 240] = b"\xab" * 200
    path.write_bytes(bytes(data))
    out = pipeline | ReadCorpus(str(path))

    def the_first_row_groups(got):
        got = sorted(got, key=lambda t: int(t.split()[2]))
        assert 600 <= len(got) < len(texts) and got == texts[:len(got)], (len(got), got[:2])

    assert_that(out.main | beam.Values() | beam.combiners.ToList(),
                lambda lists: the_first_row_groups(lists[0]), label="kept")
    assert_that(out.rejected | beam.Map(lambda r: (r["source"], r["reason"].split(":")[0])),
                equal_to([(str(path), "unreadable Parquet file")]), label="rejected")
    pipeline.run()


# With --split-sentences, a paragraph over spaCy's length limit (a book without blank lines)
# crashed the run with spaCy's E088, naming no file. It is now cut into pieces under the limit.
def test_cut_for_spacy_prefers_line_breaks_then_spaces_and_loses_nothing():
    lines = "".join(f"Line {i} is short.\n" for i in range(10))  # 18-19 characters a line
    pieces = cut_for_spacy(lines, 40)
    assert "".join(pieces) == lines and all(len(p) <= 40 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)  # whole lines only
    words = "one two three four five six seven"
    assert cut_for_spacy(words, 10) == ["one two ", "three ", "four five ", "six seven"]
    assert cut_for_spacy("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no space at all: cut anywhere
    assert cut_for_spacy(words, 100) == [words]


def test_paragraph_over_spacys_limit_is_cut_then_split_into_sentences(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(text_reader, "SPACY_MAX_CHARS", 250)  # the production path, at a limit a test can reach
    lined = [f"The {word} boat sails past the old mill." for word in ("red", "blue", "green", "white",
                                                                       "black", "brown", "grey", "pink")]
    one_line = " ".join(f"A {word} dog sleeps by the warm stove." for word in ("small", "tall", "big", "young",
                                                                             "lazy", "happy", "quiet", "wet"))
    (tmp_path / "book.txt").write_text("\n".join(lined) + "\n\n" + one_line + "\n\nHe was not afraid.\n")
    assert len(" ".join(lined)) > 250 and len(one_line) > 250
    out = pipeline | ReadCorpus(str(tmp_path / "book.txt"), TextOptions(split_sentences=True))
    texts = out.main | beam.Values()

    def check(sentences):
        assert set(lined) <= set(sentences)  # cut at line breaks: every sentence whole
        assert "He was not afraid." in sentences
        other = [s for s in sentences if s not in lined and s != "He was not afraid."]
        assert sorted(" ".join(other).split()) == sorted(one_line.split())  # cut at spaces: no word lost

    assert_that(texts | beam.combiners.ToList(), lambda got: check(got[0]), label="sentences")
    assert_that(out.counts | beam.Filter(lambda c: c[0] == "text_paragraphs_cut") | beam.CombinePerKey(sum),
                equal_to([("text_paragraphs_cut", 2)]), label="cut counted")
    pipeline.run()
