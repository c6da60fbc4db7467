"""VQA v2 in the release layout: questions + annotations JSON, the test split without annotations,
answers that need the official normalisation, the vocabulary and its soft scores."""
import json

import pytest

from vlp_train.finetune.formats import vqa
from vlp_train.finetune.formats.common import FormatError

INFO = {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0 International License"}


def answers(*given):
    return [{"answer_id": i + 1, "answer": a, "answer_confidence": "yes"} for i, a in enumerate(given)]


def write_split(folder, subset, questions, annotations=None):
    folder.mkdir(parents=True, exist_ok=True)
    if questions is not None:
        (folder / vqa.questions_file(subset)).write_text(json.dumps(
            {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE,
             "data_subtype": subset, "questions": questions}))
    if annotations is not None:
        (folder / vqa.annotations_file(subset)).write_text(json.dumps(
            {"info": INFO, "license": LICENSE, "data_type": "mscoco", "data_subtype": subset,
             "annotations": annotations}))


def annotation(qid, image_id, given, mc, answer_type="number", question_type="how many"):
    return {"question_id": qid, "image_id": image_id, "question_type": question_type,
            "answer_type": answer_type, "multiple_choice_answer": mc, "answers": answers(*given)}


@pytest.fixture
def train_dir(tmp_path):
    questions = [{"question_id": 9000, "image_id": 9, "question": "How many cats?"},
                 {"question_id": 9001, "image_id": 9, "question": "What is the cat on?"},
                 {"question_id": 25000, "image_id": 25, "question": "How many dogs?"},
                 {"question_id": 25001, "question": "Is it sunny?"},                      # no image_id
                 {"question_id": 25002, "image_id": 25, "question": "Is it raining?"},    # no annotation
                 {"question_id": 30000, "image_id": 30, "question": "What color is the bus?"}]
    annotations = [annotation(9000, 9, ["Two", "2", "two.", "2", "3", "2", "2", "two", "2", "2"], "2"),
                   annotation(9001, 9, ["the sofa"] * 6 + ["couch"] * 4, "sofa", "other", "what is the"),
                   annotation(25000, 25, ["2"] * 9 + ["1"], "two"),
                   {**annotation(30000, 30, [], "red", "other", "what color is the"), "answers": "red"},
                   annotation(31000, 31, ["yes"] * 10, "yes", "yes/no", "is the")]            # no question
    # The two files unpacked into their own folders, as the archives do.
    write_split(tmp_path / "Questions", "train2014", questions)
    write_split(tmp_path / "Annotations", "train2014", None, annotations)
    return tmp_path


def test_reads_the_release_layout_skipping_and_reporting_bad_records(train_dir):
    result = vqa.read(str(train_dir), "train")
    assert result.split == "train2014"
    assert [e.example_id for e in result] == ["9000", "9001", "25000"]
    first = result.examples[0]
    assert first.image_ids == ("train2014/COCO_train2014_000000000009",) and first.text == "How many cats?"
    assert first.target.answer_type == "number" and first.target.answers[0] == "Two"
    reasons = {p.position: p.reason for p in result.problems}
    assert result.skipped == 4
    assert "answers" in reasons["annotations[3] (question_id 30000)"]
    assert reasons["questions[3]"] == "missing field 'image_id'"
    assert "no usable annotation" in reasons["questions[4] (question_id 25002)"]
    assert "not in the questions file" in reasons["question_id 31000"]
    assert all(p.file.endswith(".json") for p in result.problems)


def test_vocabulary_and_soft_scores(train_dir, tmp_path):
    examples = vqa.read(str(train_dir), "train2014").examples
    # multiple_choice_answer "2" and "two" are one answer after normalisation: 2 questions.
    vocab = vqa.AnswerVocab.build(examples, min_count=2)
    assert vocab.answers == ["2"]
    vocab = vqa.AnswerVocab.build(examples, min_count=1)
    assert vocab.answers == ["2", "sofa"]
    # Question 9000: "Two", "2", "two.", "two" all normalise to "2": 9 of 10 -> 1.0.
    assert vocab.soft_scores(examples[0].target) == {0: 1.0}
    # 9001: "the sofa" x6 -> "sofa" (1.0); "couch" is out of the vocabulary and dropped.
    assert vocab.soft_scores(examples[1].target) == {1: 1.0}
    three = vqa.VqaTarget(("sofa", "sofa", "Sofa!", "bed") + ("chair",) * 6, "other", "what", "chair")
    assert vocab.soft_scores(three) == {1: pytest.approx(0.9)}
    path = tmp_path / "answers.json"
    vocab.save(str(path))
    assert vqa.AnswerVocab.load(str(path)) == vocab
    with pytest.raises(ValueError, match="lower the minimum"):
        vqa.AnswerVocab.build(examples, min_count=9)


def test_vqa_targets_follow_the_label_index_given(train_dir):
    """The harness's soft-score target over the label index it is given, each time: a dict whose
    contents change under the same id (as ids are reused after garbage collection) gets its own
    labels, not those of a cache keyed by the id."""
    from vlp_train.finetune.tasks import task_of

    example = vqa.read(str(train_dir), "train2014").examples[1]  # "the sofa" x 6, "couch" x 4
    index = {"sofa": 0, "couch": 1, "bed": 2}
    assert task_of("vqa").target(example, index, None).tolist() == [1.0, 1.0, 0.0]
    index.clear()
    index.update({"bed": 0, "sofa": 1, "chair": 2})
    assert task_of("vqa").target(example, index, None).tolist() == [0.0, 1.0, 0.0]


def test_test_split_has_no_annotations(tmp_path):
    write_split(tmp_path, "test-dev2015", [{"question_id": 7001, "image_id": 7, "question": "What is the cat on?"}])
    result = vqa.read(str(tmp_path), "test-dev")
    assert result.examples[0].target is None
    assert result.examples[0].image_ids == ("test2015/COCO_test2015_000000000007",)   # test-dev is in test2015
    assert not vqa.has_annotations("test-dev")
    with pytest.raises(FormatError, match="v2_OpenEnded_mscoco_val2014_questions.json: not found"):
        vqa.read(str(tmp_path), "val")
    with pytest.raises(FormatError, match="split 'minival'"):
        vqa.read(str(tmp_path), "minival")


def test_a_questions_file_of_the_wrong_shape_is_refused(tmp_path):
    (tmp_path / vqa.questions_file("val2014")).write_text(json.dumps([{"question_id": 1}]))
    with pytest.raises(FormatError, match="expected an object with a 'questions' list"):
        vqa.read(str(tmp_path), "val")
