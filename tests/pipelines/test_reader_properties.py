"""Property-based tests of every reader (issue 17): arbitrary bytes or records give valid records
or dead letters, never an exception that would stop the run.

Each reader's DoFn or function is driven directly (no pipeline per example): what it yields is
either a record the next stage can use or a tagged dead letter naming the source and the reason.
"""
import base64
import gzip
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipelines.deadletter import COUNTS, REJECTED
from pipelines.readers.detection_record import BOXES_CLIPPED, validate_detection
from pipelines.readers.jsonl_parquet import ParseDetectionsFile
from pipelines.readers.text import _clean, _ReadTextFile
from pipelines.readers.vinvl import ParseVinvlFile, join_vinvl
from pipelines.options import TextOptions

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Strategies: JSON of any shape, and detection records whose fields are anything from valid to absurd.

numbers = (st.integers(-10**400, 10**400) | st.floats(allow_nan=True, allow_infinity=True)
           | st.floats(-2000, 2000) | st.integers(0, 2000))
scalars = st.none() | st.booleans() | numbers | st.text(max_size=6)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=10)
boxes = st.lists(st.lists(numbers, min_size=4, max_size=4) | json_values, max_size=4)
records = st.fixed_dictionaries(
    {"image_id": st.text(max_size=6) | json_values, "width": numbers | json_values, "height": numbers | json_values},
    optional={"boxes": boxes | json_values, "labels": st.lists(st.text(max_size=5), max_size=4) | json_values,
              "scores": st.lists(numbers, max_size=4) | json_values,
              "features": st.lists(st.lists(numbers, max_size=3), max_size=4) | json_values})
# Python refuses to convert an integer of more than 4300 digits (a ValueError, not a JSON error)
huge_integer_line = st.just(b'{"image_id": "x", "width": ' + b"9" * 5000 + b"}")
lines = st.lists(st.binary(max_size=80) | records.map(lambda r: json.dumps(r).encode()) | huge_integer_line,
                 max_size=6)


def split(results):
    """(records, dead letters) from a reader's yields; fails on anything else."""
    kept, rejected = [], []
    for r in results:
        if isinstance(r, TaggedOutput):
            assert r.tag in (REJECTED, COUNTS, ParseVinvlFile.FEATURES, ParseVinvlFile.SIZES), r.tag
            if r.tag == REJECTED:
                assert r.value["source"] and r.value["reason"] and r.value["stage"]
                rejected.append(r.value)
            elif r.tag in (ParseVinvlFile.FEATURES, ParseVinvlFile.SIZES):
                kept.append(r)
        else:
            kept.append(r)
    return kept, rejected


def assert_valid_detection(det):
    """What the next stages rely on: a row of the DETECTIONS schema, boxes inside the image."""
    n = len(det["boxes"])
    assert len(det["labels"]) == len(det["scores"]) == n
    for x1, y1, x2, y2 in det["boxes"]:
        assert 0 <= x1 < x2 <= det["width"] and 0 <= y1 < y2 <= det["height"]
    features = det["features"]
    if features is not None:
        assert features.ndim == 2 and features.shape[0] == n and np.isfinite(features.astype(np.float16)).all()
    row = {k: v for k, v in det.items() if k != BOXES_CLIPPED}
    row["features"] = None if features is None else features.tolist()
    schemas.table_from_rows([row], schemas.DETECTIONS)


def write(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Detections


@SETTINGS
@given(record=records)
def test_validate_detection_gives_a_valid_detection_or_says_why(record):
    try:
        det = validate_detection(record)
    except (ValueError, TypeError) as err:  # what the readers dead-letter
        assert str(err)
        return
    assert_valid_detection(det)


@SETTINGS
@given(content=lines, gzipped=st.booleans(), cut=st.integers(0, 40))
def test_a_jsonl_detections_file_of_anything(tmp_path_factory, content, gzipped, cut):
    data = b"\n".join(content)
    if gzipped:
        data = gzip.compress(data)
        data = data[:len(data) - cut] if cut < len(data) else data  # a truncated download too
    path = write(tmp_path_factory.mktemp("d"), "d.jsonl.gz" if gzipped else "d.jsonl", data)
    kept, _ = split(ParseDetectionsFile().process(path))
    for where, det in kept:
        assert where.startswith(path + ":")
        assert_valid_detection(det)


parquet_rows = st.lists(st.fixed_dictionaries({
    "image_id": st.none() | st.text(max_size=5),
    "width": st.none() | st.integers(-2**63, 2**63 - 1),
    "height": st.none() | st.integers(-2**63, 2**63 - 1),
    "boxes": st.none() | st.lists(st.none() | st.lists(st.none() | st.floats(), max_size=5), max_size=3),
    "labels": st.none() | st.lists(st.none() | st.text(max_size=4), max_size=3),
    "scores": st.none() | st.lists(st.none() | st.floats(), max_size=3),
    "features": st.none() | st.lists(st.none() | st.lists(st.none() | st.floats(), max_size=3), max_size=3),
}), max_size=5)
PARQUET_SCHEMA = pa.schema([("image_id", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                            ("boxes", pa.list_(pa.list_(pa.float64()))), ("labels", pa.list_(pa.string())),
                            ("scores", pa.list_(pa.float64())), ("features", pa.list_(pa.list_(pa.float64())))])


@SETTINGS
@given(rows=parquet_rows, cut=st.none() | st.integers(1, 400))
def test_a_parquet_detections_file_of_anything(tmp_path_factory, rows, cut):
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), buffer)
    data = buffer.getvalue()
    path = write(tmp_path_factory.mktemp("p"), "d.parquet", data[:-cut] if cut else data)
    kept, _ = split(ParseDetectionsFile().process(path))
    for _, det in kept:
        assert_valid_detection(det)


vinvl_objects = st.lists(st.fixed_dictionaries({}, optional={"rect": boxes | json_values, "class": json_values,
                                                             "conf": numbers | json_values}) | json_values, max_size=3)
prediction_lines = st.lists(
    st.binary(max_size=60)
    | st.tuples(st.sampled_from(["a", "b", ""]), st.fixed_dictionaries(
        {"objects": vinvl_objects}, optional={"image_w": numbers | json_values, "image_h": numbers | json_values})
                | json_values).map(lambda t: f"{t[0]}\t{json.dumps(t[1])}".encode()),
    max_size=4)
feature_lines = st.lists(
    st.binary(max_size=60)
    | st.tuples(st.sampled_from(["a", "b", ""]), st.integers(-2, 4) | st.text(max_size=3), st.binary(max_size=64))
    .map(lambda t: f"{t[0]}\t{t[1]}\t{base64.b64encode(t[2]).decode()}".encode()),
    max_size=4)


@SETTINGS
@given(predictions=prediction_lines, features=feature_lines)
def test_vinvl_files_of_anything(tmp_path_factory, predictions, features):
    folder = tmp_path_factory.mktemp("v")
    pred = write(folder, "predictions.tsv", b"\n".join(predictions))
    feat = write(folder, "features.tsv", b"\n".join(features))
    grouped = {}
    for path in (pred, feat):
        kept, _ = split(ParseVinvlFile().process(path))
        for out in kept:
            kind, (image_id, value) = ("features", out.value) if isinstance(out, TaggedOutput) else ("predictions", out)
            grouped.setdefault(image_id, {"predictions": [], "features": []})[kind].append(value)
    for image_id, both in grouped.items():
        kept, _ = split(join_vinvl((image_id, both)))
        for _, det in kept:
            assert_valid_detection(det)


oscar_label_lines = st.lists(
    st.binary(max_size=60)
    | st.tuples(st.sampled_from(["a", "b", ""]), vinvl_objects | json_values)
    .map(lambda t: f"{t[0]}\t{json.dumps(t[1])}".encode()),
    max_size=4)
oscar_feature_lines = st.lists(
    st.binary(max_size=60)
    | st.tuples(st.sampled_from(["a", "b", ""]), st.fixed_dictionaries(
        {}, optional={"num_boxes": st.integers(-2, 4) | json_values,
                      "features": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | json_values})
                | json_values).map(lambda t: f"{t[0]}\t{json.dumps(t[1])}".encode()),
    max_size=4)
oscar_size_lines = st.lists(
    st.binary(max_size=60)
    | st.tuples(st.sampled_from(["a", "b", ""]), st.lists(st.fixed_dictionaries(
        {}, optional={"height": numbers | json_values, "width": numbers | json_values}), max_size=2) | json_values)
    .map(lambda t: f"{t[0]}\t{json.dumps(t[1])}".encode()),
    max_size=4)


@SETTINGS
@given(labels=oscar_label_lines, features=oscar_feature_lines, sizes=oscar_size_lines)
def test_oscar_vinvl_files_of_anything(tmp_path_factory, labels, features, sizes):
    folder = tmp_path_factory.mktemp("o")
    paths = [write(folder, name, b"\n".join(lines)) for name, lines in
             (("x.label.tsv", labels), ("x.feature.tsv", features), ("x.hw.tsv", sizes))]
    grouped = {}
    for path in paths:
        kept, _ = split(ParseVinvlFile().process(path))
        for out in kept:
            kind = {ParseVinvlFile.FEATURES: "features", ParseVinvlFile.SIZES: "sizes"}[out.tag] \
                if isinstance(out, TaggedOutput) else "predictions"
            image_id, value = out.value if isinstance(out, TaggedOutput) else out
            grouped.setdefault(image_id, {"predictions": [], "features": [], "sizes": []})[kind].append(value)
    for image_id, all_three in grouped.items():
        kept, _ = split(join_vinvl((image_id, all_three)))
        for _, det in kept:
            assert_valid_detection(det)


# ---------------------------------------------------------------------------------------------
# Text corpus


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode), kind=st.sampled_from(["txt", "gz"]),
       paragraphs=st.booleans(), cut=st.integers(0, 20))
def test_a_text_file_of_anything(tmp_path_factory, data, kind, paragraphs, cut):
    if kind == "gz":
        data = gzip.compress(data)
        data = data[:len(data) - cut] if cut < len(data) else data
    path = write(tmp_path_factory.mktemp("t"), f"t.txt{'.gz' if kind == 'gz' else ''}", data)
    kept, _ = split(_ReadTextFile(paragraphs).process(path))
    for text, source in kept:
        assert isinstance(text, str) and source.startswith(path + ":")
        cleaned, _ = split(_clean((text, source), TextOptions(max_chars=100)))
        for clean_text, _ in cleaned:
            assert 0 < len(clean_text) <= 100


@SETTINGS
@given(texts=st.lists(st.none() | st.text(max_size=20), max_size=5), as_binary=st.booleans(),
       cut=st.none() | st.integers(1, 300))
def test_a_parquet_text_file_of_anything(tmp_path_factory, texts, as_binary, cut):
    column = pa.array([t.encode() if (as_binary and t is not None) else t for t in texts],
                      pa.binary() if as_binary else pa.string())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buffer)
    data = buffer.getvalue()
    path = write(tmp_path_factory.mktemp("tp"), "t.parquet", data[:-cut] if cut else data)
    kept, _ = split(_ReadTextFile(False).process(path))
    assert all(isinstance(text, str) for text, _ in kept)


# ---------------------------------------------------------------------------------------------
# Images


def _png() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
damaged_png = st.tuples(st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), max_size=6),
                        st.integers(0, len(PNG))).map(
    lambda t: bytes(b if i not in dict(t[0]) else dict(t[0])[i] for i, b in enumerate(PNG))[:t[1]])


@SETTINGS
@given(data=damaged_png | st.binary(max_size=200))
def test_image_bytes_of_anything_decode_or_say_why(data):
    from pipelines.detect import decode_image
    try:
        image = decode_image(data)
    except ValueError as err:  # what DetectRegions dead-letters
        assert str(err)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size


members = st.lists(st.tuples(st.text("abc./", min_size=1, max_size=8).map(lambda n: n + ".jpg")
                             | st.text(min_size=1, max_size=8), damaged_png | st.binary(max_size=40)), max_size=4)


@SETTINGS
@given(files=members, cut=st.none() | st.integers(1, 2000), garbage=st.none() | st.binary(max_size=200))
def test_an_image_tar_of_anything(tmp_path_factory, files, cut, garbage):
    from pipelines.images import _ReadImageFile
    folder = tmp_path_factory.mktemp("i")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = garbage if garbage is not None else buffer.getvalue()
    path = write(folder, "00000.tar", data[:-cut] if cut else data)
    kept, _ = split(_ReadImageFile([os.path.join(folder, "*.tar")]).process(path))
    for image_id, image_bytes, source in kept:
        assert image_id.startswith("00000.tar/") and isinstance(image_bytes, bytes) and source.startswith(path)
