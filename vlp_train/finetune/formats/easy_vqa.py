"""easy-VQA (PyPI `easy-vqa` 1.0): the package's own data files, read with every entry checked.

Layout (the package's `easy_vqa/data/`, or a folder with the same layout passed as data_dir):
`answers.txt` (13 answers, one a line; the label order is the file's), `{train,test}/questions.json`
(a JSON array of `[question, answer, image_id]`), `{train,test}/images/{image_id}.png` (64x64).
Image ids restart at 0 in each split, so the key keeps the split: 'train/images/0' (images.py).
The metric is exact-match accuracy (metrics.accuracy).
"""
from __future__ import annotations

import os

from vlp_train.finetune.formats.common import (
    Example, FormatError, ReadResult, Skips, expect_list, load_json)
from vlp_train.finetune.formats.images import easy_vqa_key

TASK = "easy-vqa"
SPLITS = ("train", "test")


def package_data_dir() -> str:
    """The data folder installed with the easy-vqa package."""
    try:
        import easy_vqa
    except ImportError:
        raise FormatError("the easy-vqa package is not installed: pip install easy-vqa==1.0") from None
    return os.path.join(os.path.dirname(easy_vqa.__file__), "data")


def answers(data_dir: str | None = None) -> list[str]:
    """The answer vocabulary in answers.txt's order (the package's get_answers() for its own data)."""
    if data_dir is None:
        package_data_dir()  # a clear message when the package is missing
        import easy_vqa
        vocab = list(easy_vqa.get_answers())
        path = os.path.join(package_data_dir(), "answers.txt")
    else:
        path = os.path.join(data_dir, "answers.txt")
        try:
            with open(path, encoding="utf-8") as f:
                vocab = [line.strip() for line in f]
        except OSError as err:
            raise FormatError(f"{path}: cannot be read ({err.strerror})") from None
    vocab = [a for a in vocab if a]
    if not vocab or len(set(vocab)) != len(vocab):
        raise FormatError(f"{path}: expected distinct answers, one a line; got {vocab[:20]}")
    return vocab


def image_paths(split: str, data_dir: str | None = None) -> dict[str, str]:
    """Image key -> PNG path for a split (the package's get_{split}_image_paths() for its own data)."""
    _check_split(split)
    if data_dir is None:
        package_data_dir()
        import easy_vqa
        by_id = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    else:
        folder = os.path.join(data_dir, split, "images")
        if not os.path.isdir(folder):
            raise FormatError(f"{folder}: not a directory (easy-VQA images are {split}/images/<id>.png)")
        by_id = {int(name[:-4]): os.path.join(folder, name) for name in os.listdir(folder)
                 if name.endswith(".png") and name[:-4].isdigit()}
    return {easy_vqa_key(split, i): path for i, path in sorted(by_id.items())}


def read(split: str, data_dir: str | None = None) -> ReadResult:
    """Examples of a split: text = the question, target = the answer string, one image each."""
    _check_split(split)
    root = data_dir if data_dir is not None else package_data_dir()
    path = os.path.join(root, split, "questions.json")
    vocab = set(answers(data_dir))
    present = set(image_paths(split, data_dir))
    skips = Skips(TASK)
    examples = []
    for index, entry in enumerate(expect_list(load_json(path), path, "the questions")):
        position = f"entry {index}"
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0].strip()
                and isinstance(entry[1], str) and isinstance(entry[2], int) and not isinstance(entry[2], bool)):
            skips.skip(path, position, f"expected [question, answer, image_id], got {entry!r:.80}")
            continue
        question, answer, image_id = entry
        if answer not in vocab:
            skips.skip(path, position, f"answer {answer!r} is not in answers.txt")
            continue
        key = easy_vqa_key(split, image_id)
        if key not in present:
            skips.skip(path, position, f"image {split}/images/{image_id}.png does not exist")
            continue
        examples.append(Example(f"{split}-{index}", (key,), question, answer))
    return skips.result(split, examples, [path])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FormatError(f"easy-VQA split {split!r} is not one of {', '.join(SPLITS)}")
