"""Image keys: how each dataset's image ids map to the detections' `image_id` (the one place).

A dataset image key is the image's path in the dataset's public layout, without its extension:

=================  ===============================================  ====================================
dataset            from                                             key
=================  ===============================================  ====================================
COCO (VQA v2,      integer image id + subset (train2014, val2014,   'train2014/COCO_train2014_000000000009'
RefCOCO+, Karpathy test2015)                                         (`coco_key`; `coco_id` parses it back)
COCO)
Flickr30K          file name '1000092795.jpg' (SNLI-VE Flikr30kID,   'flickr30k-images/1000092795'
(SNLI-VE, Karpathy Karpathy filename; a bare id is taken too)        (`flickr30k_key`)
Flickr30K)
NLVR2              identifier '{split}-{set}-{pair}-{sentence}'      '{split}-{set}-{pair}-img0' / '-img1'
                                                                     (`nlvr2_keys`; no folder: train's
                                                                     images/train/{directory}/ varies)
easy-VQA           split + integer id                               'train/images/0' (`easy_vqa_key`)
=================  ===============================================  ====================================

The detections' `image_id` is what `vlp-data detect` wrote: the image's path relative to the
folder its --images pattern starts from, with extension (pipelines/images.py), e.g.
'COCO_train2014_000000000009.jpg' for --images 'coco/train2014/*.jpg' or
'train2014/COCO_train2014_000000000009.jpg' for --images 'coco/*/*.jpg'; VinVL TSVs of COCO key
images by the bare integer id ('9'). So `match_images` matches, with extensions dropped, when one
of the two paths is the other's trailing part on '/' boundaries ('train2014/COCO_..._09' and
'COCO_..._09', 'images/train/51/train-1-0-img0' and 'train-1-0-img0'); the longest common
trailing part wins, and a tie is ambiguous (reported, not guessed). A COCO key also matches a
detection id that is its bare integer id. NLVR2 images named '.png' that are JPEGs inside are
decoded by content by the detector; only their names matter here.
"""
from __future__ import annotations

import logging
import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from vlp_train.finetune.formats.common import FormatError

COCO_SUBSETS = ("train2014", "val2014", "test2014", "test2015")
_COCO_NAME = re.compile(r"^COCO_(train2014|val2014|test2014|test2015)_(\d{12})$")
_NLVR2_IDENTIFIER = re.compile(r"^([A-Za-z0-9]+)-(\d+)-(\d+)-(\d+)$")
EXAMPLES_SHOWN = 5

log = logging.getLogger(__name__)


# ---- one function per dataset: dataset ids -> keys ------------------------------------------------

def coco_key(image_id: int, subset: str) -> str:
    """COCO integer id + subset -> 'train2014/COCO_train2014_000000000009' (the 2014/2015 layout)."""
    if subset not in COCO_SUBSETS:
        raise ValueError(f"COCO subset {subset!r} is not one of {', '.join(COCO_SUBSETS)}")
    if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
        raise ValueError(f"COCO image id must be a non-negative integer, got {image_id!r}")
    return f"{subset}/COCO_{subset}_{image_id:012d}"


def coco_id(key_or_name: str) -> int:
    """Back from a COCO key, file name or path ('…/COCO_val2014_000000000042.jpg') to 42."""
    match = _COCO_NAME.match(_stem(key_or_name))
    if not match:
        raise ValueError(f"{key_or_name!r} is not a COCO image name (COCO_<subset>_<12 digits>)")
    return int(match.group(2))


def flickr30k_key(filename: str | int) -> str:
    """Flickr30K file name '1000092795.jpg' (or the bare id) -> 'flickr30k-images/1000092795'."""
    name = str(filename).strip()
    stem = name[:-4] if name.lower().endswith(".jpg") else name
    if not stem or "/" in stem:
        raise ValueError(f"{filename!r} is not a Flickr30K image file name")
    return f"flickr30k-images/{stem}"


def nlvr2_keys(identifier: str) -> tuple[str, str]:
    """'dev-850-0-0' ({split}-{set}-{pair}-{sentence}) -> ('dev-850-0-img0', 'dev-850-0-img1')."""
    match = _NLVR2_IDENTIFIER.match(identifier)
    if not match:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not '{{split}}-{{set}}-{{pair}}-{{sentence}}'")
    pair = "-".join(match.group(1, 2, 3))
    return f"{pair}-img0", f"{pair}-img1"


def easy_vqa_key(split: str, image_id: int) -> str:
    """easy-VQA split + integer id -> 'train/images/0' (ids restart at 0 in each split)."""
    return f"{split}/images/{int(image_id)}"


# ---- matching keys to detections ------------------------------------------------------------------

class NoImagesMatched(FormatError):
    """Not one dataset image has detections: the ids follow different conventions."""


@dataclass(frozen=True)
class ImageMatch:
    """dataset key -> detection image_id, and the dataset keys left without detections."""
    detection_of: dict[str, str]
    missing: tuple[str, ...]
    ambiguous: tuple[tuple[str, tuple[str, ...]], ...]
    total: int

    def report(self, noun: str = "detection") -> str:
        """One line for the log: how many images have a `noun` (a detection, an image file), and
        examples of those without one or with more than one."""
        line = f"{len(self.detection_of)} of {self.total} images have {noun}s"
        if self.missing:
            line += (f"; {len(self.missing)} have none (e.g. {', '.join(self.missing[:EXAMPLES_SHOWN])})")
        if self.ambiguous:
            key, ids = self.ambiguous[0]
            line += f"; {len(self.ambiguous)} match more than one {noun} equally (e.g. {key}: {', '.join(ids)})"
        return line


def _stem(path: str) -> str:
    base = posixpath.basename(path)
    root, ext = posixpath.splitext(base)
    return root if ext and len(ext) <= 5 else base


def _parts(path: str) -> tuple[str, ...]:
    """'a/b/x.jpg' -> ('a', 'b', 'x'): components with the last one's extension dropped."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        return ()
    parts[-1] = _stem(parts[-1])
    return tuple(parts)


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def match_images(dataset_keys: Iterable[str], detection_ids: Iterable[str],
                 other: str = "detections' image_id values",
                 hint: str = "run detection over the dataset's own image files") -> ImageMatch:
    """Map each dataset key onto one detection image_id (rule in the module docstring).

    Raises NoImagesMatched, showing a few ids from each side, when none match. `other` names what the
    ids are (the detections', or an images folder's files) and `hint` what to do, in that message."""
    keys = list(dict.fromkeys(dataset_keys))
    by_stem: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    detection_list = list(dict.fromkeys(detection_ids))
    for det in detection_list:
        parts = _parts(str(det))
        if parts:
            by_stem[parts[-1]].append((det, parts))
    detection_of, missing, ambiguous = {}, [], []
    for key in keys:
        parts = _parts(key)
        candidates = list(by_stem.get(parts[-1], ())) if parts else []
        coco = _COCO_NAME.match(parts[-1]) if parts else None
        if coco:  # VinVL-style integer ids
            candidates += by_stem.get(str(int(coco.group(2))), ())
        best, best_len = [], 0
        for det, det_parts in candidates:
            tail = _common_tail(parts, det_parts)
            whole = tail == min(len(parts), len(det_parts))  # one is the other's trailing part
            if coco and det_parts == (str(int(coco.group(2))),):
                whole, tail = True, 1
            if not whole:
                continue
            if tail > best_len:
                best, best_len = [det], tail
            elif tail == best_len:
                best.append(det)
        if len(best) == 1:
            detection_of[key] = best[0]
        elif best:
            ambiguous.append((key, tuple(best)))
        else:
            missing.append(key)
    if keys and not detection_of:
        raise NoImagesMatched(
            f"none of the dataset's {len(keys)} images matches any of the {len(detection_list)} {other}. "
            f"Dataset image keys, e.g.: {', '.join(keys[:EXAMPLES_SHOWN])}; "
            f"{other}, e.g.: {', '.join(map(str, detection_list[:EXAMPLES_SHOWN])) or '(none)'}. "
            "A key matches an id when one path (extension dropped) ends with the other "
            f"(see vlp_train/finetune/formats/images.py); {hint}.")
    return ImageMatch(detection_of, tuple(missing), tuple(ambiguous), len(keys))


def match_reported(dataset_keys: Iterable[str], ids: Iterable[str], what: str, noun: str = "detection",
                   **naming) -> dict[str, str]:
    """`match_images` for a job's split `what`: dataset key -> id, the images without one (or with
    more than one) reported in the log as a `noun`'s (their examples are left out); `naming`: its
    `other` and `hint`."""
    found = match_images(dataset_keys, ids, **naming)
    if found.missing or found.ambiguous:
        log.warning("%s: %s; their examples are left out", what, found.report(noun))
    return found.detection_of
