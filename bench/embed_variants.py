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
- torch bf16: the torch path under `torch.autocast("cpu", dtype=torch.bfloat16)` (the CPU has
  avx512_bf16).
- SmoothQuant (pipelines/smoothquant.py; timed: the `onnx-smoothquant` backend as it is now, and
  its first design, alpha 0.8 with only the FFN output projections fp32 and weights rounded to
  nearest (bench/smoothquant_choices.py measures what came after), and that with every MatMul
  int8; then, unless --skip-smoothquant-sweep, agreement only): alpha 0.5 / 0.65 / 0.8 with the FFN outputs fp32, int8 smoothed, or int8 not
  smoothed; and an LLM.int8()-like split on top of smoothing (`--outlier-channels` K: the K
  largest input channels of each int8 MatMul computed in fp32 by a small one-hot MatMul + MatMul +
  Add, the rest int8), on the FFN outputs, or on every other MatMul with the FFN outputs fp32
  (timed too).
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

import numpy as np

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


def smoothquant_variant(source: str, folder: str, tokens, name: str, alpha: float, ffn_out: str,
                        outlier_groups: str = "", outliers: int = 0) -> str:
    """The export smoothed (alpha) and quantised like `onnx-smoothquant`'s first design (weights
    rounded to nearest, no layer kept fp32 for its position), the FFN output projections
    (down-projections) `fp32`, `int8` (smoothed) or `int8-unsmoothed`; with `outliers`, the K
    largest input channels of the int8 MatMuls of `outlier_groups` ("ffn-out" or "others") in fp32."""
    import onnx
    from onnx import numpy_helper

    from pipelines import smoothquant as sq
    from pipelines.onnx_encoder import quantize_int8
    model = onnx.load(source)
    groups = sq.weight_matmuls(model)
    maxima = sq.activation_maxima(source, sq.calibration_feeds(tokens), groups)
    down = set(sq.down_projections(model))
    down_inputs = {x for x, nodes in groups.items() if nodes[0].name in down}
    smoothing_maxima = dict(maxima)
    if ffn_out == "int8-unsmoothed":  # s = 1 there (a Mul by ones, so that --outlier-channels can zero some)
        initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for x in down_inputs:
            weight_max = np.max([np.abs(initializers[n.input[1]]).max(1) for n in groups[x]], axis=0)
            smoothing_maxima[x] = np.maximum(weight_max, 1e-5) ** ((1 - alpha) / alpha)
    # the variants predate the last-layer rule: only the FFN outputs (when fp32) are left unsmoothed
    sq.smooth(model, smoothing_maxima, alpha, keep_fp32=down if ffn_out == "fp32" else ())
    split = {x for x in groups if (x in down_inputs) == (outlier_groups == "ffn-out")} if outliers else set()
    fp32_nodes = (list(down) if ffn_out == "fp32" else []) + outlier_split(model, maxima, split, outliers)
    path = os.path.join(folder, f"{name}.onnx")
    smoothed = os.path.join(folder, f"{name}-fp32.onnx")
    onnx.save(model, smoothed)
    quantize_int8(smoothed, path, fp32_nodes)
    return path


def outlier_split(model, maxima: dict, inputs: set, k: int) -> list[str]:
    """For each (smoothed) MatMul input X in `inputs`: its K largest channels (by calibration max)
    are zeroed in the int8 path's Mul and their weight rows, and added back in fp32 as
    (X @ one-hot[C, K]) @ W[K rows]. Returns the new fp32 MatMuls' names (not to be quantised)."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    consumers = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[0].endswith("/smoothquant"):
            consumers.setdefault(node.input[0][:-len("/smoothquant")], []).append(node)
    keep, after, before = [], {}, {}
    for x in inputs:
        channels = np.argsort(-maxima[x])[:k]
        inverse = initializers[f"{x}/smoothquant_inverse_scale"]
        scale = numpy_helper.to_array(inverse).copy()
        rows = 1.0 / scale[channels]  # s of those channels: their weights' rows were multiplied by it
        scale[channels] = 0
        inverse.CopyFrom(numpy_helper.from_array(scale, inverse.name))
        select = np.zeros((len(scale), k), np.float32)
        select[channels, np.arange(k)] = 1
        model.graph.initializer.append(numpy_helper.from_array(select, f"{x}/outlier_select"))
        before[consumers[x][0].name] = [helper.make_node("MatMul", [x, f"{x}/outlier_select"], [f"{x}/outliers"],
                                                         name=f"{x}/outlier_select_matmul")]
        keep.append(f"{x}/outlier_select_matmul")
        for node in consumers[x]:
            weight = numpy_helper.to_array(initializers[node.input[1]]).copy()
            outlier_rows = (weight[channels] / rows[:, None]).astype(np.float32)  # the unsmoothed rows
            weight[channels] = 0
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
            model.graph.initializer.append(numpy_helper.from_array(outlier_rows, f"{node.name}/outlier_rows"))
            output = node.output[0]
            node.output[0] = f"{output}/int8_part"
            after[node.name] = [
                helper.make_node("MatMul", [f"{x}/outliers", f"{node.name}/outlier_rows"], [f"{output}/outlier_part"],
                                 name=f"{node.name}/outlier_matmul"),
                helper.make_node("Add", [f"{output}/int8_part", f"{output}/outlier_part"], [output],
                                 name=f"{node.name}/outlier_add")]
            keep.append(f"{node.name}/outlier_matmul")
    ordered = []
    for node in model.graph.node:
        ordered += before.get(node.name, []) + [node] + after.get(node.name, [])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return keep


class TorchBf16:
    """The torch path (encoding.encode's direct mean-pooling) under CPU bf16 autocast."""

    def __init__(self, model):
        from pipelines.encoding import MeanPoolingEncoder
        self.fast = MeanPoolingEncoder(model)
        self._vlp_fast_encoder = self  # encoding.encode calls this object's encode

    def encode(self, texts, batch_size):
        import torch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vectors = self.fast.encode(texts, batch_size)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=3000, help="bench corpus size (agreement)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--timed-sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sensitivity", action="store_true")
    parser.add_argument("--skip-smoothquant-sweep", action="store_true")
    parser.add_argument("--outlier-channels", type=int, default=16)
    parser.add_argument("--results-name", default="embed_variants")
    args = parser.parse_args()

    import torch

    from pipelines.encoding import encode, load_sentence_model
    from pipelines.onnx_encoder import OnnxSentenceEncoder, cached_onnx_model
    from pipelines.sentence_tokenizer import BatchTokenizer, SentenceTokenizer
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
        tokens = BatchTokenizer(tokenizer)

        def smoothed(name, alpha=0.8, ffn_out="fp32", outlier_groups="", outliers=0):
            return variant(smoothquant_variant(source, cache, tokens, name, alpha, ffn_out, outlier_groups, outliers))

        k = args.outlier_channels
        speed = {"torch fp32": (model, 256), "torch bf16 autocast": (TorchBf16(model), 256), "onnx fp32": (variant(), 256),
                 "fused fp32": (variant(fused_path), 256), "onnx fp32 no-spin": (variant(spinning=False), 256),
                 "onnx fp32 batch 64": (variant(), 64), "onnx fp32 batch 32": (variant(), 32),
                 "nbits8": (variant(nbits8(source, cache)), 256),
                 "onnx-int8 (all groups)": (variant(int8_groups(source, cache, "all", list(GROUPS))), 256),
                 "onnx-smoothquant (the CPU default)": (
                     variant(cached_onnx_model(model, bundled_minilm_path(), "onnx-smoothquant", cache)), 256),
                 "smoothquant 0.8, FFN out fp32 (its first design)": (smoothed("sq-first", ffn_out="fp32"), 256),
                 "smoothquant 0.8, all int8": (smoothed("sq-all-int8", ffn_out="int8"), 256),
                 f"smoothquant 0.8, FFN out fp32, {k} outlier channels of the others fp32": (
                     smoothed("sq-split-others", outlier_groups="others", outliers=k), 256)}
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
        sweep = {}
        if not args.skip_smoothquant_sweep:
            for alpha in (0.5, 0.65, 0.8):
                for ffn_out in ("fp32", "int8", "int8-unsmoothed"):
                    name = f"alpha {alpha}, FFN out {ffn_out}"
                    sweep[name] = agree(smoothed(f"sweep-{alpha}-{ffn_out}", alpha, ffn_out))
                    print(name, sweep[name], flush=True)
            for outliers in (k, 128):
                name = f"alpha 0.8, FFN out int8 unsmoothed, its {outliers} largest input channels fp32"
                sweep[name] = agree(smoothed(f"sweep-split-{outliers}", 0.8, "int8-unsmoothed", "ffn-out", outliers))
                print(name, sweep[name], flush=True)
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
              "smoothquant_sweep_top5_agreement": sweep,
              "agreement_sets": {s: {"corpus": len(c), "queries": len(q)} for s, (c, q) in sets.items()},
              "note": "machine shared with other work while measured: compare variants within this run only"}
    for name in per_s:
        print(f"{name}: {per_s[name]:.0f}/s ({result['speedup_over_torch'][name]:.2f}x torch, "
              f"{result['speedup_over_onnx'][name]:.2f}x onnx) {agreements.get(name, '')}")
    write_result(args.results_name, result)


if __name__ == "__main__":
    main()
