"""EmbedSentences: sentence-BERT embeddings through a Beam RunInference ModelHandler.

The same transform embeds the corpus sentences and the images' tag strings, so both live in one
space. Embeddings are L2-normalised float32, so inner product = cosine in the FAISS index. The
model code itself is in encoding.py (no Beam there, so it runs on a bare GPU node).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines.batching import StableBatches
from pipelines.encoding import check_same_encoder, encode, encoder_parts, load_sentence_encoder
from pipelines.metrics import add_stage_time
from pipelines.options import EmbedOptions

log = logging.getLogger(__name__)


_MODELS: dict = {}  # (model, device, fp16, backend) -> the loaded model of this process
_MODELS_LOCK = threading.Lock()


def process_model(options: EmbedOptions):
    """One sentence model per worker process for every EmbedSentences of the pipeline (the corpus
    and the images' tag strings): RunInference shares a model only within one transform."""
    backend = options.resolved_backend()
    key = (options.model, options.device, options.fp16, backend)
    with _MODELS_LOCK:
        if key not in _MODELS:
            start = time.perf_counter()
            _MODELS[key] = load_sentence_encoder(options.model, options.device, options.fp16, backend)
            log.info("loaded sentence model %s (%s) on %s in %.1fs", options.model or "all-MiniLM-L6-v2",
                     backend, options.device, time.perf_counter() - start)
        return _MODELS[key]


class SentenceTransformerHandler(ModelHandler[list, PredictionResult, object]):
    """RunInference handler: one model per worker process (`process_model`). Each example is a whole group of
    (key, text) pairs, encoded in one call, so an embedding depends only on its group, never on
    how Beam happened to batch elements (padding and matrix shapes change the last bits).

    `expect_encoder`: the launcher's `encoder_parts`, where vectors are kept by its fingerprint
    (the embedding store). `load_model` (RunInference's DoFn.setup) then computes the parts of the
    encoder this worker loads (the functions its load uses: the same cache key, the same model
    folder digest) and refuses, before loading or embedding anything, where they differ: a worker
    image with other versions would otherwise put its vectors under a fingerprint that does not
    describe them."""

    def __init__(self, options: EmbedOptions = EmbedOptions(), expect_encoder: dict[str, str] | None = None):
        super().__init__()
        self._options, self._expect_encoder = options, expect_encoder

    def load_model(self):
        if self._expect_encoder is not None:  # before the load: a mismatched worker must not export a file first
            check_same_encoder(self._expect_encoder, encoder_parts(self._options),
                               "--embeddings: vectors are kept under the launcher's encoder",
                               "launch where the workers' versions are (the flex template launches in the worker "
                               "image), or build without --embeddings")
        return process_model(self._options)

    def run_inference(self, batch: Sequence[list], model, inference_args=None) -> Iterable[PredictionResult]:
        results = []
        for group in batch:
            start = time.perf_counter()
            vectors = encode(model, [text for _, text in group], self._options.batch_size)
            add_stage_time("embed", start)
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

    Texts go in StableBatches of about `group_batches * batch_size`, each encoded whole: the
    same text gets bit-identical embeddings with any number of workers. `expect_encoder`: see
    SentenceTransformerHandler."""

    def __init__(self, options: EmbedOptions = EmbedOptions(), group_batches: int = 4,
                 expect_encoder: dict[str, str] | None = None):
        super().__init__()
        self._options, self._expect_encoder = options, expect_encoder
        self._group_size = max(1, options.batch_size * group_batches)

    def expand(self, keyed_texts):
        return (keyed_texts
                | "StableBatches" >> StableBatches(self._group_size)
                | "RunInference" >> RunInference(SentenceTransformerHandler(self._options, self._expect_encoder))
                | "Unwrap" >> beam.FlatMap(lambda result: [(key, vector) for (key, _), vector
                                                           in zip(result.example, result.inference)]))
