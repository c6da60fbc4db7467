"""Turning decoded samples into model inputs for each granularity, with their masks (in the loader).

All randomness comes from the `random.Random` passed in, which the loader seeds per batch from
(seed, epoch, batch index): a batch is the same whether the run was resumed or not.

- region-tag (rt): text = the image's tags in the query's order. `objectives.rt_masking=both`
  (default, the paper: "masks the object tags and regions"): each sample gets 15% of its tags
  masked (MLM, 80/10/10; a multi-word tag such as "dining table" as a whole) and 15% of its regions
  (MRC on the region's tag, MRFR to the original features; masked region features are zeroed);
  `one`: one modality per sample (UNITER-style conditional masking), tags or regions.
- region-phrase (rp): text = a retrieved sentence; only linked items are masked, phrase tokens OR
  linked regions (one modality per sample); a linked item is masked with probability
  min(1, scale x link similarity), at least one per sample. Text: MLM on the phrase's tokens.
  Regions: p-MRTC, the masked region predicts every content sub-token of its phrase (the phrase's
  `words`: determiners, pronouns and particles left out, as linking does).
- image-sentence (is): the retrieved sentence (ITM label 1) or, with probability 0.5, the
  sentence of another image in the batch (label 0); 15% MLM (80/10/10) on the matched pairs.

The 10% random replacement of MLM draws a real word piece, never a special token ([CLS], [SEP],
[PAD], [MASK], [UNK]) or an [unused*] slot.

Every view carries the clean region features once (`features`, float16) and, where regions are
masked, `zeroed_regions` [B, R]: the zeroed copy the model sees is made on the device
(`objectives.input_features`). The clean features are also the MRFR target and the ITM-weight
forward's input, so the loader builds, and the trainer copies to the device, one feature tensor
per view instead of two.
"""
from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import torch

from schemas.corpus import normalise_label, tag_order
from vlp_train.objectives.contrastive import NO_KEY
from vlp_train.tasks import IGNORE, Task

RT_MASKING = ("both", "one")
# the view fields whose dim 1 is the region (dim 0 is the batch in every field)
REGION_FIELDS = frozenset({"features", "zeroed_regions", "locations", "region_mask", "mrc_labels"})
# the view fields of a fixed shape but for the batch (dim 0): the regions, and the images' pixels
FIXED_SHAPE_FIELDS = REGION_FIELDS | {"pixels"}
# a phrase without `words` (a corpus of another writer): what linking leaves out, at its simplest
_FUNCTION_WORDS = frozenset("a an the this that these those my your his her its our their some any".split())
_BRACKETED = re.compile(r"^\[.*\]$")  # [CLS], [unused17], ...: not words


class Views(dict):
    """A batch's {task: view}. The DataLoader's pinning thread calls `pin_memory` on it: a tensor
    several views share (the batch's pixels) is pinned once, so `step.to_device` copies it once,
    where torch's generic pinning would make one pinned copy per view."""

    def pin_memory(self, device=None):
        pinned = {}

        def pin(value):
            if not torch.is_tensor(value):
                return value
            if id(value) not in pinned:
                pinned[id(value)] = (value, value.pin_memory())
            return pinned[id(value)][1]
        return Views({task: {k: pin(v) for k, v in view.items()} for task, view in self.items()})


def replacement_ids(tokenizer) -> np.ndarray:
    """The ids MLM's random replacement may draw: real word pieces only."""
    special = set(tokenizer.all_special_ids)
    return np.array(sorted(i for token, i in tokenizer.get_vocab().items()
                           if i not in special and not _BRACKETED.match(token)), np.int64)


def text_key(text: str) -> int:
    """An integer per text, equal for equal texts (ITC's positives, ITM's excluded negatives)."""
    key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return key if key != NO_KEY else key + 1  # NO_KEY pads a set of keys


def retrieved_text_keys(samples) -> np.ndarray:
    """[B, K] the text keys of each image's K retrieved sentences (NO_KEY-padded): ITC counts every
    one of them as the image's positive and never as its negative (objectives.contrastive)."""
    retrieved = [[text_key(s["text"]) for s in sample["meta"]["sentences"]] for sample in samples]
    keys = np.full((len(samples), max(1, max(map(len, retrieved), default=0))), NO_KEY, np.int64)
    for i, row in enumerate(retrieved):
        keys[i, :len(row)] = row
    return keys


def tag_spans(tags: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The tag text ("person dining table cup") and each tag's character span in it."""
    spans, start = [], 0
    for tag in tags:
        spans.append((start, start + len(tag)))
        start += len(tag) + 1
    return " ".join(tags), spans


def label_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, N] labels (IGNORE where unlabelled) -> (positions [B, P], targets [B, P]), P = the most
    labelled positions of any sample (at least 2), padding targets IGNORE. The vocabulary heads
    then run on P positions instead of all N (about 15% of them), and P comes from the loader,
    so the step needs no device-to-host sync to find them. P is never 1: torch.compile treats a
    size of 1 as a constant, so a batch with P = 1 would cost a graph of its own."""
    labelled = labels != IGNORE
    width = max(2, int(labelled.sum(1).max(initial=0)))
    positions = np.zeros((labels.shape[0], width), np.int64)
    targets = np.full((labels.shape[0], width), IGNORE, np.int64)
    for i, row in enumerate(labelled):
        found = np.flatnonzero(row)
        positions[i, :len(found)] = found
        targets[i, :len(found)] = labels[i, found]
    return positions, targets


def multi_label_positions(labels: dict[tuple[int, int], list[int]], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """{(sample, position): [token ids]} -> (positions [B, P], targets [B, P, T]), IGNORE-padded;
    P and T at least 2 (see `label_positions`)."""
    per_sample: list[list[int]] = [[] for _ in range(batch)]
    for (i, position) in sorted(labels):
        per_sample[i].append(position)
    width = max(2, max((len(p) for p in per_sample), default=0))
    depth = max(2, max((len(t) for t in labels.values()), default=0))
    positions = np.zeros((batch, width), np.int64)
    targets = np.full((batch, width, depth), IGNORE, np.int64)
    for i, found in enumerate(per_sample):
        for k, position in enumerate(found):
            positions[i, k] = position
            tokens = labels[(i, position)]
            targets[i, k, :len(tokens)] = tokens
    return positions, targets


def locations(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """[x1/W, y1/H, x2/W, y2/H, area/(W*H)] per box."""
    w, h = float(width), float(height)
    x1, y1, x2, y2 = boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h
    return np.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], axis=1).astype(np.float32)


def _configured_backend(tokenizer, max_length: int):
    """A copy of a fast tokenizer's Rust object set to what `tokenizer(texts, truncation=True,
    max_length=..., padding="longest")` does: calling it directly skips the Python wrapper's
    per-call set-up and conversions (measured in bench/loader_parts.py; same output, tested)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    backend.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                           pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
    return backend


class BatchBuilder:
    def __init__(self, tokenizer, tag_index: dict[str, int], max_text_len: int, max_regions: int, objectives,
                 pad_regions: bool = False, feature_dim: int | None = None, views: dict | None = None,
                 image_size: int | None = None, region_features: bool = True):
        """`pad_regions`: every batch has `max_regions` region slots (padding masked out), not the
        most of its images; a step compiled whole then sees one region count (compile.CompiledStep).
        `feature_dim`: the model's region feature size (the loader skips samples of another).
        `views`: {task: fn(builder, samples, sentences, rng) -> view}, a family's own view of a task
        (families.Family.views) in place of the one built here.
        `image_size`: the model takes pixels (model.visual patches or both): every view carries
        `pixels`, uint8 [B, image_size, image_size, 3], the same tensor in each view of a batch.
        `region_features` False: the run reads none (`data.reads_region_features`): the loader
        leaves them undecoded and the views' `features` are zero-width [B, R, 0]."""
        self.views = dict(views or {})
        self.feature_dim, self.image_size, self.region_features = feature_dim, image_size, region_features
        self.tok = tokenizer
        self.tag_index = tag_index
        self.max_text_len, self.max_regions, self.pad_regions = max_text_len, max_regions, pad_regions
        self.obj = objectives
        self.special = set(tokenizer.all_special_ids)
        self.mask_id = tokenizer.mask_token_id
        self.unk_id = tokenizer.unk_token_id
        self.replacements = replacement_ids(tokenizer)
        self._backend = _configured_backend(tokenizer, max_text_len)
        self._phrase_tokens: dict[tuple[str, ...], list[int]] = {}
        if objectives.rt_masking not in RT_MASKING:
            raise ValueError(f"objectives.rt_masking={objectives.rt_masking!r}: expected one of {RT_MASKING}")

    # -- shared pieces ---------------------------------------------------------------------

    def _tokenize(self, texts: list[str]):
        """(ids, attention mask, character offsets) padded to the longest, truncated to max_text_len."""
        if self._backend is None:  # a slow (Python) tokenizer
            enc = self.tok(texts, truncation=True, max_length=self.max_text_len, padding="longest",
                           return_offsets_mapping=True, return_tensors="np")
            return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(bool), enc["offset_mapping"]
        encodings = self._backend.encode_batch(texts)
        return (np.array([e.ids for e in encodings], np.int64), np.array([e.attention_mask for e in encodings], bool),
                np.array([e.offsets for e in encodings], np.int64).reshape(len(texts), -1, 2))

    def _regions(self, samples):
        n = self.max_regions if self.pad_regions else max(1, max(min(len(s["meta"]["boxes"]), self.max_regions)
                                                                  for s in samples))
        dim = samples[0]["feats"].shape[1]
        # float16 as stored: half the bytes through the loader's shared memory and the host-to-
        # device copy; the trainer widens them on the device (`to_device`).
        feats = np.zeros((len(samples), n, dim), np.float16)
        locs = np.zeros((len(samples), n, 5), np.float32)
        mask = np.zeros((len(samples), n), bool)
        tags = np.full((len(samples), n), IGNORE, np.int64)
        for i, s in enumerate(samples):
            r = min(len(s["meta"]["boxes"]), self.max_regions)
            feats[i, :r] = s["feats"][:r]
            locs[i, :r] = locations(np.asarray(s["meta"]["boxes"][:r], np.float32), s["meta"]["width"], s["meta"]["height"])
            mask[i, :r] = True
            tags[i, :r] = [self.tag_index.get(normalise_label(t), IGNORE) for t in s["meta"]["tags"][:r]]
        return feats, locs, mask, tags

    def _mask_tokens(self, ids, labels, i, positions, rng):
        """80% [MASK], 10% random token, 10% unchanged; labels keep the originals."""
        for p in positions:
            labels[i, p] = ids[i, p]
            roll = rng.random()
            if roll < 0.8:
                ids[i, p] = self.mask_id
            elif roll < 0.9:
                ids[i, p] = self.replacements[rng.randrange(len(self.replacements))]

    def _random_positions(self, candidates: list[int], prob: float, rng) -> list[int]:
        chosen = [p for p in candidates if rng.random() < prob]
        return chosen or ([rng.choice(candidates)] if candidates else [])

    def _text_candidates(self, ids_row, mask_row):
        return [p for p in range(len(ids_row)) if mask_row[p] and int(ids_row[p]) not in self.special]

    @staticmethod
    def _tensors(**arrays):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    # -- the three views -------------------------------------------------------------------

    def region_tag(self, samples, rng: random.Random) -> dict:
        feats, locs, rmask, tags = self._regions(samples)
        texts, spans = zip(*(tag_spans(tag_order(s["meta"]["tags"], s["meta"]["scores"])) for s in samples))
        ids, tmask, offsets = self._tokenize(list(texts))
        mlm = np.full(ids.shape, IGNORE, np.int64)
        mrc = np.full(tags.shape, IGNORE, np.int64)
        masked_regions = np.zeros(rmask.shape, bool)
        both = self.obj.rt_masking == "both"
        for i in range(len(samples)):
            modality = rng.random()  # drawn in both modes: `one` masks the tags below 0.5, else the regions
            if both or modality < 0.5:
                tokens = self._tag_tokens(ids[i], tmask[i], offsets[i], spans[i])
                chosen = self._random_positions(list(range(len(tokens))), self.obj.mlm_prob, rng)
                self._mask_tokens(ids, mlm, i, sorted(t for c in chosen for t in tokens[c]), rng)
            if both or modality >= 0.5:
                for r in self._random_positions(list(np.flatnonzero(rmask[i])), self.obj.region_mask_prob, rng):
                    masked_regions[i, r] = True
                    mrc[i, r] = tags[i, r]
        mlm_positions, mlm_targets = label_positions(mlm)
        return {"task": Task.REGION_TAG, **self._tensors(
            input_ids=ids, text_mask=tmask, mlm_labels=mlm, mlm_positions=mlm_positions, mlm_targets=mlm_targets,
            features=feats, zeroed_regions=masked_regions,  # clean features: also the MRFR target
            locations=locs, region_mask=rmask, mrc_labels=mrc,
            active=np.ones(len(samples), bool))}

    def _tag_tokens(self, ids_row, mask_row, offsets_row, spans) -> list[list[int]]:
        """The token positions of each tag still in the (truncated) text: a tag is masked whole."""
        candidates = self._text_candidates(ids_row, mask_row)
        tokens = [[t for t in candidates if offsets_row[t, 0] < end and offsets_row[t, 1] > start] for start, end in spans]
        return [t for t in tokens if t]

    def phrase_targets(self, phrase: dict) -> list[int]:
        """The sub-tokens a masked region linked to `phrase` predicts: its content words' word
        pieces (determiners and pronouns are not in `words`), [UNK] left out."""
        words = tuple(phrase.get("words") or [w for w in phrase["text"].lower().split() if w not in _FUNCTION_WORDS])
        if words not in self._phrase_tokens:
            if len(self._phrase_tokens) >= 200_000:  # a bound on a long run's distinct phrases
                self._phrase_tokens.clear()
            pieces = self.tok(" ".join(words), add_special_tokens=False)["input_ids"]
            self._phrase_tokens[words] = [t for t in pieces if t != self.unk_id and t not in self.special]
        return self._phrase_tokens[words]

    def region_phrase(self, samples, sentences, rng: random.Random) -> dict:
        feats, locs, rmask, _ = self._regions(samples)
        zeroed = np.zeros(rmask.shape, bool)
        ids, tmask, offsets = self._tokenize([s["text"] for s in sentences])
        clean_ids = ids.copy()
        mlm = np.full(ids.shape, IGNORE, np.int64)
        mrtc: dict[tuple[int, int], list[int]] = {}  # (sample, region) -> its phrase's sub-tokens
        masked_text = np.zeros(len(samples), bool)
        active = np.zeros(len(samples), bool)
        for i, sentence in enumerate(sentences):
            linked = [p for p in sentence["phrases"] if p.get("region") is not None and p["region"] < rmask.shape[1]]
            spans = {id(p): [t for t in range(ids.shape[1]) if tmask[i, t] and int(clean_ids[i, t]) not in self.special
                             and offsets[i, t, 0] < p["end"] and offsets[i, t, 1] > p["start"]] for p in linked}
            linked = [p for p in linked if spans[id(p)]]  # phrases cut off by truncation cannot be masked
            if not linked:
                continue
            chosen = [p for p in linked if rng.random() < min(1.0, self.obj.phrase_mask_scale * p["similarity"])]
            chosen = chosen or [max(linked, key=lambda p: (p["similarity"], -p["start"]))]
            active[i] = True
            if rng.random() < 0.5:  # mask the phrases' tokens
                masked_text[i] = True
                self._mask_tokens(ids, mlm, i, sorted({t for p in chosen for t in spans[id(p)]}), rng)
            else:  # mask the linked regions; each predicts its best phrase's content sub-tokens
                for p in sorted(chosen, key=lambda p: p["similarity"]):  # the most similar phrase wins
                    targets = self.phrase_targets(p) or [int(clean_ids[i, t]) for t in spans[id(p)]]
                    mrtc[(i, p["region"])] = targets
                    zeroed[i, p["region"]] = True
        mlm_positions, mlm_targets = label_positions(mlm)
        mrtc_positions, mrtc_targets = multi_label_positions(mrtc, len(samples))
        return {"task": Task.REGION_PHRASE, **self._tensors(
            input_ids=ids, text_mask=tmask, mlm_labels=mlm, mlm_positions=mlm_positions, mlm_targets=mlm_targets,
            features=feats, zeroed_regions=zeroed, locations=locs, region_mask=rmask,
            mrtc_positions=mrtc_positions, mrtc_targets=mrtc_targets, masked_text=masked_text, active=active,
            clean_ids=clean_ids)}

    def image_sentence(self, samples, sentences, rng: random.Random) -> dict:
        feats, locs, rmask, _ = self._regions(samples)
        n = len(samples)
        labels = np.ones(n, np.int64)
        texts = []
        for i in range(n):
            if n > 1 and rng.random() < self.obj.itm_negative_prob:
                j = (i + 1 + rng.randrange(n - 1)) % n  # any other image of the batch
                # not a negative if image i retrieved that text too (one of its K sentences)
                if sentences[j]["text"] not in {s["text"] for s in samples[i]["meta"]["sentences"]}:
                    labels[i] = 0
                    texts.append(sentences[j]["text"])
                    continue
            texts.append(sentences[i]["text"])
        ids, tmask, _ = self._tokenize(texts)
        clean_ids, clean_mask, _ = self._tokenize([s["text"] for s in sentences])
        mlm = np.full(ids.shape, IGNORE, np.int64)
        for i in range(n):
            # Mismatched pairs are masked too, or a [MASK] in the input would tell ITM "match"
            # (ITM and MLM share this forward); but they get no MLM loss: the sentence is not
            # about the image, so its words give no grounded signal.
            self._mask_tokens(ids, mlm, i, self._random_positions(
                self._text_candidates(ids[i], tmask[i]), self.obj.mlm_prob, rng), rng)
            if labels[i] == 0:
                mlm[i] = IGNORE
        mlm_positions, mlm_targets = label_positions(mlm)
        return {"task": Task.IMAGE_SENTENCE, **self._tensors(
            input_ids=ids, text_mask=tmask, mlm_labels=mlm, mlm_positions=mlm_positions, mlm_targets=mlm_targets,
            features=feats, locations=locs, region_mask=rmask,
            itm_labels=labels, active=np.ones(n, bool), clean_ids=clean_ids, clean_text_mask=clean_mask)}

    # -- VLMo's views (vlp_train/families/vlmo.py) -----------------------------------------

    def _mlm(self, texts: list[str], rng: random.Random):
        """Tokenised texts with 15% (objectives.mlm_prob) of each one's tokens masked, 80/10/10."""
        ids, tmask, _ = self._tokenize(texts)
        clean_ids = ids.copy()
        mlm = np.full(ids.shape, IGNORE, np.int64)
        for i in range(len(texts)):
            self._mask_tokens(ids, mlm, i, self._random_positions(
                self._text_candidates(ids[i], tmask[i]), self.obj.mlm_prob, rng), rng)
        positions, targets = label_positions(mlm)
        return ids, clean_ids, tmask, positions, targets

    def image_text(self, samples, sentences, rng: random.Random) -> dict:
        """VLMo's image-text view: each image with its retrieved sentence (the positive pair; the
        negatives of ITC and ITM are the other samples of the global batch), the sentence's MLM
        masking, a key per text (equal texts, equal keys) and the keys of each image's K retrieved
        sentences, so that an image is never contrasted with a sentence it retrieved (two images
        that retrieved the same sentence are not each other's negatives)."""
        feats, locs, rmask, _ = self._regions(samples)
        texts = [s["text"] for s in sentences]
        ids, clean_ids, tmask, positions, targets = self._mlm(texts, rng)
        keys = np.array([text_key(t) for t in texts], np.int64)
        retrieved_keys = retrieved_text_keys(samples)
        return {"task": Task.IMAGE_TEXT, **self._tensors(
            input_ids=ids, clean_ids=clean_ids, text_mask=tmask, mlm_positions=positions, mlm_targets=targets,
            features=feats, locations=locs, region_mask=rmask, text_keys=keys, retrieved_keys=retrieved_keys,
            active=np.ones(len(samples), bool))}

    def image_only(self, samples, rng: random.Random) -> dict:
        """The vision stage's view: regions alone, 15% (objectives.region_mask_prob, at least one
        an image) zeroed, to be regressed to their features."""
        feats, locs, rmask, _ = self._regions(samples)
        zeroed = np.zeros(rmask.shape, bool)
        for i in range(len(samples)):
            zeroed[i, self._random_positions(list(np.flatnonzero(rmask[i])), self.obj.region_mask_prob, rng)] = True
        return {"task": Task.IMAGE_ONLY, **self._tensors(
            features=feats, zeroed_regions=zeroed, locations=locs, region_mask=rmask,
            active=np.ones(len(samples), bool))}

    def text_only(self, texts: list[str], rng: random.Random) -> dict:
        """The language stage's view: text alone, MLM."""
        ids, _, tmask, positions, targets = self._mlm(texts, rng)
        return {"task": Task.TEXT_ONLY, **self._tensors(
            input_ids=ids, text_mask=tmask, mlm_positions=positions, mlm_targets=targets,
            active=np.ones(len(texts), bool))}

    def build(self, samples, tasks, rng: random.Random) -> dict:
        """The views of `tasks` for one batch of decoded samples; one sentence picked per sample.
        Samples of a text corpus ({key, text}: the language stage) make the text-only view."""
        if samples and "meta" not in samples[0]:
            if list(map(Task, tasks)) != [Task.TEXT_ONLY]:
                raise ValueError(f"a batch of text alone has no view for the tasks {list(tasks)}")
            return {Task.TEXT_ONLY: self.text_only([s["text"] for s in samples], rng)}
        sentences = [rng.choice(s["meta"]["sentences"]) for s in samples]
        # uint8 as decoded: a quarter of float32's bytes through the workers' shared memory and the
        # copy to the device, where the patch embedding normalises them
        pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples])) if self.image_size else None
        views = Views()
        for task in map(Task, tasks):
            if task in self.views:
                views[task] = self.views[task](self, samples, sentences, rng)
                continue
            if task is Task.IMAGE_TEXT:
                views[task] = self.image_text(samples, sentences, rng)
                continue
            if task is Task.IMAGE_ONLY:
                views[task] = self.image_only(samples, rng)
                continue
            if task is Task.TEXT_ONLY:
                views[task] = self.text_only([s["text"] for s in sentences], rng)
                continue
            if task is Task.REGION_TAG:
                views[task] = self.region_tag(samples, rng)
            elif task is Task.REGION_PHRASE:
                views[task] = self.region_phrase(samples, sentences, rng)
            elif task is Task.IMAGE_SENTENCE:
                views[task] = self.image_sentence(samples, sentences, rng)
            else:
                raise ValueError(f"no view for task {task!r}")
        if pixels is not None:  # every view of the batch, a family's own too: one tensor, shared
            for view in views.values():
                if "features" in view or "region_mask" in view:  # an image's view (not text alone)
                    view["pixels"] = pixels
        return views
