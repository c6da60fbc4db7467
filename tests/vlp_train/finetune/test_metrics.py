"""Each metric against values worked out by hand."""
import json

import numpy as np
import pytest

from vlp_train.finetune import metrics
from vlp_train.finetune.formats.common import Example
from vlp_train.finetune.formats.refcoco import RefTarget
from vlp_train.finetune.formats.vqa import VqaTarget, normalize_answer


def vqa_example(qid, answers, answer_type="other", question_type="what is"):
    return Example(str(qid), ("val2014/COCO_val2014_000000000001",), "q?",
                   VqaTarget(tuple(answers), answer_type, question_type, answers[0]))


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_the_ten_leave_one_out_subsets(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    # By hand for 2 of 10: the 2 annotators who said "2" each leave 1 match among the other 9
    # (1/3), the other 8 leave 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert metrics.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_the_answers_differ():
    # Not all identical: prediction and answers normalised ("Two" -> "2", "two." -> "2").
    assert metrics.vqa_accuracy("Two", ["two."] + ["2"] + ["3"] * 8) == pytest.approx(0.6)
    # All ten identical: nothing is normalised, so "Two" scores 0 against ten "2"; "2 " still 1.
    assert metrics.vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert metrics.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


@pytest.mark.parametrize("raw, normalised", [
    ("yes!", "yes"), ("t-shirt", "t shirt"), ("hello - world", "hello world"), ("100,978", "100978"),
    ("red, white", "red white"), ("A dog.", "dog"), ("3.5", "3.5"), ("the cat's toy", "cat's toy"),
    ("dont", "don't"), ("none", "0"), ("Ten", "10"), ("Im", "im"), ("(left)", "left"), ("what?", "what"),
    ("an apple\tpie", "apple pie")])
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_scores_overall_and_per_type_and_results_file(tmp_path):
    examples = [vqa_example(1, ["yes"] * 10, "yes/no", "is the"),
                vqa_example(2, ["2", "2"] + ["3"] * 8, "number", "how many"),
                vqa_example(3, ["red"] * 3 + ["blue"] * 7, "other", "what color")]
    predictions = {"1": "yes", "2": "2", "3": "red"}          # 1.0, 0.6, 0.9
    scores = metrics.vqa_scores(predictions, examples)
    assert scores["overall"] == pytest.approx(83.33)             # 100 * 2.5 / 3 rounded to 2 dp
    assert scores["per_answer_type"] == {"number": 60.0, "other": 90.0, "yes/no": 100.0}
    assert scores["per_question_type"]["how many"] == 60.0
    with pytest.raises(ValueError, match="1 of 3 examples have no prediction"):
        metrics.vqa_scores({"1": "yes", "2": "2"}, examples)
    test_examples = [Example("7001", ("test2015/COCO_test2015_000000000007",), "q?"),
                     Example("7002", ("test2015/COCO_test2015_000000000007",), "q?")]
    with pytest.raises(ValueError, match="cannot be scored"):
        metrics.vqa_scores({"7001": "a", "7002": "b"}, test_examples)
    path = tmp_path / "out" / "results.json"
    assert metrics.write_vqa_results(str(path), {"7001": "sofa", "7002": "2"}, test_examples) == 2
    assert json.loads(path.read_text()) == [{"question_id": 7001, "answer": "sofa"}, {"question_id": 7002, "answer": "2"}]


def test_accuracy_and_nlvr2_consistency():
    examples = [Example(i, (), "s", t) for i, t in
                [("dev-1-0-0", True), ("dev-1-1-0", False), ("dev-1-0-1", True), ("dev-1-1-1", True)]]
    predictions = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-0-1": True, "dev-1-1-1": False}
    # sentence 0 (pairs 0, 1) all right, sentence 1 one wrong: accuracy 3/4, consistency 1/2.
    assert metrics.nlvr2_scores(predictions, examples) == {"accuracy": 75.0, "consistency": 50.0}
    assert metrics.nlvr2_sentence_group("test1-850-12-3") == "test1-850-3"
    assert metrics.accuracy({"a": "yes", "b": "red"}, [Example("a", (), "", "yes"), Example("b", (), "", "blue")]) == 50.0


def test_iou_and_refcoco_accuracy():
    a = metrics.xywh_to_xyxy([10, 10, 20, 20])
    assert a == (10.0, 10.0, 30.0, 30.0)
    assert metrics.box_iou(a, (20, 20, 40, 40)) == pytest.approx(100 / 700)   # 10x10 over 400+400-100
    assert metrics.box_iou(a, a) == 1.0
    assert metrics.box_iou(a, (30, 10, 50, 30)) == 0.0                       # edges touch
    assert metrics.box_iou((5, 5, 5, 9), (5, 5, 5, 9)) == 0.0                 # no area
    examples = [Example(str(i), (), "e", RefTarget(box=(0.0, 0.0, 10.0, 10.0), ref_id=i, ann_id=i, category_id=1))
                for i in range(3)]
    predicted = {"0": (0, 0, 10, 5),     # IoU exactly 0.5: a hit
                 "1": (0, 0, 10, 4.9),   # 0.49
                 "2": (1, 1, 11, 11)}    # 81 / 119
    assert metrics.refcoco_accuracy(predicted, examples) == pytest.approx(200 / 3)


def test_retrieval_recall_at_k_by_hand():
    scores = np.array([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],     # rows: images, columns: texts
                       [0.5, 0.1, 0.5, 0.2, 0.1, 0.1],
                       [0.5, 0.5, 0.5, 0.5, 0.05, 0.0]])
    text_image = [0, 0, 1, 1, 2, 2]
    # Text retrieval ranks (0-based): image 0 -> text 0 first (0); image 1 -> text 2 ties text 0 at
    # 0.5, a tie counts against it (1); image 2 -> its best 0.05 below four others (4).
    # Image retrieval ranks: text 0 -> image 0 first (0); every other text has 2 images at least as high.
    got = metrics.retrieval_recalls(scores, text_image, ks=(1, 2, 5))
    assert got["tr@1"] == pytest.approx(100 / 3) and got["tr@2"] == pytest.approx(200 / 3) and got["tr@5"] == 100
    assert got["ir@1"] == pytest.approx(100 / 6) and got["ir@2"] == pytest.approx(100 / 6) and got["ir@5"] == 100
    assert got["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 100 / 6 + 100 / 6 + 100)
    assert got["rmean"] == pytest.approx(got["rsum"] / 6)
    # A constant scorer gets nothing at K=1; a candidate left at -inf is ranked last.
    assert metrics.retrieval_recalls(np.zeros((3, 6)), text_image, ks=(1,))["tr@1"] == 0.0
    reranked = np.full((3, 6), -np.inf)
    reranked[0, 0] = reranked[1, 2] = reranked[2, 5] = 1.0
    assert metrics.retrieval_recalls(reranked, text_image, ks=(1,))["tr@1"] == 100.0
    # image_scores ranks image retrieval alone: text retrieval stays `scores`'s
    apart = metrics.retrieval_recalls(scores, text_image, ks=(1,), image_scores=reranked)
    assert apart["tr@1"] == pytest.approx(100 / 3) and apart["ir@1"] == pytest.approx(300 / 6)
    assert apart["rmean"] == pytest.approx((100 / 3 + 300 / 6) / 2)
    with pytest.raises(ValueError, match="image_scores"):
        metrics.retrieval_recalls(scores, text_image, image_scores=scores[:2])
    # Folds: each of 3 one-image folds ranks its own 2 captions only.
    assert metrics.retrieval_recalls_folds(scores, text_image, 3, ks=(1,))["tr@1"] == 100.0
    with pytest.raises(ValueError, match="no caption"):
        metrics.retrieval_recalls(scores, [0, 0, 0, 0, 1, 1])
    images, index = metrics.retrieval_index([Example("1", ("b",), "x"), Example("2", ("a",), "y"), Example("3", ("b",), "z")])
    assert images == ["b", "a"] and index == [0, 1, 0]
