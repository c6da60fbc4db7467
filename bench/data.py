"""Synthetic benchmark inputs at a stated scale (only throughput is measured, so templates do).

- images: random crops / flips / rescales of the bundled real photos, so the detector sees
  real content at realistic sizes;
- sentences: caption-like sentences built from templates over a COCO-like vocabulary, all unique.
"""
from __future__ import annotations

import itertools
import os
import random

import numpy as np

SUBJECTS = ["man", "woman", "child", "boy", "girl", "dog", "cat", "horse", "bird", "cow", "sheep", "person",
            "chef", "rider", "skier", "surfer", "player", "teacher", "tourist", "farmer"]
ADJECTIVES = ["red", "small", "large", "old", "young", "white", "black", "wooden", "brown", "tall", "happy",
              "green", "blue", "tired", "busy", "quiet", "shiny", "striped", "fluffy", "yellow"]
VERBS = ["sits on", "stands next to", "walks past", "looks at", "leans on", "runs towards", "sleeps under",
         "holds", "rides", "plays with", "waits by", "carries", "jumps over", "points at", "reads near"]
OBJECTS = ["sofa", "table", "bench", "car", "bicycle", "motorcycle", "cup", "bottle", "laptop", "umbrella",
           "chair", "bed", "clock", "vase", "kite", "boat", "train", "bus", "truck", "book", "pizza", "cake",
           "bowl", "television", "suitcase"]
PLACES = ["in the kitchen", "on the street", "in the park", "at the beach", "in a small room", "near the station",
          "under a tree", "at night", "in the snow", "by the river", "in the city centre", "on a farm",
          "at the market", "in the garden", "during the rain"]


def template_sentences(n: int, seed: int = 0) -> list[str]:
    """n unique caption-like sentences."""
    combos = itertools.product(ADJECTIVES, SUBJECTS, VERBS, ADJECTIVES, OBJECTS, PLACES)
    total = len(ADJECTIVES) ** 2 * len(SUBJECTS) * len(VERBS) * len(OBJECTS) * len(PLACES)
    if n > total:
        raise ValueError(f"at most {total} template sentences")
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(total), n))
    out, want = [], iter(picks)
    target = next(want, None)
    for i, (a1, s, v, a2, o, p) in enumerate(combos):
        if i == target:
            out.append(f"A {a1} {s} {v} a {a2} {o} {p}.")
            target = next(want, None)
            if target is None:
                break
    rng.shuffle(out)
    return out


def write_corpus(path: str, n: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(template_sentences(n)) + "\n")
    return path


def write_images(directory: str, n: int, seed: int = 0) -> str:
    """n JPEGs derived from the bundled photos; returns a glob."""
    from PIL import Image

    from pipelines.sample import _photos, _to_rgb_uint8

    os.makedirs(directory, exist_ok=True)
    existing = len([f for f in os.listdir(directory) if f.endswith(".jpg")])
    if existing >= n:
        return os.path.join(directory, "*.jpg")
    photos = [_to_rgb_uint8(image) for _, image in _photos()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        scale = rng.uniform(0.8, 1.5)
        Image.fromarray(np.ascontiguousarray(crop)).resize((int(cw * scale), int(ch * scale))).save(
            os.path.join(directory, f"img{i:06d}.jpg"), quality=90)
    return os.path.join(directory, "*.jpg")
