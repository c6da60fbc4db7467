"""Tiny shards in the corpus format, where tags, region features and sentences correspond."""
import json
import os
import random

import numpy as np
import pytest

from schemas import SCHEMA_VERSION
from schemas.corpus import IMAGE_SIZE_FIELD, META_MEMBER, encode_image, sample_key, sample_members, stored_image_size, tar_bytes
from tests.image_corpus import template_sentences

TAGS = ["cat", "dog", "car", "cup", "sofa", "horse"]
DIM = 16


def make_sample(i: int, rng: random.Random, prototypes: np.ndarray):
    chosen = rng.sample(range(len(TAGS)), 2)
    tags = [TAGS[t] for t in chosen]
    feats = np.stack([prototypes[t] + 0.1 * np.random.default_rng(i * 7 + j).standard_normal(DIM)
                      for j, t in enumerate(chosen)]).astype(np.float16)
    boxes = [[10.0, 10.0, 60.0, 80.0], [50.0, 20.0, 120.0, 90.0]]
    sentences = template_sentences(i, tags)
    meta = {"schema_version": 1, "image_id": f"img{i:04d}.jpg", "width": 160, "height": 120, "boxes": boxes,
            "tags": tags, "scores": [0.9, 0.8], "sentences": sentences}
    return meta, feats


def draw_image(meta: dict, seed: int) -> np.ndarray:
    """The sample's picture as its boxes see it (width x height): noise, each region's box filled
    with its tag's colour, so the pixels under a region tell its tag, as its features do."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (meta["height"], meta["width"], 3), dtype=np.uint8)
    for (x1, y1, x2, y2), tag in zip(meta["boxes"], meta["tags"]):
        colour = np.random.default_rng(TAGS.index(tag)).integers(60, 256, 3)
        image[int(y1):int(y2), int(x1):int(x2)] = colour
    return image


def with_image(meta: dict, seed: int, size: int) -> tuple[dict, bytes]:
    """The sample as `build-retrieval --store-images` writes it: its image member and image_size."""
    stored = stored_image_size(meta["width"], meta["height"], size)
    return {**meta, "schema_version": SCHEMA_VERSION, IMAGE_SIZE_FIELD: list(stored)}, encode_image(draw_image(meta, seed), size)


def write_shards(folder, n_images: int, per_shard: int, seed: int = 0, corrupt: int = 0, images: int = 0):
    """DIR/shards/corpus-*.tar + DIR/tag_vocab.json; `corrupt` samples get undecodable JSON;
    `images` > 0: each sample carries its image (`{key}.jpg`), its longer side `images` px."""
    rng = random.Random(seed)
    prototypes = np.random.default_rng(seed).standard_normal((len(TAGS), DIM)) * 2
    samples = [make_sample(i, rng, prototypes) for i in range(n_images)]
    shard_dir = os.path.join(folder, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    keyed = sorted((sample_key(m["image_id"]), i, m, f) for i, (m, f) in enumerate(samples))
    for s in range(0, len(keyed), per_shard):
        members = []
        for n, (key, i, meta, feats) in enumerate(keyed[s:s + per_shard]):
            image = None
            if images:
                meta, image = with_image(meta, seed * 100_003 + i, images)
            sample = sample_members(key, meta, feats, image)
            if corrupt and s == 0 and n < corrupt:
                sample[0] = (f"{key}.{META_MEMBER}", b"{not json")
            members += sample
        with open(os.path.join(shard_dir, "corpus-%06d.tar" % (s // per_shard)), "wb") as f:
            f.write(tar_bytes(members))
    with open(os.path.join(folder, "tag_vocab.json"), "w") as f:
        json.dump({"schema_version": 1, "tags": sorted(TAGS)}, f)
    return os.path.join(shard_dir, "*.tar")


@pytest.fixture
def tiny_shards(tmp_path):
    return write_shards(str(tmp_path / "corpus"), n_images=48, per_shard=16)


@pytest.fixture
def image_shards(tmp_path):
    """A tiny corpus built as with --store-images (images of 160 x 120 stored at 96 x 72)."""
    return write_shards(str(tmp_path / "corpus-images"), n_images=48, per_shard=16, images=96)


TINY_MODEL = ["model.init=random", "model.layers=2", "model.hidden=64", "model.heads=2", "model.compile=off"]
# a patch model of the same size: 64 x 64 images, 16 patches
TINY_PATCHES = TINY_MODEL + ["model.image_size=64", "model.patch_size=16"]
