"""The language stage's text (VLMo, `model.stage=language`): the sentences the pipeline wrote
(OUT/sentences/*.parquet: sentence_id, text; docs/corpus-format.md), the unpaired text μ-VLA has
in abundance, streamed like the shards: a shuffle buffer, batches seeded by position (so a resumed
run sees the same batches), split over ranks and loader workers.

The pipeline writes large Parquet files (500,000 rows each by default), so a small corpus has one
file: the split is by row, not by file. Every (rank, worker) reads every file and keeps the rows
whose index, counted over the whole corpus in file order, falls to it; the file order is shuffled
per epoch."""
from __future__ import annotations

import glob
import logging
import os

from vlp_train.data import CorpusStream, corpus_folder, is_remote

log = logging.getLogger(__name__)

TEXT_FOLDER = "sentences"


def text_corpus_files(spec: str | None, shard_urls: list[str]) -> list[str]:
    """data.text_corpus (a folder, a glob or a comma list of Parquet files), or with None the
    sentences/ folder beside the shards' folder."""
    if spec is None:
        local = [u for u in shard_urls if not is_remote(u)]
        if not local:
            raise ValueError("model.stage=language with remote shards: give data.text_corpus=PATH (a local folder of "
                             "sentences-*.parquet)")
        spec = os.path.join(corpus_folder(local[0]), TEXT_FOLDER)
    files = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if is_remote(part):
            raise ValueError(f"data.text_corpus={part}: a local folder or files are read here, not a URL")
        part = os.path.expanduser(part)
        files += sorted(glob.glob(os.path.join(part, "*.parquet"))) if os.path.isdir(part) else sorted(glob.glob(part))
    if not files:
        raise FileNotFoundError(f"the language stage's text: no Parquet files in {spec} (the corpus's sentences/ "
                                "folder, written by the pipeline; or give data.text_corpus)")
    return files


def rows_per_file(files: list[str]) -> dict[str, int]:
    """Rows of each Parquet file, from its footer (nothing decoded)."""
    import pyarrow.parquet as pq
    counts = {}
    for path in files:
        try:
            counts[path] = pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError) as err:  # pyarrow's errors are both
            raise ValueError(f"{path}: not a readable Parquet file of sentences: {err}") from err
    return counts


class TextStream(CorpusStream):
    """Batches of the language stage ({Task.TEXT_ONLY: view}), positioned and resumed like the shards'."""

    def _share(self, worker: int, workers: int) -> tuple[int, int]:
        """(this stream's slot, the number of slots): rows are dealt round-robin over rank x worker."""
        return self.rank * workers + worker, self.world * workers

    def _records(self, worker: int, workers: int):
        import pyarrow.parquet as pq
        slot, slots = self._share(worker, workers)
        order = self._shard_order(self.epoch)
        if self.resampled:  # drawn with replacement, forever, each (rank, worker) its own
            import random
            own = random.Random(f"{self.seed}/resample/{self.epoch}/{self.rank}/{worker}")
            order = iter(lambda: own.choice(self.urls), None)
            slot, slots = 0, 1
        index = 0
        for path in order:
            try:
                reader = pq.ParquetFile(path)
                for batch in reader.iter_batches(columns=["sentence_id", "text"], batch_size=4096):
                    ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                    for sentence_id, text in zip(ids, texts):
                        if index % slots == slot:
                            yield {"__key__": sentence_id, "__url__": path, "text": text}
                        index += 1
            except (OSError, ValueError, KeyError) as err:
                self._unreadable(ValueError(f"{path}: {err}"))

    def _decode(self, raws: list[dict]) -> tuple[list[dict], list[str]]:
        good, errors = [], []
        for raw in raws:
            text = raw.get("text")
            if not isinstance(text, str) or not text.strip():
                errors.append(f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}: no text")
                continue
            good.append({"key": str(raw["__key__"]), "text": text})
        return good, errors

    def epoch_batches(self, epoch: int, shard_samples: dict[str, int], workers: int) -> int:
        """Each (rank, worker) holds every slots-th row of the corpus and ends with a partial
        batch of its own; every rank stops when the first runs out (so the fewest over the ranks)."""
        total = sum(shard_samples[url] for url in self.urls)
        slots = self.world * workers

        def rank_batches(rank: int) -> int:
            return sum(-(-len(range(rank * workers + w, total, slots)) // self.batch_size) for w in range(workers))
        return min(rank_batches(rank) for rank in range(self.world))
