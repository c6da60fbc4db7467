"""Image-text retrieval on the Karpathy splits: `dataset_coco.json`, `dataset_flickr30k.json`
(also `dataset_flickr8k.json`).

{dataset, images: [{imgid, split: train|restval|val|test, filename, sentids, sentences: [{sentid,
imgid, raw, tokens}], COCO also filepath (train2014|val2014) and cocoid}]}. imgid / sentid are
positions in the file, not dataset ids. split='train' takes COCO's restval too (113,287 images),
as the literature does; split='restval' alone is also accepted.

One Example per caption: example_id = str(sentid), image_ids = (the image key: images.coco_key
for COCO, images.flickr30k_key for Flickr30K), text = the raw caption, target None. A few COCO
images have more than 5 captions: the first `captions_per_image` (5) are kept, as most work does
(None keeps all). metrics.retrieval_index turns the examples into the image list and each
caption's image index that metrics.retrieval_recalls takes.
"""
from __future__ import annotations

import glob
import os

from vlp_train.finetune.formats.common import (
    Example, FormatError, ReadResult, Skips, expect_list, field_of, load_json, log, record_error)
from vlp_train.finetune.formats.images import coco_key, flickr30k_key

TASK = "retrieval"
SPLITS = ("train", "restval", "val", "test")
DATASETS = ("coco", "flickr30k", "flickr8k")
FLICKR8K_FOLDER = "Flicker8k_Dataset"   # (sic) the Flickr8K archive's folder


def dataset_file(data: str, dataset: str | None = None) -> str:
    """The Karpathy JSON: `data` itself when a file, else dataset_{dataset}.json in that folder
    (or the only dataset_*.json there when no dataset is named)."""
    if os.path.isfile(data):
        return data
    if not os.path.isdir(data):
        raise FormatError(f"{data}: no such file or folder (expected dataset_coco.json or dataset_flickr30k.json)")
    if dataset is not None:
        path = os.path.join(data, f"dataset_{dataset}.json")
        if not os.path.isfile(path):
            raise FormatError(f"{path}: not found")
        return path
    found = sorted(glob.glob(os.path.join(glob.escape(data), "dataset_*.json")))
    if len(found) != 1:
        raise FormatError(f"{data}: expected exactly one dataset_*.json, found {len(found)}; name the file")
    return found[0]


def image_key(dataset: str, image: dict) -> str:
    filename = field_of(image, "filename", str)
    if dataset == "coco":
        cocoid = image.get("cocoid")
        subset = image.get("filepath") or filename.split("_")[1]
        if not isinstance(cocoid, int):  # older copies lack cocoid: the file name has it
            cocoid = int(os.path.splitext(filename)[0].rsplit("_", 1)[-1])
        return coco_key(cocoid, subset)
    if dataset == "flickr30k":
        return flickr30k_key(filename)
    return f"{FLICKR8K_FOLDER}/{os.path.splitext(filename)[0]}"


def read(data: str, split: str, dataset: str | None = None, captions_per_image: int | None = 5) -> ReadResult:
    if split not in SPLITS:
        raise FormatError(f"Karpathy split {split!r} is not one of {', '.join(SPLITS)}")
    if captions_per_image is not None and captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1 (or None for all), got {captions_per_image}")
    path = dataset_file(data, dataset)
    doc = load_json(path)
    if not isinstance(doc, dict) or "images" not in doc:
        raise FormatError(f"{path}: expected an object with 'dataset' and 'images' (a Karpathy split file)")
    name = doc.get("dataset")
    if name not in DATASETS:
        raise FormatError(f"{path}: 'dataset' is {name!r}, expected one of {', '.join(DATASETS)}")
    wanted = {"train", "restval"} if split == "train" else {split}
    skips = Skips(TASK)
    examples, trimmed, seen = [], 0, set()
    for index, image in enumerate(expect_list(doc["images"], path, "'images'")):
        position = f"images[{index}]"
        try:
            if not isinstance(image, dict):
                raise TypeError(f"expected an object, got {type(image).__name__}")
            if field_of(image, "split", str) not in wanted:
                continue
            key = image_key(name, image)
            position += f" ({image['filename']})"
            sentences = field_of(image, "sentences", list)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            skips.skip(path, position, record_error(err))
            continue
        captions = []
        for s_index, sentence in enumerate(sentences):
            if isinstance(sentence, dict) and isinstance(sentence.get("sentid"), int) \
                    and isinstance(sentence.get("raw"), str) and sentence["raw"].strip() \
                    and sentence["sentid"] not in seen:
                captions.append(sentence)
            else:
                skips.skip(path, f"{position} sentences[{s_index}]", "expected {sentid: int, raw: non-empty str}"
                           + (" (sentid repeated)" if isinstance(sentence, dict) and sentence.get("sentid") in seen else ""))
        if not captions:
            skips.skip(path, position, "no usable caption")
            continue
        if captions_per_image is not None and len(captions) > captions_per_image:
            trimmed += 1
            captions = captions[:captions_per_image]
        for sentence in captions:
            seen.add(sentence["sentid"])
            examples.append(Example(str(sentence["sentid"]), (key,), sentence["raw"].strip()))
    if trimmed:
        log.info("retrieval %s: %d image(s) had more than %d captions; the first %d kept",
                 split, trimmed, captions_per_image, captions_per_image)
    return skips.result(split, examples, [path])
