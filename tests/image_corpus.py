"""Corpora whose shards carry their images (`{key}.jpg`, schema version 2), for tests of both halves.

- `write_image_corpus(folder, ...)`: a tiny corpus written straight through the corpus contract
  (schemas.corpus: encode_image, sample_members, tar_bytes), in well under a second. Each image is
  drawn so that what lies under a region identifies its tag (a tag's own colour and stripes on a
  noisy background), boxes of many sizes, some touching the image's edges; region features and
  sentences correspond to the tags as in tests/vlp_train/conftest.py. Also writes manifest.parquet
  (with the `images` column) and tag_vocab.json, as a build does.
- `build_image_corpus(folder, ...)`: the real thing, `vlp-data build-retrieval --images ...
  --store-images` over four photos (the bundled detector, sentence model, spaCy, GloVe): tens of
  seconds, so for `@pytest.mark.slow` tests.

The fixture `image_corpus` (tests/conftest.py) gives `write_image_corpus`'s shards glob.
"""
from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np

TAGS = ["cat", "dog", "car", "cup", "sofa", "horse"]
DIM = 16
# One colour per tag: the pixels under a region say which tag it is.
TAG_COLOURS = {"cat": (230, 40, 40), "dog": (40, 200, 60), "car": (40, 70, 230),
               "cup": (230, 210, 40), "sofa": (200, 50, 200), "horse": (40, 210, 210)}
_TEMPLATES = ["a {0} next to a {1}.", "the {1} and the {0} are here.", "there is a {0}."]


def template_sentences(i: int, tags: list[str]) -> list[dict]:
    """Sample i's retrieved sentences: the templates filled with its two tags, each tag's phrase
    (with its determiner) linked to the tag's region."""
    sentences = []
    for rank, template in enumerate(_TEMPLATES):
        text = template.format(*tags)
        phrases = []
        for region, tag in enumerate(tags):
            start = text.find(tag)
            if start < 0:
                continue
            det = text.rfind(" ", 0, start - 1) + 1
            phrases.append({"text": text[det:start + len(tag)], "start": det, "end": start + len(tag), "words": [tag],
                            "region": region, "tag": tag, "similarity": 0.9})
        sentences.append({"sentence_id": f"s{i}-{rank}", "text": text, "rank": rank, "score": 0.8 - 0.1 * rank,
                          "phrases": sorted(phrases, key=lambda p: p["start"])})
    return sentences


def _boxes(rng: random.Random, width: int, height: int, count: int) -> list[list[float]]:
    """`count` boxes of varied size inside the image; about one in three touches an edge."""
    boxes = []
    for _ in range(count):
        w = rng.uniform(0.1, 0.9) * width
        h = rng.uniform(0.1, 0.9) * height
        x1 = rng.choice([0.0, width - w, rng.uniform(0, width - w)])
        y1 = rng.choice([0.0, height - h, rng.uniform(0, height - h)])
        boxes.append([round(x1, 2), round(y1, 2), round(min(x1 + w, width), 2), round(min(y1 + h, height), 2)])
    return boxes


def draw_image(boxes: list[list[float]], tags: list[str], width: int, height: int, seed: int) -> np.ndarray:
    """RGB uint8 [height, width, 3]: grey noise, each region's box filled with its tag's colour
    and diagonal stripes (later regions over earlier ones)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 160, (height, width, 3)).astype(np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    stripes = ((x + y) // 4) % 2 == 0
    for (x1, y1, x2, y2), tag in zip(boxes, tags):
        inside = (x >= int(x1)) & (x < int(np.ceil(x2))) & (y >= int(y1)) & (y < int(np.ceil(y2)))
        colour = np.array(TAG_COLOURS[tag], np.uint8)
        image[inside & stripes] = colour
        image[inside & ~stripes] = colour // 2
    return image


def make_image_sample(i: int, rng: random.Random, prototypes: np.ndarray, width: int, height: int,
                      image_size: int):
    """(meta, float16 features, JPEG bytes) of sample i, meta in schema version 2 with image_size."""
    from schemas import SCHEMA_VERSION
    from schemas.corpus import encode_image, stored_image_size

    chosen = rng.sample(range(len(TAGS)), 2)
    tags = [TAGS[t] for t in chosen]
    feats = np.stack([prototypes[t] + 0.1 * np.random.default_rng(i * 7 + j).standard_normal(DIM)
                      for j, t in enumerate(chosen)]).astype(np.float16)
    boxes = _boxes(rng, width, height, len(tags))
    sentences = template_sentences(i, tags)
    jpeg = encode_image(draw_image(boxes, tags, width, height, seed=i), image_size)
    meta = {"schema_version": SCHEMA_VERSION, "image_id": f"img{i:04d}.jpg", "width": width, "height": height,
            "boxes": boxes, "tags": tags, "scores": [0.9, 0.8], "sentences": sentences,
            "image_size": list(stored_image_size(width, height, image_size))}
    return meta, feats, jpeg


def write_image_corpus(folder: str, n_images: int = 24, per_shard: int = 8, width: int = 160, height: int = 120,
                       image_size: int = 64, seed: int = 0) -> str:
    """FOLDER/shards/corpus-*.tar (json, feats.npy and jpg per sample) + manifest.parquet +
    tag_vocab.json; returns the shards glob. The same arguments give the same bytes."""
    import pyarrow.parquet as pq

    import schemas
    from schemas.corpus import sample_key, sample_members, tar_bytes

    rng = random.Random(seed)
    prototypes = np.random.default_rng(seed).standard_normal((len(TAGS), DIM)) * 2
    samples = [make_image_sample(i, rng, prototypes, width, height, image_size) for i in range(n_images)]
    shard_dir = os.path.join(folder, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    keyed = sorted((sample_key(meta["image_id"]), meta, feats, jpeg) for meta, feats, jpeg in samples)
    rows = []
    for s in range(0, len(keyed), per_shard):
        members = []
        chunk = keyed[s:s + per_shard]
        for key, meta, feats, jpeg in chunk:
            members += sample_members(key, meta, feats, jpeg)
        data = tar_bytes(members)
        name = "corpus-%06d.tar" % (s // per_shard)
        with open(os.path.join(shard_dir, name), "wb") as f:
            f.write(data)
        rows.append({"shard": f"shards/{name}", "samples": len(chunk), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "images": len(chunk)})
    pq.write_table(schemas.table_from_rows(rows, schemas.MANIFEST), os.path.join(folder, "manifest.parquet"))
    with open(os.path.join(folder, "tag_vocab.json"), "w") as f:
        json.dump({"schema_version": schemas.SCHEMA_VERSION, "tags": sorted(TAGS)}, f)
    return os.path.join(shard_dir, "*.tar")


def photo_inputs(folder: str) -> tuple[str, str]:
    """Four photos (scikit-image: coffee, the motorcycle pair, the camera man) plus a flat image
    the detector finds nothing in, and the project's scene sentences: (--images glob, --text)."""
    import skimage.data
    from PIL import Image

    from pipelines.sample import SAMPLE_DIR

    os.makedirs(folder, exist_ok=True)
    left, right, _ = skimage.data.stereo_motorcycle()
    for name, array in (("coffee.jpg", skimage.data.coffee()), ("moto_left.jpg", left), ("moto_right.png", right),
                        ("camera.png", np.stack([skimage.data.camera()] * 3, -1)),
                        ("flat.png", np.full((120, 160, 3), 90, np.uint8))):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            Image.fromarray(array).save(path)
    return os.path.join(folder, "*"), os.path.join(SAMPLE_DIR, "scenes.txt")


def build_image_corpus(folder: str, image_size: int = 384, extra: tuple[str, ...] = ()) -> str:
    """`vlp-data build-retrieval --images (photo_inputs) --store-images --image-size N` into
    FOLDER/out (4 samples in 2 shards); returns that output folder. Extra CLI or Beam arguments
    go last."""
    from click.testing import CliRunner

    from pipelines.cli import main

    images, text = photo_inputs(os.path.join(folder, "images"))
    out = os.path.join(folder, "out")
    result = CliRunner().invoke(main, ["build-retrieval", "--images", images, "--text", text, "--output", out,
                                       "--k", "3", "--samples-per-shard", "2", "--store-images",
                                       "--image-size", str(image_size), *extra])
    if result.exit_code != 0:
        raise RuntimeError(f"build-retrieval --store-images failed: {result.output}") from result.exception
    return out
