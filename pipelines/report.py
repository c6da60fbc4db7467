"""`vlp-data report OUTPUT`: a static HTML report of a corpus, to judge it before training on it.

One self-contained folder (index.html, images/, plots/; no network): a seeded draw of N samples,
each with its image, its regions as labelled boxes and its retrieved sentences with every noun
phrase in the colour of the region it links to; the corpus counts, the dead letters by reason,
histograms, and the samples of lowest and highest retrieval score side by side.

Fast on a large corpus: the statistics come from the Parquet side tables (only the columns they
need), and of the shards only those holding a drawn sample are read (the manifest gives each
shard's sample count; a key's shard is found from each shard's first key, one tar header each).
"""
from __future__ import annotations

import bisect
import glob
import html
import io
import json
import os
import random
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipelines.deadletter import message
from pipelines.images import common_base_directory
from pipelines.files import split_patterns
from schemas.corpus import check_published, decode_members, sample_key
from schemas.folders import replace_report_folder

IMAGE_MAX_SIDE = 640          # report images are downscaled to this (boxes stay in original pixels)
REJECTED_EXAMPLES = 3         # dead letters shown per reason
REJECTED_LINES_READ = 200_000  # at most this many dead-letter lines are read for the examples
# Region colours: distinct on white and on a photo (Sasha Trubetskoy's list), by region index.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#9a6324", "#469990", "#800000", "#808000", "#000075", "#fabed4", "#ffe119", "#a9a9a9")


def region_colour(region: int) -> str:
    return PALETTE[region % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# Reading the corpus


def read_columns(output: str, table: str, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """The named columns of a side table (all of its files), each file's version and types checked."""
    files = sorted(glob.glob(os.path.join(output, table, "*.parquet")))
    if not files:
        return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
    parts = []
    for path in files:
        file_schema = pq.read_schema(path)
        schemas.check_version(file_schema, path)
        schemas.check_fields(file_schema, pa.schema([schema.field(c) for c in columns]), path)
        parts.append(pq.read_table(path, columns=columns))
    return pa.concat_tables(parts)


def draw_positions(counts: list[int], n: int, seed: int) -> dict[int, set[int]]:
    """A seeded draw of n samples over shards of these sample counts: shard -> positions in it."""
    total = sum(counts)
    drawn = sorted(random.Random(seed).sample(range(total), min(n, total)))
    starts = np.cumsum([0] + counts[:-1]).tolist()
    by_shard: dict[int, set[int]] = {}
    for position in drawn:
        shard = bisect.bisect_right(starts, position) - 1
        by_shard.setdefault(shard, set()).add(position - starts[shard])
    return by_shard


def first_key(shard_path: str) -> str:
    """The first sample key of a shard: its first tar member's name up to the first dot."""
    with open(shard_path, "rb") as f:
        header = f.read(tarfile.BLOCKSIZE)
    return header[:100].split(b"\0", 1)[0].decode("utf-8").split(".", 1)[0]


def read_samples(shard_paths: list[str], positions: dict[int, set[int]], keys: dict[int, set[str]]) -> dict[str, dict]:
    """The samples at `positions` or with `keys`, per shard index, read with webdataset; only
    those shards are opened. key -> {"json", "image" (bytes or None), "dim", "drawn" (by position)},
    in shard order."""
    import webdataset as wds

    found = {}
    for shard in sorted(set(positions) | set(keys)):
        wanted_positions, wanted_keys = positions.get(shard, set()), keys.get(shard, set())
        for position, sample in enumerate(wds.WebDataset(shard_paths[shard], shardshuffle=False)):
            if position in wanted_positions or sample["__key__"] in wanted_keys:
                meta, feats = decode_members(sample)  # the corpus contract's decoding (no pickles)
                schemas.validate_sample(meta, feats, where=f"{shard_paths[shard]}:{sample['__key__']}")
                image = next((sample[ext] for ext in ("jpg", "jpeg", "png", "webp") if isinstance(sample.get(ext), bytes)), None)
                found[sample["__key__"]] = {"json": meta, "image": image, "drawn": position in wanted_positions,
                                            "dim": int(feats.shape[1]) if feats is not None and feats.ndim == 2 else 0}
    return found


class ImageSource:
    """Finds an image by its image_id under the --images pattern(s) the build was given (the id is
    the path relative to the patterns' common base folder; `x.tar/member.jpg` is a tar member)."""

    def __init__(self, images: str | None):
        if images and os.path.isdir(images):
            images = os.path.join(images, "*")
        self._base = common_base_directory(split_patterns(images)) if images else None

    def read(self, image_id: str) -> bytes | None:
        if self._base is None:
            return None
        path = os.path.join(self._base, image_id)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        if ".tar/" in image_id:
            tar_id, member = image_id.split(".tar/", 1)
            tar_path = os.path.join(self._base, tar_id + ".tar")
            if os.path.isfile(tar_path):
                with tarfile.open(tar_path) as tar:
                    try:
                        return tar.extractfile(member).read()
                    except (KeyError, AttributeError):
                        return None
        return None


def save_thumbnail(data: bytes, path: str) -> bool:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE))
            image.save(path, "JPEG", quality=85)
        return True
    except Exception:  # an image that no longer decodes: the placeholder is drawn instead
        return False


def rejected_examples(output: str, reasons: dict[str, int]) -> dict[str, list[dict]]:
    """A few dead letters per reason (as stats.json names it: 'stage: reason'; a reason class has
    no colon, and of an older corpus's 'reason: detail' the words before the colon are the class)."""
    examples: dict[str, list[dict]] = {reason: [] for reason in reasons}
    read = 0
    for path in sorted(glob.glob(os.path.join(output, "rejected", "build", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                read += 1
                record = json.loads(line)
                reason = f"{record['stage']}: {record['reason'].split(':')[0]}"
                if len(examples.setdefault(reason, [])) < REJECTED_EXAMPLES:
                    examples[reason].append(record)
                if read >= REJECTED_LINES_READ or all(len(v) >= REJECTED_EXAMPLES for v in examples.values()):
                    return examples
    return examples


# ---------------------------------------------------------------------------------------------
# Plots


def _histogram(path: str, title: str, xlabel: str, series: list[tuple[str, np.ndarray]], bins, note: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    data = [values for _, values in series]
    if any(len(v) for v in data):
        ax.hist(data, bins=bins, stacked=True, label=[label for label, _ in series])
        if len(series) > 1:
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.basename(path)


def _bar(path: str, title: str, counts: list[tuple[str, int]], note: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 0.6 + 0.22 * max(len(counts), 3)), dpi=100)
    labels = [label for label, _ in counts][::-1]
    ax.barh(labels, [n for _, n in counts][::-1], color="#4363d8")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.set_xlabel("count")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.basename(path)


def make_plots(plot_dir: str, retrievals: pa.Table, links: pa.Table, samples: list[dict]) -> list[tuple[str, str]]:
    """(file, caption) of each histogram."""
    os.makedirs(plot_dir, exist_ok=True)
    scores = retrievals["score"].to_numpy()
    best = pc.equal(retrievals["rank"], 0)
    sims = links["similarity"].to_numpy()
    linked = links["region"].is_valid().to_numpy(zero_copy_only=False)
    # phrases per retrieved sentence: link rows per (image, rank); a sentence without a phrase has no row
    per_sentence = links.group_by(["image_id", "rank"]).aggregate([([], "count_all")])["count_all"].to_numpy()
    per_sentence = np.concatenate([per_sentence, np.zeros(max(len(retrievals) - len(per_sentence), 0), int)])
    n = len(samples)
    regions = np.array([len(s["boxes"]) for s in samples])
    tags = Counter(tag for s in samples for tag in s["tags"]).most_common(30)
    return [
        (_histogram(os.path.join(plot_dir, "retrieval_score.png"), "Retrieval score (cosine)", "score",
                    [("rank 0", scores[best.to_numpy(zero_copy_only=False)]),
                     ("ranks 1..K-1", scores[~best.to_numpy(zero_copy_only=False)])], 30),
         f"all {len(scores):,} retrievals (retrievals/)"),
        (_histogram(os.path.join(plot_dir, "phrases_per_sentence.png"), "Noun phrases per retrieved sentence",
                    "phrases", [("sentences", per_sentence)], np.arange(0, max(per_sentence.max(initial=0), 1) + 2) - 0.5),
         f"all {len(retrievals):,} retrieved sentences (links/, retrievals/)"),
        (_histogram(os.path.join(plot_dir, "link_similarity.png"), "Phrase-region similarity", "similarity",
                    [("linked", sims[linked]), ("unlinked", sims[~linked])], 30),
         f"all {len(sims):,} noun phrases (links/)"),
        (_histogram(os.path.join(plot_dir, "regions_per_image.png"), "Regions per image", "regions",
                    [("images", regions)], np.arange(0, max(regions.max(initial=0), 1) + 2) - 0.5),
         f"the {n} drawn samples (regions are only in the shards)"),
        (_bar(os.path.join(plot_dir, "tag_frequency.png"), "Tag frequency (regions)", tags or [("(none)", 0)]),
         f"the 30 most frequent tags of the {n} drawn samples"),
    ]


# ---------------------------------------------------------------------------------------------
# HTML


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def render_sentence(sentence: dict) -> str:
    """The sentence text with each noun phrase marked: coloured as its region, or as unlinked."""
    text, out, at = sentence["text"], [], 0
    for p in sorted(sentence["phrases"], key=lambda p: p["start"]):
        if p["start"] < at:  # overlapping spans are not expected from noun chunks; show the first
            continue
        out.append(_e(text[at:p["start"]]))
        phrase = _e(text[p["start"]:p["end"]])
        if p["region"] is None:
            out.append(f'<span class="phrase unlinked" title="unlinked (best similarity {p["similarity"]:.2f})">'
                       f'{phrase}</span>')
        else:
            colour = region_colour(p["region"])
            out.append(f'<span class="phrase linked" data-region="{p["region"]}" style="--c:{colour}" '
                       f'title="region {p["region"]} ({_e(p["tag"])}), similarity {p["similarity"]:.2f}">{phrase}'
                       f'<sub>{p["similarity"]:.2f}</sub></span>')
        at = p["end"]
    out.append(_e(text[at:]))
    return "".join(out)


def render_sample(key: str, sample: dict, image_file: str | None, dim: int) -> str:
    w, h = sample["width"], sample["height"]
    stroke = max(w, h) / 200
    font = max(w, h) / 32
    figure = [f'<svg class="figure" viewBox="0 0 {w} {h}" role="img" aria-label="{_e(sample["image_id"])}">']
    if image_file:
        figure.append(f'<image href="images/{_e(image_file)}" x="0" y="0" width="{w}" height="{h}" '
                      f'preserveAspectRatio="none"/>')
    else:  # no image anywhere: the box layout on a plain ground
        figure.append(f'<rect class="placeholder" x="0" y="0" width="{w}" height="{h}"/>'
                      f'<text class="placeholder-text" x="{w / 2}" y="{h / 2}" font-size="{font}">no image</text>')
    for i, (box, tag, score) in enumerate(zip(sample["boxes"], sample["tags"], sample["scores"])):
        x1, y1, x2, y2 = box
        colour = region_colour(i)
        figure.append(f'<g class="region" data-region="{i}"><rect class="box" x="{x1:.1f}" y="{y1:.1f}" '
                      f'width="{max(x2 - x1, 1):.1f}" height="{max(y2 - y1, 1):.1f}" style="stroke:{colour}" '
                      f'stroke-width="{stroke:.1f}"/><text x="{x1 + stroke:.1f}" y="{y1 + font:.1f}" font-size="{font:.1f}" '
                      f'style="fill:{colour}">{i}: {_e(tag)} {score:.2f}</text></g>')
    figure.append("</svg>")
    regions = "".join(f'<li data-region="{i}"><span class="swatch" style="background:{region_colour(i)}"></span>'
                      f'{i}: {_e(tag)} <small>{score:.2f}</small></li>'
                      for i, (tag, score) in enumerate(zip(sample["tags"], sample["scores"])))
    sentences = "".join(f'<li><span class="score">#{s["rank"]} {s["score"]:.3f}</span> {render_sentence(s)}</li>'
                        for s in sorted(sample["sentences"], key=lambda s: s["rank"]))
    best = max((s["score"] for s in sample["sentences"]), default=0.0)
    tags = "|".join(sorted(set(sample["tags"])))
    return (f'<article class="sample" id="s-{key}" data-key="{key}" data-tags="{_e(tags)}" data-best="{best:.4f}">'
            f'<div class="figure-box">{"".join(figure)}</div><div class="about">'
            f'<h3>{_e(sample["image_id"])} <small>{w}x{h}, {len(sample["boxes"])} regions'
            f'{f" x {dim}-d" if dim else ""}, key {key}</small></h3>'
            f'<ol class="regions">{regions}</ol><ol class="sentences">{sentences}</ol></div></article>')


def _flatten(stats: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in stats.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{margin:16px 0 4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table.stats{border-collapse:collapse} table.stats td{padding:2px 10px;border-bottom:1px solid #eee}
table.stats td:last-child{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots figure{margin:0} .plots figcaption{font-size:12px;color:#666}
.sample{display:flex;gap:16px;border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0;background:#fff}
.figure-box{flex:0 0 380px} .figure{width:380px;height:auto;display:block;background:#f4f4f4}
.about{flex:1;min-width:0} .about h3{margin:0 0 6px;font-size:15px} .about h3 small{color:#777;font-weight:normal}
.box{fill:none} .region text{font-weight:bold;paint-order:stroke;stroke:#fff;stroke-width:3px}
.region.hot .box{fill:rgba(255,255,255,.25);stroke-width:3%} .region.dim{opacity:.25}
.placeholder{fill:#e8e8e8;stroke:#bbb} .placeholder-text{fill:#999;text-anchor:middle}
ol.regions{display:flex;flex-wrap:wrap;gap:4px 14px;list-style:none;padding:0;margin:0 0 6px;font-size:13px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
ol.sentences{padding-left:0;list-style:none;margin:0} ol.sentences li{margin:3px 0}
.score{display:inline-block;min-width:72px;color:#555;font-variant-numeric:tabular-nums}
.phrase.linked{background:color-mix(in srgb,var(--c) 28%,transparent);border-bottom:2px solid var(--c);
  border-bottom-color:var(--c);border-radius:2px;cursor:pointer}
.phrase.linked.hot{background:color-mix(in srgb,var(--c) 60%,transparent)}
.phrase sub{font-size:10px;color:#555;margin-left:1px}
.phrase.unlinked{border-bottom:2px dotted #999;color:#555}
.controls{position:sticky;top:0;background:#fafafa;padding:8px;border:1px solid #ddd;border-radius:6px;z-index:2}
.controls input{width:320px} .side{display:flex;gap:12px} .side>div{flex:1;min-width:0}
.side .sample{flex-direction:column} .side .figure-box{flex:none}
.rejected li{margin-bottom:6px} .rejected code{font-size:12px;word-break:break-all}
.hidden{display:none}
"""

SCRIPT = """
document.addEventListener('DOMContentLoaded', () => {
  // hovering a phrase lights up its region's box (and the others dim)
  document.querySelectorAll('.phrase.linked').forEach(phrase => {
    const sample = phrase.closest('.sample');
    const region = phrase.dataset.region;
    const boxes = () => sample.querySelectorAll('.region');
    phrase.addEventListener('mouseenter', () => {
      phrase.classList.add('hot');
      boxes().forEach(g => g.classList.toggle(g.dataset.region === region ? 'hot' : 'dim', true));
    });
    phrase.addEventListener('mouseleave', () => {
      phrase.classList.remove('hot');
      boxes().forEach(g => g.classList.remove('hot', 'dim'));
    });
  });
  // filter by tag, search over the sentences
  const tag = document.getElementById('tag-filter');
  const query = document.getElementById('search');
  const shown = document.getElementById('shown');
  const samples = Array.from(document.querySelectorAll('#samples .sample'));
  function apply() {
    const wantTag = tag.value, words = query.value.trim().toLowerCase();
    let count = 0;
    samples.forEach(s => {
      const tagOk = !wantTag || s.dataset.tags.split('|').includes(wantTag);
      const textOk = !words || s.querySelector('.sentences').textContent.toLowerCase().includes(words);
      s.classList.toggle('hidden', !(tagOk && textOk));
      if (tagOk && textOk) count++;
    });
    shown.textContent = count + ' of ' + samples.length + ' samples shown';
  }
  tag.addEventListener('change', apply);
  query.addEventListener('input', apply);
  apply();
});
"""


def render_page(output: str, stats: dict, plots: list[tuple[str, str]], drawn: list[tuple[str, dict]],
                lowest: list[tuple[str, dict]], highest: list[tuple[str, dict]], rejected: dict[str, list[dict]],
                image_files: dict[str, str], dims: dict[str, int], seed: int, shards_read: int, shards_total: int) -> str:
    def card(key, sample):
        return render_sample(key, sample, image_files.get(key), dims.get(key, 0))

    tags = sorted({t for _, s in drawn for t in s["tags"]})
    stats_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) else v)}</td></tr>"
                         for k, v in _flatten(stats) if not k.startswith("rejected."))
    reject_items = []
    for reason, count in sorted(stats.get("rejected", {}).items(), key=lambda kv: -kv[1]):
        examples = "".join(f"<li><code>{_e(r['source'])}</code>: {_e(message(r))}"
                           + (f"<br><code>{_e(r['record'][:300])}</code>" if r.get("record") else "") + "</li>"
                           for r in rejected.get(reason, []))
        reject_items.append(f"<li><b>{_e(reason)}</b>: {count:,}<ul>{examples}</ul></li>")
    figures = "".join(f'<figure><img src="plots/{_e(f)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
                      for f, caption in plots)
    options = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in tags)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlp-data report: {_e(output)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>Corpus report</h1>
<p>{_e(os.path.abspath(output))}: {len(drawn)} samples drawn (seed {seed}) from {stats.get("images_out", 0):,};
{shards_read} of {shards_total} shard(s) read. Hover a coloured noun phrase to see the region it is linked to
(the small number is the similarity); dotted phrases are unlinked.</p>
<h2 id="corpus">The corpus</h2>
<table class="stats">{stats_rows}</table>
<h2 id="histograms">Histograms</h2>
<div class="plots">{figures}</div>
<h2 id="rejected">Rejected records ({stats.get("rejected_total", 0):,})</h2>
<ul class="rejected">{"".join(reject_items) or "<li>none</li>"}</ul>
<h2 id="extremes">Lowest and highest retrieval scores</h2>
<p>The images whose best retrieved sentence scored lowest (left) and highest (right): where the left column
still reads as a fair description, the retrieval is sound down to there; where the ranks below the first drift
off topic, K is too large.</p>
<div class="side"><div id="lowest"><h3>Lowest</h3>{"".join(card(k, s) for k, s in lowest)}</div>
<div id="highest"><h3>Highest</h3>{"".join(card(k, s) for k, s in highest)}</div></div>
<h2 id="drawn">Samples</h2>
<div class="controls"><label>tag <select id="tag-filter"><option value="">(any)</option>{options}</select></label>
<label>search sentences <input id="search" type="search" placeholder="words in a retrieved sentence"></label>
<span id="shown"></span></div>
<div id="samples">{"".join(card(k, s) for k, s in drawn)}</div>
<script>{SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------


def write_report(output: str, out_dir: str = "report", images: str | None = None, samples: int = 200,
                 seed: int = 0, extremes: int = 3, overwrite: bool = False) -> str:
    """Write the report folder; returns the path of its index.html."""
    check_published(output)  # a corpus mid-publish may mix two runs: refuse it, as the trainer does
    with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    if images is None and os.path.isdir(os.path.join(output, ".sample-input", "images")):
        images = os.path.join(output, ".sample-input", "images")  # the bundled sample's own images
    retrievals = read_columns(output, "retrievals", schemas.RETRIEVALS, ["image_id", "rank", "score"])
    links = read_columns(output, "links", schemas.LINKS, ["image_id", "rank", "region", "similarity"])

    manifest_path = os.path.join(output, "manifest.parquet")
    manifest = schemas.read_table(manifest_path, schemas.MANIFEST).to_pylist() if os.path.exists(manifest_path) else []
    shard_paths = [os.path.join(output, row["shard"]) for row in manifest]
    positions = draw_positions([row["samples"] for row in manifest], samples, seed) if manifest else {}

    # the images of lowest and highest best score, found in their shards by key
    best = retrievals.filter(pc.equal(retrievals["rank"], 0)).sort_by([("score", "ascending"), ("image_id", "ascending")])
    best_ids = best["image_id"].to_pylist()
    low_ids, high_ids = best_ids[:extremes], best_ids[::-1][:extremes]
    keys_by_shard: dict[int, set[str]] = {}
    if shard_paths:
        firsts = [first_key(p) for p in shard_paths]
        for image_id in low_ids + high_ids:
            key = sample_key(image_id)
            keys_by_shard.setdefault(max(bisect.bisect_right(firsts, key) - 1, 0), set()).add(key)
    found = read_samples(shard_paths, positions, keys_by_shard)

    replace_report_folder(out_dir, output, overwrite)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir)
    source = ImageSource(images)
    image_files, dims = {}, {}
    for key, sample in found.items():
        data = sample["image"] or source.read(sample["json"]["image_id"])
        if data is not None and save_thumbnail(data, os.path.join(image_dir, f"{key}.jpg")):
            image_files[key] = f"{key}.jpg"
        dims[key] = sample["dim"]

    drawn = [(key, sample["json"]) for key, sample in found.items() if sample["drawn"]]
    lowest = [(sample_key(i), found[sample_key(i)]["json"]) for i in low_ids if sample_key(i) in found]
    highest = [(sample_key(i), found[sample_key(i)]["json"]) for i in high_ids if sample_key(i) in found]
    plots = make_plots(os.path.join(out_dir, "plots"), retrievals, links, [s for _, s in drawn])
    page = render_page(output, stats, plots, drawn, lowest, highest, rejected_examples(output, stats.get("rejected", {})),
                       image_files, dims, seed, len(set(positions) | set(keys_by_shard)), len(shard_paths))
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(page)
    return index
