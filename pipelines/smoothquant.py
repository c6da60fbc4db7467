"""SmoothQuant (Xiao et al., 2023) on an fp32 ONNX graph, then int8 dynamic quantisation: the
`--sbert-backend onnx-smoothquant` file.

Why: `onnx-int8` (ONNX Runtime's `quantize_dynamic`) quantises each MatMul's activations with ONE
scale per tensor, and a few input channels of a sentence-BERT's MatMuls are 4-20x larger than the
rest (channel 99 of most LayerNorm outputs in MiniLM), so that scale is coarse for every other
channel and a share of the top-5 retrievals changes (docs/benchmarks.md). SmoothQuant moves the
range from the activations into the weights, which are quantised per output channel: for each
input channel j of a weight MatMul, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), X' = X / s (an
inserted Mul) and W' = diag(s) W, so X' W' = X W exactly in fp32 and X' has far smaller outliers.

How, and why this way:
- On the ONNX graph, for every MatMul whose weight is a 2-D initializer (whatever the model's
  names); MatMuls sharing an input (a layer's query, key and value) share one Mul and one s (the
  max of their weights' rows). Any such graph keeps its function; nothing BERT-specific is matched.
- The 1/s is an explicit Mul, not folded into the LayerNorm before it: in BERT's post-norm layers
  the LayerNorm's output also feeds the residual Add, which a scaled gamma/beta would change. The
  Mul is one elementwise pass next to a MatMul (no slower in bench/embed_variants.py's runs).
- Calibration maxima come from the fp32 graph run over fixed built-in English text (the project's
  own scene descriptions, pipelines/sample/scenes.txt), batched as the encoder batches, never the
  user's corpus: the file is cached by model folder only, and must not depend on the data.
- The down-projections (a weight with more rows than columns: BERT's FFN output, fed by the GELU)
  stay fp32, and their input is not smoothed (nothing to gain for a fp32 MatMul). Measured on
  MiniLM, int8 there costs the most agreement with or without smoothing (its input has outlier channels that neither smoothing nor keeping the largest 128 channels in
  fp32 brought back to 0.95 top-5 agreement), and it is a third of the weight FLOPs.
- The last layer's MatMuls (after the last-but-one down-projection) stay fp32 too: measured on
  MiniLM, each of its last two layers kept fp32 recovers more top-5 agreement than any of its first
  four does; keeping both fp32 cost too much speed (2.42x torch idle, under the 2.5x target), the
  last one alone keeps more than 2.5x (docs/benchmarks.md, run K).
- The int8 weights are rounded by GPTQ (Frantar et al., 2023), not to nearest: row by row (input
  channels, the most active first), each rounding error is compensated in the rows not yet rounded
  through the inverse Hessian of the layer's calibration inputs (H = X^T X, damped), which minimises
  the error of X W rather than of W. Measured on MiniLM, weight rounding alone (int8 weights, fp32
  compute) cost as much top-5 agreement as the activations' int8. The quantiser's own scales and
  layout are kept: only the int8 values it wrote are replaced (`gptq_round`).
- onnxruntime's own SmoothQuant (`quantize_static(extra_options={"SmoothQuant": True})`) is for
  static quantisation and needs neural-compressor; ORT's dynamic quantiser has none, and its GPTQ
  (`matmul_nbits_quantizer`) makes MatMulNBits files, whose 8-bit kernel was no faster than fp32
  here.

No torch and no Beam here.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable

import numpy as np

# alpha: the share of each channel's range moved into the weights. 0.65-0.8 kept >= 0.95 top-5
# agreement on MiniLM (0.5: 0.951 bench with the down-projection fp32, 0.844 with it int8).
SMOOTHING_ALPHA = 0.8
CALIBRATION_TEXT = os.path.join(os.path.dirname(__file__), "sample", "scenes.txt")
CALIBRATION_BATCH = 256  # the encoder's default batch: calibration tensors look like the ones quantised


def calibration_texts() -> list[str]:
    with open(CALIBRATION_TEXT, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# Which weight MatMuls stay fp32 (`fp32_matmuls`), by name: part of the cache key, so changing the
# rule must change this name.
KEEP_FP32_RULE = "rows>columns|last-layer"
# GPTQ's damping: this share of the Hessian's mean diagonal is added to it. Chosen on the dev set
# of bench/smoothquant_choices.py (template sentences drawn with another seed than the bench's
# default set; 0.01, 0.1, 0.3, 1.0 tried with the last layer, and with the last two, fp32): the
# calibration text has ~1,300 tokens for 384 channels, and less damping fits it too closely.
GPTQ_DAMPING = 0.1
# ONNX Runtime's symmetric int8 weights use -127..127 (quantize_dynamic, reduce_range off).
INT8_MAX = 127
# The rewrite's own version, in the cache key: raise it when `smooth`, `fp32_matmuls`, `gptq_round`
# or `round_weights_by_gptq` change the file it makes (GPTQ's float64 linear algebra may differ in
# the last bits with another numpy/LAPACK, which the key does not hold).
# 2: inputs of MatMuls that all stay fp32 are no longer smoothed; shared weights copied per group.
# 3: the last layer's MatMuls fp32 (and their inputs not smoothed); int8 weights rounded by GPTQ.
SMOOTHING_FORMAT = 3


def settings_tag() -> str:
    """What the smoothed file depends on besides the fp32 export (part of its cache key)."""
    digest = hashlib.sha256("\n".join(calibration_texts()).encode("utf-8")).hexdigest()[:12]
    return (f"sq{SMOOTHING_FORMAT}|{SMOOTHING_ALPHA}|{CALIBRATION_BATCH}|{KEEP_FP32_RULE}|gptq{GPTQ_DAMPING}|"
            f"{digest}")


def weight_matmuls(model) -> dict[str, list]:
    """The graph's MatMul nodes whose second input is a 2-D initializer (a weight), grouped by
    their activation input (in graph order). A graph without one is not a model to quantise."""
    initializers = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        raise ValueError(f"{model.graph.name or 'the ONNX graph'}: no MatMul with a 2-D weight initializer; "
                         f"not a transformer export that SmoothQuant applies to")
    return groups


def keeps_fp32(weight) -> bool:
    """The down-projection half of KEEP_FP32_RULE: a weight (initializer) with more rows (inputs)
    than columns (outputs), a BERT-like encoder's FFN output, stays fp32."""
    return weight.dims[0] > weight.dims[1]


def down_projections(model) -> list[str]:
    """Names of the down-projections (`keeps_fp32`): the FFN output projections of a BERT-like
    encoder."""
    initializers = {i.name: i for i in model.graph.initializer}
    return [node.name for nodes in weight_matmuls(model).values() for node in nodes
            if keeps_fp32(initializers[node.input[1]])]


def fp32_matmuls(model) -> list[str]:
    """Names of the weight MatMuls that stay fp32 (KEEP_FP32_RULE): the down-projections, and the
    last layer's other weight MatMuls, those after the last-but-one down-projection in graph order
    (MiniLM's layer 5: query, key, value, attention output and FFN input). A graph with fewer than
    two down-projections has no layer this can find: only its down-projections stay fp32."""
    down = down_projections(model)
    is_down = set(down)
    weighted = {node.name for nodes in weight_matmuls(model).values() for node in nodes}
    order = [node.name for node in model.graph.node if node.name in weighted]
    down_positions = [i for i, name in enumerate(order) if name in is_down]
    if len(down_positions) < 2:
        return down
    return down + [name for name in order[down_positions[-2] + 1:] if name not in is_down]


def quantised_inputs(model, keep_fp32: Iterable[str]) -> list[str]:
    """The weight-MatMul inputs read by at least one MatMul outside `keep_fp32`: the ones `smooth`
    smooths and GPTQ needs the Gram matrices of."""
    fp32 = set(keep_fp32)
    return [x for x, nodes in weight_matmuls(model).items() if any(n.name not in fp32 for n in nodes)]


def check_names(model, model_name: str) -> None:
    """The fp32 rule, the smoothing and ONNX Runtime's exclusion list name MatMuls by node name: an
    export whose weight MatMuls lack distinct names is refused rather than quantised wrongly."""
    names = [node.name for nodes in weight_matmuls(model).values() for node in nodes]
    if "" in names or len(set(names)) != len(names):
        raise ValueError(f"--sbert-backend onnx-smoothquant: {model_name}'s ONNX export has weight MatMuls "
                         f"without distinct node names, which this rewrite needs. Use --sbert-backend onnx "
                         f"(the exact fp32 export) or onnx-int8.")


class Calibration:
    """What one pass of the fp32 graph over the calibration feeds gives: `maxima` (max |x| per
    last-axis channel of each named tensor, padding included, as the quantiser sees it), `grams`
    (X^T X over the real tokens, float64, of the tensors asked for: GPTQ's Hessians) and `outputs`
    (the graph's own outputs for each feed)."""

    def __init__(self, maxima: dict[str, np.ndarray], grams: dict[str, np.ndarray], outputs: list[list[np.ndarray]]):
        self.maxima, self.grams, self.outputs = maxima, grams, outputs


def calibrate(path: str, feeds: Iterable[dict], tensors: Iterable[str], grams_of: Iterable[str] = ()) -> Calibration:
    """Run the fp32 graph at `path` over `feeds` once, keeping each named tensor's channel maxima
    and, for those in `grams_of`, its Gram matrix over the feed's real tokens (attention_mask)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    wanted, gram_names = list(tensors), set(grams_of)
    outputs = [o.name for o in model.graph.output]
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    grams: dict[str, np.ndarray] = {}
    graph_outputs = []
    for feed in feeds:
        values = session.run(outputs + wanted, feed)
        graph_outputs.append(values[:len(outputs)])
        real_tokens = feed["attention_mask"].reshape(-1).astype(bool)
        for name, value in zip(wanted, values[len(outputs):]):
            rows = value.reshape(-1, value.shape[-1])
            channel_max = np.abs(rows).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
            if name in gram_names:
                tokens = rows[real_tokens].astype(np.float64)
                grams[name] = grams.get(name, 0) + tokens.T @ tokens
    missing = [name for name in wanted if name not in maxima]
    if missing:
        raise ValueError(f"no calibration batches reached {missing[:3]}")
    return Calibration(maxima, grams, graph_outputs)


def activation_maxima(path: str, feeds: Iterable[dict], tensors: Iterable[str]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor of the fp32 graph at `path` over `feeds`."""
    return calibrate(path, feeds, tensors).maxima


def smoothed_name(x: str) -> str:
    """The name of input `x` divided by its smoothing scales (what its MatMuls read after `smooth`)."""
    return f"{x}/smoothquant"


def inverse_scale_name(x: str) -> str:
    """The initializer holding 1/s of input `x` after `smooth`."""
    return f"{x}/smoothquant_inverse_scale"


def smoothing_factors(activation_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the weights sharing the input (rows = inputs)."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.maximum(activation_max, 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-5, None).astype(np.float32)


def smooth(model, maxima: dict[str, np.ndarray], alpha: float = SMOOTHING_ALPHA,
           keep_fp32: Iterable[str] | None = None) -> int:
    """Rewrite `model` (an onnx ModelProto, in place): each weight-MatMul input X gets a Mul by 1/s
    (an initializer named `inverse_scale_name(X)`) shared by its MatMuls, whose weights' rows are
    multiplied by s. The fp32 function is unchanged. An input whose MatMuls all stay fp32
    (`keep_fp32`, the names of MatMuls that stay fp32; default `fp32_matmuls`) is left as it is:
    smoothing gains nothing there and costs an elementwise pass (over the FFN's widest tensor for
    the down-projections). Returns the number of Muls inserted."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    groups = weight_matmuls(model)
    fp32 = set(fp32_matmuls(model) if keep_fp32 is None else keep_fp32)
    smoothed_inputs = set(quantised_inputs(model, fp32))
    readers: dict[str, int] = {}  # initializer name -> nodes (and graph outputs) reading it
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for output in model.graph.output:
        readers[output.name] = readers.get(output.name, 0) + 1
    inserted: dict[str, object] = {}  # first consumer's name -> its Mul
    for x, nodes in groups.items():
        if x not in smoothed_inputs:
            continue
        # A weight read by anything besides this group's MatMuls (ALBERT's shared layers, or torch's
        # exporter merging identical initializers) gets this group's own copy: scaled in place, it
        # would be scaled again by the next group (or change the other reader).
        for node in nodes:
            name = node.input[1]
            if readers[name] > sum(1 for n in nodes if n.input[1] == name):
                copy = numpy_helper.from_array(numpy_helper.to_array(initializers[name]), f"{name}/smoothquant_copy/{x}")
                if copy.name not in initializers:
                    model.graph.initializer.append(copy)
                    initializers[copy.name] = model.graph.initializer[-1]
                readers[name] -= 1
                node.input[1] = copy.name
        if x not in maxima:
            raise ValueError(f"no calibration maximum for the MatMul input {x!r}")
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        if maxima[x].shape != (weights[0].shape[0],):
            raise ValueError(f"{x!r}: {maxima[x].shape[0]} calibration channels for a weight of "
                             f"{weights[0].shape[0]} input rows")
        s = smoothing_factors(maxima[x], weights, alpha)
        inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), inverse_scale_name(x))
        model.graph.initializer.append(inverse)
        smoothed = smoothed_name(x)
        inserted[nodes[0].name] = helper.make_node("Mul", [x, inverse.name], [smoothed], name=f"{x}/smoothquant_mul")
        for node, weight in zip(nodes, weights):
            node.input[0] = smoothed
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array((weight * s[:, None]).astype(np.float32),
                                                                         node.input[1]))
    ordered = []  # each Mul right before its first consumer: the node list stays topologically sorted
    for node in model.graph.node:
        if node.name in inserted:
            ordered.append(inserted[node.name])
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return len(inserted)


def calibration_feeds(tokens, batch_size: int = CALIBRATION_BATCH) -> list[dict]:
    """The calibration texts as the encoder feeds them: sorted by token length, padded per batch.
    `tokens` is the model's `sentence_tokenizer.BatchTokenizer`."""
    ids, lengths = tokens.tokenize(calibration_texts())
    order = np.argsort(-lengths, kind="stable")
    feeds = []
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention = tokens.pad(ids, rows, lengths[rows])
        feeds.append({"input_ids": input_ids, "attention_mask": attention})
    return feeds


# How far the smoothed fp32 graph's outputs may be from the source's (X/s times diag(s)W is XW up
# to float rounding: measured at most 1.1e-7 on MiniLM's normalised vectors, |x| <= 0.2); a wrongly rewritten
# graph is off by far more.
SMOOTHED_TOLERANCE = 1e-4


def graph_outputs(model_or_path, feeds: Iterable[dict]) -> list[list[np.ndarray]]:
    """Every graph output of the fp32 ONNX model (a ModelProto or a path) for each feed."""
    import onnxruntime as ort

    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def check_function_kept(expected_outputs: list[list[np.ndarray]], smoothed, feeds: list[dict],
                        model_name: str) -> None:
    """Raise unless the smoothed fp32 graph gives the source graph's outputs (`expected_outputs`,
    one list per feed) on `feeds`."""
    for expected, got in zip(expected_outputs, graph_outputs(smoothed, feeds)):
        for a, b in zip(expected, got):
            if a.shape != b.shape or not np.allclose(b, a, rtol=SMOOTHED_TOLERANCE, atol=SMOOTHED_TOLERANCE):
                error = float(np.abs(b - a).max()) if a.shape == b.shape else "a different shape"
                raise ValueError(f"--sbert-backend onnx-smoothquant: smoothing changed the fp32 function of "
                                 f"{model_name}'s ONNX export (largest difference {error}); its graph is not "
                                 f"one this rewrite handles. Use --sbert-backend onnx (the exact fp32 export).")


def gptq_round(weight: np.ndarray, scale: np.ndarray, gram: np.ndarray, damping: float = GPTQ_DAMPING) -> np.ndarray:
    """int8 values q of `weight` [inputs, outputs] on the per-output-channel grid `scale` (q * scale
    stands for weight), rounded by GPTQ (Frantar et al., 2023) for inputs whose Gram matrix is
    `gram` [inputs, inputs]: the rows are rounded one at a time, the most active input first, and
    each row's rounding error is spread over the rows not yet rounded through the Cholesky factor
    of the inverse damped Hessian, so that X q*scale stays near X weight. An input never active in
    the calibration (zero diagonal) is rounded to nearest and moves no error. With a diagonal
    `gram` every row is rounded to nearest."""
    w = weight.astype(np.float64)
    h = gram.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = np.mean(np.diag(h)[~dead]) if (~dead).any() else 1.0  # a live channel's scale: damping unchanged
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    h += damping * np.mean(np.diag(h)) * np.eye(len(h))
    w = w[order]
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    grid = np.where(scale > 0, scale, 1.0).astype(np.float64)
    rounded = np.empty(w.shape, dtype=np.int8)
    for k in range(len(w)):
        row = np.clip(np.round(w[k] / grid), -INT8_MAX, INT8_MAX)
        rounded[k] = row
        w[k + 1:] -= np.outer(upper[k, k + 1:], (w[k] - row * grid) / upper[k, k])
    out = np.empty_like(rounded)
    out[order] = rounded
    return out


def round_weights_by_gptq(quantized, smoothed, grams: dict[str, np.ndarray], model_name: str,
                          keep_fp32: Iterable[str] | None = None, damping: float = GPTQ_DAMPING) -> int:
    """Replace the int8 weights the dynamic quantiser wrote into `quantized` (an onnx ModelProto, in
    place; its weight W as the initializers W_quantized, W_scale, W_zero_point, symmetric) by
    `gptq_round`'s, from the smoothed fp32 weights of `smoothed` and the Gram matrices of the
    source inputs (`grams`, scaled here by the smoothing: X/s); the MatMuls of `keep_fp32` (default
    `fp32_matmuls`) were not quantised. The quantiser's own scales are kept. Returns the number of
    weights rounded."""
    from onnx import numpy_helper

    weights = {i.name: i for i in smoothed.graph.initializer}
    stored = {i.name: i for i in quantized.graph.initializer}
    fp32 = set(fp32_matmuls(smoothed) if keep_fp32 is None else keep_fp32)
    groups = weight_matmuls(smoothed)
    rounded = 0
    for x, gram in grams.items():
        inverse = numpy_helper.to_array(weights[inverse_scale_name(x)]).astype(np.float64)
        hessian = gram * inverse[:, None] * inverse[None, :]  # the Gram matrix of X/s
        for node in groups[smoothed_name(x)]:
            if node.name in fp32:
                continue
            name = node.input[1]
            values, scale, zero = (stored.get(f"{name}_{part}") for part in ("quantized", "scale", "zero_point"))
            weight = numpy_helper.to_array(weights[name])
            if values is None or scale is None or zero is not None and numpy_helper.to_array(zero).any():
                raise ValueError(f"--sbert-backend onnx-smoothquant: onnxruntime's quantiser wrote {model_name}'s "
                                 f"weight {name!r} in a layout this rewrite does not know (symmetric int8 as "
                                 f"{name}_quantized and {name}_scale expected). Use --sbert-backend onnx-int8 or onnx.")
            scale = numpy_helper.to_array(scale).astype(np.float64)
            written = numpy_helper.to_array(values)
            nearest = np.clip(np.round(weight / np.where(scale > 0, scale, 1.0)), -INT8_MAX, INT8_MAX)
            if (written.dtype != np.int8 or written.shape != weight.shape or scale.shape != (weight.shape[1],)
                    or np.mean(nearest == written) < 0.99):
                raise ValueError(f"--sbert-backend onnx-smoothquant: onnxruntime's quantiser's int8 {name!r} of "
                                 f"{model_name} is not its weight on a per-output-channel grid as expected. "
                                 f"Use --sbert-backend onnx-int8 or onnx.")
            values.CopyFrom(numpy_helper.from_array(gptq_round(weight, scale, hessian, damping), values.name))
            rounded += 1
    written = sum(1 for node in quantized.graph.node if node.op_type == "MatMulInteger")
    if rounded != written:
        raise ValueError(f"--sbert-backend onnx-smoothquant: onnxruntime's quantiser made {written} int8 MatMuls "
                         f"of {model_name} where {rounded} were expected. Use --sbert-backend onnx-int8 or onnx.")
    return rounded


def smoothquant_int8(source: str, path: str, tokens, quantize, alpha: float = SMOOTHING_ALPHA,
                     model_name: str = "the model", keep_fp32: Iterable[str] | None = None,
                     damping: float | None = GPTQ_DAMPING, calibration: Calibration | None = None) -> None:
    """fp32 ONNX at `source` -> smoothed, int8 (all weight MatMuls but `keep_fp32`, default
    `fp32_matmuls`), weights rounded by GPTQ at `damping` (None: to nearest, as the quantiser wrote
    them), at `path`. `quantize(src, dst, exclude)` is the dynamic quantiser (onnx_encoder's, per
    channel). The smoothed fp32 graph is checked against the source on the calibration feeds first.
    The source graph runs once over the calibration text, or not at all when `calibration` (this
    source's, over `calibration_feeds(tokens)`, with the Gram matrices GPTQ needs) is given:
    bench/smoothquant_choices.py makes its variants from one."""
    import onnx

    model = onnx.load(source)
    check_names(model, model_name)
    feeds = calibration_feeds(tokens)
    fp32 = set(fp32_matmuls(model) if keep_fp32 is None else keep_fp32)
    smoothed_inputs = quantised_inputs(model, fp32)
    if calibration is None:
        calibration = calibrate(source, feeds, weight_matmuls(model),
                                grams_of=smoothed_inputs if damping is not None else ())
    smooth(model, calibration.maxima, alpha, keep_fp32=fp32)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or None) as work:
        smoothed = os.path.join(work, "smoothed.onnx")
        onnx.save(model, smoothed)
        check_function_kept(calibration.outputs, smoothed, feeds, model_name)
        if damping is None:
            quantize(smoothed, path, sorted(fp32))
            return
        quantized = os.path.join(work, "int8.onnx")
        quantize(smoothed, quantized, sorted(fp32))
        int8 = onnx.load(quantized)
        round_weights_by_gptq(int8, model, {x: calibration.grams[x] for x in smoothed_inputs}, model_name,
                              keep_fp32=fp32, damping=damping)
        onnx.save(int8, path)
