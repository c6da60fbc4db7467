"""SNLI-VE: the JSON Lines release `snli_ve_{train,dev,test}.jsonl`.

Each line has the SNLI 1.0 fields plus `Flikr30kID` (sic) = the Flickr30K file name ("123.jpg";
a bare id is taken too). One Example per line: example_id = pairID (else 'line N'), image_ids =
(flickr30k_key,), text = sentence2 (the hypothesis; the caption premise sentence1 is not used),
target = gold_label, one of LABELS (index = the class). Metric: metrics.accuracy.
"""
from __future__ import annotations

from vlp_train.finetune.formats.common import (
    Example, FormatError, ReadResult, Skips, find_file, json_line_examples, nonempty_text)
from vlp_train.finetune.formats.images import flickr30k_key

TASK = "snli-ve"
SPLITS = ("train", "dev", "test")
LABELS = ("entailment", "neutral", "contradiction")   # fixed: the head's class order


def read(data_dir: str, split: str) -> ReadResult:
    if split not in SPLITS:
        raise FormatError(f"SNLI-VE split {split!r} is not one of {', '.join(SPLITS)}")
    path = find_file(data_dir, f"snli_ve_{split}.jsonl")
    skips = Skips(TASK)
    return skips.result(split, json_line_examples(path, skips, _example, "pairID"), [path])


def _example(record: dict, line_no: int) -> Example:
    example_id = str(record.get("pairID") or f"line {line_no}")
    image = record.get("Flikr30kID")
    if not isinstance(image, (str, int)) or isinstance(image, bool):
        raise KeyError("missing field 'Flikr30kID' (the Flickr30K file name)")
    key = flickr30k_key(image)
    hypothesis = nonempty_text(record, "sentence2")
    label = record.get("gold_label")
    if label not in LABELS:  # "-" (no majority) rows are not in the release
        raise ValueError(f"field 'gold_label' must be one of {', '.join(LABELS)}, got {label!r:.40}")
    return Example(example_id, (key,), hypothesis, label)
