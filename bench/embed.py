"""CPU sentence embedding by backend (`--sbert-backend`): sentences/s and top-5 retrieval agreement
with PyTorch fp32 (today's path), all measured in one run with a fixed thread count.

    python bench/embed.py                                  # 20,000 bench sentences, 2 threads
    python bench/embed.py --sentences 5000 --repeats 1     # a quick look

Backends: torch (fp32, `encoding.encode`'s direct mean-pooling path), onnx (ONNX Runtime fp32 of a
`torch.onnx.export`, intra-op threads that sleep when idle), onnx-int8 (the same with int8 MatMul
weights, per channel), onnx-smoothquant (the export smoothed by SmoothQuant, then int8 but the FFN
output projections: pipelines/smoothquant.py; the CPU default); timed too: onnx-spinning (onnx with ONNX Runtime's default spinning threads,
the setting before). Each gets the same texts with the same batch size; torch and ONNX Runtime both
get --threads intra-op threads. The load average is recorded around every repeat.

- throughput: median of --repeats encodes of --timed-sentences corpus sentences, the backends in
  turn in every repeat (so a busy spell of the machine hits all of them), after one warm-up each.
- agreement, on two sets:
  * bench: the deduplicated bench corpus (bench/data.py's unique template sentences, as
    bench/pipeline.py feeds the pipeline) searched with detector-like tag strings ("person dog cup");
  * real: real news sentences (gensim's Lee corpus, de-duplicated) searched with other sentences of it.
  For each query the exact top-5 (inner product of normalised vectors) under the backend against
  fp32 torch's: mean |top5 & top5_fp32| / 5, the share of equal top-1, and the cosine of each
  corpus vector to its fp32 vector (mean, min).
  Also the fp32 similarity the backend's top-5 gives up (mean over its 5, against fp32's own top-5):
  near 0 when the sentences it swaps are near-ties.
- first use: the export (and quantisation) time into an empty cache folder.
Writes bench/results/embed_cpu.json (or --results-name).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.data import OBJECTS, SUBJECTS, template_sentences  # noqa: E402
from bench.env import device_name, write_result  # noqa: E402

BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-smoothquant")
SPINNING = "onnx-spinning"  # timed only: the onnx backend with ORT's spinning threads (its setting before)


def tag_strings(n: int, seed: int = 0) -> list[str]:
    """Detector-like queries: 1-4 distinct object words, as an image's tag string."""
    rng, words, out = random.Random(seed), SUBJECTS + OBJECTS, {}
    while len(out) < n:
        out[" ".join(rng.sample(words, rng.randint(1, 4)))] = None
    return list(out)


def lee_sentences() -> list[str]:
    from gensim.test.utils import datapath
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        pieces = [s.strip() for line in f for s in re.split(r"(?<=[.!?])\s+", line) if len(s.strip()) > 20]
    return list(dict.fromkeys(pieces))


def top5(corpus: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :5]


def agreement(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    ref, got = top5(*reference), top5(*other)
    cosines = (reference[0] * other[0]).sum(1)
    fp32_scores = reference[1] @ reference[0].T  # [queries, corpus] under fp32
    rows = np.arange(len(ref))[:, None]
    # how much fp32 similarity the backend's top-5 gives up: ~0 when its swaps are near-ties
    lost = (fp32_scores[rows, ref].mean(1) - fp32_scores[rows, got].mean(1))
    return {"top5_agreement": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref, got)])),
            "top1_equal": float((ref[:, 0] == got[:, 0]).mean()),
            "fp32_score_lost_mean": float(lost.mean()), "fp32_score_lost_max": float(lost.max()),
            "cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=20000, help="bench corpus size (agreement)")
    parser.add_argument("--queries", type=int, default=500, help="tag-string queries (agreement)")
    parser.add_argument("--timed-sentences", type=int, default=2000, help="corpus sentences per timed encode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--results-name", default="embed_cpu")
    args = parser.parse_args()

    import torch

    from pipelines.encoding import encode, load_sentence_model
    from pipelines.onnx_encoder import OnnxSentenceEncoder
    from schemas.corpus import bundled_minilm_path

    torch.set_num_threads(args.threads)
    model = load_sentence_model(None)
    encoders, first_use_s = {"torch": model}, {}
    with tempfile.TemporaryDirectory() as cache:
        for backend in BACKENDS[1:]:  # the int8 ones quantise the onnx export made just before
            start = time.perf_counter()
            encoders[backend] = OnnxSentenceEncoder.from_folder(bundled_minilm_path(), backend, threads=args.threads,
                                                                cache_dir=cache, model=model)
            first_use_s[backend] = time.perf_counter() - start
        # the onnx backend as it was before its threads stopped spinning (timed only: the same vectors)
        encoders[SPINNING] = OnnxSentenceEncoder.from_folder(bundled_minilm_path(), "onnx", threads=args.threads,
                                                             cache_dir=cache, spinning=True, model=model)
        timed_rows = BACKENDS + (SPINNING,)

        corpus = template_sentences(args.sentences)
        assert len(set(corpus)) == len(corpus)
        timed = corpus[:args.timed_sentences]
        times = {b: [] for b in timed_rows}
        for backend in timed_rows:
            encode(encoders[backend], timed[:args.batch_size], args.batch_size)  # warm-up
        load_average = [os.getloadavg()]
        for _ in range(args.repeats):
            for backend in timed_rows:
                start = time.perf_counter()
                encode(encoders[backend], timed, args.batch_size)
                times[backend].append(time.perf_counter() - start)
                print(f"{backend}: {len(timed) / times[backend][-1]:.0f} sentences/s", flush=True)
            load_average.append(os.getloadavg())

        sets = {"bench": (corpus, tag_strings(args.queries))}
        real = lee_sentences()
        sets["real"] = (real[:400], real[400:460])
        vectors = {name: {b: (encode(encoders[b], c, args.batch_size), encode(encoders[b], q, args.batch_size))
                          for b in BACKENDS} for name, (c, q) in sets.items()}

    per_s = {b: len(timed) / statistics.median(times[b]) for b in timed_rows}
    result = {
        "device": device_name("cpu"), "threads": args.threads, "batch_size": args.batch_size,
        "command": "python bench/embed.py " + " ".join(sys.argv[1:]),
        "timed_sentences": len(timed), "repeats": args.repeats,
        "sentences_per_s": per_s, "speedup_over_torch": {b: per_s[b] / per_s["torch"] for b in timed_rows},
        "load_average_1_5_15_min_before_and_after_each_repeat": load_average,
        "seconds_each_repeat": times, "first_use_seconds": first_use_s,
        "agreement_sets": {name: {"corpus": len(c), "queries": len(q)} for name, (c, q) in sets.items()},
        "agreement": {name: {b: agreement(vectors[name]["torch"], vectors[name][b]) for b in BACKENDS[1:]}
                      for name in sets},
        "note": "machine shared with other work while measured: compare backends within this run only",
    }
    for b in timed_rows:
        print(f"{b}: {per_s[b]:.0f} sentences/s ({per_s[b] / per_s['torch']:.2f}x)"
              + "".join(f"; {name} top-5 agreement {result['agreement'][name][b]['top5_agreement']:.3f}"
                        for name in sets if b in BACKENDS[1:]))
    write_result(args.results_name, result)


if __name__ == "__main__":
    main()
