"""Tiny shards in the corpus format, where tags, region features and sentences correspond."""
import json
import os
import random

import numpy as np
import pytest

from schemas.corpus import META_MEMBER, sample_key, sample_members, tar_bytes

TAGS = ["cat", "dog", "car", "cup", "sofa", "horse"]
DIM = 16


def make_sample(i: int, rng: random.Random, prototypes: np.ndarray):
    chosen = rng.sample(range(len(TAGS)), 2)
    tags = [TAGS[t] for t in chosen]
    feats = np.stack([prototypes[t] + 0.1 * np.random.default_rng(i * 7 + j).standard_normal(DIM)
                      for j, t in enumerate(chosen)]).astype(np.float16)
    boxes = [[10.0, 10.0, 60.0, 80.0], [50.0, 20.0, 120.0, 90.0]]
    sentences = []
    for rank, template in enumerate(["a {0} next to a {1}.", "the {1} and the {0} are here.", "there is a {0}."]):
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
    meta = {"schema_version": 1, "image_id": f"img{i:04d}.jpg", "width": 160, "height": 120, "boxes": boxes,
            "tags": tags, "scores": [0.9, 0.8], "sentences": sentences}
    return meta, feats


def write_shards(folder, n_images: int, per_shard: int, seed: int = 0, corrupt: int = 0):
    """DIR/shards/corpus-*.tar + DIR/tag_vocab.json; `corrupt` samples get undecodable JSON."""
    rng = random.Random(seed)
    prototypes = np.random.default_rng(seed).standard_normal((len(TAGS), DIM)) * 2
    samples = [make_sample(i, rng, prototypes) for i in range(n_images)]
    shard_dir = os.path.join(folder, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    keyed = sorted((sample_key(m["image_id"]), m, f) for m, f in samples)
    for s in range(0, len(keyed), per_shard):
        members = []
        for n, (key, meta, feats) in enumerate(keyed[s:s + per_shard]):
            sample = sample_members(key, meta, feats)
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


TINY_MODEL = ["model.init=random", "model.layers=2", "model.hidden=64", "model.heads=2", "model.compile=off"]
