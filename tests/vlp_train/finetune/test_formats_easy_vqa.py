"""easy-VQA: the installed package's real data, and its layout written small with bad entries."""
import json

import pytest
from PIL import Image

from vlp_train.finetune.formats import easy_vqa
from vlp_train.finetune.formats.common import FormatError


def test_package_data_as_the_package_reads_it():
    import easy_vqa as package
    texts, answers, ids = package.get_test_questions()
    result = easy_vqa.read("test")
    assert result.skipped == 0 and len(result) == len(texts) == 9673
    assert [e.text for e in result] == texts and [e.target for e in result] == answers
    assert [e.image_ids for e in result] == [(f"test/images/{i}",) for i in ids]
    assert easy_vqa.answers() == package.get_answers() and len(easy_vqa.answers()) == 13
    paths = easy_vqa.image_paths("test")
    assert len(paths) == 1000 and paths["test/images/0"] == package.get_test_image_paths()[0]
    assert set(result.image_ids()) <= set(paths)


def test_own_folder_in_the_same_layout_with_bad_entries(tmp_path):
    (tmp_path / "answers.txt").write_text("yes\nno\nred\n")
    (tmp_path / "train" / "images").mkdir(parents=True)
    for i in (0, 1):
        Image.new("RGB", (64, 64)).save(tmp_path / "train" / "images" / f"{i}.png")
    questions = [["is there a red shape?", "yes", 0],
                 ["what color is the shape?", "blue", 0],      # answer not in answers.txt
                 ["is it round?", "no"],                       # two fields
                 ["is there a circle?", "no", 5],              # no such image
                 ["what color is the shape?", "red", 1]]
    (tmp_path / "train" / "questions.json").write_text(json.dumps(questions))
    result = easy_vqa.read("train", str(tmp_path))
    assert [(e.example_id, e.image_ids, e.target) for e in result] == [
        ("train-0", ("train/images/0",), "yes"), ("train-4", ("train/images/1",), "red")]
    assert result.skipped == 3
    assert [p.position for p in result.problems] == ["entry 1", "entry 2", "entry 3"]
    assert "not in answers.txt" in result.problems[0].reason and "5.png does not exist" in result.problems[2].reason
    with pytest.raises(FormatError, match="split 'val'"):
        easy_vqa.read("val", str(tmp_path))
