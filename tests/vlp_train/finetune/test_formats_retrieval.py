"""Karpathy-split JSON (COCO and Flickr30K) as released: splits, restval, caption counts, keys."""
import json

import numpy as np
import pytest

from vlp_train.finetune import metrics
from vlp_train.finetune.formats import retrieval
from vlp_train.finetune.formats.common import FormatError


def image(imgid, split, filename, captions, first_sentid, **extra):
    sentences = [{"tokens": c.lower().strip(".").split(), "raw": c, "imgid": imgid, "sentid": first_sentid + i}
                 for i, c in enumerate(captions)]
    return {"filename": filename, "imgid": imgid, "split": split, "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences, **extra}


def test_coco_splits_restval_and_caption_limit(tmp_path):
    images = [
        image(0, "test", "COCO_val2014_000000000777.jpg", ["A dog on a bed.", "A dog sleeps."], 0,
              filepath="val2014", cocoid=777),
        image(1, "train", "COCO_train2014_000000000009.jpg", ["Food in bowls."], 2, filepath="train2014", cocoid=9),
        image(2, "restval", "COCO_val2014_000000000042.jpg", [f"Caption {i}." for i in range(7)], 3,
              filepath="val2014", cocoid=42),
        image(3, "test", "COCO_val2014_000000000888.jpg", [], 10, filepath="val2014", cocoid=888),  # no caption
        {"imgid": 4, "split": "test", "sentences": []}]                                               # no filename
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    test = retrieval.read(str(tmp_path), "test")
    assert [(e.example_id, e.image_ids, e.text) for e in test] == [
        ("0", ("val2014/COCO_val2014_000000000777",), "A dog on a bed."),
        ("1", ("val2014/COCO_val2014_000000000777",), "A dog sleeps.")]
    assert test.skipped == 2 and [p.reason for p in test.problems] == ["no usable caption", "missing field 'filename'"]
    train = retrieval.read(str(tmp_path / "dataset_coco.json"), "train")
    assert train.image_ids() == ["train2014/COCO_train2014_000000000009", "val2014/COCO_val2014_000000000042"]
    assert len(train) == 1 + 5                                   # the restval image keeps its first 5 of 7
    assert len(retrieval.read(str(tmp_path), "train", captions_per_image=None)) == 1 + 7
    assert len(retrieval.read(str(tmp_path), "restval")) == 5


def test_flickr30k_keys_and_the_metric_on_read_examples(tmp_path):
    images = [image(0, "test", "1000092795.jpg", ["Two young guys.", "Two men outside."], 0),
              image(1, "test", "10002456.jpg", ["Several men.", "Workers."], 2),
              image(2, "train", "1001465944.jpg", ["A girl."], 4)]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    test = retrieval.read(str(path), "test")
    keys, text_image = metrics.retrieval_index(test.examples)
    assert keys == ["flickr30k-images/1000092795", "flickr30k-images/10002456"] and text_image == [0, 0, 1, 1]
    # Image 0 prefers caption 2 (image 1's): TR@1 misses it, TR@2 not. Image retrieval: captions 0
    # and 3 rank their image first; caption 1 (0.1 < 0.2) and caption 2 (0.3 < 0.9) do not.
    scores = np.array([[0.5, 0.1, 0.9, 0.0], [0.1, 0.2, 0.3, 0.8]])
    got = metrics.retrieval_recalls(scores, text_image, ks=(1, 2))
    assert got["tr@1"] == 50.0 and got["tr@2"] == 100.0 and got["ir@1"] == 50.0 and got["ir@2"] == 100.0
    with pytest.raises(FormatError, match="'dataset' is 'mscoco'"):
        path.write_text(json.dumps({"dataset": "mscoco", "images": images}))
        retrieval.read(str(path), "test")
    with pytest.raises(FormatError, match="split 'dev'"):
        retrieval.read(str(path), "dev")
