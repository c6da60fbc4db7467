"""The shared reader rules: image keys per dataset, matching them to detection ids, skip/count/report."""
import json

import pytest

from vlp_train.finetune.formats import common, images
from vlp_train.finetune.formats.common import FormatError, Skips


def test_dataset_image_keys():
    assert images.coco_key(9, "train2014") == "train2014/COCO_train2014_000000000009"
    assert images.coco_id("train2014/COCO_train2014_000000000009") == 9
    assert images.coco_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert images.flickr30k_key("1000092795.jpg") == images.flickr30k_key("1000092795") == "flickr30k-images/1000092795"
    assert images.nlvr2_keys("dev-850-0-0") == ("dev-850-0-img0", "dev-850-0-img1")
    assert images.nlvr2_keys("test1-3-12-5") == ("test1-3-12-img0", "test1-3-12-img1")
    assert images.easy_vqa_key("test", 7) == "test/images/7"
    for bad in (lambda: images.coco_key(9, "train2017"), lambda: images.coco_key(-1, "val2014"),
                lambda: images.coco_id("000000000009.jpg"), lambda: images.nlvr2_keys("dev-850-0"),
                lambda: images.flickr30k_key("")):
        with pytest.raises(ValueError):
            bad()


def test_match_images_by_trailing_path_and_coco_integer():
    keys = ["train2014/COCO_train2014_000000000009", "train2014/COCO_train2014_000000000025",
            "train2014/COCO_train2014_000000000030", "train2014/COCO_train2014_000000000042"]
    detections = ["COCO_train2014_000000000009.jpg",             # detect --images 'train2014/*.jpg'
                  "coco/train2014/COCO_train2014_000000000025.jpg",  # a folder further up
                  "30",                                            # VinVL integer id
                  "val2014/COCO_val2014_000000000042.jpg"]        # another image
    match = images.match_images(keys, detections)
    assert match.detection_of == {keys[0]: detections[0], keys[1]: detections[1], keys[2]: "30"}
    assert match.missing == (keys[3],)
    assert "3 of 4 images have detections; 1 have none (e.g. train2014/COCO_train2014_000000000042)" in match.report()


def test_match_images_split_folders_and_nlvr2_buckets():
    # easy-VQA ids restart per split: the split folder decides; a bare '0.png' matches either split.
    both = ["train/images/0.png", "test/images/0.png"]
    assert images.match_images(["train/images/0"], both).detection_of == {"train/images/0": "train/images/0.png"}
    assert images.match_images(["test/images/0"], ["0.png"]).detection_of == {"test/images/0": "0.png"}
    # NLVR2 train images sit in images/train/{directory}/: the detection path is the longer one.
    match = images.match_images(["train-1-0-img0"], ["images/train/51/train-1-0-img0.png", "train-1-0-img1.png"])
    assert match.detection_of == {"train-1-0-img0": "images/train/51/train-1-0-img0.png"}
    # Two detections equally good: reported as ambiguous, not guessed.
    match = images.match_images(["train-1-0-img0", "train-2-0-img0"],
                                ["a/train-1-0-img0.png", "b/train-1-0-img0.jpg", "train-2-0-img0.png"])
    assert match.ambiguous == (("train-1-0-img0", ("a/train-1-0-img0.png", "b/train-1-0-img0.jpg")),)
    assert "more than one detection equally" in match.report()
    # an images folder's files: both clauses name image files, none names detections
    files = match.report("image file")
    assert "1 of 2 images have image files" in files and "match more than one image file equally" in files
    assert "detection" not in files


def test_match_images_none_shows_both_sides():
    with pytest.raises(images.NoImagesMatched) as err:
        images.match_images(["flickr30k-images/1000092795", "flickr30k-images/10002456"],
                            ["00000.tar/000000012.jpg", "00000.tar/000000013.jpg"])
    message = str(err.value)
    assert "flickr30k-images/1000092795" in message and "00000.tar/000000012.jpg" in message


def test_skips_count_all_keep_first_and_refuse_an_empty_result(caplog):
    skips = Skips("demo")
    for i in range(common.MAX_REPORTED + 5):
        skips.skip("f.json", f"line {i + 1}", "bad")
    assert skips.count == common.MAX_REPORTED + 5 and len(skips.problems) == common.MAX_REPORTED
    assert str(skips.problems[0]) == "f.json, line 1: bad"
    assert "f.json, line 1: bad" in caplog.text
    with pytest.raises(FormatError, match="no usable example in f.json"):
        skips.result("dev", [], ["f.json"])
    result = skips.result("dev", [common.Example("1", ("a",), "t", True)], ["f.json"])
    assert result.skipped == common.MAX_REPORTED + 5 and "skipped (f.json, line 1: bad" in result.summary()


def test_find_file_looks_one_folder_down(tmp_path):
    (tmp_path / "Questions").mkdir()
    (tmp_path / "Questions" / "q.json").write_text("[]")
    assert common.find_file(tmp_path, "q.json") == str(tmp_path / "Questions" / "q.json")
    with pytest.raises(FormatError, match="a.json: not found in"):
        common.find_file(tmp_path, "a.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"bad.json: not valid JSON \(line 1"):
        common.load_json(str(tmp_path / "bad.json"))


def test_json_lines_skips_bad_lines_with_their_number(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n{broken\n[1, 2]\n" + json.dumps({"a": 2}) + "\n")
    skips = Skips("demo")
    assert [(n, r["a"]) for n, r in common.json_lines(str(path), skips)] == [(1, 1), (5, 2)]
    assert [p.position for p in skips.problems] == ["line 3", "line 4"]


@pytest.mark.parametrize("pattern, path, key", [
    ("/d/coco/train2014/*.jpg", "/d/coco/train2014/COCO_train2014_000000000009.jpg", images.coco_key(9, "train2014")),
    ("/d/coco/*/*.jpg", "/d/coco/val2014/COCO_val2014_000000000042.jpg", images.coco_key(42, "val2014")),
    ("/d/flickr30k-images/*.jpg", "/d/flickr30k-images/1000092795.jpg", images.flickr30k_key("1000092795.jpg")),
    ("/d/nlvr2/images/train/*/*.png", "/d/nlvr2/images/train/51/train-10171-0-img1.png",
     images.nlvr2_keys("train-10171-0-0")[1]),
    ("/d/nlvr2/dev/*.png", "/d/nlvr2/dev/dev-850-0-img0.png", images.nlvr2_keys("dev-850-0-0")[0]),
    ("/d/easy_vqa/data/*/images/*.png", "/d/easy_vqa/data/test/images/7.png", images.easy_vqa_key("test", 7)),
])
def test_keys_match_the_ids_vlp_data_detect_gives_the_release_files(pattern, path, key):
    from pipelines.images import _ReadImageFile
    detection_id = _ReadImageFile([pattern])._image_id(path)   # what `vlp-data detect --images PATTERN` keys by
    assert images.match_images([key], [detection_id]).detection_of == {key: detection_id}
