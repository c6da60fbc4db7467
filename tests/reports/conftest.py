"""A small corpus and a run folder written by hand in the formats vlp-data and vlp-train write,
with one known sample, for the report tests (seconds, no pipeline run)."""
import hashlib
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

import schemas
from schemas.corpus import sample_key, sample_members, tar_bytes

KNOWN = "coffee.png"  # the known sample: a cup and a table, one sentence linking both, one unlinked phrase
KNOWN_SENTENCE = "A cup of coffee stands on the table in the morning."
NO_IMAGE = "lost.png"      # no file under --images and none in the shard: the placeholder is drawn
IN_SHARD = "carried.png"   # the shard carries this image (a png member)


def _phrase(text, sentence, region, tag, similarity):
    start = sentence.index(text)
    return {"text": text, "start": start, "end": start + len(text), "words": [text.split()[-1].lower()],
            "region": region, "tag": tag, "similarity": similarity}


def _sample(image_id, width, height, boxes, tags, sentences):
    return {"schema_version": schemas.SCHEMA_VERSION, "image_id": image_id, "width": width, "height": height,
            "boxes": boxes, "tags": tags, "scores": [0.9 - 0.1 * i for i in range(len(tags))], "sentences": sentences}


def _samples():
    known = _sample(KNOWN, 600, 400, [[180.0, 90.0, 420.0, 330.0], [0.0, 250.0, 600.0, 400.0]], ["cup", "dining table"], [
        {"sentence_id": "known0", "text": KNOWN_SENTENCE, "rank": 0, "score": 0.81, "phrases": [
            _phrase("A cup", KNOWN_SENTENCE, 0, "cup", 0.93), _phrase("the table", KNOWN_SENTENCE, 1, "dining table", 0.71),
            _phrase("the morning", KNOWN_SENTENCE, None, None, 0.12)]},
        {"sentence_id": "known1", "text": "Shares fell on Monday.", "rank": 1, "score": 0.12, "phrases": [
            _phrase("Shares", "Shares fell on Monday.", None, None, 0.05)]}])
    samples = [known]
    for i in range(13):
        text = f"A person number {i} rides a bicycle."
        tags = ["person", "bicycle"] if i % 2 else ["person"]
        boxes = [[10.0, 10.0, 100.0, 200.0], [50.0, 120.0, 220.0, 230.0]][:len(tags)]
        name = NO_IMAGE if i == 0 else IN_SHARD if i == 1 else f"photo{i:02d}.png"
        samples.append(_sample(name, 240, 240, boxes, tags, [
            {"sentence_id": f"s{i}", "text": text, "rank": 0, "score": 0.2 + 0.04 * i, "phrases": [
                _phrase("A person", text, 0, "person", 0.8 + 0.01 * i), _phrase("a bicycle", text, 1 if i % 2 else None,
                                                                             "bicycle" if i % 2 else None, 0.6)]}]))
    return samples


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(output folder, images folder) of a 14-sample corpus in 3 shards, with every side table."""
    root = tmp_path_factory.mktemp("corpus")
    out, images = root / "out", root / "images"
    for d in ("shards", "retrievals", "links", "sentences", "rejected/build"):
        (out / d).mkdir(parents=True)
    images.mkdir()
    Image.fromarray(skimage.data.coffee()).save(images / KNOWN)
    samples = _samples()
    for s in samples[3:]:
        Image.fromarray(np.full((240, 240, 3), (40 * len(s["image_id"])) % 255, np.uint8)).save(images / s["image_id"])
    carried = (images / "carried-source.png")
    Image.fromarray(np.full((240, 240, 3), 200, np.uint8)).save(carried)

    by_key = sorted(((sample_key(s["image_id"]), s) for s in samples), key=lambda ks: ks[0])
    manifest = []
    for n, start in enumerate(range(0, len(by_key), 5)):
        members = []
        for key, s in by_key[start:start + 5]:
            members += sample_members(key, s, np.ones((len(s["boxes"]), 8), np.float16))
            if s["image_id"] == IN_SHARD:
                members.append((f"{key}.png", carried.read_bytes()))
        data = tar_bytes(members)
        name = f"shards/corpus-{n:06d}.tar"
        (out / name).write_bytes(data)
        manifest.append({"shard": name, "samples": len(by_key[start:start + 5]), "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
    pq.write_table(schemas.table_from_rows(manifest, schemas.MANIFEST), out / "manifest.parquet")
    retrievals = [{"image_id": s["image_id"], "rank": x["rank"], "sentence_id": x["sentence_id"], "sentence": x["text"],
                   "score": x["score"]} for s in samples for x in s["sentences"]]
    links = [{"image_id": s["image_id"], "rank": x["rank"], "sentence_id": x["sentence_id"], "phrase": p["text"],
              "start": p["start"], "end": p["end"], "region": p["region"], "tag": p["tag"], "similarity": p["similarity"]}
             for s in samples for x in s["sentences"] for p in x["phrases"]]
    sentences = [{"sentence_id": r["sentence_id"], "text": r["sentence"]} for r in retrievals]
    for table, rows, schema in (("retrievals", retrievals, schemas.RETRIEVALS), ("links", links, schemas.LINKS),
                                ("sentences", sentences, schemas.SENTENCES)):
        pq.write_table(schemas.table_from_rows(rows, schema), out / table / f"{table}-00000-of-00001.parquet")
    rejected = [{"stage": "detect", "source": f"/x/blank{i}.png", "reason": "no region above the confidence threshold 0.25",
                 "record": None} for i in range(5)]
    rejected.append({"stage": "read_text", "source": "t.txt:3", "reason": "not UTF-8: byte 0xff", "record": "\\xff"})
    (out / "rejected/build/rejected-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    stats = {"schema_version": 1, "images_in": 20, "images_out": len(samples), "images_valid": 14,
             "images_retrieved": 14, "rejected": {"detect: no region above the confidence threshold 0.25": 5,
                                                  "read_text: not UTF-8": 1}, "rejected_total": 6,
             "sentences": len(sentences), "text": {"lines": 40}, "k": 2, "retrievals": len(retrievals),
             "mean_retrieval_score": 0.4, "phrases_per_sentence": 1.9, "link_rate": 0.6, "shards": len(manifest)}
    (out / "stats.json").write_text(json.dumps(stats))
    return str(out), str(images)


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory):
    """A run folder as `vlp-train run` writes it, with named losses the report cannot know in advance."""
    run = tmp_path_factory.mktemp("run") / "vlp-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"optim": {"lr": 1e-4, "epochs": 3}, "run": {"log_every": 2}}))
    rows = []
    for step in range(2, 42, 2):
        row = {"step": step, "epoch": step // 14, "lr": 1e-4 * (1 - step / 42), "itm_weighting": step >= 14,
               "loss": 8 * math.exp(-step / 15), "samples_per_s": 40.0 + step % 5, "bad_samples": 1 if step == 10 else 0,
               "rt/mlm": 9 * math.exp(-step / 12), "is/itm": 0.7 - step / 200, "zz/novel": step / 10.0}
        rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "eval": {"tag_mlm_acc": step / 50, "sentence_mlm_acc": step / 60,
                                                "itm_auc": float("nan") if step == 10 else 0.5 + step / 100}})
        if step == 4:
            rows.append({"step": step, "keys": ["a", "b"]})
    with open(run / "log.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 42, "loss": 1.')  # a run still writing its last line
    return str(run)
