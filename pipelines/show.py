"""`python -m pipelines.show OUT`: where the shards are, and one sample in readable form.

Reads the shards with bare webdataset (no project code), as any other tool would."""
from __future__ import annotations

import glob
import json
import os
import sys


def describe(output: str, limit_sentences: int = 5) -> str:
    import webdataset as wds

    shards = sorted(glob.glob(os.path.join(output, "shards", "*.tar")))
    if not shards:
        return f"no shards under {output}/shards"
    lines = [f"{len(shards)} shard(s): {shards[0]}" + (f" ... {shards[-1]}" if len(shards) > 1 else "")]
    with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    lines.append(f"images out: {stats['images_out']}, sentences in corpus: {stats['sentences']}, "
                 f"link rate: {stats['link_rate']:.2f}, rejected: {stats['rejected_total']}")
    sample = next(iter(wds.WebDataset(shards[0], shardshuffle=False).decode()))
    meta, feats = sample["json"], sample["feats.npy"]
    lines.append(f"\nsample {sample['__key__']}: image {meta['image_id']} ({meta['width']}x{meta['height']}), "
                 f"features {feats.dtype} {list(feats.shape)}")
    for i, (tag, score, box) in enumerate(zip(meta["tags"], meta["scores"], meta["boxes"])):
        lines.append(f"  region {i}: {tag:<14} {score:.2f}  box {[round(v) for v in box]}")
    for s in meta["sentences"][:limit_sentences]:
        lines.append(f"  #{s['rank']} ({s['score']:.3f}) {s['text']}")
        for p in s["phrases"]:
            link = f"region {p['region']} ({p['tag']})" if p["region"] is not None else "unlinked"
            lines.append(f"      '{p['text']}' -> {link}, similarity {p['similarity']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(sys.argv[1] if len(sys.argv) > 1 else "vlp-out"))
