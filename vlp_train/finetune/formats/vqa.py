"""VQA v2: the questions + annotations JSON release, the official answer normalisation, and the
answer vocabulary with the literature's soft scores.

Files (in data_dir, or one folder below it): `v2_OpenEnded_mscoco_{subset}_questions.json` and, for
train2014/val2014 only, `v2_mscoco_{subset}_annotations.json`. test2015 and test-dev2015 have no
annotations: their examples have target None and are scored by the server from the results JSON
(metrics.write_vqa_results). Images: COCO `{train2014|val2014|test2015}` (test-dev is a subset of
test2015), keys by images.coco_key.

Normalisation = the official evaluation's (vqaEval.py, master): `normalize_answer` is its
processPunctuation then processDigitArticle. The vocabulary follows the bottom-up-attention tools
(reused by LXMERT, UNITER, VisualBERT): each question's `multiple_choice_answer`, normalised and with
commas removed, counted once per question; answers of at least `min_count` (9) questions are kept,
in first-seen order (3,129 from train+val; fewer from train alone). A question's soft target for an
answer that `m` of its 10 annotators gave is min(1, 0.3 m) (0, .3, .6, .9, 1): the mean over the 10
leave-one-annotator-out subsets of min(1, matches/3), i.e. exactly the accuracy that answer scores.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from vlp_train.finetune.formats.common import (
    Example, FormatError, ReadResult, Skips, expect_list, field_of, find_file, load_json, nonempty_text,
    record_error)
from vlp_train.finetune.formats.images import coco_key

TASK = "vqa"
SPLIT_NAMES = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
IMAGE_SUBSET = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015",
                "test-dev2015": "test2015"}
ANSWER_TYPES = ("yes/no", "number", "other")
DEFAULT_MIN_COUNT = 9


@dataclass(frozen=True)
class VqaTarget:
    """The annotation of one question: the 10 annotators' raw answers and the question's types."""
    answers: tuple[str, ...]
    answer_type: str
    question_type: str
    multiple_choice_answer: str


def questions_file(subset: str) -> str:
    return f"v2_OpenEnded_mscoco_{subset}_questions.json"


def annotations_file(subset: str) -> str:
    return f"v2_mscoco_{subset}_annotations.json"


def subset_name(split: str) -> str:
    """'train' / 'train2014' -> 'train2014' (also val, test, test-dev)."""
    subset = SPLIT_NAMES.get(split, split)
    if subset not in IMAGE_SUBSET:
        raise FormatError(f"VQA v2 split {split!r} is not one of "
                          f"{', '.join(list(SPLIT_NAMES) + list(IMAGE_SUBSET))}")
    return subset


def has_annotations(split: str) -> bool:
    return subset_name(split) in ("train2014", "val2014")


def read(data_dir: str, split: str) -> ReadResult:
    """One Example per question: example_id = str(question_id), image_ids = (COCO key,), text = the
    question, target = VqaTarget (None for test2015 / test-dev2015, which have no annotations)."""
    subset = subset_name(split)
    skips = Skips(TASK)
    q_path = find_file(data_dir, questions_file(subset))
    q_doc = load_json(q_path)
    if not isinstance(q_doc, dict) or "questions" not in q_doc:
        raise FormatError(f"{q_path}: expected an object with a 'questions' list")
    questions = expect_list(q_doc["questions"], q_path, "'questions'")
    targets, rejected, files = None, set(), [q_path]
    if has_annotations(subset):
        a_path = find_file(data_dir, annotations_file(subset))
        files.append(a_path)
        targets, rejected = _read_annotations(a_path, skips)
    image_subset = IMAGE_SUBSET[subset]
    examples, seen = [], set()
    for index, q in enumerate(questions):
        position = f"questions[{index}]"
        try:
            if not isinstance(q, dict):
                raise TypeError(f"expected an object, got {type(q).__name__}")
            qid = field_of(q, "question_id", int)
            key = coco_key(field_of(q, "image_id", int), image_subset)
            text = nonempty_text(q, "question")
        except (KeyError, TypeError, ValueError) as err:
            skips.skip(q_path, position, record_error(err))
            continue
        position += f" (question_id {qid})"
        if qid in seen:
            skips.skip(q_path, position, "question_id repeated")
            continue
        seen.add(qid)
        target = None
        if targets is not None:
            if qid in rejected:  # its annotation was malformed: reported and counted once, there
                continue
            if qid not in targets:
                skips.skip(q_path, position, f"no usable annotation in {os.path.basename(files[1])}")
                continue
            image_id, target = targets.pop(qid)
            if image_id != coco_id_of(key):
                skips.skip(q_path, position, f"image_id {coco_id_of(key)} but the annotation says {image_id}")
                continue
        examples.append(Example(str(qid), (key,), text, target))
    for qid in targets or ():  # left over: annotated, but not asked in the questions file
        skips.skip(files[1], f"question_id {qid}", "annotation for a question not in the questions file")
    return skips.result(subset, examples, files)


def coco_id_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def _read_annotations(path: str, skips: Skips) -> tuple[dict[int, tuple[int, VqaTarget]], set[int]]:
    """question id -> (image id, VqaTarget); and the question ids whose annotation was malformed."""
    doc = load_json(path)
    if not isinstance(doc, dict) or "annotations" not in doc:
        raise FormatError(f"{path}: expected an object with an 'annotations' list")
    found, rejected = {}, set()
    for index, a in enumerate(expect_list(doc["annotations"], path, "'annotations'")):
        position = f"annotations[{index}]"
        try:
            if not isinstance(a, dict):
                raise TypeError(f"expected an object, got {type(a).__name__}")
            qid = field_of(a, "question_id", int)
            position += f" (question_id {qid})"
            image_id = field_of(a, "image_id", int)
            answer_type = field_of(a, "answer_type", str)
            raw = field_of(a, "answers", list)
            if not raw or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in raw):
                raise TypeError("field 'answers' must be a non-empty list of {answer_id, answer, ...}")
            target = VqaTarget(tuple(x["answer"] for x in raw), answer_type,
                               str(a.get("question_type", "")),
                               str(a.get("multiple_choice_answer", "")))
        except (KeyError, TypeError) as err:
            skips.skip(path, position, record_error(err))
            if isinstance(a, dict) and isinstance(a.get("question_id"), int):
                rejected.add(a["question_id"])
            continue
        if qid in found:
            skips.skip(path, position, "question_id annotated twice")
            continue
        found[qid] = (image_id, target)
    return found, rejected


# ---- the official answer normalisation (vqaEval.py) -----------------------------------------------

# Deleted (no space) when an occurrence touches a space or the answer has a digit,digit ("100,978");
# otherwise replaced by a space. Apostrophe and colon are kept.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Every "." not followed by a digit ("1.5" keeps its point). The official pattern's leading
# "(?!<=\d)" is a mistyped lookbehind (a lookahead for "<=digit") that never blocks anything.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where the count goes: at most 32 periods are removed.
_PERIOD_MAX_REMOVED = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings -> with apostrophes (the official table; its capitalised keys such as
# "Im" never fire because words are lower-cased first, and "somebody'd" -> "somebodyd" is its own).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}


def clean_whitespace(answer: str) -> str:
    """The step applied to every answer: newline and tab -> space, then strip."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    joined_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        # The official test looks at the input, not the text as changed so far.
        if p + " " in text or " " + p in text or joined_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVED)


def process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


# Answers repeat heavily (a few thousand distinct over 200k questions): scoring a split and building
# every batch's soft targets normalise the same strings again and again.
@functools.lru_cache(maxsize=1 << 17)
def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer (whitespace, punctuation, digits, articles,
    contractions). The metric applies it only to questions whose 10 answers are not all identical."""
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def vocabulary_answer(answer: str) -> str:
    """An answer as the vocabulary holds it: normalised, commas removed (bottom-up-attention)."""
    return normalize_answer(answer).replace(",", "")


# ---- answer vocabulary and soft scores --------------------------------------------------------------

def soft_score(matching_annotators: int) -> float:
    """min(1, 0.3 m): the official accuracy of an answer m of the 10 annotators gave."""
    return min(1.0, 0.3 * matching_annotators)


def soft_scores(target: VqaTarget, index: dict[str, int]) -> dict[int, float]:
    """label -> min(1, 0.3 m) for each answer of `index` (answer -> label) the annotators gave (m of them)."""
    counts = Counter(vocabulary_answer(a) for a in target.answers)
    return {index[a]: soft_score(m) for a, m in counts.items() if a in index}


class AnswerVocab:
    """The answers a classifier predicts over; index = label. Saved/loaded as a JSON list."""

    def __init__(self, answers: Iterable[str]):
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError("the answer vocabulary repeats an answer")

    def __len__(self) -> int:
        return len(self.answers)

    def __eq__(self, other) -> bool:
        return isinstance(other, AnswerVocab) and self.answers == other.answers

    @classmethod
    def build(cls, examples: Iterable[Example], min_count: int = DEFAULT_MIN_COUNT) -> "AnswerVocab":
        """Answers that are the multiple_choice_answer of at least min_count distinct questions
        (pass train, or train and val as the literature's 3,129 does), in first-seen order."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        questions: dict[str, set[str]] = {}
        for example in examples:
            if example.target is None:
                raise ValueError(f"question {example.example_id} has no annotation: build the "
                                 "vocabulary from train (and val)")
            answer = vocabulary_answer(example.target.multiple_choice_answer)
            questions.setdefault(answer, set()).add(example.example_id)
        kept = [a for a, ids in questions.items() if len(ids) >= min_count and a]
        if not kept:
            raise ValueError(f"no answer is given for {min_count} or more questions; lower the minimum count")
        return cls(kept)

    def soft_scores(self, target: VqaTarget) -> dict[int, float]:
        """label -> min(1, 0.3 m) for each in-vocabulary answer the annotators gave (m of them)."""
        return soft_scores(target, self.index)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.answers, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str) -> "AnswerVocab":
        answers = load_json(path)
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise FormatError(f"{path}: expected a JSON list of answer strings")
        return cls(answers)
