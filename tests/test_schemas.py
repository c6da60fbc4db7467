"""schemas/: version stamping and checks, and the sample validator."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas


def test_every_table_carries_its_version(tmp_path):
    path = tmp_path / "r.parquet"
    rows = [{"image_id": "a", "rank": 0, "sentence_id": "s", "sentence": "t", "score": 0.5, "query": "sofa cup"}]
    pq.write_table(schemas.table_from_rows(rows, schemas.RETRIEVALS), path)
    assert pq.read_schema(path).metadata[schemas.VERSION_KEY] == str(schemas.SCHEMA_VERSION).encode()
    assert schemas.read_table(str(path), schemas.RETRIEVALS).to_pylist() == rows


def test_retrievals_written_before_the_query_column_still_read(tmp_path):
    """The query column was added within version 1 (schemas.ADDED_COLUMNS): an older file reads
    it as null; any other missing column is still an error naming it."""
    row = {"image_id": "a", "rank": 0, "sentence_id": "s", "sentence": "t", "score": 0.5}
    old_schema = pa.schema([f for f in schemas.RETRIEVALS if f.name != "query"], metadata=schemas.RETRIEVALS.metadata)
    old = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), old)
    assert schemas.read_table(str(old), schemas.RETRIEVALS).to_pylist() == [{**row, "query": None}]
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema).drop_columns(["score"]), damaged)
    with pytest.raises(schemas.SchemaError, match=r"missing column\(s\) \['score'\]"):
        schemas.read_table(str(damaged), schemas.RETRIEVALS)


def test_read_table_rejects_unversioned_old_and_wrong_files(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"sentence_id": ["a"], "text": ["b"]}), plain)
    with pytest.raises(schemas.SchemaError, match="plain.parquet: no schema_version"):
        schemas.read_table(str(plain), schemas.SENTENCES)
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"sentence_id": ["a"]}).replace_schema_metadata({"schema_version": "0"}), old)
    with pytest.raises(schemas.SchemaError, match="schema_version 0"):
        schemas.read_table(str(old), schemas.SENTENCES)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"sentence_id": ["a"]}).replace_schema_metadata({"schema_version": "1"}), wrong)
    with pytest.raises(schemas.SchemaError, match=r"missing column\(s\) \['text'\]"):
        schemas.read_table(str(wrong), schemas.SENTENCES)


def _sample():
    return {"schema_version": 1, "image_id": "x", "width": 10, "height": 10,
            "boxes": [[0.0, 0.0, 5.0, 5.0]], "tags": ["sofa"], "scores": [0.9],
            "sentences": [{"sentence_id": "s", "text": "a red sofa", "rank": 0, "score": 0.5,
                           "phrases": [{"text": "a red sofa", "start": 0, "end": 10, "words": ["red", "sofa"],
                                        "region": 0, "tag": "sofa", "similarity": 0.9}]}]}


def test_validate_sample_accepts_a_good_sample_and_names_problems():
    schemas.validate_sample(_sample(), np.zeros((1, 4), np.float16))
    bad_span = _sample()
    bad_span["sentences"][0]["phrases"][0]["end"] = 5
    with pytest.raises(schemas.SchemaError, match="does not match its span"):
        schemas.validate_sample(bad_span)
    with pytest.raises(schemas.SchemaError, match="feats shape"):
        schemas.validate_sample(_sample(), np.zeros((2, 4), np.float16))
    with pytest.raises(schemas.SchemaError, match="dtype float32"):
        schemas.validate_sample(_sample(), np.zeros((1, 4), np.float32))
    null_phrase = _sample()["sentences"]
    null_phrase[0]["phrases"].append(None)
    for field, value in (("boxes", [None]), ("boxes", [[0.0, None, 5.0, 5.0]]), ("tags", [None]), ("scores", [None]),
                         ("sentences", [None]), ("sentences", [[]]), ("sentences", null_phrase)):
        null = _sample()
        null[field] = value
        with pytest.raises(schemas.SchemaError, match=f"{field} hold a null"):  # (or a non-object)
            schemas.validate_sample(null)
    bad_region = _sample()
    bad_region["sentences"][0]["phrases"][0]["region"] = 3
    with pytest.raises(schemas.SchemaError, match="links to region 3 of 1"):
        schemas.validate_sample(bad_region)
    missing = _sample()
    del missing["tags"]
    with pytest.raises(schemas.SchemaError):
        schemas.validate_sample(missing)


def test_the_batch_type_check_finds_null_regions_by_arrow_null_counts():
    """check_sample_types (what the loader runs once a batch) refuses a null box, coordinate, tag or
    score anywhere in the batch, so validate_sample(types_checked=True) need not look for them."""
    good = [_sample(), _sample()]
    schemas.check_sample_types(good)
    for field, value, held in (("boxes", [None], "boxes"), ("boxes", [[0.0, None, 5.0, 5.0]], "boxes"),
                               ("tags", [None], "tags"), ("scores", [None], "scores")):
        bad = _sample()
        bad[field] = value
        with pytest.raises(schemas.SchemaError, match=f"^batch: {held} hold a null$"):
            schemas.check_sample_types([*good, bad], "batch")
    nulls = _sample()
    nulls["tags"], nulls["scores"] = [None], [None]
    with pytest.raises(schemas.SchemaError, match="tags, scores hold a null"):
        schemas.check_sample_types([nulls])


def test_validate_sample_checks_version_nested_fields_and_finite_features():
    old = _sample()
    old["schema_version"] = 0
    with pytest.raises(schemas.SchemaError, match="schema_version 0"):
        schemas.validate_sample(old)
    nested = _sample()
    nested["sentences"][0]["phrases"][0]["colour"] = "red"
    with pytest.raises(schemas.SchemaError, match=r"unknown field\(s\) \['colour'\] in sentence s"):
        schemas.validate_sample(nested)
    nested = _sample()
    nested["sentences"][0]["lang"] = "en"
    with pytest.raises(schemas.SchemaError, match=r"\['lang'\]"):
        schemas.validate_sample(nested)
    for bad in (np.inf, -np.inf, np.nan):  # one bad value among finite ones, the extremes included
        feats = np.array([[65504, -65504, 6e-8, bad]], np.float16)
        with pytest.raises(schemas.SchemaError, match="inf or nan"):
            schemas.validate_sample(_sample(), feats)
    schemas.validate_sample(_sample(), np.array([[65504, -65504, 6e-8, -0.0]], np.float16))
