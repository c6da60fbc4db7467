"""RefCOCO+ (and RefCOCO / RefCOCOg): the `refs({split_by}).p` + `instances.json` release.

`refs(unc).p` is a Python 2 pickle of a list of refs {ref_id, ann_id, image_id, category_id,
split, sent_ids, sentences: [{sent_id, sent, raw, tokens}], file_name}. It is read with an
unpickler that builds only plain containers, strings and numbers: any class, function or
reduce in the file is refused (`SafeRefsUnpickler`), so a tampered file cannot run code. A JSON
conversion of the same list (`refs(unc).json`, e.g. `json.dump(refs, f)`) is read instead when
present. `instances.json` is COCO-style: images (id, file_name), annotations (id, image_id, bbox
[x, y, w, h] in pixels, category_id), categories.

One Example per sentence: example_id = str(sent_id), image_ids = (COCO key of train2014,), text =
the cleaned lower-case `sent`, target = RefTarget: the ground-truth box (x1, y1, x2, y2) of the
ref's annotation, and as candidates every COCO annotation box of the image (the "gt" setting of
the two-stage papers; the "det" setting scores the detections' boxes instead). ref.file_name
carries an extra suffix and is ignored. Splits: train, val, testA (people), testB (other objects).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass

from vlp_train.finetune.formats.common import (
    Example, FormatError, Skips, expect_list, field_of, find_file, load_json, record_error)
from vlp_train.finetune.formats.images import coco_key
from vlp_train.finetune.metrics import xywh_to_xyxy

TASK = "refcoco"
SPLITS = ("train", "val", "testA", "testB", "test")


@dataclass(frozen=True)
class Region:
    ann_id: int
    box: tuple[float, float, float, float]   # x1, y1, x2, y2
    category_id: int


@dataclass(frozen=True)
class RefTarget:
    box: tuple[float, float, float, float]   # the referred object, x1, y1, x2, y2 in pixels
    ref_id: int
    ann_id: int
    category_id: int
    candidates: tuple[Region, ...] = ()       # the image's COCO annotations (shared per image)


class SafeRefsUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers, booleans and None only.

    Every way a pickle reaches code (GLOBAL / STACK_GLOBAL / INST / OBJ, copyreg extensions) goes
    through find_class, which refuses; REDUCE / BUILD / NEWOBJ then have nothing to call."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refused: the file asks for {module}.{name}; refs files hold only lists, dicts, strings "
            "and numbers, so this is not a refs file from the release (or it was tampered with)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused: the file uses persistent ids, which a refs file never has")


def load_refs_pickle(path: str) -> list:
    """The refs list of a refs(*).p file, through SafeRefsUnpickler; FormatError when refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise FormatError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        # Python 2 str -> text: the release's strings are ASCII; UTF-8 covers any other.
        refs = SafeRefsUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except pickle.UnpicklingError as err:
        raise FormatError(f"{path}: {err}") from None
    except Exception as err:  # a truncated or non-pickle file: EOFError, ValueError, ...
        raise FormatError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from None
    return expect_list(refs, path, "the refs")


def refs_path(data_dir: str, split_by: str = "unc") -> str:
    """refs({split_by}).json if present (a JSON conversion), else refs({split_by}).p."""
    for name in (f"refs({split_by}).json", f"refs({split_by}).p"):
        try:
            return find_file(data_dir, name)
        except FormatError:
            continue
    raise FormatError(f"neither refs({split_by}).p nor refs({split_by}).json found in {data_dir} "
                      "(nor one folder below)")


def load_refs(path: str) -> list:
    return expect_list(load_json(path), path, "the refs") if path.endswith(".json") else load_refs_pickle(path)


def read(data_dir: str, split: str, split_by: str = "unc"):
    """One Example per expression of the refs whose split is `split`."""
    if split not in SPLITS:
        raise FormatError(f"RefCOCO split {split!r} is not one of {', '.join(SPLITS)}")
    skips = Skips(TASK)
    r_path = refs_path(data_dir, split_by)
    i_path = find_file(data_dir, "instances.json")
    refs = load_refs(r_path)
    boxes, image_names, regions_of = _read_instances(i_path, skips)
    examples = []
    for index, ref in enumerate(refs):
        position = f"refs[{index}]"
        try:
            if not isinstance(ref, dict):
                raise TypeError(f"expected a dict, got {type(ref).__name__}")
            ref_split = field_of(ref, "split", str)
            if ref_split != split:
                continue
            ref_id = field_of(ref, "ref_id", int)
            position += f" (ref_id {ref_id})"
            ann_id = field_of(ref, "ann_id", int)
            image_id = field_of(ref, "image_id", int)
            category_id = field_of(ref, "category_id", int)
            sentences = field_of(ref, "sentences", list)
        except (KeyError, TypeError) as err:
            skips.skip(r_path, position, record_error(err))
            continue
        if ann_id not in boxes:
            skips.skip(r_path, position, f"ann_id {ann_id} is not an annotation in {os.path.basename(i_path)}")
            continue
        ann_image, box = boxes[ann_id]
        if ann_image != image_id:
            skips.skip(r_path, position, f"ann_id {ann_id} belongs to image {ann_image}, not {image_id}")
            continue
        target = RefTarget(box, ref_id, ann_id, category_id, regions_of.get(image_id, ()))
        key = _image_key(image_id, image_names)
        for s_index, sentence in enumerate(sentences):
            where = f"{position} sentences[{s_index}]"
            try:
                if not isinstance(sentence, dict):
                    raise TypeError(f"expected a dict, got {type(sentence).__name__}")
                sent_id = field_of(sentence, "sent_id", int)
                text = sentence.get("sent") or sentence.get("raw")
                if not isinstance(text, str) or not text.strip():
                    raise TypeError("no 'sent' (nor 'raw') text")
            except (KeyError, TypeError) as err:
                skips.skip(r_path, where, record_error(err))
                continue
            examples.append(Example(str(sent_id), (key,), text, target))
    return skips.result(split, examples, [r_path, i_path])


def _image_key(image_id: int, image_names: dict[int, str]) -> str:
    """The COCO key from instances' file_name (train2014 images), else from the id."""
    name = image_names.get(image_id)
    if name and name.startswith("COCO_") and name.count("_") == 2:
        subset = name.split("_")[1]
        return f"{subset}/{os.path.splitext(name)[0]}"
    return coco_key(image_id, "train2014")


def _read_instances(path: str, skips: Skips):
    """ann id -> (image id, xyxy box); image id -> file name; image id -> its Regions."""
    doc = load_json(path)
    if not isinstance(doc, dict) or "annotations" not in doc:
        raise FormatError(f"{path}: expected a COCO-style object with 'annotations'")
    image_names = {}
    for image in doc.get("images") or []:
        if isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str):
            image_names[image["id"]] = image["file_name"]
    boxes, regions_of = {}, {}
    for index, ann in enumerate(expect_list(doc["annotations"], path, "'annotations'")):
        position = f"annotations[{index}]"
        try:
            if not isinstance(ann, dict):
                raise TypeError(f"expected an object, got {type(ann).__name__}")
            ann_id = field_of(ann, "id", int)
            image_id = field_of(ann, "image_id", int)
            bbox = field_of(ann, "bbox", list)
            if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox) \
                    or bbox[2] < 0 or bbox[3] < 0:
                raise TypeError(f"field 'bbox' must be [x, y, w, h] with w, h >= 0, got {bbox!r:.60}")
            category_id = ann.get("category_id", -1)
        except (KeyError, TypeError) as err:
            skips.skip(path, position, record_error(err))
            continue
        box = xywh_to_xyxy(bbox)
        boxes[ann_id] = (image_id, box)
        regions_of.setdefault(image_id, []).append(Region(ann_id, box, category_id))
    return boxes, image_names, {i: tuple(r) for i, r in regions_of.items()}


def write_refs_json(refs_pickle: str, out_path: str) -> int:
    """Convert a refs(*).p to the JSON form this reader also takes (safely); returns the ref count."""
    refs = load_refs_pickle(refs_pickle)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(refs, f)
    return len(refs)
