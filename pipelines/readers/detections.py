"""ReadDetections: detections in any format the readers know -> one detection per image, its
regions in the corpus's order and capped, with dead letters and counts."""
from __future__ import annotations

import hashlib
import json

import apache_beam as beam
import numpy as np

from pipelines.deadletter import COUNTS, REJECTED, duplicate_rejection
from pipelines.files import MatchAll
from pipelines.options import DetectOptions
from pipelines.readers.detection_record import BOXES_CLIPPED, keep_top_regions
from pipelines.readers.jsonl_parquet import ParseDetectionsFile
from pipelines.readers.vinvl import YAML_EXTENSIONS, ParseVinvlFile, join_vinvl, with_sibling_files
from pipelines.stages import split_outputs, split_rejected, stage_output


def _features_digest(features) -> str:
    if features is None:
        return ""
    array = np.ascontiguousarray(features, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def _dedupe_key(record) -> tuple[str, str]:
    """Records that differ only in features must still sort the same way in every run."""
    without_features = {k: v for k, v in record.items() if k != "features"}
    return json.dumps(without_features, sort_keys=True), _features_digest(record["features"])


def _first_per_image(element):
    """Duplicate image ids: keep one deterministically (the smallest record, then the first
    file:line of identical ones), dead-letter the rest, each naming where the kept one is."""
    image_id, located = element
    located = sorted(located, key=lambda wd: (_dedupe_key(wd[1]), wd[0]))
    kept_where, kept = located[0]
    yield kept
    for where, dup in located[1:]:
        yield duplicate_rejection("read_detections", where, image_id, kept_where,
                                  record={k: v for k, v in dup.items() if k not in ("features", BOXES_CLIPPED)})


REGIONS_DROPPED = "regions_over_max"  # stats.json: regions of precomputed detections beyond --max-regions


def _finish_detection(detection: dict, max_regions: int):
    """The detection's regions put in the corpus's order and capped at `max_regions` (as the
    detector does), then counted: the clipped boxes and the dropped regions for stats.json; the
    detection goes on without the clipped count."""
    detection = dict(detection)
    clipped = detection.pop(BOXES_CLIPPED)
    detection, dropped = keep_top_regions(detection, max_regions)
    beam.metrics.Metrics.counter("read_detections", "images").inc()
    for name, n in ((BOXES_CLIPPED, clipped), (REGIONS_DROPPED, dropped)):
        if n:
            beam.metrics.Metrics.counter("read_detections", name).inc(n)
            yield beam.pvalue.TaggedOutput(COUNTS, (name, n))
    yield detection


class ReadDetections(beam.PTransform):
    """Detections from JSON Lines, Parquet or VinVL TSV files -> a StageOutput: main the valid
    detection dicts, the dead letters, counts (name, n): boxes clipped to their image, regions
    beyond `max_regions`. A detection dict has image_id, width, height, boxes, labels, scores and features (float32
    [regions, dim] or None), its regions highest score first, at most `max_regions` of them. A
    VinVL predictions.tsv picks up features.tsv beside it; an Oscar/VinVL X.label.tsv its X.feature.tsv and
    X.hw.tsv, an X.yaml the files it names.
    """

    def __init__(self, pattern: str, max_regions: int = DetectOptions.max_regions):
        super().__init__()
        self._pattern, self._max_regions = pattern, max_regions

    def expand(self, pbegin):
        files = pbegin | "MatchDetections" >> MatchAll(self._pattern)
        tsv = files | "TsvFiles" >> beam.Filter(lambda p: p.endswith((".tsv", ".tsv.gz")))
        yaml_files = files | "YamlFiles" >> beam.Filter(lambda p: p.endswith(YAML_EXTENSIONS))
        other = files | "OtherFiles" >> beam.Filter(lambda p: not p.endswith((".tsv", ".tsv.gz", *YAML_EXTENSIONS)))

        plain, plain_rejected = split_rejected(other | "Spread" >> beam.Reshuffle(), "ParseDetections",
                                               ParseDetectionsFile())

        # VinVL: a predictions (or label) file also reads the features (and size) files beside it,
        # a yaml the files it names; each file once.
        vinvl_files, files_rejected = split_rejected((tsv, yaml_files) | "VinvlFiles" >> beam.Flatten(),
                                                     "WithFeatureFiles", with_sibling_files)
        predictions, features, sizes, vinvl_rejected = split_outputs(
            vinvl_files | "DistinctTsv" >> beam.Distinct(), "ParseVinvl",
            (ParseVinvlFile.FEATURES, ParseVinvlFile.SIZES, REJECTED), ParseVinvlFile())
        joined, join_rejected = split_rejected(
            {"predictions": predictions, "features": features, "sizes": sizes} | "JoinVinvl" >> beam.CoGroupByKey(),
            "MergeVinvl", join_vinvl)

        unique, duplicates = split_rejected(
            (plain, joined) | "AllDetections" >> beam.Flatten()
            | "ByImage" >> beam.Map(lambda located: (located[1]["image_id"], located))
            | "GroupImage" >> beam.GroupByKey(), "Dedupe", _first_per_image)
        finished, counts = split_outputs(unique, "CountImages", (COUNTS,), _finish_detection, self._max_regions)
        return stage_output(finished, (plain_rejected, files_rejected, vinvl_rejected, join_rejected, duplicates),
                            counts)
