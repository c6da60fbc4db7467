"""VinVL detections from TSV files, in both layouts (described below), joined per image."""
from __future__ import annotations

import base64
import json
import posixpath

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.deadletter import duplicate_rejection, rejection, rejection_for
from pipelines.files import UnreadableFile, decode_line, open_file, read_lines
from pipelines.readers.detection_record import validate_detection


# VinVL comes in two layouts, read alike (one join per image):
# - scene_graph_benchmark's output: predictions.tsv is
#   `image_id \t {"objects": [{"rect", "class", "conf"}], "image_h", "image_w"}`; features.tsv is
#   `image_id \t num_boxes \t base64(float32[num_boxes, 2054])`.
# - the Oscar/VinVL distribution (the downloadable datasets): X.label.tsv is
#   `image_id \t [{"class", "conf", "rect"}, ...]`; X.feature.tsv is
#   `image_id \t {"num_boxes": n, "features": base64(float32[n, 2054])}`; X.hw.tsv is
#   `image_id \t [{"height": h, "width": w}]` (the image size, which the labels lack); an X.yaml may
#   name the three files (keys label, feature, hw). Given a label file, or the yaml, the other
#   files are read too.
# Features are 2048 visual dims followed by 6 box-geometry dims. The trainer computes its own
# geometry, so we keep the 2048.
VINVL_VISUAL_DIM = 2048
OSCAR_LABELS, OSCAR_FEATURES, OSCAR_HW = ".label.tsv", ".feature.tsv", ".hw.tsv"
OSCAR_YAML_KEYS = {"label": OSCAR_LABELS, "feature": OSCAR_FEATURES, "hw": OSCAR_HW}


def _stem(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def _oscar_kind(path: str) -> str | None:
    """'.label.tsv' / '.feature.tsv' / '.hw.tsv' for a file of the Oscar/VinVL distribution, else None."""
    return next((kind for kind in (OSCAR_LABELS, OSCAR_FEATURES, OSCAR_HW) if _stem(path).endswith(kind)), None)


def _is_vinvl_features(path: str) -> bool:
    kind = _oscar_kind(path)
    return kind == OSCAR_FEATURES if kind else "feature" in posixpath.basename(path)


def _existing(path: str) -> str | None:
    return path if FileSystems.exists(path) else None


def _sibling_features(path: str) -> str | None:
    """The features file beside a predictions.tsv (features.tsv) or an X.label.tsv (X.feature.tsv)."""
    if _oscar_kind(path) == OSCAR_LABELS:
        return _existing(path.replace(OSCAR_LABELS, OSCAR_FEATURES))
    if _oscar_kind(path):
        return None
    base = posixpath.basename(path)
    sibling = posixpath.join(posixpath.dirname(path), base.replace("predictions", "features"))
    return sibling if sibling != path and FileSystems.exists(sibling) else None


def _oscar_yaml_files(path: str) -> list[str]:
    """The label, feature and hw files an Oscar/VinVL X.yaml names (relative to its folder), or
    UnreadableFile when it is not such a yaml."""
    import yaml

    try:
        with open_file(path) as f:
            config = yaml.safe_load(f.read())
    except (OSError, yaml.YAMLError) as err:
        raise UnreadableFile("unreadable yaml", str(err)) from err
    named = {key: config.get(key) for key in OSCAR_YAML_KEYS} if isinstance(config, dict) else {}
    if not named.get("label"):
        raise UnreadableFile("yaml names no VinVL label file", f"expected keys {sorted(OSCAR_YAML_KEYS)}")
    folder = posixpath.dirname(path)
    return [posixpath.join(folder, name) for name in named.values() if isinstance(name, str)]


def _where(line: tuple[str, int]) -> str:
    return f"{line[0]}:{line[1]}"


class ParseVinvlFile(beam.DoFn):
    """A VinVL TSV file (either layout) -> per line (image_id, ((path, line_no), ...)) for the join:
    predictions or labels (record, has_features_file) on the main output, features (float32
    array) on FEATURES, image sizes ((width, height)) on SIZES. The (path, line_no) lets the join
    pick among duplicates the same way in every run."""
    FEATURES = "vinvl_features"
    SIZES = "vinvl_sizes"

    def process(self, path):
        oscar = _oscar_kind(path)
        is_features = _is_vinvl_features(path)
        # A predictions file with a features file beside it promises features for each of its images.
        has_features_file = not is_features and _sibling_features(path) is not None
        try:
            for line_no, line in read_lines(path):
                if not line.strip():
                    continue
                try:
                    cols = decode_line(line, line_no).rstrip("\r\n").split("\t")
                    if oscar == OSCAR_HW:
                        image_id, size = self._oscar_size(cols)
                        yield beam.pvalue.TaggedOutput(self.SIZES, (image_id, ((path, line_no), size)))
                    elif is_features:
                        image_id, feats = self._oscar_features(cols) if oscar else self._features(cols)
                        yield beam.pvalue.TaggedOutput(self.FEATURES, (image_id, ((path, line_no), feats)))
                    else:
                        record = self._oscar_labels(cols) if oscar else self._prediction(cols)
                        yield record["image_id"], ((path, line_no), record, has_features_file)
                except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
                    yield rejection("read_detections", f"{path}:{line_no}", "bad VinVL line",
                                    line[:300].decode("utf-8", "replace"), detail=str(err))
        except UnreadableFile as err:
            yield rejection_for("read_detections", path, err, "unreadable file")

    @staticmethod
    def _prediction(cols):
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        image_id, payload = cols[0], json.loads(cols[1])
        if not isinstance(payload, dict):
            raise ValueError(f"the prediction must be a JSON object, got {type(payload).__name__}")
        return {"image_id": image_id, "width": payload.get("image_w"), "height": payload.get("image_h"),
                **ParseVinvlFile._objects(payload.get("objects", []))}

    @staticmethod
    def _objects(objects) -> dict:
        """boxes, labels and scores of a list of {"rect", "class", "conf"} objects."""
        if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
            raise ValueError("'objects' must be a list of JSON objects")
        return {"boxes": [o["rect"] for o in objects], "labels": [o["class"] for o in objects],
                "scores": [o.get("conf", 1.0) for o in objects]}

    @classmethod
    def _oscar_labels(cls, cols):
        """X.label.tsv: image_id, a JSON list of objects; the size comes from X.hw.tsv in the join."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        return {"image_id": cols[0], "width": None, "height": None, **cls._objects(json.loads(cols[1]))}

    @staticmethod
    def _oscar_size(cols):
        """X.hw.tsv: image_id, [{"height": h, "width": w}] (a bare object is taken too)."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        payload = json.loads(cols[1])
        if isinstance(payload, list) and len(payload) == 1:
            payload = payload[0]
        if not isinstance(payload, dict):
            raise ValueError("the size must be [{\"height\": h, \"width\": w}]")
        return cols[0], (payload["width"], payload["height"])

    @classmethod
    def _oscar_features(cls, cols):
        """X.feature.tsv: image_id, {"num_boxes": n, "features": base64 float32}."""
        if len(cols) != 2:
            raise ValueError(f"expected 2 tab-separated columns, got {len(cols)}")
        payload = json.loads(cols[1])
        if not isinstance(payload, dict):
            raise ValueError(f"the features must be a JSON object, got {type(payload).__name__}")
        return cols[0], cls._decode_features(payload["num_boxes"], payload["features"])

    @classmethod
    def _features(cls, cols):
        if len(cols) != 3:
            raise ValueError(f"expected 3 tab-separated columns, got {len(cols)}")
        return cols[0], cls._decode_features(cols[1], cols[2])

    @staticmethod
    def _decode_features(num_boxes, encoded) -> np.ndarray:
        """float32 [num_boxes, dim] from base64, the visual dims only."""
        if not isinstance(num_boxes, (int, str)) or isinstance(num_boxes, bool) or not isinstance(encoded, str):
            raise ValueError("num_boxes must be an integer and the features a base64 string")
        num_boxes = int(num_boxes)
        flat = np.frombuffer(base64.b64decode(encoded), dtype=np.float32)
        if num_boxes <= 0 or flat.size % num_boxes:
            raise ValueError(f"{flat.size} floats do not split into {num_boxes} boxes")
        feats = flat.reshape(num_boxes, -1)
        return feats[:, :VINVL_VISUAL_DIM] if feats.shape[1] > VINVL_VISUAL_DIM else feats


def join_vinvl(element):
    """One image's VinVL lines -> (file:line, detection). Among duplicates the first by (file, line) wins,
    so every run keeps the same one; each other line is dead-lettered, as is an unpaired line."""
    image_id, grouped = element
    predictions = sorted(grouped["predictions"], key=lambda p: p[0])
    features = sorted(grouped["features"], key=lambda f: f[0])
    sizes = sorted(grouped.get("sizes", ()), key=lambda s: s[0])
    for kind, lines in (("predictions", predictions), ("features", features), ("sizes", sizes)):
        for line in lines[1:]:
            yield duplicate_rejection("read_detections", _where(line[0]), image_id, _where(lines[0][0]), f"VinVL {kind}",
                                      line[1] if kind == "predictions" else None)
    if not predictions:
        if features:  # a size line alone is metadata of an image without labels: nothing to read
            yield rejection("read_detections", _where(features[0][0]), "VinVL features without a prediction line",
                            detail=f"image_id {image_id!r}")
        return
    line, record, has_features_file = predictions[0]
    if has_features_file and not features:
        yield rejection("read_detections", _where(line), "VinVL prediction without a features line", record,
                        detail=f"image_id {image_id!r}")
        return
    if record["width"] is None:  # Oscar/VinVL labels: the size is in X.hw.tsv
        if not sizes:
            yield rejection("read_detections", _where(line), "VinVL labels without an image size", record,
                            detail=f"no line for image_id {image_id!r} in a {OSCAR_HW} beside {line[0]}")
            return
        record = dict(record, width=sizes[0][1][0], height=sizes[0][1][1])
    try:
        yield _where(line), validate_detection(dict(record, features=features[0][1] if features else None))
    except (ValueError, TypeError) as err:
        yield rejection_for("read_detections", _where(line), err, "invalid detection record", record)



YAML_EXTENSIONS = (".yaml", ".yml")


def with_sibling_files(path: str):
    """A VinVL file and the files read with it: a predictions file's features file; an X.label.tsv's
    X.feature.tsv and X.hw.tsv; the files an X.yaml names (the yaml itself is not parsed again)."""
    if path.endswith(YAML_EXTENSIONS):
        try:
            named = _oscar_yaml_files(path)
        except UnreadableFile as err:
            yield rejection_for("read_detections", path, err, "unreadable yaml")
            return
        for named_path in named:
            yield from with_sibling_files(named_path)
        return
    yield path
    sibling = None if _is_vinvl_features(path) else _sibling_features(path)
    if sibling:
        yield sibling
    if _oscar_kind(path) == OSCAR_LABELS:
        size = _existing(path.replace(OSCAR_LABELS, OSCAR_HW))
        if size:
            yield size
