"""What else was tried for a faster CPU embedding than `--sbert-backend onnx` (fp32) at the same
retrievals: each variant's sentences/s against torch fp32 and `onnx` fp32 in one run, and its top-5
agreement with torch fp32 (bench/embed.py's sets and measure). Not backends the CLI offers: the
evidence behind the choice in docs/benchmarks.md.

    pip install -e '.[bench]'                            # onnx-ir, which the MatMulNBits variant needs
    python bench/embed_variants.py                       # speed variants + int8 sensitivity
    python bench/embed_variants.py --skip-sensitivity    # speed variants only

Variants, all from the bundled MiniLM's fp32 export (pipelines.onnx_encoder.export_onnx):
- fused: onnxruntime.transformers.optimizer.optimize_model(model_type="bert") of an export made
  with eager attention (the SDPA export's NaN guards keep the attention fusion from matching);
  fp32, with Attention, SkipLayerNormalization, BiasGelu and EmbedLayerNormalization fused.
- no-spin: `onnx` with session.intra_op.allow_spinning = 0 (threads sleep instead of spinning).
- batch 64 / 32: `onnx` at smaller batches than the default 256.
- nbits8: MatMulNBits, 8-bit weights in blocks of 32 with accuracy_level 4 (int8 compute with
  activations quantised per block of 32 per token) over every weight MatMul.
- sensitivity (unless --skip-sensitivity): `onnx-int8`'s quantisation (dynamic, per-channel
  weights, activations per tensor) applied to ONE group of MatMuls in all 6 layers at a time
  (query, key, value, attention output, FFN in, FFN out), then to all four attention groups: the
  top-5 agreement each group alone costs.
Writes bench/results/embed_variants.json.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.data import template_sentences  # noqa: E402
from bench.embed import agreement, lee_sentences, tag_strings  # noqa: E402
from bench.env import device_name, write_result  # noqa: E402

GROUPS = {"query": "self/query/", "key": "self/key/", "value": "self/value/", "attention-out": "attention/output/",
          "ffn-in": "intermediate/", "ffn-out": "/output/dense/"}


def fused_export(model, folder: str) -> str:
    from onnxruntime.transformers import optimizer

    from pipelines.onnx_encoder import export_onnx
    bert = model[0].auto_model
    previous = bert.config._attn_implementation
    bert.set_attn_implementation("eager")
    try:
        export_onnx(model, os.path.join(folder, "eager.onnx"))
    finally:
        bert.set_attn_implementation(previous)
    config = bert.config
    fused = optimizer.optimize_model(os.path.join(folder, "eager.onnx"), model_type="bert", opt_level=0,
                                     num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    path = os.path.join(folder, "fused.onnx")
    fused.save_model_to_file(path)
    return path, stats


def nbits8(source: str, folder: str) -> str:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                          quant_format=QuantFormat.QOperator, bits=8)
    quantizer = MatMulNBitsQuantizer(source, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    path = os.path.join(folder, "nbits8.onnx")
    quantizer.model.save_model_to_file(path, use_external_data_format=False)
    return path


def int8_groups(source: str, folder: str, name: str, groups: list[str]) -> str:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    graph = onnx.load(source).graph
    weights = {i.name for i in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
             and any(GROUPS[g] in n.name and (g != "ffn-out" or "attention" not in n.name) for g in groups)]
    assert len(nodes) == 6 * len(groups), nodes
    path = os.path.join(folder, f"int8-{name}.onnx")
    quantize_dynamic(source, path, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=3000, help="bench corpus size (agreement)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--timed-sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sensitivity", action="store_true")
    parser.add_argument("--results-name", default="embed_variants")
    args = parser.parse_args()

    import torch

    from pipelines.encoding import encode, load_sentence_model
    from pipelines.onnx_encoder import OnnxSentenceEncoder, cached_onnx_model
    from pipelines.sentence_tokenizer import SentenceTokenizer
    from schemas.corpus import bundled_minilm_path

    logging.disable(logging.WARNING)  # the quantisers' per-node notes
    torch.set_num_threads(args.threads)
    model = load_sentence_model(None)
    tokenizer = SentenceTokenizer.from_model(model)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        source = cached_onnx_model(model, bundled_minilm_path(), "onnx", cache)

        def variant(path=source, spinning=True):  # the pipeline's encoder (its tokenising and padding) on `path`
            return OnnxSentenceEncoder(path, tokenizer, args.threads, spinning)

        fused_path, fused_stats = fused_export(model, cache)
        speed = {"torch fp32": (model, 256), "onnx fp32": (variant(), 256),
                 "fused fp32": (variant(fused_path), 256), "onnx fp32 no-spin": (variant(spinning=False), 256),
                 "onnx fp32 batch 64": (variant(), 64), "onnx fp32 batch 32": (variant(), 32),
                 "nbits8": (variant(nbits8(source, cache)), 256),
                 "onnx-int8 (all groups)": (variant(int8_groups(source, cache, "all", list(GROUPS))), 256)}
        corpus = template_sentences(args.sentences)
        timed = corpus[:args.timed_sentences]
        times = {name: [] for name in speed}
        for encoder, batch in speed.values():
            encode(encoder, timed[:batch], batch)  # warm-up
        for _ in range(args.repeats):
            for name, (encoder, batch) in speed.items():
                start = time.perf_counter()
                encode(encoder, timed, batch)
                times[name].append(time.perf_counter() - start)
            print({name: round(len(timed) / t[-1]) for name, t in times.items()}, flush=True)
        load_after = os.getloadavg()

        lee = lee_sentences()
        sets = {"bench": (corpus, tag_strings(args.queries)), "real": (lee[:400], lee[400:460])}
        reference = {s: (encode(model, c, 256), encode(model, q, 256)) for s, (c, q) in sets.items()}

        def agree(encoder):
            return {s: agreement(reference[s], (encode(encoder, c, 256), encode(encoder, q, 256)))["top5_agreement"]
                    for s, (c, q) in sets.items()}

        agreements = {name: agree(encoder) for name, (encoder, _) in speed.items() if name != "torch fp32"}
        sensitivity = {}
        if not args.skip_sensitivity:
            for group in [[g] for g in GROUPS] + [["query", "key", "value", "attention-out"]]:
                name = "+".join(group)
                sensitivity[name] = agree(variant(int8_groups(source, cache, name, group)))
                print(name, sensitivity[name], flush=True)

    per_s = {name: len(timed) / statistics.median(t) for name, t in times.items()}
    result = {"device": device_name("cpu"), "threads": args.threads,
              "command": "python bench/embed_variants.py " + " ".join(sys.argv[1:]),
              "timed_sentences": len(timed), "repeats": args.repeats, "load_average_before": load_before,
              "load_average_after_timing": load_after, "fused_operators": fused_stats,
              "sentences_per_s": per_s, "speedup_over_torch": {k: v / per_s["torch fp32"] for k, v in per_s.items()},
              "speedup_over_onnx": {k: v / per_s["onnx fp32"] for k, v in per_s.items()},
              "seconds_each_repeat": times, "top5_agreement": agreements, "int8_group_sensitivity": sensitivity,
              "agreement_sets": {s: {"corpus": len(c), "queries": len(q)} for s, (c, q) in sets.items()},
              "note": "machine shared with other work while measured: compare variants within this run only"}
    for name in per_s:
        print(f"{name}: {per_s[name]:.0f}/s ({result['speedup_over_torch'][name]:.2f}x torch, "
              f"{result['speedup_over_onnx'][name]:.2f}x onnx) {agreements.get(name, '')}")
    write_result(args.results_name, result)


if __name__ == "__main__":
    main()
