"""Record types and the skip / count / report rule shared by every downstream dataset reader.

The interface (what the fine-tuning harness relies on)
------------------------------------------------------
Each task has one module in this package with a ``read(...) -> ReadResult`` that reads the dataset
in its public release layout, untouched:

===========  ===========================================================  =========================
module       read(...)                                                    Example.target
===========  ===========================================================  =========================
vqa          read(data_dir, split)  split: train/val/test/test-dev        VqaTarget (None on test)
             (or the full names train2014, val2014, test2015, ...)        + AnswerVocab (soft scores)
nlvr2        read(data_dir, split)  split: train/dev/test1/test2          bool (the "True"/"False" label)
snli_ve      read(data_dir, split)  split: train/dev/test                 str, one of snli_ve.LABELS
refcoco      read(data_dir, split, split_by="unc")  train/val/testA/testB  RefTarget (box xyxy + candidates)
retrieval    read(path, split)  dataset_coco.json / dataset_flickr30k.json  None: one Example per caption,
                                                                          its image is image_ids[0]
easy_vqa     read(split, data_dir=None)  split: train/test (package data)  str answer (easy_vqa.answers())
===========  ===========================================================  =========================

Every ``Example`` has ``example_id`` (a string: the question id, NLVR2 identifier, SNLI-VE pairID,
RefCOCO sentence id, Karpathy sentid), ``image_ids`` (dataset image keys, one per image: two for
NLVR2, left then right), ``text`` (the question / sentence / hypothesis / expression / caption) and a
task-specific ``target``. The image keys are documented in ``images.py`` (one function per
dataset); ``images.match_images(dataset_keys, detection_ids)`` maps them onto the ``image_id``
values of the detections ``vlp-data detect`` (or any detections the pipeline reads) wrote, reports
the images without detections and stops when none match.

Bad input: a question / annotation / line / ref that is malformed is skipped, counted
(``ReadResult.skipped``) and reported with its file and position (the first ``MAX_REPORTED`` in
``ReadResult.problems``, each also logged as a warning). A file that is missing or not what the
release has at all (not JSON, wrong top level) raises ``FormatError`` naming the file; so does a
file that gives no usable example.

Metrics are in ``vlp_train.finetune.metrics``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger("vlp_train.finetune.formats")

# How many problems a ReadResult keeps (and logs one by one); the rest are only counted.
MAX_REPORTED = 10


class FormatError(ValueError):
    """A dataset file that is missing or unreadable as a whole (names the file)."""


@dataclass(frozen=True)
class Example:
    """One downstream example: the text, its image(s) and the task's target."""
    example_id: str
    image_ids: tuple[str, ...]
    text: str
    target: Any = None


@dataclass(frozen=True)
class Problem:
    """A skipped record: the file, where in it (e.g. 'line 12', 'questions[3]') and why."""
    file: str
    position: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, {self.position}: {self.reason}"


@dataclass(frozen=True)
class ReadResult:
    """The examples of one split, and what was skipped (count + the first MAX_REPORTED)."""
    task: str
    split: str
    examples: tuple[Example, ...]
    skipped: int = 0
    problems: tuple[Problem, ...] = ()
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def image_ids(self) -> list[str]:
        """Every image key the examples name, each once, in first-seen order."""
        return list(dict.fromkeys(i for e in self.examples for i in e.image_ids))

    def summary(self) -> str:
        line = f"{self.task} {self.split}: {len(self.examples)} examples from {', '.join(self.files)}"
        if self.skipped:
            line += f"; {self.skipped} skipped (" + "; ".join(str(p) for p in self.problems[:3])
            line += ", ..." if self.skipped > 3 else ""
            line += ")"
        return line


@dataclass
class Skips:
    """Collects skipped records for a reader: counts all, keeps and logs the first MAX_REPORTED."""
    task: str
    problems: list[Problem] = field(default_factory=list)
    count: int = 0

    def skip(self, file: str, position: str, reason: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_REPORTED:
            problem = Problem(str(file), position, reason)
            self.problems.append(problem)
            log.warning("%s: skipped %s", self.task, problem)

    def result(self, split: str, examples: list[Example], files: list[str]) -> ReadResult:
        """The ReadResult; FormatError when nothing usable was read."""
        if not examples:
            detail = f" ({self.count} skipped, first: {self.problems[0]})" if self.problems else ""
            raise FormatError(f"{self.task} {split}: no usable example in {', '.join(map(str, files))}{detail}")
        if self.count:
            log.warning("%s %s: %d record(s) skipped, %d read", self.task, split, self.count, len(examples))
        return ReadResult(self.task, split, tuple(examples), self.count, tuple(self.problems),
                          tuple(str(f) for f in files))


def find_file(data_dir: str | os.PathLike, name: str) -> str:
    """`data_dir/name`, else the one `data_dir/*/name` (an archive unpacked into its own folder)."""
    direct = os.path.join(data_dir, name)
    if os.path.isfile(direct):
        return direct
    below = sorted(glob.glob(os.path.join(glob.escape(str(data_dir)), "*", glob.escape(name))))
    if len(below) == 1:
        return below[0]
    if len(below) > 1:
        raise FormatError(f"{name}: found more than once under {data_dir}: {', '.join(below)}")
    if not os.path.isdir(data_dir):
        raise FormatError(f"{data_dir}: not a directory (expected the folder holding {name})")
    raise FormatError(f"{name}: not found in {data_dir} (nor one folder below)")


def load_json(path: str) -> Any:
    """A whole JSON file; FormatError naming the file (and the place) when it is not JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except OSError as err:
        raise FormatError(f"{path}: cannot be read ({err.strerror})") from None


def json_lines(path: str, skips: Skips) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSON Lines file; a bad line is skipped."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise FormatError(f"{path}: cannot be read ({err.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                skips.skip(path, f"line {line_no}", f"not valid JSON ({err})")
                continue
            if not isinstance(record, dict):
                skips.skip(path, f"line {line_no}", f"expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def json_line_examples(path: str, skips: Skips, example_of: Callable[[dict, int], Example],
                       id_field: str) -> list[Example]:
    """One Example per line of a JSON Lines release file (NLVR2's, SNLI-VE's), in order:
    example_of(record, line number) makes it, raising KeyError/TypeError/ValueError for a record it
    refuses; such a line is skipped with the reason, and so is a line whose example_id an earlier
    line gave. A skipped line's position is "line N", with the record's `id_field` (the release's id
    of it) in brackets when that is a non-empty string."""
    examples, seen = [], set()
    for line_no, record in json_lines(path, skips):
        position = f"line {line_no}"
        named = record.get(id_field)
        if isinstance(named, str) and named.strip():
            position += f" ({named})"
        try:
            example = example_of(record, line_no)
        except (KeyError, TypeError, ValueError) as err:
            skips.skip(path, position, record_error(err))
            continue
        if example.example_id in seen:
            skips.skip(path, position, f"{id_field} {example.example_id} repeated")
            continue
        seen.add(example.example_id)
        examples.append(example)
    return examples


def expect_list(value: Any, path: str, what: str) -> list:
    """The top-level list a release file must hold (FormatError otherwise)."""
    if not isinstance(value, list):
        raise FormatError(f"{path}: expected {what} to be a list, got {type(value).__name__}")
    return value


def field_of(record: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    """record[name] checked against kind; KeyError/TypeError carry a message for Skips."""
    if name not in record:
        raise KeyError(f"missing field '{name}'")
    value = record[name]
    # bool is an int subclass: an id or a count given as true/false is malformed.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise TypeError(f"field '{name}' must be {_kind_name(kind)}, got {value!r:.60}")
    return value


def nonempty_text(record: dict, name: str) -> str:
    value = field_of(record, name, str)
    if not value.strip():
        raise TypeError(f"field '{name}' is empty")
    return value


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def record_error(err: Exception) -> str:
    """The message of a KeyError/TypeError/ValueError raised while checking a record."""
    return err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
