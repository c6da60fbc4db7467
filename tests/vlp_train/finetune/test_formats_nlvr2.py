"""NLVR2 JSON Lines as released: string labels, image names from the identifier, bad lines."""
import json

import pytest

from vlp_train.finetune import metrics
from vlp_train.finetune.formats import nlvr2
from vlp_train.finetune.formats.common import FormatError


def line(identifier, sentence, label, **extra):
    return json.dumps({"validation": {"7": label}, "sentence": sentence, "left_url": "http://x/a.jpg",
                       "writer": "103", "label": label, "right_url": "http://x/b.jpg", "synset": "dog",
                       "query": "dogs35", "identifier": identifier, "extra_validations": {}, **extra})


def test_reads_lines_with_string_labels_and_pair_images(tmp_path):
    data = tmp_path / "nlvr2" / "data"
    data.mkdir(parents=True)
    (data / "dev.json").write_text("\n".join([
        line("dev-850-0-0", "Both images show two dogs.", "True"),
        line("dev-850-1-0", "Both images show two dogs.", "False"),
        '{"identifier": "dev-851-0-0", "sentence": "truncated',                      # broken JSON
        line("dev-851-0-1", "One image has a cat.", True),                           # a JSON boolean, not the string
        line("dev-852", "Bad identifier.", "True"),                                  # no pair/sentence fields
        line("dev-850-0-0", "Repeated.", "True"),                                    # identifier repeated
        "",
        line("dev-853-2-3", "There is a sofa.", "false")]) + "\n")                   # case is free (official metric)
    result = nlvr2.read(str(tmp_path / "nlvr2"), "dev")                              # data/ is one level down
    assert [(e.example_id, e.image_ids, e.target) for e in result] == [
        ("dev-850-0-0", ("dev-850-0-img0", "dev-850-0-img1"), True),
        ("dev-850-1-0", ("dev-850-1-img0", "dev-850-1-img1"), False),
        ("dev-853-2-3", ("dev-853-2-img0", "dev-853-2-img1"), False)]
    assert result.examples[0].text == "Both images show two dogs."
    assert result.skipped == 4
    assert [p.position for p in result.problems] == ["line 3", "line 4 (dev-851-0-1)", "line 5 (dev-852)",
                                                     "line 6 (dev-850-0-0)"]
    assert 'must be the string "True" or "False"' in result.problems[1].reason
    # The metric takes the reader's examples: sentence 0 of set 850 over its two pairs.
    scores = metrics.nlvr2_scores({"dev-850-0-0": True, "dev-850-1-0": True, "dev-853-2-3": False}, result.examples)
    assert scores == {"accuracy": pytest.approx(200 / 3), "consistency": 50.0}


def test_train_images_keep_the_name_whatever_the_bucket(tmp_path):
    (tmp_path / "train.json").write_text(line("train-10171-0-0", "A dog.", "True", directory=51) + "\n")
    example = nlvr2.read(str(tmp_path), "train").examples[0]
    assert example.image_ids == ("train-10171-0-img0", "train-10171-0-img1")
    with pytest.raises(FormatError, match="test1.json: not found"):
        nlvr2.read(str(tmp_path), "test1")
