"""RefCOCO+ in the release layout: refs(unc).p (a Python 2 pickle) + instances.json, the refusing
unpickler, the JSON conversion, boxes from COCO xywh."""
import json
import os
import pickle
import struct

import pytest

from vlp_train.finetune.formats import refcoco
from vlp_train.finetune.formats.common import FormatError
from vlp_train.finetune.metrics import box_iou


def py2_pickle(value, protocol=2) -> bytes:
    """What Python 2's pickle.dump(refs, f, protocol) writes for plain data: str as raw bytes
    (SHORT_BINSTRING in protocol 2, a quoted STRING in protocol 0), opcodes Python 3 never writes."""
    if protocol == 0:
        return emit_text(value) + b"."

    def emit(v):
        if isinstance(v, dict):
            return b"}(" + b"".join(emit(k) + emit(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(emit(x) for x in v) + b"e"
        if isinstance(v, str):
            raw = v.encode("utf-8")
            return b"U" + bytes([len(raw)]) + raw
        if isinstance(v, bool):
            return b"\x88" if v else b"\x89"
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        if isinstance(v, float):
            return b"G" + struct.pack(">d", v)
        raise TypeError(v)
    return b"\x80\x02" + emit(value) + b"."


def emit_text(v) -> bytes:
    if isinstance(v, dict):
        return b"(d" + b"".join(emit_text(k) + emit_text(x) + b"s" for k, x in v.items())
    if isinstance(v, list):
        return b"(l" + b"".join(emit_text(x) + b"a" for x in v)
    if isinstance(v, str):   # Python 2's repr of a byte string: non-ASCII bytes as \xNN
        escaped = "".join(c if 32 <= ord(c) < 127 and c not in "\\'" else f"\\x{ord(c):02x}"
                          for c in v.encode("utf-8").decode("latin-1"))
        return b"S'" + escaped.encode("ascii") + b"'\n"
    if isinstance(v, int):
        return b"I" + str(v).encode() + b"\n"
    raise TypeError(v)


def sentence(sent_id, text):
    return {"sent_id": sent_id, "sent": text.lower(), "raw": text, "tokens": text.lower().split()}


REFS = [
    {"ref_id": 5, "ann_id": 900, "image_id": 42, "category_id": 1, "split": "testA", "sent_ids": [11, 12],
     "sentences": [sentence(11, "Man in red"), sentence(12, "left guy, café")],
     "file_name": "COCO_train2014_000000000042_5.jpg"},
    {"ref_id": 6, "ann_id": 901, "image_id": 42, "category_id": 1, "split": "testA", "sent_ids": [13],
     "sentences": [sentence(13, "woman")], "file_name": "COCO_train2014_000000000042_6.jpg"},
    {"ref_id": 7, "ann_id": 950, "image_id": 77, "category_id": 62, "split": "testB", "sent_ids": [14],
     "sentences": [sentence(14, "chair on right")], "file_name": "COCO_train2014_000000000077_7.jpg"},
    {"ref_id": 8, "image_id": 42, "category_id": 1, "split": "testA", "sent_ids": [15],          # no ann_id
     "sentences": [sentence(15, "nobody")], "file_name": "COCO_train2014_000000000042_8.jpg"},
    {"ref_id": 9, "ann_id": 999, "image_id": 42, "category_id": 1, "split": "testA", "sent_ids": [16],  # no such ann
     "sentences": [sentence(16, "ghost")], "file_name": "COCO_train2014_000000000042_9.jpg"},
]
INSTANCES = {
    "info": {}, "licenses": [], "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                                               {"id": 62, "name": "chair", "supercategory": "furniture"}],
    "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 480, "width": 640},
               {"id": 77, "file_name": "COCO_train2014_000000000077.jpg", "height": 480, "width": 640}],
    "annotations": [
        {"id": 900, "image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0,
         "segmentation": [[10, 20, 40, 20, 40, 60]], "iscrowd": 0},
        {"id": 901, "image_id": 42, "category_id": 1, "bbox": [100, 50, 50, 100], "area": 5000.0,
         "segmentation": [[100, 50, 150, 50, 150, 150]], "iscrowd": 0},
        {"id": 950, "image_id": 77, "category_id": 62, "bbox": [300.5, 200.25, 20, 10], "area": 200.0,
         "segmentation": [[300, 200, 320, 210]], "iscrowd": 0}]}


@pytest.fixture(params=[2, 0], ids=["protocol 2", "protocol 0"])
def release(tmp_path, request):
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    (folder / "refs(unc).p").write_bytes(py2_pickle(REFS, request.param))
    (folder / "instances.json").write_text(json.dumps(INSTANCES))
    return folder


def test_reads_the_python2_refs_pickle_and_instances(release):
    result = refcoco.read(str(release), "testA")
    assert [e.example_id for e in result] == ["11", "12", "13"]
    assert [e.text for e in result] == ["man in red", "left guy, café", "woman"]
    first = result.examples[0]
    assert first.image_ids == ("train2014/COCO_train2014_000000000042",)
    assert first.target.box == (10.0, 20.0, 40.0, 60.0)               # xywh -> xyxy
    assert first.target.ann_id == 900 and first.target.category_id == 1
    assert [(r.ann_id, r.box) for r in first.target.candidates] == [(900, (10.0, 20.0, 40.0, 60.0)),
                                                                    (901, (100.0, 50.0, 150.0, 150.0))]
    assert result.skipped == 2
    reasons = [p.reason for p in result.problems]
    assert reasons == ["missing field 'ann_id'", "ann_id 999 is not an annotation in instances.json"]
    assert result.problems[0].position == "refs[3] (ref_id 8)"
    b = refcoco.read(str(release), "testB")
    assert b.examples[0].target.box == (300.5, 200.25, 320.5, 210.25) and b.skipped == 0
    # The ground-truth candidate is a hit for its own box, the other person is not.
    assert box_iou(first.target.candidates[0].box, first.target.box) == 1.0
    assert box_iou(first.target.candidates[1].box, first.target.box) < 0.5


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class Plain:
    pass


@pytest.mark.parametrize("payload", [Payload(), Plain(), [{"ref_id": 1, "boxes": {1, 2}}]],
                         ids=["reduce", "class instance", "set"])
def test_a_pickle_asking_for_any_class_or_callable_is_refused(release, payload):
    (release / "refs(unc).p").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(FormatError, match=r"refs\(unc\)\.p: refused: the file asks for .*not a refs file"):
        refcoco.read(str(release), "testA")


def test_not_a_pickle_at_all(release):
    (release / "refs(unc).p").write_bytes(b"\x80\x02]q\x00(")
    with pytest.raises(FormatError, match=r"not a readable refs pickle"):
        refcoco.read(str(release), "testA")


def test_json_conversion_reads_the_same(release, tmp_path):
    pickled = refcoco.read(str(release), "testA").examples
    assert refcoco.write_refs_json(str(release / "refs(unc).p"), str(release / "refs(unc).json")) == len(REFS)
    os.remove(release / "refs(unc).p")
    assert refcoco.read(str(release), "testA").examples == pickled
    with pytest.raises(FormatError, match=r"neither refs\(google\)\.p nor refs\(google\)\.json"):
        refcoco.read(str(release), "val", split_by="google")
