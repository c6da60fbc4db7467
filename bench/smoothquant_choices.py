"""Why `--sbert-backend onnx-smoothquant` is made as it is: the top-5 retrieval agreement with torch
fp32 of its first design and of each change to it, on the bench's default set and a held-out one.

    python bench/smoothquant_choices.py          # ~20 minutes on 2 busy cores

Sets (bench/embed.py's measure, `agreement`):
- dev: 20,000 template sentences x 500 tag strings drawn with seed 1, the set the choices were made on;
- test: the bench's default set (seed 0: bench/embed.py's 20,000 x 500), which the target is judged on;
- real: gensim's Lee sentences (400 x 60, as bench/embed.py).
Rows, all from the bundled MiniLM's fp32 export, smoothed at alpha 0.8 on the calibration text:
- first design: the FFN output projections fp32, every other weight MatMul int8, weights rounded to
  nearest (the default from run E to run J);
- weights only: the first design's int8 weights (rounded to nearest, dequantised) with fp32 compute,
  activations exact: what weight rounding alone costs;
- layer L fp32: the first design with layer L's query, key, value, attention output and FFN input
  MatMuls fp32 too (L = 0..5): what each layer's int8 costs;
- GPTQ damping d: the first design with its int8 weights rounded by GPTQ at damping d;
- last two layers fp32: the first design with layers 4 and 5 fp32, weights rounded to nearest, then
  by GPTQ at GPTQ_DAMPING (more agreement than the backend, but under 2.5x torch: bench/embed.py);
- last layer fp32: the first design with layer 5 fp32 (smoothquant.fp32_matmuls's rule), weights
  rounded to nearest, then by GPTQ at each damping but the backend's;
- the backend: `onnx-smoothquant` as the CLI makes it (last layer fp32, GPTQ at GPTQ_DAMPING).
Agreement only: speeds are bench/embed.py's. Writes bench/results/smoothquant_choices.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.data import template_sentences  # noqa: E402
from bench.embed import agreement, lee_sentences, tag_strings  # noqa: E402
from bench.env import device_name, write_result  # noqa: E402

LAYERS = 6
DAMPINGS = (0.01, 0.1, 0.3, 1.0)


def variant(source: str, folder: str, name: str, tokens, calibration, keep: set[str], damping: float | None = None,
            weights_only: bool = False) -> str:
    """The export smoothed (alpha 0.8) with `keep`'s MatMuls fp32 (and their inputs not smoothed),
    the rest int8 (rounded to nearest, or by GPTQ at `damping`: the backend's own making,
    smoothquant_int8), or, `weights_only`, the int8 weights dequantised back into an fp32 graph."""
    import onnx
    from onnx import numpy_helper

    from pipelines import smoothquant as sq
    from pipelines.onnx_encoder import quantize_int8

    path = os.path.join(folder, f"{name}.onnx")
    if not weights_only:
        sq.smoothquant_int8(source, path, tokens, quantize_int8, model_name="MiniLM", keep_fp32=keep, damping=damping,
                            calibration=calibration)
        return path
    model = onnx.load(source)
    sq.smooth(model, calibration.maxima, keep_fp32=keep)
    weights = {i.name: i for i in model.graph.initializer}
    for nodes in sq.weight_matmuls(model).values():
        for node in nodes:
            if node.name not in keep:
                w = numpy_helper.to_array(weights[node.input[1]])
                scale = np.abs(w).max(axis=0) / sq.INT8_MAX
                weights[node.input[1]].CopyFrom(numpy_helper.from_array(
                    (np.clip(np.round(w / scale), -sq.INT8_MAX, sq.INT8_MAX) * scale).astype(np.float32),
                    node.input[1]))
    onnx.save(model, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-name", default="smoothquant_choices")
    args = parser.parse_args()

    import onnx
    import torch

    from pipelines import smoothquant as sq
    from pipelines.encoding import encode, load_sentence_model
    from pipelines.onnx_encoder import OnnxSentenceEncoder, cached_onnx_model
    from pipelines.sentence_tokenizer import BatchTokenizer, SentenceTokenizer
    from schemas.corpus import bundled_minilm_path

    torch.set_num_threads(args.threads)
    model = load_sentence_model(None)
    real = lee_sentences()
    sets = {"dev": (template_sentences(args.sentences, seed=1), tag_strings(args.queries, seed=1)),
            "test": (template_sentences(args.sentences), tag_strings(args.queries)),
            "real": (real[:400], real[400:460])}
    reference = {name: (encode(model, c, 256), encode(model, q, 256)) for name, (c, q) in sets.items()}
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        source = cached_onnx_model(model, bundled_minilm_path(), "onnx", cache)
        tokenizer = SentenceTokenizer.load(os.path.dirname(source))
        graph = onnx.load(source)
        groups = sq.weight_matmuls(graph)
        down = set(sq.down_projections(graph))
        tokens = BatchTokenizer(tokenizer)
        calibration = sq.calibrate(source, sq.calibration_feeds(tokens), groups,
                                   grams_of=sq.quantised_inputs(graph, down))
        last_layer = set(sq.fp32_matmuls(graph))

        def layer(index):
            return {n.name for nodes in groups.values() for n in nodes if f"/layer.{index}/" in n.name}

        files = {"first design": variant(source, cache, "first", tokens, calibration, down),
                 "weights only (int8 weights, fp32 compute)": variant(source, cache, "w", tokens, calibration, down,
                                                                      weights_only=True)}
        files.update({f"layer {i} fp32": variant(source, cache, f"l{i}", tokens, calibration, down | layer(i))
                      for i in range(LAYERS)})
        files.update({f"GPTQ damping {d}": variant(source, cache, f"g{d}", tokens, calibration, down, damping=d)
                      for d in DAMPINGS})
        last_two = down | layer(LAYERS - 2) | layer(LAYERS - 1)
        files["last two layers fp32"] = variant(source, cache, "two", tokens, calibration, last_two)
        files[f"last two layers fp32, GPTQ damping {sq.GPTQ_DAMPING}"] = variant(
            source, cache, "two-gptq", tokens, calibration, last_two, damping=sq.GPTQ_DAMPING)
        files["last layer fp32"] = variant(source, cache, "last", tokens, calibration, last_layer)
        files.update({f"last layer fp32, GPTQ damping {d}": variant(source, cache, f"t{d}", tokens, calibration,
                                                                    last_layer, damping=d)
                      for d in DAMPINGS if d != sq.GPTQ_DAMPING})
        files[f"onnx-smoothquant (last layer fp32, GPTQ {sq.GPTQ_DAMPING})"] = cached_onnx_model(
            model, bundled_minilm_path(), "onnx-smoothquant", cache)
        for row, path in files.items():
            encoder = OnnxSentenceEncoder(path, tokenizer, args.threads)
            rows[row] = {name: agreement(reference[name], (encode(encoder, c, 256), encode(encoder, q, 256)))
                         for name, (c, q) in sets.items()}
            print(row + ": " + ", ".join(f"{name} {rows[row][name]['top5_agreement']:.4f}" for name in sets),
                  flush=True)
    write_result(args.results_name, {
        "device": device_name("cpu"), "threads": args.threads,
        "command": "python bench/smoothquant_choices.py " + " ".join(sys.argv[1:]),
        "sets": {name: {"corpus": len(c), "queries": len(q)} for name, (c, q) in sets.items()},
        "gptq_damping_of_the_backend": sq.GPTQ_DAMPING, "agreement": rows})


if __name__ == "__main__":
    main()
