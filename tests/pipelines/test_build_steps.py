"""The small steps between stages in pipelines/build.py."""
from apache_beam.pvalue import TaggedOutput

from pipelines import build
from pipelines.options import BuildOptions


def test_an_image_with_no_retrieved_sentence_is_dead_lettered_not_dropped():
    detection = {"image_id": "a.jpg", "width": 4, "height": 4, "boxes": [[0, 0, 1, 1]], "labels": ["cat"],
                 "scores": [0.9], "features": None}
    (out,) = list(build._make_sample(("a.jpg", {"detection": [detection], "sentences": []})))
    assert isinstance(out, TaggedOutput) and out.tag == "rejected"
    assert out.value["source"] == "a.jpg" and out.value["reason"].startswith("no retrieved sentences")
    # sentences of an image rejected earlier (no detection here): that image is dead-lettered upstream
    assert list(build._make_sample(("b.jpg", {"detection": [], "sentences": [{"rank": 0}]}))) == []


def test_mean_retrieval_score_is_exact_in_any_summation_order():
    scores = [0.1, 0.2, 0.3, 0.7000001, 1e-7, 0.33333334]
    micros = [round(s * build.SCORE_UNITS) for s in scores]
    forward = {"retrievals": len(scores), "retrieval_score_micros": sum(micros)}
    backward = {"retrievals": len(scores), "retrieval_score_micros": sum(reversed(micros))}
    a, b = build.render_stats(forward, BuildOptions()), build.render_stats(backward, BuildOptions())
    assert a["mean_retrieval_score"] == b["mean_retrieval_score"] == round(sum(micros) / len(scores) / 1e6, 6)
