"""Sentence-BERT on ONNX Runtime for CPU embedding (`--sbert-backend onnx | onnx-int8 | onnx-smoothquant`).

The ONNX model is exported from the user's own sentence-transformers folder on first use
(`torch.onnx.export` of the model's modules as one graph: (input_ids, attention_mask) -> sentence
embedding) and cached; `onnx-int8` is that export with the weights of its MatMuls quantised to
int8 per output channel (`onnxruntime.quantization.quantize_dynamic`; activations stay float and
are quantised on the fly, one scale per tensor). Quantising every MatMul per tensor is as fast but
moves the vectors much further (cosine 0.96 to fp32 against 0.99, see docs/benchmarks.md).
`onnx-smoothquant` is the export smoothed first (pipelines/smoothquant.py: activation outlier
channels moved into the weights) and then quantised the same way, except the FFN output
projections and the last layer, which stay fp32, with its int8 weights rounded by
GPTQ: slower than `onnx-int8`, and it keeps >= 0.95 of fp32's top-5 (docs/benchmarks.md, run K).

Texts are tokenised exactly as the torch path does (`sentence_tokenizer.SentenceTokenizer`: the
model's own tokenizer and max_seq_length), so the backends differ only in the arithmetic. That
tokenizer is saved beside model.onnx in the cache folder, so a process whose export is cached loads
onnxruntime and the `tokenizers` library only.

No Beam and no torch at import time: the torch model is only loaded to export (once per cache).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np

from pipelines.fingerprint import cache_root, folder_digest
from pipelines.sentence_tokenizer import (RUST_FILE, SETTINGS_FILE, TOKENIZER_DIR, BatchTokenizer,
                                         SentenceTokenizer)

log = logging.getLogger(__name__)

SMOOTHQUANT = "onnx-smoothquant"
ONNX_BACKENDS = ("onnx", "onnx-int8", SMOOTHQUANT)
QUANTISED_BACKENDS = ("onnx-int8", SMOOTHQUANT)  # made from the fp32 ("onnx") export
# Part of every cache key: raise it when the export or the quantisation changes, so that files
# made by an older version are not reused. 2: the saved tokenizer beside model.onnx. 3: the
# onnx-smoothquant backend (whose smoothing settings are in its key too).
EXPORT_FORMAT = 3
OPSET = 17
MODEL_FILE = "model.onnx"


# The x86 flags of an int8 dot product instruction (AVX512-VNNI, AVX-VNNI).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (Linux: /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    """Whether this CPU has an int8 dot product instruction (VNNI). ONNX Runtime's dynamic int8
    MatMul multiplies u8 activations by s8 weights (reduce_range off); without VNNI its x86 kernel
    sums pairs of those products in int16 (vpmaddubsw), which can saturate, as ORT's quantiser warns.
    Every agreement figure of onnx-int8 and onnx-smoothquant (docs/benchmarks.md) was measured on a
    VNNI CPU."""
    return any(flag in cpu_flags() for flag in VNNI_FLAGS)


_WARNED_WITHOUT_VNNI: set[str] = set()


def warn_without_vnni(backend: str) -> None:
    """Log once per process and backend that an int8 backend runs on a CPU without VNNI."""
    if backend in QUANTISED_BACKENDS and backend not in _WARNED_WITHOUT_VNNI and not has_vnni():
        _WARNED_WITHOUT_VNNI.add(backend)
        log.warning("--sbert-backend %s on a CPU without VNNI (%s): ONNX Runtime's int8 MatMul may saturate "
                    "here, and its agreement with fp32 was measured on VNNI CPUs only; --sbert-backend onnx "
                    "gives the exact fp32 vectors", backend, " / ".join(VNNI_FLAGS))


def cache_key(folder: str, backend: str, cache_dir: str | None = None) -> str:
    """The cache folder's name: the model folder's content digest (a changed weight, tokenizer or
    config file gives another; a copy of the folder elsewhere the same; remembered by the folder's
    file stats, so a worker process does not hash the folder again), the backend, and the versions
    and settings the file depends on (`export_tag`)."""
    return f"{folder_digest(folder, cache_dir)[:32]}-{backend}-{export_tag(backend)}"


def export_parts(backend: str) -> dict[str, str]:
    """What `backend`'s ONNX file depends on besides the model folder, by name: the export format,
    the opset, the exporter (torch, and transformers, whose model code torch traces), onnxruntime
    (its quantiser writes the int8 file; it runs every file) and, for onnx-smoothquant, the
    smoothing settings. Read from package metadata: a process that only reads the cache imports
    neither torch nor transformers."""
    import onnxruntime

    parts = {"export format": str(EXPORT_FORMAT), "opset": str(OPSET),
             "torch": importlib.metadata.version("torch"), "transformers": importlib.metadata.version("transformers"),
             "onnxruntime": onnxruntime.__version__}
    if backend == SMOOTHQUANT:
        from pipelines.smoothquant import settings_tag
        parts["smoothquant"] = settings_tag()  # the alpha and the calibration text
    return parts


def export_tag(backend: str) -> str:
    """`export_parts` as a short digest: the cache key's last part."""
    return hashlib.sha256("|".join(export_parts(backend).values()).encode("utf-8")).hexdigest()[:8]


def sentence_graph(model):
    """The sentence-transformers modules as one torch module of (input_ids, attention_mask): the
    transformer, its pooling and (where the model has one) its Normalize, whatever they are."""
    import torch

    class SentenceGraph(torch.nn.Module):
        def __init__(self, st_model):
            super().__init__()
            self.st_model = st_model

        def forward(self, input_ids, attention_mask):
            return self.st_model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]

    return SentenceGraph(model).eval()


def export_onnx(model, path: str) -> None:
    """The sentence-transformers `model` -> an fp32 ONNX file at `path`, batch and sequence dynamic."""
    import torch

    example = torch.ones((2, 8), dtype=torch.long)
    # the tracer warns about the model's shape checks (always true here: the mask is as long as the ids)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            sentence_graph(model).cpu(), (example, example), path, dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "sentence_embedding": {0: "batch"}})


def quantize_int8(source: str, path: str, exclude: Sequence[str] = ()) -> None:
    """fp32 ONNX -> int8 weights of the MatMuls with a constant (weight) operand, per output channel
    (but the nodes named in `exclude`); attention's activation x activation MatMuls stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def not_the_preprocessing_hint(record):  # logged on the root logger at every call; it does not apply here
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(not_the_preprocessing_hint)
    try:
        quantize_dynamic(source, path, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude), extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(not_the_preprocessing_hint)


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock across processes (the SDK processes of one worker export once, not each)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(entry: str) -> bool:
    """Whether a cache folder holds what an encoder reads (it is renamed into place whole, so a
    folder that exists is complete unless someone removed files from it): the model and the two
    files `SentenceTokenizer.load` reads."""
    return all(os.path.isfile(os.path.join(entry, *parts))
               for parts in ((MODEL_FILE,), (TOKENIZER_DIR, RUST_FILE), (TOKENIZER_DIR, SETTINGS_FILE)))


def cached_onnx_model(model, folder: str, backend: str, cache_dir: str | None = None) -> str:
    """The ONNX file of `backend` for the sentence-transformers model in `folder`, with the model's
    tokenizer saved beside it (`SentenceTokenizer.save`, in TOKENIZER_DIR): made on first use and
    kept under the cache folder by the folder's fingerprint. `model`: the loaded model, or None to
    load it from `folder` only if an export has to be made. Each cache folder is written as a
    private temporary folder and renamed into place whole, so a killed or concurrent export never
    leaves a half folder where a reader looks; a lock makes concurrent processes wait for one
    export instead of each making its own."""
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"not an ONNX backend: {backend!r} (one of {', '.join(ONNX_BACKENDS)})")
    root = cache_dir or cache_root()
    os.makedirs(root, exist_ok=True)
    key = cache_key(folder, backend, root)
    entry = os.path.join(root, key)
    final = os.path.join(entry, MODEL_FILE)
    if _complete(entry):
        return final
    source = cached_onnx_model(model, folder, "onnx", root) if backend in QUANTISED_BACKENDS else None
    with _locked(os.path.join(root, key + ".lock")):
        if _complete(entry):  # another process made it while this one waited
            return final
        start = time.perf_counter()
        work = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
        try:
            made = os.path.join(work, MODEL_FILE)
            if source is None:
                if model is None:
                    from pipelines.encoding import load_sentence_model
                    model = load_sentence_model(folder, "cpu")
                try:
                    tokenizer = SentenceTokenizer.from_model(model)
                except TypeError as err:
                    raise ValueError(f"--sbert-backend {backend} cannot run {folder}: {err}; use --sbert-backend "
                                     f"torch") from err
                export_onnx(model, made)
                tokenizer.save(work)
            else:  # the int8 backends are quantised from the fp32 export and tokenise as it does
                source_tokenizer = os.path.join(os.path.dirname(source), TOKENIZER_DIR)
                if backend == SMOOTHQUANT:
                    from pipelines.smoothquant import smoothquant_int8
                    tokens = BatchTokenizer(SentenceTokenizer.load(os.path.dirname(source)))
                    smoothquant_int8(source, made, tokens, quantize_int8, model_name=folder)
                else:
                    quantize_int8(source, made)
                shutil.copytree(source_tokenizer, os.path.join(work, TOKENIZER_DIR))
            if os.path.isdir(entry):  # an incomplete folder (files removed by hand): replaced
                shutil.rmtree(entry)
            os.chmod(work, 0o755)  # mkdtemp's folder is private; the cache folder is read by every user's workers
            os.replace(work, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("made the %s model of %s in %.1fs: %s", backend, folder, time.perf_counter() - start, final)
    return final


class OnnxSentenceEncoder:
    """Normalised float32 sentence embeddings from an ONNX file, tokenised as the torch path
    (`SentenceTokenizer`), texts sorted by length within each call (little padding)."""

    def __init__(self, onnx_path: str, tokenizer: SentenceTokenizer, threads: int | None = None,
                 spinning: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Idle intra-op threads sleep instead of spinning: Beam runs an SDK process per core,
            # each with its own session, and on a shared machine spinning threads take the cores
            # from the threads that compute (measured in docs/benchmarks.md).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = onnx_path
        self._session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.tokens = BatchTokenizer(tokenizer)

    @classmethod
    def from_folder(cls, folder: str, backend: str, threads: int | None = None, cache_dir: str | None = None,
                    spinning: bool = False, model=None) -> OnnxSentenceEncoder:
        """The encoder of the sentence-transformers model in `folder` on `backend`: its cached export
        and the tokenizer saved with it. The model (`model`, or loaded from `folder`) is needed only
        when the export is not cached yet."""
        warn_without_vnni(backend)
        path = cached_onnx_model(model, folder, backend, cache_dir)
        return cls(path, SentenceTokenizer.load(os.path.dirname(path)), threads, spinning)

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._session.get_outputs()[0].shape[1]), dtype=np.float32)
        ids, lengths = self.tokens.tokenize(list(texts))
        order = np.argsort(-lengths, kind="stable")
        out = None  # [texts, dim] once the first batch gives the width
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            batch, attention = self.tokens.pad(ids, rows, lengths[rows])
            vectors = self._session.run(None, {"input_ids": batch, "attention_mask": attention})[0]
            if out is None:
                out = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        # the torch path always normalises; a model without a Normalize module is normalised here
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
