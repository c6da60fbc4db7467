"""One detection record: validation (fields, finite numbers, boxes fitted to the image, features
within float16), the corpus's region order and the --max-regions cap. Every detections reader,
the detector and `vlp-train finetune --detections` use these."""
from __future__ import annotations

import math

import numpy as np

from pipelines.deadletter import Rejected
from schemas.corpus import normalise_label


def _is_finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # JSON allows integers of any length; past a float's range they are not numbers we keep
        return False


def _number(value, field: str, integer: bool = False):
    # numpy scalars count: a box given as an np.ndarray holds np.float32, not float.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not _is_finite(value):
        raise Rejected(f"field '{_base(field)}' must be a finite number", f"{field} = {value!r:.60}")
    if integer and int(value) != value:
        raise Rejected(f"field '{_base(field)}' must be an integer", f"{field} = {value!r:.60}")
    return int(value) if integer else float(value)


def _sequence(value, field: str) -> list:
    """A list from a list, tuple or array. A string is rejected: list("cat") would pass as three labels."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return list(value)
    raise Rejected(f"field '{_base(field)}' must be a list", f"{field} is {type(value).__name__} {value!r:.60}")


def _base(field: str) -> str:
    """'boxes[3]' -> 'boxes': a reason class names the field, its detail the element."""
    return field.split("[", 1)[0]


def _features_array(features, regions: int) -> np.ndarray:
    _sequence(features, "features")
    try:
        features = np.asarray(features, dtype=np.float32)
    except (ValueError, TypeError) as err:  # ragged rows, strings
        raise Rejected("field 'features' must be a [regions, dim] array of numbers", str(err)) from err
    if features.ndim != 2 or features.shape[0] != regions:
        raise Rejected("features must be [regions, dim], a row per region", f"{regions} regions, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise Rejected("features contain NaN or infinity")
    too_large = np.abs(features) > FLOAT16_MAX
    if too_large.any():
        region, column = (int(i) for i in np.argwhere(too_large)[0])
        raise Rejected("features beyond the float16 range the shards store",
                       f"features[{region}][{column}] = {float(features[region, column]):.6g} (|x| must be at most "
                       f"{FLOAT16_MAX:g})")
    return features


# Boxes against their image: detectors round and pad, so a corner a little outside the image is
# clipped to it (and counted); one further out, or a box with no area, is nonsense that would
# poison every loss (a coordinate of 1e30), so the record is dead-lettered naming the box.
BOX_TOLERANCE = 0.05  # how far past an edge a corner may be, as a fraction of the image's side
BOXES_CLIPPED = "boxes_clipped"  # a validated detection's count of clipped boxes, for stats.json
FLOAT16_MAX = float(np.finfo(np.float16).max)  # shards store region features as float16
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the schemas store scores as float32
INT32_MAX = 2**31 - 1  # the schemas store width and height as int32


def fit_boxes_to_image(boxes: list[list[float]], width: int, height: int) -> tuple[list[list[float]], int]:
    """(boxes clipped to the image, how many were clipped), or ValueError naming the first box
    that is further than BOX_TOLERANCE outside the image or has no area inside it."""
    fitted, clipped = [], 0
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = box
        slack_x, slack_y = BOX_TOLERANCE * width, BOX_TOLERANCE * height
        if not (-slack_x <= x1 <= width + slack_x and -slack_x <= x2 <= width + slack_x
                and -slack_y <= y1 <= height + slack_y and -slack_y <= y2 <= height + slack_y):
            raise Rejected("box outside the image", f"boxes[{i}] = {box} for a {width}x{height} image "
                                                    f"(more than {BOX_TOLERANCE:.0%} of a side past an edge)")
        inside = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                  min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        if not (inside[2] > inside[0] and inside[3] > inside[1]):
            raise Rejected("box without area", f"boxes[{i}] = {box} (x2 > x1 and y2 > y1 inside the "
                                               f"{width}x{height} image are needed)")
        clipped += inside != box
        fitted.append(inside)
    return fitted, clipped


def validate_detection(record) -> dict:
    """A clean detection dict from a raw record, or ValueError naming the field that is wrong."""
    if not isinstance(record, dict):
        raise Rejected("expected a JSON object", f"got {type(record).__name__}")
    for field in ("image_id", "width", "height", "boxes", "labels", "scores"):
        if field not in record or record[field] is None:
            raise Rejected(f"missing field '{field}'")
    image_id = record["image_id"]
    if not isinstance(image_id, str) or not image_id.strip():
        raise Rejected("field 'image_id' must be a non-empty string", f"got {image_id!r:.60}")
    width = _number(record["width"], "width", integer=True)
    height = _number(record["height"], "height", integer=True)
    if not (0 < width <= INT32_MAX and 0 < height <= INT32_MAX):
        raise Rejected("width/height must be positive int32 values", f"got {width}x{height}")
    boxes, labels, scores = (_sequence(record[f], f) for f in ("boxes", "labels", "scores"))
    if not (len(boxes) == len(labels) == len(scores)):
        raise Rejected("boxes/labels/scores lengths differ", f"{len(boxes)}/{len(labels)}/{len(scores)}")
    clean_boxes = []
    for i, box in enumerate(boxes):
        box = _sequence(box, f"boxes[{i}]")
        if len(box) != 4:
            raise Rejected("a box must be [x1, y1, x2, y2]", f"boxes[{i}] = {box!r:.80}")
        clean_boxes.append([_number(v, f"boxes[{i}]") for v in box])
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise Rejected("a label must be a non-empty string", f"labels[{i}] = {label!r:.60}")
    clean_scores = [_number(s, f"scores[{i}]") for i, s in enumerate(scores)]
    for i, score in enumerate(clean_scores):
        if abs(score) > FLOAT32_MAX:
            raise Rejected("field 'scores' is beyond the float32 range the tables store", f"scores[{i}] = {score!r}")
    fitted_boxes, clipped = fit_boxes_to_image(clean_boxes, width, height)
    features = record.get("features")
    if features is not None:
        features = _features_array(features, len(boxes))
    return {"image_id": image_id, "width": width, "height": height, "boxes": fitted_boxes,
            "labels": [normalise_label(label) for label in labels], "scores": clean_scores, "features": features,
            BOXES_CLIPPED: clipped}


def region_order(scores, labels, boxes) -> list[int]:
    """Region indices in the corpus's order: highest score first, ties by label, then by box. The
    detector orders its regions so, and precomputed detections are put so (`keep_top_regions`):
    the trainer keeps the first `max_regions`."""
    return sorted(range(len(scores)), key=lambda j: (-float(scores[j]), labels[j], tuple(boxes[j])))


def keep_top_regions(detection: dict, max_regions: int) -> tuple[dict, int]:
    """(the detection with its regions in `region_order`, at most `max_regions` of them, features
    alike; how many regions were dropped)."""
    order = region_order(detection["scores"], detection["labels"], detection["boxes"])
    kept = order[:max_regions]
    features = detection.get("features")
    return ({**detection, "boxes": [detection["boxes"][j] for j in kept],
             "labels": [detection["labels"][j] for j in kept], "scores": [detection["scores"][j] for j in kept],
             "features": None if features is None else features[kept]},
            len(order) - len(kept))
