"""Regions of a downstream dataset's images: detections the pipeline reads (`vlp-data detect`
Parquet, JSON Lines; each record checked by the pipeline's own validator), loaded for the images
a job needs. Dataset image keys are matched to the detections' image_id values by the one rule of
`formats.images.match_images` (images without detections reported with examples; none matching
stops the job, showing ids from both sides)."""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Regions:
    """One image's regions, as the trainer's BatchBuilder reads a sample."""
    width: int
    height: int
    boxes: list[list[float]]
    tags: list[str]
    feats: np.ndarray  # float16 [regions, dim]

    def sample(self) -> dict:
        return {"meta": {"width": self.width, "height": self.height, "boxes": self.boxes, "tags": self.tags},
                "feats": self.feats}


def detection_files(pattern: str) -> list[str]:
    files = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found and os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.parquet")) + glob.glob(os.path.join(part, "*.jsonl*")))
        files += found
    if not files:
        raise FileNotFoundError(f"--detections {pattern!r}: no file matches")
    other = [f for f in files if not f.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json"))]
    if other:  # VinVL's TSV files are joined across files (labels, features, sizes): convert them once
        raise ValueError(f"--detections {other[0]}: fine-tuning reads the Parquet (or JSON Lines) detections "
                         "`vlp-data detect` writes; convert other layouts (VinVL / Oscar TSV) once with "
                         f"`vlp-data convert-detections --detections '{pattern}' --output DIR` and give "
                         "--detections 'DIR/detections/*.parquet'")
    return files


class DetectionIndex:
    """image_id -> where it is, for every detection in the files (ids read, features not yet); and
    the regions load_regions has read, so a run reads each detection once, whatever split asks."""

    def __init__(self, pattern: str):
        self.files = detection_files(pattern)
        self.where: dict[str, tuple[str, int]] = {}
        self.loaded: dict[str, Regions] = {}   # image_id -> its regions, as load_regions read them
        self.read: set[str] = set()            # image_ids read (a bad record's too: not read again)
        self.loaded_max_regions: int | None = None
        for path in self.files:
            for row, image_id in enumerate(_ids_of(path)):
                if image_id in self.where:
                    log.warning("detections: image_id %s again in %s (kept the first, %s)", image_id, path,
                                self.where[image_id][0])
                    continue
                self.where[image_id] = (path, row)


def _ids_of(path: str) -> list[str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return [str(v) for v in pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()]
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds on a bad file
            raise ValueError(f"--detections {path}: not a readable detections Parquet file ({err})") from err
    ids = []
    for _, record in _jsonl_records(path):
        ids.append(str(record.get("image_id")) if isinstance(record, dict) else "")
    return ids


def _jsonl_records(path: str):
    from pipelines.files import decode_line, read_lines
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(decode_line(line, line_no))
        except ValueError as err:
            log.warning("detections %s:%d: malformed JSON (%s): skipped", path, line_no, err)
            yield f"{path}:{line_no}", None


def load_regions(index: DetectionIndex, wanted: set[str], max_regions: int) -> dict[str, Regions]:
    """The regions of the detection ids in `wanted`, each record checked by the pipeline's
    validator (pipelines.readers.detection_record.validate_detection), put in the corpus's region
    order and capped at `max_regions`; a bad record is logged with its file and row and left out (its images are then
    reported missing). Detections read before (through the same index) are not read again."""
    from pipelines.readers.detection_record import keep_top_regions, validate_detection

    if index.loaded_max_regions != max_regions:
        index.loaded, index.read, index.loaded_max_regions = {}, set(), max_regions
    by_file: dict[str, set[int]] = {}
    for image_id in wanted - index.read:
        path, row = index.where[image_id]
        by_file.setdefault(path, set()).add(row)
    index.read |= wanted
    regions = index.loaded
    for path, rows in sorted(by_file.items()):
        for where, record in _records(path, rows):
            try:
                detection = validate_detection(record)
            except (ValueError, TypeError) as err:
                log.warning("detections %s: %s: skipped", where, err)
                continue
            if detection["features"] is None:
                log.warning("detections %s: no region features (the model needs them): skipped", where)
                continue
            detection, _ = keep_top_regions(detection, max_regions)
            if not detection["boxes"]:
                log.warning("detections %s: no regions: skipped", where)
                continue
            regions[detection["image_id"]] = Regions(detection["width"], detection["height"], detection["boxes"],
                                                     detection["labels"], detection["features"].astype(np.float16))
    return {image_id: regions[image_id] for image_id in wanted if image_id in regions}


def _records(path: str, rows: set[int]):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        from pipelines.readers.jsonl_parquet import detections_columns
        parquet = pq.ParquetFile(path)
        columns = detections_columns(parquet.schema_arrow)
        row = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            picked = [i for i in range(batch.num_rows) if row + i in rows]
            if picked:
                for i, record in zip(picked, batch.take(picked).to_pylist()):
                    yield f"{path}:row {row + i}", record
            row += batch.num_rows
        return
    for row, (where, record) in enumerate(_jsonl_records(path)):
        if row in rows:
            yield where, record
