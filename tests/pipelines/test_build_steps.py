"""The small steps between stages in pipelines/build.py."""
import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.util import assert_that, equal_to

from pipelines import build
from pipelines.options import BuildOptions


def test_an_image_with_no_retrieved_sentence_is_dead_lettered_not_dropped():
    # --no-shards too: such an image was counted as retrieved and written nowhere
    (out,) = list(build._hits_per_image(("cat", {"images": ["a.jpg"], "hits": [[]]})))
    assert isinstance(out, TaggedOutput) and out.tag == "rejected"
    assert out.value["source"] == "a.jpg" and out.value["reason"].startswith("no retrieved sentences")
    hit = {"rank": 0, "sentence_id": "s", "sentence": "A cat.", "score": 0.5}
    assert list(build._hits_per_image(("cat", {"images": ["a.jpg"], "hits": [[hit]]}))) == [("a.jpg", ("cat", [hit]))]
    # retrievals/ rows carry the query the image searched with
    assert list(build._retrieval_rows(("a.jpg", ("cat", [hit])))) == [{"image_id": "a.jpg", "query": "cat", **hit}]
    # an image missing from either side of the sample join was dead-lettered before it
    assert list(build._make_sample(("a.jpg", {"detection": [{"image_id": "a.jpg"}], "sentences": []}))) == []
    assert list(build._make_sample(("b.jpg", {"detection": [], "sentences": [{"rank": 0}]}))) == []


def test_an_image_without_regions_or_features_is_dead_lettered_in_shards_mode(pipeline):
    """boxes [] and features null: rejected for having no regions, not for lacking features
    (which stops the run), so the build goes on."""
    empty = {"image_id": "empty.jpg", "width": 4, "height": 4, "boxes": [], "labels": [], "scores": [],
             "features": None}
    good = {"image_id": "a.jpg", "width": 4, "height": 4, "boxes": [[0, 0, 1, 1]], "labels": ["cat"],
            "scores": [0.9], "features": np.zeros((1, 8), np.float32)}
    usable = pipeline | beam.Create([empty, good]) | build.UsableDetections(shards=True)
    assert_that(usable.main | beam.Map(lambda d: d["image_id"]), equal_to(["a.jpg"]), label="kept")
    assert_that(usable.rejected | beam.Map(lambda r: (r["stage"], r["source"], r["reason"].split(",")[0])),
                equal_to([("retrieve", "empty.jpg", "no detected regions")]), label="rejected")
    pipeline.run()


def test_mean_retrieval_score_is_exact_in_any_summation_order():
    scores = [0.1, 0.2, 0.3, 0.7000001, 1e-7, 0.33333334]
    micros = [round(s * build.SCORE_UNITS) for s in scores]
    forward = {"retrievals": len(scores), "retrieval_score_micros": sum(micros)}
    backward = {"retrievals": len(scores), "retrieval_score_micros": sum(reversed(micros))}
    a, b = build.render_stats(forward, BuildOptions()), build.render_stats(backward, BuildOptions())
    assert a["mean_retrieval_score"] == b["mean_retrieval_score"] == round(sum(micros) / len(scores) / 1e6, 6)
