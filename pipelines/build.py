"""Assembly of the `build-retrieval` pipeline, and publishing its output.

`build_retrieval_pipeline` only builds (the caller runs it): FindDetections, ReadSentences,
Retrieve, MakeSamples and WriteShards, each returning a StageOutput (pipelines.stages) whose
`main` goes on to the next stage and the writes, and whose dead letters and counts are gathered
from all stages into rejected/build/ and stats.json. Everything is written under
OUTPUT/.staging; `publish` moves it into OUTPUT once the run succeeded, replacing the previous
run's entries whole, so OUTPUT never mixes files of two runs.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

import schemas
from pipelines.deadletter import rejection
from pipelines.embed import EmbedSentences
from pipelines.files import is_local
from pipelines.images import STORED_IMAGE, ReadStoredImages
from pipelines.options import BuildOptions, ShardOptions
from pipelines.readers.detection_record import BOXES_CLIPPED
from pipelines.readers.detections import REGIONS_DROPPED, ReadDetections
from pipelines.readers.text import ReadCorpus
from pipelines.retrieve import RetrieveTopK, ShardCorpus
from pipelines.stages import StageOutput, split_rejected, stage_output
from pipelines.store import EmbedCorpus
from schemas.corpus import PUBLISH_JOURNAL, STAGING, tag_query
from pipelines.shards import (WriteFiles, WriteShards, WriteSingleFile, WriteTable, is_partial, json_bytes, parquet_bytes,
                              rejected_jsonl, rejected_sort_key, write_bytes)

log = logging.getLogger(__name__)

CORPUS_SPILL = "_corpus"  # in the staging folder: the corpus shards (and index files) the search reads; never published
PREVIOUS = ".previous"  # where a local publish parks the replaced entries until the swap is done
# Marks a folder vlp-data writes into: a rerun may replace its entries there. A folder with other
# files and no marker is the user's, and is written into only with --overwrite.
OUTPUT_MARKER = ".vlp-data"
# What each command publishes; a rerun replaces exactly these (removing the ones it did not
# produce this time) and leaves the other command's entries alone, so `detect` and
# `build-retrieval` can share an output folder (even read from it).
BUILD_REJECTED, DETECT_REJECTED = "rejected/build", "rejected/detect"  # rejected-0000i-of-0000N.jsonl in each
# The single dead-letter files of earlier versions: never written now, removed when a run publishes.
LEGACY_BUILD_REJECTED, LEGACY_DETECT_REJECTED = "rejected/rejected.jsonl", "rejected/detect.jsonl"
BUILD_ENTRIES = ("sentences", "retrievals", "links", "shards", BUILD_REJECTED, LEGACY_BUILD_REJECTED,
                 "manifest.parquet", "tag_vocab.json", "stats.json")
# detect / convert-detections' counts: a file of their own, so they never replace a build's stats.json
DETECT_STATS = "detect_stats.json"
DETECT_ENTRIES = ("detections", DETECT_REJECTED, LEGACY_DETECT_REJECTED, DETECT_STATS)
FEATS = "_feats"  # the region features travel with a sample dict under this key until written


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the user's extra arguments; locally an offline runner by default."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=FnApiRunner")  # the default DirectRunner downloads Prism first
    return PipelineOptions(args)


def staging_dir(output: str) -> str:
    return posixpath.join(output, STAGING)


# ---------------------------------------------------------------------------------------------
# Steps between the stages


def _has_regions(detection: dict):
    """An image without regions has no tags to query with: dead-lettered before anything else
    looks at it (in shards mode its missing features must not fail the run)."""
    if detection["boxes"]:
        yield detection
    else:
        yield rejection("retrieve", detection["image_id"], "no detected regions, so no tags to query with")


def _query_of(detection: dict):
    """image -> (tag string, image_id): the query is the image's tags in deterministic order."""
    return tag_query(detection["labels"], detection["scores"]), detection["image_id"]


def _hits_per_image(element):
    """(query, {images, hits}) -> (image_id, (query, hits)) per image of that query; an image whose
    search came back empty (e.g. IVF probing only empty lists) is dead-lettered, not counted as retrieved."""
    query, grouped = element
    hit_lists = [hits for hits in grouped["hits"] if hits]
    for image_id in grouped["images"]:
        if not hit_lists:
            yield rejection("retrieve", image_id, "no retrieved sentences",
                            detail=f"the index returned nothing for its query {query!r}")
        for hits in hit_lists:
            yield image_id, (query, hits)


def _retrieval_rows(element):
    image_id, (query, hits) = element
    for hit in hits:
        yield {"image_id": image_id, "query": query, **hit}


NO_FEATURES = "no region features"  # shards need them: such an image stops the run (run_problem)


def _check_features(detection: dict):
    if detection.get("features") is None:
        yield rejection("shards", detection["image_id"], NO_FEATURES,
                        detail="shards need them (give detections with features, use --images, or pass --no-shards "
                               "for retrievals only)")
    else:
        yield detection


def corpus_feature_width(width_counts: list[tuple[int, int]]) -> int | None:
    """The corpus's one feature width: the most common among the images, ties to the smaller.
    Counts are exact, so every run and worker count picks the same width."""
    return min(width_counts, key=lambda wc: (-wc[1], wc[0]))[0] if width_counts else None


def _keep_corpus_width(detection: dict, width: int):
    found = detection["features"].shape[1]
    if found == width:
        yield detection
    else:
        yield rejection("shards", detection["image_id"], "feature width differs from the corpus's",
                        detail=f"{found}, expected {width} (one width per corpus: the most common among the images, "
                               f"ties to the smaller)")


class OneFeatureWidth(beam.PTransform):
    """Detections with features -> a StageOutput: main those of the corpus's feature width
    (`corpus_feature_width`), each other one dead-lettered with both widths. The trainer stacks
    regions of many images into one batch, so a corpus of mixed widths would fail there, naming
    no sample."""

    def expand(self, detections):
        width = (detections
                 | "Width" >> beam.Map(lambda d: (d["features"].shape[1], 1))
                 | "CountPerWidth" >> beam.CombinePerKey(sum)
                 | "WidthCounts" >> beam.combiners.ToList()
                 | "CorpusWidth" >> beam.Map(corpus_feature_width))
        kept, rejected = split_rejected(detections, "KeepCorpusWidth", _keep_corpus_width,
                                        width=beam.pvalue.AsSingleton(width))
        return stage_output(kept, rejected)


class UsableDetections(beam.PTransform):
    """Valid detections -> a StageOutput: main those a sample can be made of, the others
    dead-lettered. Without regions an image is dead-lettered first (it has no tags to query
    with); then, for shards, one without features and one of another feature width than the
    corpus's."""

    def __init__(self, shards: bool):
        super().__init__()
        self._shards = shards

    def expand(self, detections):
        with_regions, no_regions = split_rejected(detections, "HasRegions", _has_regions)
        if not self._shards:
            return stage_output(with_regions, no_regions)
        with_features, no_features = split_rejected(with_regions, "NeedFeatures", _check_features)
        one_width = with_features | "OneFeatureWidth" >> OneFeatureWidth()
        return stage_output(one_width.main, (no_regions, no_features), parts=[one_width])


def _make_sample(element):
    """Join of one image's detection and its retrieved sentences (with phrases) -> sample dict.
    An image without one of the two was dead-lettered earlier (rejected before the join, or its
    retrieval came back empty: `_hits_per_image`)."""
    image_id, grouped = element
    if not (grouped["detection"] and grouped["sentences"]):
        return
    detection = grouped["detection"][0]
    sentences = sorted(grouped["sentences"], key=lambda s: s["rank"])
    yield {
        "schema_version": schemas.SCHEMA_VERSION,
        "image_id": image_id,
        "width": detection["width"],
        "height": detection["height"],
        "boxes": [[float(v) for v in box] for box in detection["boxes"]],
        "tags": list(detection["labels"]),
        "scores": [float(s) for s in detection["scores"]],
        "sentences": sentences,
        FEATS: detection["features"],
        **_stored_image_fields(detection),
    }


def _stored_image_fields(detection: dict) -> dict:
    """--store-images: the sample's image_size, and the JPEG travelling with it until written."""
    if STORED_IMAGE not in detection:
        return {}
    data, size = detection[STORED_IMAGE]
    return {"image_size": list(size), STORED_IMAGE: data}


def _sentence_with_phrases(element):
    """Join on sentence_id: each (image, hit) gets that sentence's noun phrases."""
    _, grouped = element
    phrases = grouped["phrases"][0] if grouped["phrases"] else []
    for image_id, hit in grouped["uses"]:
        yield image_id, {"sentence_id": hit["sentence_id"], "text": hit["sentence"], "rank": hit["rank"],
                         "score": hit["score"], "phrases": [dict(p) for p in phrases]}


def _split_features(sample: dict):
    """sample -> (sample dict as written, float16 features, stored JPEG or None)."""
    sample = dict(sample)
    feats = sample.pop(FEATS)
    return sample, feats.astype("float16"), sample.pop(STORED_IMAGE, None)


def _link_rows(sample: dict):
    for s in sample["sentences"]:
        for p in s["phrases"]:
            yield {"image_id": sample["image_id"], "rank": s["rank"], "sentence_id": s["sentence_id"],
                   "phrase": p["text"], "start": p["start"], "end": p["end"], "region": p["region"],
                   "tag": p["tag"], "similarity": p["similarity"]}


def _sample_stats(sample: dict):
    phrases = [p for s in sample["sentences"] for p in s["phrases"]]
    yield "images_out", 1
    yield "phrases", len(phrases)
    yield "phrases_linked", sum(p["region"] is not None for p in phrases)
    yield "sentence_slots", len(sample["sentences"])


def _reject_stats(record: dict):
    yield f"rejected/{record['stage']}: {record['reason']}", 1


SCORE_UNITS = 10**6  # scores are summed as integer micro-units: exact, so in any order of bundles


def _rejected_stats(totals: dict) -> dict:
    """What every run's stats file says of its dead letters (by "stage: reason") and of the regions
    its reader clipped or dropped, with the schema version."""
    rejected = {k.split("/", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("rejected/")}
    return {
        "schema_version": schemas.SCHEMA_VERSION,
        "rejected": rejected,
        "rejected_total": sum(rejected.values()),
        "boxes_clipped": totals.get(BOXES_CLIPPED, 0),
        REGIONS_DROPPED: totals.get(REGIONS_DROPPED, 0),
    }


def render_stats(totals: dict, options: BuildOptions) -> dict:
    def ratio(a, b):
        return round(totals.get(a, 0) / totals[b], 6) if totals.get(b) else 0.0

    common = _rejected_stats(totals)
    image_rejects = sum(v for k, v in common["rejected"].items()
                        if k.split(":")[0] in ("read_images", "detect", "read_detections"))
    return {
        **common,
        "images_in": totals.get("images_valid", 0) + image_rejects,
        "images_valid": totals.get("images_valid", 0),
        "images_retrieved": totals.get("images_retrieved", 0),
        "images_out": totals.get("images_out", 0) if options.shards else totals.get("images_retrieved", 0),
        "sentences": totals.get("sentences", 0),
        "text": {k[len("text_"):]: v for k, v in sorted(totals.items()) if k.startswith("text_")},
        "k": options.retrieve.k,
        "retrievals": totals.get("retrievals", 0),
        "mean_retrieval_score": round(ratio("retrieval_score_micros", "retrievals") / SCORE_UNITS, 6),
        "unique_retrieved_sentences": totals.get("unique_retrieved_sentences", 0),
        "phrases_per_sentence": ratio("phrases", "sentence_slots"),
        "link_rate": ratio("phrases_linked", "phrases"),
        "shards": totals.get("shards", 0),
    }


# ---------------------------------------------------------------------------------------------
# The build's stages: each returns a StageOutput (pipelines.stages), the assembly reads them alike


class FindDetections(beam.PTransform):
    """The pipeline's start -> a StageOutput: main the detections a sample can be made of (from
    --images through the detector, or read from --detections; with --store-images each carries
    its stored image), the dead letters of every other image, counts: the readers' and
    ("images_valid", 1) per valid detection."""

    def __init__(self, options: BuildOptions):
        super().__init__()
        self._options = options

    def expand(self, pbegin):
        options = self._options
        if options.images:
            from pipelines.detect import DetectRegions
            from pipelines.images import ReadImages
            images = pbegin | "ReadImages" >> ReadImages(options.images)
            found = images.main | "DetectRegions" >> DetectRegions(
                options.detect, store_image_size=options.image_size if options.store_images else None)
            parts = [images, found]
        else:
            found = pbegin | "ReadDetections" >> ReadDetections(options.detections, options.detect.max_regions)
            parts = [found]
        valid = found.main | "CountValid" >> beam.Map(lambda _: ("images_valid", 1))
        usable = found.main | "UsableDetections" >> UsableDetections(options.shards)
        parts.append(usable)
        if options.store_images and options.detections:  # with --images the detector's worker stored them
            parts.append(usable.main | "ReadStoredImages" >> ReadStoredImages(options.image_root, options.image_size))
        return stage_output(parts[-1].main, counts=valid, parts=parts)


class ReadSentences(beam.PTransform):
    """The pipeline's start -> a StageOutput: main the text corpus's (sentence_id, text), unique;
    the reader's dead letters and counts (the sentences themselves are counted once, by Retrieve,
    which needs their number to shard the corpus)."""

    def __init__(self, options: BuildOptions):
        super().__init__()
        self._options = options

    def expand(self, pbegin):
        read = pbegin | "ReadCorpus" >> ReadCorpus(self._options.text, self._options.text_options)
        return stage_output(read.main, parts=[read])


def _retrieval_counts(element):
    _, (_, hits) = element
    yield "images_retrieved", 1
    yield "retrievals", len(hits)
    yield "retrieval_score_micros", sum(round(float(hit["score"]) * SCORE_UNITS) for hit in hits)


class Retrieve(beam.PTransform):
    """{"detections", "sentences"} -> a StageOutput: main (image_id, (query, hits)) per image
    with a retrieval; dead letters: images whose search came back empty; counts: the corpus's
    sentences (counted once, for the stats and for ShardCorpus), images retrieved, retrievals and
    their summed score.

    Sentences are embedded (with --embeddings, only those the store lacks) and written in corpus
    shards under `spill_dir`; only their file names travel to the workers. Each image's tag
    string is embedded once per distinct string and searched against every shard (with
    --embeddings, by workers whose encoder is the store folder's: stored and query vectors must
    come from one encoder)."""

    def __init__(self, options: BuildOptions, spill_dir: str):
        super().__init__()
        self._options, self._spill_dir = options, spill_dir

    def expand(self, inputs):
        options, sentences = self._options, inputs["sentences"]
        embed_corpus = EmbedCorpus(options.embed, options.embeddings)
        embedded = sentences | "EmbedCorpus" >> embed_corpus
        sentence_count = sentences | "CountSentences" >> beam.combiners.Count.Globally()
        corpus = embedded.main | "ShardCorpus" >> ShardCorpus(self._spill_dir, options.retrieve, row_count=sentence_count)
        queries = inputs["detections"] | "Queries" >> beam.Map(_query_of)
        hits = (queries
                | "QueryStrings" >> beam.Keys()
                | "DistinctQueries" >> beam.Distinct()
                | "KeyQuery" >> beam.Map(lambda q: (q, q))
                | "EmbedQueries" >> EmbedSentences(options.embed, expect_encoder=embed_corpus.store_encoder)
                | "RetrieveTopK" >> RetrieveTopK(corpus.main, options.retrieve))
        image_hits, no_hits = split_rejected({"images": queries, "hits": hits.main} | "JoinQueries" >> beam.CoGroupByKey(),
                                             "HitsPerImage", _hits_per_image)
        counts = (sentence_count | "SentencesStat" >> beam.Map(lambda n: ("sentences", n)),
                  image_hits | "CountRetrieved" >> beam.FlatMap(_retrieval_counts))
        return stage_output(image_hits, no_hits, counts=counts, parts=[embedded, corpus, hits])


class MakeSamples(beam.PTransform):
    """{"detections", "image_hits", "sentences"} -> a StageOutput: main one sample per image
    with its phrases linked to its regions; nothing rejected (an image without a detection or
    a retrieval was dead-lettered upstream); counts: unique retrieved sentences, and per sample
    its phrases, linked phrases and sentence slots.

    Noun phrases are extracted once per retrieved sentence, joined back per image, then joined
    with the detection."""

    def __init__(self, options: BuildOptions):
        super().__init__()
        self._options = options

    def expand(self, inputs):
        from pipelines.link import LinkPhrasesToRegions, TrainWordVectors
        from pipelines.phrases import ExtractNounPhrases

        options, detections = self._options, inputs["detections"]
        uses = inputs["image_hits"] | "UsesBySentence" >> beam.FlatMapTuple(
            lambda image_id, query_hits: [(hit["sentence_id"], (image_id, hit)) for hit in query_hits[1]])
        unique_sentences = (uses | "RetrievedSentences" >> beam.MapTuple(lambda sid, use: (sid, use[1]["sentence"]))
                            | "DistinctRetrieved" >> beam.Distinct())
        phrases = unique_sentences | "ExtractNounPhrases" >> ExtractNounPhrases(options.phrases)
        image_sentences = ({"uses": uses, "phrases": phrases.main}
                           | "JoinPhrases" >> beam.CoGroupByKey()
                           | "SentencePerImage" >> beam.FlatMap(_sentence_with_phrases))
        samples = ({"detection": detections | "DetByImage" >> beam.Map(lambda d: (d["image_id"], d)),
                    "sentences": image_sentences}
                   | "JoinImage" >> beam.CoGroupByKey()
                   | "MakeSample" >> beam.FlatMap(_make_sample))
        trained = None
        if options.link.word_vectors == "train":
            texts = inputs["sentences"] | "CorpusTexts" >> beam.Values()
            tags = detections | "AllLabels" >> beam.FlatMap(lambda d: d["labels"])
            trained = (texts, tags) | "TrainWordVectors" >> TrainWordVectors(options.link)
        linked = samples | "LinkPhrasesToRegions" >> LinkPhrasesToRegions(options.link, trained)
        unique = unique_sentences | "CountUnique" >> beam.Map(lambda _: ("unique_retrieved_sentences", 1))
        return stage_output(linked.main, counts=(unique, linked.main | "CountSamples" >> beam.FlatMap(_sample_stats)),
                            parts=[phrases, linked])


# ---------------------------------------------------------------------------------------------


def build_retrieval_pipeline(options: BuildOptions, beam_args: list[str] | None = None) -> beam.Pipeline:
    """The whole `build-retrieval` graph; nothing runs until the caller runs the pipeline."""
    if not options.text:
        raise ValueError("no text corpus given")
    if not (options.detections or options.images):
        raise ValueError("give --detections or --images")
    check_store_images(options)
    if options.shards:
        from pipelines.link import check_word_vectors
        check_word_vectors(options.link.word_vectors, options.link.trust_pickle)
    out = staging_dir(options.output)
    p = beam.Pipeline(options=beam_options(beam_args or []))

    detections = p | "Detections" >> FindDetections(options)
    sentences = p | "Sentences" >> ReadSentences(options)
    _ = (sentences.main | "SentenceRows" >> beam.MapTuple(lambda sid, text: {"sentence_id": sid, "text": text})
         | "WriteSentences" >> WriteTable(out, "sentences", schemas.SENTENCES, lambda r: r["sentence_id"],
                                          options.shard.table_rows_per_file))
    retrieved = ({"detections": detections.main, "sentences": sentences.main}
                 | "Retrieve" >> Retrieve(options, posixpath.join(out, CORPUS_SPILL)))
    _ = retrieved.main | "RetrievalRows" >> beam.FlatMap(_retrieval_rows) | "WriteRetrievals" >> WriteTable(
        out, "retrievals", schemas.RETRIEVALS, lambda r: (r["image_id"], r["rank"]), options.shard.table_rows_per_file)
    stages = [detections, sentences, retrieved]

    if options.shards:
        samples = ({"detections": detections.main, "image_hits": retrieved.main, "sentences": sentences.main}
                   | "Samples" >> MakeSamples(options))
        shards = samples.main | "SplitFeatures" >> beam.Map(_split_features) | "WriteShards" >> WriteShards(
            out, options.shard)
        stages += [samples, shards]
        _ = shards.main | "WriteManifest" >> WriteSingleFile(
            posixpath.join(out, "manifest.parquet"), lambda rows: parquet_bytes(rows, schemas.MANIFEST),
            sort_key=lambda r: r["shard"])
        _ = (samples.main | "LinkRows" >> beam.FlatMap(_link_rows)
             | "WriteLinks" >> WriteTable(out, "links", schemas.LINKS,
                                          lambda r: (r["image_id"], r["rank"], r["start"]), options.shard.table_rows_per_file))
        _ = (samples.main | "SampleTags" >> beam.FlatMap(lambda s: s["tags"])
             | "DistinctTags" >> beam.Distinct()
             | "WriteTagVocab" >> WriteSingleFile(
                 posixpath.join(out, "tag_vocab.json"),
                 lambda tags: json_bytes({"schema_version": schemas.SCHEMA_VERSION, "tags": tags}), sort_key=str))

    # Dead letters and the run's statistics: every stage's, as its output gives them
    write_rejected_and_stats(stages, out, BUILD_REJECTED, lambda totals: render_stats(totals, options))
    publish_when_done(p, options.output, BUILD_ENTRIES, check=BuildCheck(options))
    return p


def check_store_images(options: BuildOptions) -> None:
    """ValueError for --store-images / --image-root / --image-size given in a way that cannot work
    (the CLI asks this before it writes anything; the pipeline again when it is built)."""
    if options.image_root and not options.detections:
        raise ValueError("--image-root goes with --detections (and --store-images); --images are read from where "
                         "they are")
    if options.image_root and not options.store_images:
        raise ValueError("--image-root is read only with --store-images")
    if not options.store_images:
        return
    if not options.shards:
        raise ValueError("--store-images writes the images into the shards: it cannot go with --no-shards")
    if options.image_size < 1:
        raise ValueError(f"--image-size must be at least 1, got {options.image_size}")
    if options.detections and not options.image_root:
        raise ValueError("--store-images with --detections needs --image-root DIR, the folder the detections' "
                         "images are read from (see docs/corpus-format.md for how an image id names its file)")
    if options.image_root and is_local(options.image_root) and not os.path.isdir(options.image_root):
        raise ValueError(f"--image-root {options.image_root!r} is not a folder")


def write_rejected(out: str, entry: str) -> WriteFiles:
    """Dead letters -> OUT/entry/rejected-0000i-of-0000N.jsonl, records sorted in each file."""
    return WriteFiles(posixpath.join(out, entry), "rejected", rejected_sort_key, ShardOptions.rejected_per_file,
                      rejected_jsonl, "jsonl")


def _detection_row(detection: dict) -> dict:
    features = detection.get("features")
    return {**detection, "features": None if features is None else features.astype("float32").tolist()}


def build_detect_pipeline(images: str, output: str, options, beam_args: list[str] | None = None,
                          detections_per_file: int = ShardOptions.detections_per_file) -> beam.Pipeline:
    """`vlp-data detect`: images -> detections/*.parquet (DETECTIONS schema) + rejected/."""
    from pipelines.detect import DetectRegions
    from pipelines.images import ReadImages

    p = beam.Pipeline(options=beam_options(beam_args or []))
    read = p | "ReadImages" >> ReadImages(images)
    detected = read.main | "DetectRegions" >> DetectRegions(options)
    _write_detections(p, detected.main, [read, detected], output, detections_per_file)
    return p


def build_convert_detections_pipeline(detections: str, output: str, max_regions: int,
                                      beam_args: list[str] | None = None,
                                      detections_per_file: int = ShardOptions.detections_per_file) -> beam.Pipeline:
    """`vlp-data convert-detections`: detections in any format the pipeline reads (JSON Lines,
    Parquet, VinVL / Oscar TSV) -> detections/*.parquet + rejected/, as `vlp-data detect` writes
    them (each record validated, regions highest score first, at most `max_regions`): the one
    layout `vlp-train finetune --detections` reads."""
    p = beam.Pipeline(options=beam_options(beam_args or []))
    read = p | "ReadDetections" >> ReadDetections(detections, max_regions)
    _write_detections(p, read.main, [read], output, detections_per_file)
    return p


def _write_detections(p, detections, stages: list[StageOutput], output: str, detections_per_file: int) -> None:
    """Detections -> OUTPUT/detections/*.parquet (DETECTIONS), the `stages`' dead letters ->
    OUTPUT/rejected/detect/, their counts (and the dead letters by reason) -> OUTPUT/DETECT_STATS,
    published when every write has finished."""
    out = staging_dir(output)
    _ = (detections | "DetectionRows" >> beam.Map(_detection_row)
         | "WriteDetections" >> WriteTable(out, "detections", schemas.DETECTIONS, lambda r: r["image_id"],
                                           detections_per_file))
    write_rejected_and_stats(stages, out, DETECT_REJECTED, render_detect_stats, DETECT_STATS,
                             extra_counts=[detections | "CountDetections" >> beam.Map(lambda _: ("detections", 1))])
    publish_when_done(p, output, DETECT_ENTRIES)


def render_detect_stats(totals: dict) -> dict:
    """detect_stats.json from the summed counts of a detect / convert-detections run."""
    return {**_rejected_stats(totals), "detections": totals.get("detections", 0)}


def write_rejected_and_stats(stages: list[StageOutput], out: str, rejected_entry: str, render,
                             stats_name: str = "stats.json", extra_counts=()) -> None:
    """The `stages`' dead letters -> OUT/rejected_entry/; their counts, the dead letters by reason
    and `extra_counts`, summed -> render(totals) -> OUT/stats_name. A plain function applied to the
    pipeline (not a PTransform), so its steps keep their top-level labels (AllRejected, WriteStats, ...)."""
    rejected = tuple(stage.rejected for stage in stages) | "AllRejected" >> beam.Flatten()
    _ = rejected | "WriteRejected" >> write_rejected(out, rejected_entry)
    counts = (*(stage.counts for stage in stages), rejected | "CountRejected" >> beam.FlatMap(_reject_stats),
              *extra_counts)
    _ = (counts | "AllStats" >> beam.Flatten()
         | "SumStats" >> beam.CombinePerKey(sum)
         | "StatsDict" >> beam.combiners.ToDict()
         | "WriteStats" >> beam.Map(lambda totals: _write_stats(out, render(totals), stats_name)))


def _write_stats(out: str, stats: dict, name: str) -> None:
    write_bytes(posixpath.join(out, name), json_bytes(stats))


# ---------------------------------------------------------------------------------------------
# Publishing


class OutputError(ValueError):
    """An --output that cannot or may not be written: said in one line before anything runs."""


def claim_output(output: str, overwrite: bool = False) -> None:
    """Before a run: `output` must be a folder this process can write, and either empty, marked
    as vlp-data's (OUTPUT_MARKER), or given up by the user (--overwrite); then it is marked.
    Publishing replaces entries whole (stats.json, shards/, ...), which would delete a user's own
    files of those names in a folder that was never ours."""
    marker = posixpath.join(output, OUTPUT_MARKER)
    try:
        if is_local(output):
            if os.path.exists(output) and not os.path.isdir(output):
                raise OutputError(f"--output {output!r} is a file, not a folder")
            ours = os.path.exists(marker)
            others = os.path.isdir(output) and os.listdir(output)
        else:
            ours = FileSystems.exists(marker)
            others = FileSystems.match([posixpath.join(output, "**")], limits=[1])[0].metadata_list
        if others and not ours and not overwrite:
            raise OutputError(f"--output {output!r} is not empty and was not written by vlp-data (it has no "
                              f"{OUTPUT_MARKER} file): choose an empty or new folder, or pass --overwrite to write "
                              f"into it (files and folders named like the outputs, e.g. stats.json or shards/, are "
                              f"replaced)")
        if is_local(output):
            os.makedirs(output, exist_ok=True)
        with FileSystems.create(marker) as f:
            f.write(b"written by vlp-data: its reruns replace their own entries here\n")
    except (OSError, BeamIOError) as err:
        raise OutputError(f"--output {output!r} cannot be written: {_root_cause(err)}") from err


def _root_cause(err: BaseException) -> BaseException:
    """Beam's filesystem errors wrap the OSError that says what is wrong."""
    causes = getattr(err, "exception_details", None) or {}
    return next(iter(causes.values()), err)


def clear_staging(output: str) -> None:
    """Before a run: finish a publish that a crash interrupted, then drop any half-written staging."""
    finish_publish(output)
    path = staging_dir(output)
    if is_local(path):
        if FileSystems.exists(path):
            FileSystems.delete([path])
        return
    # An object store has no folders: `exists` is false for a name prefix and deleting one
    # deletes nothing, so the staged objects are listed and deleted one by one.
    leftover = [m.path for m in _match(posixpath.join(path, "**"))]
    if leftover:
        log.info("removing %d staged files of an earlier run that did not finish", len(leftover))
        FileSystems.delete(leftover)


def drop_partial_files(files: list[str]) -> list[str]:
    """Delete, of the staged `files`, the temporary ones of writes whose worker died before the
    rename (their retries wrote the files again): they must not be published beside the real
    ones. Returns the others."""
    partial = [f for f in files if is_partial(f)]
    if partial:
        log.warning("not publishing %d temporary files of interrupted writes: %s", len(partial), partial[:3])
        FileSystems.delete(partial)
    return [f for f in files if not is_partial(f)]


def publish(output: str, entries: tuple[str, ...]) -> None:
    """Replace OUTPUT's `entries` by the staged ones; entries of an earlier run that this run did
    not produce are removed, other entries are left alone.

    A journal in the staging folder records the swap before it starts, so a crash part way is
    finished by the next run (`clear_staging`) or `vlp-data finish-publish`, and refused by readers
    until then (`schemas.corpus.check_published`): the output never stays a mix of two runs."""
    staged = staging_dir(output)
    if is_local(output):
        drop_partial_files([os.path.join(folder, name) for folder, _, names in os.walk(staged) for name in names])
        produced = [e for e in entries if os.path.lexists(os.path.join(staged, e))]
        journal = os.path.join(staged, PUBLISH_JOURNAL)
        with open(journal + ".tmp", "w", encoding="utf-8") as f:  # whole or absent: a kill mid-write leaves none
            json.dump({"entries": list(entries), "produced": produced}, f)
        os.replace(journal + ".tmp", journal)
        finish_publish(output)
        return
    # Object stores have no directory rename: the journal lists every file to move in.
    staged_files = drop_partial_files([m.path for m in _match(posixpath.join(staged, "**"))])
    moving = [r for r in (_relative(staged, f) for f in staged_files) if _in_entries(r, entries)]  # not the corpus spill
    write_bytes(posixpath.join(staged, PUBLISH_JOURNAL), json_bytes({"entries": list(entries), "moving": moving}))
    finish_publish(output)


class BuildCheckError(RuntimeError):
    """The run finished but made nothing usable (no sentences, no valid image, ...): it fails in the
    publish step, which then moves nothing, so OUTPUT keeps the previous run's corpus."""


def run_problem(stats: dict, options: BuildOptions) -> str | None:
    """What makes a finished build unusable, in one line (None: publish it)."""
    where = f"see {options.output}/{STAGING}/rejected/ for the dead-lettered records"
    if stats["sentences"] == 0:
        return f"the text corpus gave zero valid sentences ({options.text}); {where}"
    if stats["images_valid"] == 0:
        return f"zero valid images in {options.detections or options.images}; {where}"
    no_features = stats["rejected"].get(f"shards: {NO_FEATURES}", 0)
    if no_features:
        return (f"{no_features} image(s) have no region features, which shards need: give detections with "
                f"features, use --images to run the detector, or pass --no-shards for retrievals only")
    not_stored = sum(v for k, v in stats["rejected"].items() if k.startswith("store_images:"))
    if options.store_images and not_stored and stats["images_retrieved"] == 0:
        return (f"none of the {stats['images_valid']} valid image(s) could be stored ({not_stored} "
                f"dead-lettered reading them from --image-root {options.image_root}: check the folder and "
                f"how image ids name files, docs/corpus-format.md); {where}")
    if stats["images_retrieved"] == 0:
        return (f"none of the {stats['images_valid']} valid image(s) got a retrieval (no tags to query "
                f"with, or an empty index); {where}")
    return None


class BuildCheck:
    """The publish step's check of a build: its staged stats.json must describe a usable corpus."""

    def __init__(self, options: BuildOptions):
        self._options = options

    def __call__(self, output: str) -> None:
        problem = run_problem(read_stats(staging_dir(output)), self._options)
        if problem:
            raise BuildCheckError(problem)


def final_outputs(pipeline: beam.Pipeline) -> list:
    """Every PCollection of the graph that no step reads (as main or side input): the writes' and
    the stats file's results. When all of them are complete, every step has finished."""
    from apache_beam.pipeline import PipelineVisitor

    class Outputs(PipelineVisitor):
        def __init__(self):
            self.produced, self.read = [], set()

        def visit_transform(self, node):
            self.read.update(id(pc) for pc in node.inputs)
            self.read.update(id(side.pvalue) for side in node.side_inputs)
            self.produced.extend(pc for pc in node.outputs.values() if isinstance(pc, beam.PCollection))

    visitor = Outputs()
    pipeline.visit(visitor)
    return [pc for pc in visitor.produced if id(pc) not in visitor.read]


def publish_when_done(pipeline: beam.Pipeline, output: str, entries: tuple[str, ...], check=None) -> None:
    """The pipeline's last step: once every other step has finished (the graph's final outputs,
    `final_outputs`, are all complete: a global combine of them fires only then), check the run
    (`check(output)` raises to refuse it) and publish OUTPUT/.staging into OUTPUT. It runs inside
    the job, so any runner, a Dataflow flex template included, ends with the output in place
    without a process waiting for the job. Call it after the graph is complete."""
    finals = final_outputs(pipeline)
    done = [pc | f"Finished{i}" >> beam.Map(lambda _: 1) for i, pc in enumerate(finals)]
    _ = (tuple(done) | "AllFinished" >> beam.Flatten()
         | "CountFinished" >> beam.CombineGlobally(sum)
         | "Publish" >> beam.Map(_publish_step, output=output, entries=entries, check=check))


def _publish_step(_, output: str, entries: tuple[str, ...], check=None) -> None:
    """Check and publish; safe to run again (a runner may retry the step): a swap already
    recorded is finished, not started over; with nothing staged an earlier try has published."""
    if FileSystems.exists(posixpath.join(staging_dir(output), PUBLISH_JOURNAL)):
        finish_publish(output)
        return
    if not _match(posixpath.join(staging_dir(output), "**")):
        log.info("nothing staged in %s: published by an earlier try of this step", output)
        return
    if check is not None:
        check(output)
    publish(output, entries)
    log.info("published %s", output)


def _relative(folder: str, path: str) -> str:
    return path[len(folder):].lstrip("/")


def _finish_object_store_publish(output: str, plan: dict) -> None:
    """The swap on an object store, file by file; each step may be redone: the old entries' files
    that this run does not write are deleted, the staged files still there are moved in (over any
    old file of the same name), then the rest of the staging folder goes, the journal last."""
    staged, moving = staging_dir(output), set(plan["moving"])
    old = [m.path for entry in plan["entries"]
           for m in _match(posixpath.join(output, entry)) + _match(posixpath.join(output, entry, "**"))]
    stale = [path for path in old if _relative(output, path) not in moving]
    if stale:
        FileSystems.delete(stale)
    still_staged = {_relative(staged, m.path) for m in _match(posixpath.join(staged, "**"))}
    pending = sorted(moving & still_staged)
    FileSystems.rename([posixpath.join(staged, r) for r in pending], [posixpath.join(output, r) for r in pending])
    journal = posixpath.join(staged, PUBLISH_JOURNAL)
    leftovers = sorted(posixpath.join(staged, r) for r in still_staged - moving - {PUBLISH_JOURNAL})
    if leftovers:
        FileSystems.delete(leftovers)
    FileSystems.delete([journal])


def _in_entries(relative: str, entries: tuple[str, ...]) -> bool:
    """Whether a staged file is (under) one of the entries; an entry may be a nested path
    such as rejected/build."""
    return any(relative == entry or relative.startswith(entry + "/") for entry in entries)


def finish_publish(output: str) -> bool:
    """Carry out (or redo, idempotently) the swap the journal in the staging folder records
    (PUBLISH_JOURNAL). False if there is none."""
    staged = staging_dir(output)
    journal = posixpath.join(staged, PUBLISH_JOURNAL)
    if not FileSystems.exists(journal):
        return False
    try:
        with FileSystems.open(journal) as f:
            plan = json.loads(f.read().decode("utf-8"))
        if not isinstance(plan, dict) or not {"entries", "produced" if is_local(output) else "moving"} <= set(plan):
            raise ValueError("not a publish plan")
    except (ValueError, KeyError, TypeError) as err:
        # written whole before anything moves (a local journal by rename, an object at once), so a
        # damaged one means the swap never started: drop it, the output is still the earlier run's
        log.warning("the publish journal %s is unreadable (%s): the swap had not started; removed", journal, err)
        FileSystems.delete([journal])
        return False
    if not is_local(output):
        _finish_object_store_publish(output, plan)
        return True
    trash = os.path.join(output, PREVIOUS)
    for entry in plan["entries"]:
        source, target = os.path.join(staged, entry), os.path.join(output, entry)
        if entry in plan["produced"] and not os.path.lexists(source):
            continue  # moved in before the interruption
        if os.path.lexists(target):
            parked = os.path.join(trash, entry)
            os.makedirs(os.path.dirname(parked), exist_ok=True)
            shutil.rmtree(parked, ignore_errors=True)
            os.replace(target, parked)
        if entry in plan["produced"]:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    return True


def _match(pattern: str):
    result = FileSystems.match([pattern])[0]
    return list(result.metadata_list)


def read_stats(output: str) -> dict:
    with FileSystems.open(posixpath.join(output, "stats.json")) as f:
        return json.loads(f.read().decode("utf-8"))
