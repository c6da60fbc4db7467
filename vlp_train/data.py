"""The streaming loader: shard list -> shuffle shards (per epoch) -> split by node -> split by
worker -> read tars (webdataset) -> sample shuffle buffer -> batches -> decode -> pick one of the
K sentences -> tokenize -> masks -> padded tensors.

Exact epochs: each rank reads its shards once per epoch; resampled: shards drawn with
replacement. Everything random is seeded from (seed, epoch, rank, batch index), so the loader
position (epoch, batches consumed) is enough to resume exactly: workers fast-forward through the
consumed batches without decoding them. Bad samples are logged, counted and skipped.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from schemas import SchemaError, check_sample_types, validate_sample
from schemas.corpus import IMAGE_MEMBER, META_MEMBER, check_published, decode_members, image_member, normalise_label
from vlp_train.masking import BatchBuilder
from vlp_train.objectives import FEATURE_TARGET_TASKS
from vlp_train.tasks import TASKS, Task
from vlp_train.visual import load_pixels

log = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    """A shard read through a URL or a command (https://, pipe:gsutil cat gs://...), not a local path."""
    return "://" in url or url.startswith("pipe:")


def corpus_folder(shard: str) -> str | None:
    """The corpus folder a local shard was published in (the folder above its shards/ folder, where
    the pipeline also writes manifest.parquet, tag_vocab.json and sentences/); None for a remote shard."""
    return None if is_remote(shard) else os.path.dirname(os.path.dirname(os.path.abspath(shard)))


def expand_shards(spec: str) -> list[str]:
    """Comma list of globs / brace patterns ('corpus-{000000..000009}.tar') / URLs."""
    urls = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if is_remote(part) or "{" in part:
            urls += wds.shardlists.expand_urls(part)
        else:
            matched = sorted(glob.glob(os.path.expanduser(part)))
            if not matched and os.path.isdir(part):
                matched = sorted(glob.glob(os.path.join(part, "*.tar")))
            urls += matched
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


def check_corpora_published(urls: list[str]) -> None:
    """Refuse shards of a corpus folder that a build is publishing into, or was killed publishing
    into (its shards and manifest may be of two runs): the folder above each local shards/ folder."""
    for corpus in sorted({corpus_folder(u) for u in urls} - {None}):  # a remote shard has none
        check_published(corpus)


def samples_per_shard(urls: list[str], manifest: str | None = None) -> dict[str, int]:
    """Samples in each shard: local ones from their tar member names (nothing decoded); remote
    ones (https://, pipe:gsutil cat gs://...) from the corpus manifest (`manifest.parquet`,
    written with the shards), matched by file name. {} when a remote shard has no count."""
    counts, remote = {}, any(is_remote(u) for u in urls)
    if remote and not manifest:
        return {}
    listed = manifest_counts(manifest) if remote else {}
    for url in urls:
        if is_remote(url):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if name not in listed:
                raise ValueError(f"data.manifest {manifest} lists no shard named {name} (from {url})")
            counts[url] = listed[name]
            continue
        counts[url] = count_samples(url)
    if counts and not any(counts.values()):
        raise no_readable_sample(urls)
    return counts


def no_readable_sample(urls: list[str]) -> ValueError:
    return ValueError(f"none of the {len(urls)} shard(s) holds a readable sample ({urls[0]}, ...): see the "
                      "warnings above for each shard")


def count_samples(path: str) -> int:
    """The samples in a local shard (its .json members), up to where it can be read: a shard cut
    short counts what precedes the cut, one that cannot be opened counts 0; both are named in a
    warning (training skips them alike). A tar cut between members reads as a shorter archive,
    without an error: its missing end-of-archive blocks (two zero blocks) give it away."""
    import tarfile
    count = 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                count += member.name.endswith("." + META_MEMBER)
            end = tar.offset  # where the end-of-archive blocks must stand
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                log.warning("shard %s is cut short after %d sample(s): the rest of it is lost", path, count)
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("shard %s cannot be read %s: %s", path, f"past sample {count}" if count else "at all", err)
    return count


def manifest_counts(path: str) -> dict[str, int]:
    """shard file name -> samples, from a corpus manifest.parquet."""
    from schemas import MANIFEST, read_table
    table = read_table(path, MANIFEST)
    return {shard.rsplit("/", 1)[-1]: samples
            for shard, samples in zip(table.column("shard").to_pylist(), table.column("samples").to_pylist())}


def load_tag_vocab(path: str | None, urls: list[str]) -> list[str]:
    """tags from tag_vocab.json (given, or beside the shards folder), else one scan of the shards;
    normalised as the corpus compares labels (schemas.corpus.normalise_label), each once."""
    folder = None if path or not urls else corpus_folder(urls[0])
    candidate = path or (os.path.join(folder, "tag_vocab.json") if folder else None)
    if candidate and os.path.isfile(candidate):
        with open(candidate, encoding="utf-8") as f:
            return list(dict.fromkeys(map(normalise_label, json.load(f)["tags"])))
    if path:
        raise FileNotFoundError(f"data.tag_vocab {path} does not exist")
    log.warning("no tag_vocab.json beside the shards: building the tag vocabulary by scanning %d shard(s)", len(urls))
    tags = set()
    for raw in every_sample(urls):
        try:
            tags.update(map(normalise_label, json.loads(raw[META_MEMBER])["tags"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # skipped, as training skips it
            log.warning("tag scan: skipping bad sample %s: %r", raw.get("__key__", "?"), err)
    return sorted(tags)


def every_sample(urls: list[str]):
    """Every raw sample of every shard, unsplit: each rank must read the same here (the tag
    vocabulary, the feature size). A plain `wds.WebDataset` refuses to run under
    torch.distributed without a node splitter; the tar reader underneath it has none."""
    return wds.tariterators.tarfile_samples(({"url": url} for url in urls), handler=wds.warn_and_continue)


BAD_SAMPLE = (ValueError, SchemaError, KeyError, TypeError)


def reads_region_features(visual: str, tasks) -> bool:
    """Whether a run reads its samples' region features: its model sees regions (model.visual
    regions or both), or one of its tasks regresses them (`objectives.FEATURE_TARGET_TASKS`). A
    patch model without either leaves each sample's features member undecoded."""
    return visual != "patches" or any(t in FEATURE_TARGET_TASKS for t in tasks)


def _parse(raw: dict, features: bool = True) -> dict:
    meta, feats = decode_members(raw, features)  # feats float16, as stored; None when not read
    return {"key": raw["__key__"], "meta": meta, "feats": feats, "image": image_member(raw),
            "where": f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"}


def _checked(parsed: dict, types_checked: bool) -> dict:
    validate_sample(parsed["meta"], parsed["feats"], where=parsed["where"], types_checked=types_checked)
    if not parsed["meta"]["sentences"]:
        raise ValueError(f"{parsed['where']}: no sentences")
    if parsed["feats"] is None:  # not read: zero-width features, one row a region (the views' shapes hold)
        parsed = {**parsed, "feats": np.zeros((len(parsed["meta"]["boxes"]), 0), np.float16)}
    return {k: parsed[k] for k in ("key", "meta", "feats", "image")}


def missing_images(where: str, visual: str) -> ValueError:
    return ValueError(f"{where}: no image ({{key}}.{IMAGE_MEMBER} member), but model.visual={visual} trains on the "
                      "images' pixels: build the corpus with `vlp-data build-retrieval --store-images`, or train "
                      "with model.visual=regions")


def with_pixels(sample: dict, where: str, image_size: int, visual: str = "patches") -> dict:
    """The sample with its image decoded and resized to the model's square (`visual.load_pixels`),
    in place of the encoded bytes. ValueError naming the sample when it has none or it is damaged."""
    if sample["image"] is None:
        raise missing_images(where, visual)
    try:
        pixels = load_pixels(sample["image"], image_size)
    except ValueError as err:
        raise ValueError(f"{where}: {IMAGE_MEMBER} member: {err}") from err
    return {**{k: v for k, v in sample.items() if k != "image"}, "pixels": pixels}


def decode(raw: dict) -> dict:
    """A raw webdataset sample -> {key, meta, feats}; SchemaError / ValueError when bad."""
    return _checked(_parse(raw), types_checked=False)


def decode_batch(raws: list[dict], feature_dim: int | None = None, image_size: int | None = None,
                 region_features: bool = True) -> tuple[list[dict], list[str]]:
    """What `decode` gives for each good raw sample (in order), and the errors of the bad ones. The
    schema's type check runs once over the batch; only a batch that fails it is checked again
    sample by sample, to keep the good samples and name the bad ones. `feature_dim`: the model's
    region feature size; a sample of another (shards of two corpora given together) is a bad one.
    `image_size`: the model takes pixels: each sample's image decoded to that square (`pixels`);
    one without an image or with a damaged one is a bad one. `region_features` False: the run
    reads none (`reads_region_features`): the features member is not decoded, and each sample's
    `feats` is zero-width [regions, 0]."""
    parsed, errors = [], []
    for raw in raws:
        try:
            parsed.append(_parse(raw, region_features))
        except BAD_SAMPLE as err:
            errors.append(str(err))
    metas = [p["meta"] for p in parsed]
    try:
        types_checked = all(isinstance(m, dict) for m in metas)
        if types_checked:
            check_sample_types(metas)
    except SchemaError:
        types_checked = False
    decoded = []
    for p in parsed:
        try:
            decoded.append(_checked(p, types_checked))
        except BAD_SAMPLE as err:  # the checks name the sample; an error of Python's own does not
            errors.append(str(err) if str(err).startswith(p["where"]) else f"{p['where']}: {type(err).__name__}: {err}")
            continue
        width = decoded[-1]["feats"].shape[1]
        if feature_dim and region_features and width != feature_dim:
            decoded.pop()
            errors.append(f"{p['where']}: region features of width {width}, but the model takes {feature_dim}")
        elif image_size:
            try:
                decoded[-1] = with_pixels(decoded[-1], p["where"], image_size)
            except ValueError as err:
                decoded.pop()
                errors.append(str(err))
    return decoded, errors


def batch_rng(seed: int, epoch: int, rank: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{rank}/{index}")


class CorpusStream(IterableDataset):
    """Yields ready batches ({task: view}, plus keys and the batch index) for one epoch."""

    def __init__(self, urls, builder: BatchBuilder, batch_size: int, tasks: list[str], schedule: str,
                 shuffle_buffer: int, seed: int, resampled: bool = False, rank: int = 0, world: int = 1):
        self.urls, self.builder, self.batch_size = list(urls), builder, batch_size
        self.tasks, self.schedule = tasks, schedule
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        self.rank, self.world = rank, world
        self.epoch, self.start_batch, self.max_batches, self.task_offset = 0, 0, None, 0

    def set_position(self, epoch: int, start_batch: int = 0, max_batches: int | None = None, task_offset: int = 0):
        """`task_offset`: batches of earlier epochs, so round-robin continues across epochs."""
        self.epoch, self.start_batch, self.max_batches, self.task_offset = epoch, start_batch, max_batches, task_offset

    def tasks_of(self, index: int) -> list[str]:
        if self.schedule == "mixed":
            return self.tasks
        if self.schedule != "round_robin":
            raise ValueError(f"objectives.schedule {self.schedule!r}: round_robin or mixed")
        return [self.tasks[(self.task_offset + index) % len(self.tasks)]]

    def _shard_order(self, epoch: int) -> list[str]:
        shards = self.urls[:]
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(shards)
        return shards

    def _split(self, shards: list[str], rank: int, worker: int, workers: int) -> list[str]:
        # split_by_node, then split_by_worker (explicit, so the split is part of the position)
        return shards[rank::self.world][worker::workers]

    def _shards(self, worker: int, workers: int):
        if self.resampled:  # with replacement, forever; each (rank, worker) its own stream
            own = random.Random(f"{self.seed}/resample/{self.epoch}/{self.rank}/{worker}")
            while True:
                yield {"url": own.choice(self.urls)}
        for url in self._split(self._shard_order(self.epoch), self.rank, worker, workers):
            yield {"url": url}

    def epoch_batches(self, epoch: int, shard_samples: dict[str, int], workers: int) -> int:
        """The batches of `epoch` that training takes: each loader worker ends its shards with a
        partial batch of its own, and under DDP every rank stops when the first runs out (so the
        fewest over the ranks). Exact for a corpus without bad samples."""
        order = self._shard_order(epoch)

        def rank_batches(rank: int) -> int:
            return sum(-(-sum(shard_samples[url] for url in self._split(order, rank, worker, workers))
                         // self.batch_size) for worker in range(workers))
        return min(rank_batches(rank) for rank in range(self.world))

    def _unreadable(self, exn: Exception) -> bool:
        """webdataset's handler for a shard (or a part of it) that cannot be read: logged with the
        shard's name (webdataset adds it to the error), counted with the bad samples, skipped."""
        log.warning("skipping an unreadable shard or part of one: %s", exn)
        self._unreadable_parts += 1
        return True

    def _records(self, worker: int, workers: int):
        """This (rank, worker)'s raw samples, in shard order (text_corpus.TextStream reads Parquet instead)."""
        return wds.tariterators.tarfile_samples(self._shards(worker, workers), handler=self._unreadable)

    def _decode(self, raws: list[dict]) -> tuple[list[dict], list[str]]:
        return decode_batch(raws, self.builder.feature_dim, self.builder.image_size, self.builder.region_features)

    def _samples(self, worker: int, workers: int):
        stream = self._records(worker, workers)
        rng = random.Random(f"{self.seed}/buffer/{self.epoch}/{self.rank}/{worker}")
        buffer = []
        for sample in stream:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self):
        """Batches, each held back until the next is made, so the bad samples met after the last
        one (a shard whose end is damaged) are counted with it instead of lost."""
        held = None
        for batch in self._batches():
            if held is not None:
                yield held
            held = batch
        if held is not None:
            held["bad_samples"] += self._bad_left + self._unreadable_parts
            yield held

    def _batches(self):
        info = get_worker_info()
        workers, loader_id = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batches round-robin from its workers, starting at worker 0; after
        # resuming at batch b, worker i plays logical worker (i + b) % W so the order continues.
        worker = (loader_id + self.start_batch) % workers
        index = worker  # global batch index of this worker's k-th batch: k * W + worker
        pending, bad = [], 0
        self._unreadable_parts = self._bad_left = 0
        samples = self._samples(worker, workers)
        while True:
            raw = next(samples, None)
            if raw is not None:
                pending.append(raw)
                if len(pending) < self.batch_size:
                    continue
            if not pending:
                return
            batch_raw, pending = pending, []  # a full batch, or the epoch's last partial one
            if self.max_batches is not None and index >= self.max_batches:
                return
            if index >= self.start_batch:
                decoded, errors = self._decode(batch_raw)
                for error in errors:
                    log.warning("skipping bad sample: %s", error)
                bad += len(errors) + self._unreadable_parts
                self._unreadable_parts = 0
                if decoded:
                    rng = batch_rng(self.seed, self.epoch, self.rank, index)
                    views = self.builder.build(decoded, self.tasks_of(index), rng)
                    yield {"index": index, "keys": [d["key"] for d in decoded], "bad_samples": bad, "views": views}
                    bad = 0
                self._bad_left = bad  # not yet handed over with a batch
            index += workers
            if raw is None:
                return


def make_loader(dataset: CorpusStream, num_workers: int, pin_memory: bool):
    # Its own generator: a DataLoader draws a base seed whenever it is iterated, and drawing it
    # from the global RNG would shift dropout after a resume (batches are seeded by position anyway).
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                       generator=torch.Generator().manual_seed(dataset.seed))


def enabled_tasks(objectives, stage: str = "vl") -> list[Task]:
    """The tasks a run trains: VLMo's vision and language stages (model.stage) one each, else the
    objectives switched on."""
    if stage == "vision":
        return [Task.IMAGE_ONLY]
    if stage == "language":
        return [Task.TEXT_ONLY]
    flags = {Task.REGION_TAG: objectives.region_tag, Task.REGION_PHRASE: objectives.region_phrase,
             Task.IMAGE_SENTENCE: objectives.image_sentence, Task.IMAGE_TEXT: objectives.image_text}
    tasks = [t for t in TASKS if flags.get(t)]
    if not tasks:
        raise ValueError("every objective is switched off")
    return tasks
