"""A downstream split as model inputs: its examples (formats/), their images' regions (regions.py),
batches built by the trainer's BatchBuilder (the same tokenisation, region order, locations and
padding as pre-training) in an order fixed by (seed, epoch): the loader position (epoch, batch)
is enough to resume exactly."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from vlp_train.finetune.formats.images import match_reported
from vlp_train.finetune.regions import DetectionIndex, Regions, load_regions

log = logging.getLogger(__name__)


def first_examples(read, max_examples: int = 0) -> list:
    """The examples of a split a job takes: the first `max_examples` (0: all)."""
    return list(read.examples[:max_examples] if max_examples else read.examples)


def image_keys(examples) -> list[str]:
    return list(dict.fromkeys(k for e in examples for k in e.image_ids))


def read_regions_once(index: DetectionIndex, splits: list[tuple], max_regions: int) -> None:
    """The regions of every image the splits ((ReadResult, max_examples) each) name, read in one pass
    over the detection files: each split's SplitData then finds them read (a split shares the
    files with the others, and reading a large detections file is the slow part)."""
    from vlp_train.finetune.formats.images import match_images as match

    keys = image_keys(e for read, max_examples in splits for e in first_examples(read, max_examples))
    load_regions(index, set(match(keys, index.where).detection_of.values()), max_regions)


def covered_examples(examples: list, covered: dict, what: str, has: str, missing: str) -> list:
    """The examples all of whose images are in `covered` (regions, image files); the rest are left out
    with a warning counting them, and none left is an error."""
    kept = [e for e in examples if all(k in covered for k in e.image_ids)]
    if not kept:
        raise ValueError(f"{what}: no example has {has} for its images (see the warnings above)")
    if len(kept) < len(examples):
        log.warning("%s: %d of %d examples left out (images without %s)", what, len(examples) - len(kept),
                    len(examples), missing)
    return kept


def leave_out_damaged(image_files: dict[str, str], damaged: dict[str, str], examples: list, what: str) -> dict:
    """Drop the `damaged` images (key -> why) from `image_files` (key -> file), so that their examples
    are left out as a missing file's are; each reported with its file, why and its examples (the
    first MAX_REPORTED one a line, the rest counted). Returns {file: (why, example ids)}."""
    from vlp_train.finetune.formats.common import MAX_REPORTED

    if not damaged:
        return {}
    examples_of: dict[str, list[str]] = {key: [] for key in damaged}
    for e in examples:
        for key in dict.fromkeys(e.image_ids):
            if key in examples_of:
                examples_of[key].append(e.example_id)
    found = {image_files.pop(key): (why, examples_of[key]) for key, why in damaged.items()}
    for path, (why, ids) in list(found.items())[:MAX_REPORTED]:
        log.warning("%s: image file %s cannot be decoded (%s); left out with its example(s) %s", what, path, why,
                    ", ".join(ids))
    log.warning("%s: %d image file(s) cannot be decoded, %d example(s) left out with them%s", what, len(found),
                sum(len(ids) for _, ids in found.values()),
                f" (the first {MAX_REPORTED} named above)" if len(found) > MAX_REPORTED else "")
    return found


class SplitData:
    """The examples of a split that have what the model sees for every image they name: regions
    (`index`: detections) and/or pixels (`images`: the dataset's image files, for a model on
    patches, decoded at `image_size` as pre-training does). An example whose image lacks either, or
    whose image file cannot be decoded (pixels.image_problem, checked here once), is left out and
    counted (the images reported with examples): decided before the examples are shared out, the
    image files' check on the main rank of a DDP run (`dist_info`) for every rank, so every rank
    keeps the same ones (batches_per_epoch)."""

    def __init__(self, task, read, index: DetectionIndex | None, max_regions: int, max_examples: int = 0,
                 images=None, image_size: int | None = None, dist_info=None):
        self.task = task
        self.split = read.split
        examples = first_examples(read, max_examples)
        if len(examples) < len(read.examples):
            log.warning("%s %s: the first %d of %d examples (data.max_examples)", task.name, read.split,
                        max_examples, len(read.examples))
        what = f"{task.name} {read.split}"
        self.regions: dict[str, Regions] = {}
        if index is not None:
            detection_of = match_reported(image_keys(examples), index.where, what)
            regions = load_regions(index, set(detection_of.values()), max_regions)
            self.regions = {key: regions[d] for key, d in detection_of.items() if d in regions}
            examples_with = covered_examples(examples, self.regions, what, "regions", "usable detections")
        else:
            examples_with = examples
        # pixels: image key -> its file (decoded in the loader, `pixels`)
        self.image_files: dict[str, str] = {}
        self.image_size = image_size
        # an image file that cannot be decoded: file -> (why, the examples left out with it)
        self.damaged: dict[str, tuple[str, list[str]]] = {}
        if images is not None:
            self.image_files = images.match(image_keys(examples_with), what)
            self.damaged = leave_out_damaged(self.image_files, images.damaged(self.image_files, what, dist_info),
                                             examples_with, what)
            examples_with = covered_examples(examples_with, self.image_files, what, "an image file",
                                             "a file under --images that can be decoded")
        self.examples = examples_with
        self.left_out = len(examples) - len(self.examples)

    @property
    def feature_dim(self) -> int | None:
        """The detections' region feature size (None without detections)."""
        return next(iter(self.regions.values())).feats.shape[1] if self.regions else None

    def pixels(self, key: str, example: str) -> np.ndarray:
        """The image `key`'s pixels, uint8 [image_size, image_size, 3]; `example` names who needs it
        in an error (a file that passed the check of SplitData and still cannot be read or decoded
        stops the run with its name)."""
        from vlp_train.finetune.pixels import read_pixels
        return read_pixels(self.image_files[key], self.image_size, example)

    def inputs(self, builder, texts: list[str] | None, keys: list[str] | None, examples: list[str] | None = None):
        """model_inputs of texts and/or the images `keys` (regions when the split has them, pixels
        when it has image files); `examples` name who needs each image, for an error."""
        regions = pixels = None
        if keys is not None:
            if self.regions:
                regions = [self.regions[k] for k in keys]
            if self.image_files:  # an image in several pairs of the call (ITM's pairs) is decoded once
                decoded = {}
                for k, e in zip(keys, examples or [f"image {k}" for k in keys]):
                    if k not in decoded:
                        decoded[k] = self.pixels(k, e)
                pixels = [decoded[k] for k in keys]
        return model_inputs(builder, texts, regions, pixels)

    def __len__(self) -> int:
        return len(self.examples)


def model_inputs(builder, texts: list[str] | None = None, regions: list | None = None,
                 pixels: list | None = None) -> dict:
    """The model's tensors of texts (input_ids, text_mask) and/or images (features, locations,
    region_mask from `regions`: Regions; `pixels`: uint8 [S, S, 3] arrays each), made by
    pre-training's BatchBuilder: the same tokenisation, region order, box locations and padding;
    pixels stacked uint8 as its loader sends them (normalised on the device). Images seen by their
    pixels alone (a model on patches without detections) have no regions: zero-width region
    tensors. Pairs: texts[i] with image i."""
    arrays = {}
    if texts is not None:
        ids, text_mask, _ = builder._tokenize(texts)
        arrays.update(input_ids=ids, text_mask=text_mask)
    if regions is not None:
        feats, locs, region_mask, _ = builder._regions([r.sample() for r in regions])
        arrays.update(features=feats, locations=locs, region_mask=region_mask)
    elif pixels is not None:
        n = len(pixels)
        arrays.update(features=np.zeros((n, 0, 0), np.float16), locations=np.zeros((n, 0, 5), np.float32),
                      region_mask=np.zeros((n, 0), bool))
    if pixels is not None:
        arrays.update(pixels=np.stack(pixels))
    return builder._tensors(**arrays)


class Collate:
    """Example indices -> a batch: {"keys", "inputs": the model's tensors, "targets" [B, labels]}.
    An NLVR2 pair puts every example's first images, then their second images, in one stacked
    batch of 2B sequences (the same text with each)."""

    def __init__(self, data: SplitData, builder, label_index: dict[str, int]):
        self.data, self.builder, self.label_index = data, builder, label_index

    def __call__(self, indices: list[int]) -> dict:
        examples = [self.data.examples[i] for i in indices]
        if self.data.task.pairs is not None and self.label_index is not None:
            return self.pairs(examples)
        images = self.data.task.images
        inputs = self.data.inputs(self.builder, [e.text for e in examples] * images,
                                  [e.image_ids[k] for k in range(images) for e in examples],
                                  [e.example_id for _ in range(images) for e in examples])
        targets = None
        if self.label_index is not None and self.data.task.dual_encoder:  # ITC: each example's image key
            from vlp_train.finetune.tasks import pair_key
            targets = torch.tensor([pair_key(e.image_ids[0]) for e in examples], dtype=torch.long)
        elif self.label_index is not None:
            rows = [self.data.task.target(e, self.label_index, [self.data.regions.get(k) for k in e.image_ids])
                    for e in examples]
            targets = torch.zeros(len(rows), max(len(r) for r in rows))  # region targets: padded to the batch's
            for i, row in enumerate(rows):
                targets[i, :len(row)] = row[:targets.shape[1]]
            if self.data.task.regions:
                targets = targets[:, :inputs["region_mask"].shape[1]]
        return {"keys": [e.example_id for e in examples], "inputs": inputs, "targets": targets, "bad_samples": 0}

    def pairs(self, examples: list) -> dict:
        """A batch of a pair task's training pairs (retrieval: matched and mismatched caption-image pairs)."""
        pairs = self.data.task.pairs(examples)
        inputs = self.data.inputs(self.builder, [e.text for e, _, _ in pairs], [image for _, image, _ in pairs],
                                  [e.example_id for e, _, _ in pairs])
        targets = torch.zeros(len(pairs), len(self.label_index))
        for i, (_, _, label) in enumerate(pairs):
            targets[i, self.label_index[label]] = 1.0
        return {"keys": [e.example_id for e in examples], "inputs": inputs, "targets": targets, "bad_samples": 0}


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's examples of an epoch, in its order: a permutation drawn from (seed, epoch), split by rank."""
    order = list(range(n))
    random.Random(f"{seed}/finetune/{epoch}").shuffle(order)
    return order[rank::world]


def batch_indices(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """The batches every rank takes in an epoch: the smallest rank's share of the n examples
    (n // world; epoch_order gives the first n % world ranks one more) in batches of batch_size, the
    last one partial. The same number on every rank, so every rank counts the same steps and calls
    the same collectives; a larger share's extra batch is dropped, as pre-training's loader stops
    every rank when the first runs out (data.CorpusStream.epoch_batches, distributed.synchronised)."""
    return -(-(n // world) // batch_size)


def loader(data: SplitData, collate: Collate, batches: list[list[int]], start_batch: int, num_workers: int,
           seed: int, pin_memory: bool = False):
    """Batches from `start_batch` on, each with its "index" in the epoch."""
    def numbered(positions):
        batch = collate([i for p in positions for i in batches[p]])
        return {**batch, "index": positions[0]}

    chunks = [[p] for p in range(start_batch, len(batches))]
    return torch.utils.data.DataLoader(chunks, batch_size=None, collate_fn=numbered, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))

