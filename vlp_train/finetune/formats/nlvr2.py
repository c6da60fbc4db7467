"""NLVR2: the JSON Lines release `nlvr2/data/{train,dev,test1,test2}.json` (also the
balanced/unbalanced subsets, e.g. split='balanced_dev' finds `balanced/balanced_dev.json`).

Each line: identifier '{split}-{set}-{pair}-{sentence}', sentence, label "True"/"False" (strings; case ignored, as the official metric does),
left_url, right_url, directory (train: the image bucket 0-99), ... One Example per line:
example_id = identifier, image_ids = the left and right image keys ('{split}-{set}-{pair}-img0',
'-img1', images.nlvr2_keys), text = sentence, target = bool. Metrics: metrics.nlvr2_scores
(accuracy and consistency over the sentence groups).
"""
from __future__ import annotations

from vlp_train.finetune.formats.common import (
    Example, FormatError, ReadResult, Skips, find_file, json_line_examples, nonempty_text)
from vlp_train.finetune.formats.images import nlvr2_keys

TASK = "nlvr2"
# The release writes "True" / "False"; the official metrics.py compares them lower-cased, so case is free.
LABELS = {"true": True, "false": False}


def read(data_dir: str, split: str) -> ReadResult:
    if not split or "/" in split:
        raise FormatError(f"NLVR2 split {split!r}: expected a file name such as train, dev, test1, test2")
    path = find_file(data_dir, f"{split}.json")
    skips = Skips(TASK)
    return skips.result(split, json_line_examples(path, skips, _example, "identifier"), [path])


def _example(record: dict, line_no: int) -> Example:
    identifier = nonempty_text(record, "identifier")
    keys = nlvr2_keys(identifier)
    sentence = nonempty_text(record, "sentence")
    label = record.get("label")
    if not isinstance(label, str) or label.lower() not in LABELS:  # strings, not JSON booleans
        raise ValueError(f"field 'label' must be the string \"True\" or \"False\", got {label!r:.40}")
    return Example(identifier, keys, sentence, LABELS[label.lower()])
