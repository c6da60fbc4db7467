"""How every sentence-BERT backend tokenises (torch, onnx, onnx-int8): one rule, in one place.

`SentenceTokenizer` is a sentence-transformers model's tokenizer reduced to what encoding needs:
its Rust tokenizer (the `tokenizers` library), set as the model's Hugging Face tokenizer sets it for
`tokenizer(texts, truncation=True, max_length=max_seq_length, padding=False)` (truncation at the
model's max_seq_length on the tokenizer's side, special tokens added, no padding), and the pad id.
It is saved beside an ONNX export (`save`, the tokenizer's own `save_pretrained` files plus these
settings) and loaded back with the `tokenizers` library alone (`load`): an SDK worker process with
a cached export tokenises exactly as the torch model without loading sentence-transformers or
transformers. `BatchTokenizer` turns texts into the unpadded ids and padded batches both backends
feed their model.

No torch, transformers or sentence-transformers at import time, nor in `load`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

TOKENIZER_DIR = "tokenizer"            # inside an export's cache folder
SETTINGS_FILE = "vlp_tokenizing.json"  # inside TOKENIZER_DIR, beside the save_pretrained files
RUST_FILE = "tokenizer.json"           # what a fast tokenizer's save_pretrained writes: the Rust tokenizer
SETTINGS_VERSION = 1


class SentenceTokenizer:
    """texts -> token ids, exactly as the sentence model's own tokenizer call gives them."""

    def __init__(self, rust, max_length: int, pad_id: int, truncation_side: str = "right",
                 split_special_tokens: bool = False, hf_tokenizer=None):
        rust.no_padding()
        rust.enable_truncation(max_length, stride=0, strategy="longest_first", direction=truncation_side)
        rust.encode_special_tokens = split_special_tokens
        self._rust = rust
        self.max_length, self.pad_id = max_length, pad_id
        self.truncation_side, self.split_special_tokens = truncation_side, split_special_tokens
        self._hf_tokenizer = hf_tokenizer  # kept only to save its files (`save`)

    @classmethod
    def from_model(cls, model) -> SentenceTokenizer:
        """The tokenizer of a sentence-transformers model whose first module is a Transformer with a
        fast (Rust) tokenizer; TypeError otherwise (the torch path then leaves tokenising to
        `SentenceTransformer.encode`; the ONNX backends refuse the model)."""
        from sentence_transformers.models import Transformer
        from tokenizers import Tokenizer

        first = list(model)[0]
        if not isinstance(first, Transformer):
            raise TypeError(f"the sentence model's first module is a {type(first).__name__}, not a Transformer")
        hf = first.tokenizer
        if hf is None or not getattr(hf, "is_fast", False):
            raise TypeError(f"the sentence model's tokenizer ({type(hf).__name__}) is not a fast (Rust) tokenizer")
        # a private copy: the model's own tokenizer keeps the settings its callers give it
        rust = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        return cls(rust, int(model.max_seq_length), hf.pad_token_id or 0, hf.truncation_side,
                   bool(getattr(hf, "split_special_tokens", False)), hf_tokenizer=hf)

    def save(self, folder: str) -> None:
        """The tokenizer's save_pretrained files and these settings under `folder`/TOKENIZER_DIR."""
        if self._hf_tokenizer is None:
            raise ValueError("a SentenceTokenizer loaded from files is copied with its folder, not saved again")
        target = os.path.join(folder, TOKENIZER_DIR)
        self._hf_tokenizer.save_pretrained(target)
        # the Rust tokenizer as this object tokenises (the model's normaliser included, e.g. the
        # lower-casing sentence-transformers adds for do_lower_case): `load` reads this file
        self._rust.save(os.path.join(target, RUST_FILE))
        settings = {"version": SETTINGS_VERSION, "max_seq_length": self.max_length, "pad_token_id": self.pad_id,
                    "truncation_side": self.truncation_side, "split_special_tokens": self.split_special_tokens}
        with open(os.path.join(target, SETTINGS_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> SentenceTokenizer:
        """What `save` wrote under `folder`, with the `tokenizers` library only."""
        from tokenizers import Tokenizer

        target = os.path.join(folder, TOKENIZER_DIR)
        with open(os.path.join(target, SETTINGS_FILE), encoding="utf-8") as f:
            settings = json.load(f)
        if settings.get("version") != SETTINGS_VERSION:
            raise ValueError(f"{target}: tokenizer settings version {settings.get('version')}, "
                             f"this code reads {SETTINGS_VERSION}")
        return cls(Tokenizer.from_file(os.path.join(target, RUST_FILE)), int(settings["max_seq_length"]),
                   int(settings["pad_token_id"]), settings["truncation_side"], bool(settings["split_special_tokens"]))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length, unpadded (the caller pads per batch)."""
        return [encoding.ids for encoding in self._rust.encode_batch(list(texts), add_special_tokens=True)]


class BatchTokenizer:
    """A SentenceTokenizer as every backend uses it: texts -> unpadded token ids and their lengths,
    and rows of those -> a padded int64 batch with its attention mask. The Rust tokenizer is set
    once and releases the GIL, so a background thread may tokenise the next chunk meanwhile."""

    def __init__(self, tokenizer: SentenceTokenizer):
        self.tokenizer = tokenizer
        self.max_length, self.pad_id = tokenizer.max_length, tokenizer.pad_id

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        ids = self.tokenizer.token_ids(texts)
        return ids, np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))

    def pad(self, ids: list[list[int]], rows: np.ndarray, row_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids[rows] (of lengths `row_lengths`) padded to the longest -> (input_ids, attention_mask)."""
        width = int(row_lengths.max())
        batch = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for r, i in enumerate(rows):
            batch[r, :row_lengths[r]] = ids[i]
        return batch, (np.arange(width)[None, :] < row_lengths[:, None]).astype(np.int64)
