"""SNLI-VE JSON Lines as released: Flikr30kID (sic), the hypothesis as text, 3-way labels."""
import json

import pytest

from vlp_train.finetune import metrics
from vlp_train.finetune.formats import snli_ve
from vlp_train.finetune.formats.common import FormatError


def line(image, label, hypothesis, pair):
    return json.dumps({"Flikr30kID": image, "gold_label": label, "sentence1": "A boy runs.",
                       "sentence2": hypothesis, "annotator_labels": [label] * 3,
                       "captionID": f"{image}#2", "pairID": pair,
                       "sentence1_parse": "(ROOT ...)", "sentence2_parse": "(ROOT ...)",
                       "sentence1_binary_parse": "( ... )", "sentence2_binary_parse": "( ... )"})


def test_reads_the_release_and_skips_bad_lines(tmp_path):
    (tmp_path / "snli_ve_dev.jsonl").write_text("\n".join([
        line("123456.jpg", "neutral", "The boy is late.", "123456.jpg#2r1n"),
        line("123456.jpg", "entailment", "A boy moves.", "123456.jpg#2r1e"),
        line("77", "contradiction", "The boy sleeps.", "77.jpg#0r1c"),               # bare id (IGLUE copies)
        line("123456.jpg", "-", "No majority.", "123456.jpg#2r2n"),                  # "-": no gold label
        json.dumps({"gold_label": "neutral", "sentence2": "No image.", "pairID": "x"}),
        line("123456.jpg", "neutral", "   ", "123456.jpg#2r3n"),                     # empty hypothesis
        "not json"]) + "\n")
    result = snli_ve.read(str(tmp_path), "dev")
    assert [(e.example_id, e.image_ids, e.text, e.target) for e in result] == [
        ("123456.jpg#2r1n", ("flickr30k-images/123456",), "The boy is late.", "neutral"),
        ("123456.jpg#2r1e", ("flickr30k-images/123456",), "A boy moves.", "entailment"),
        ("77.jpg#0r1c", ("flickr30k-images/77",), "The boy sleeps.", "contradiction")]
    assert result.skipped == 4
    assert [p.position for p in result.problems] == ["line 4 (123456.jpg#2r2n)", "line 5 (x)",  # named by pairID
                                                     "line 6 (123456.jpg#2r3n)", "line 7"]
    assert "gold_label" in result.problems[0].reason and "Flikr30kID" in result.problems[1].reason
    assert snli_ve.LABELS.index("contradiction") == 2
    assert metrics.accuracy({"123456.jpg#2r1n": "neutral", "123456.jpg#2r1e": "neutral",
                             "77.jpg#0r1c": "contradiction"}, result.examples) == pytest.approx(200 / 3)
    with pytest.raises(FormatError, match="split 'val'"):
        snli_ve.read(str(tmp_path), "val")
