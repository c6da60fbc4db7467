"""`vlp-data report`: the HTML structure the generator writes (the browser test looks at it rendered)."""
import glob
import os
import re
from html.parser import HTMLParser

import numpy as np
import webdataset
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.report import region_colour
from schemas.corpus import sample_key
from .conftest import IN_SHARD, KNOWN, KNOWN_SENTENCE, NO_IMAGE


class Elements(HTMLParser):
    """Every start tag as (tag, attributes), in order."""

    def __init__(self, page):
        super().__init__()
        self.elements = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def find(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


def report(corpus, tmp_path, *extra):
    output, images = corpus
    result = CliRunner().invoke(main, ["report", output, "--images", images, "--out", str(tmp_path / "report"), *extra])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    return page, Elements(page)


def drawn_keys(elements):
    keys, inside = [], False
    for tag, attrs in elements.elements:
        if attrs.get("id") == "samples":
            inside = True
        elif inside and tag == "article":
            keys.append(attrs["data-key"])
    return keys


def test_every_drawn_sample_with_its_image_boxes_and_linked_phrases(corpus, tmp_path):
    page, elements = report(corpus, tmp_path)
    assert len(drawn_keys(elements)) == 14  # all of them: fewer than --samples
    key = sample_key(KNOWN)
    known = page[page.index(f'id="s-{key}"'):]
    known = known[:known.index("</article>")]
    assert f'href="images/{key}.jpg"' in known
    assert Image.open(tmp_path / "report" / "images" / f"{key}.jpg").size == (600, 400)  # under 640: kept
    boxes = {int(a["data-region"]): a for a in Elements(known).find("g", class_="region")}
    assert sorted(boxes) == [0, 1]
    assert "0: cup 0.90" in known and "1: dining table 0.80" in known
    rects = Elements(known).find("rect", class_="box")
    assert [r["style"] for r in rects] == [f"stroke:{region_colour(0)}", f"stroke:{region_colour(1)}"]
    linked = Elements(known).find("span", class_="phrase linked")
    assert [(p["data-region"], p["style"]) for p in linked] == [("0", f"--c:{region_colour(0)}"), ("1", f"--c:{region_colour(1)}")]
    assert "similarity 0.93" in linked[0]["title"]
    unlinked = Elements(known).find("span", class_="phrase unlinked")
    assert len(unlinked) == 2 and "0.12" in unlinked[0]["title"]
    plain = re.sub(r"<sub>.*?</sub>", "", re.sub(r"<span[^>]*>|</span>", "", known))
    assert KNOWN_SENTENCE in plain  # the marked sentence still reads as itself
    assert f'href="images/{sample_key(IN_SHARD)}.jpg"' in page  # the shard's own image
    lost = page[page.index(f'id="s-{sample_key(NO_IMAGE)}"'):]
    assert 'class="placeholder"' in lost[:lost.index("</article>")] and "<image" not in lost[:lost.index("</article>")]


def test_corpus_counts_rejects_histograms_and_extremes(corpus, tmp_path):
    page, elements = report(corpus, tmp_path)
    assert "<td>images_in</td><td>20</td>" in page and "<td>text.lines</td><td>40</td>" in page
    rejected = page[page.index('id="rejected"'):page.index('id="extremes"')]
    assert "detect: no region above the confidence threshold 0.25</b>: 5" in rejected
    assert rejected.count("/x/blank") == 3 and "t.txt:3" in rejected  # a few examples per reason
    plots = [a["src"] for a in elements.find("img")]
    assert len(plots) == 5
    for src in plots:
        pixels = np.asarray(Image.open(tmp_path / "report" / src).convert("RGB")).astype(int)
        bars = (np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 60) | (np.abs(pixels - [67, 99, 216]).sum(axis=-1) < 60)
        assert bars.sum() > 300, src  # the bars are drawn, not only the axes
    low = page[page.index('id="lowest"'):page.index('id="highest"')]
    high = page[page.index('id="highest"'):page.index('id="drawn"')]
    assert f'data-key="{sample_key(KNOWN)}"' in high and f'data-key="{sample_key(NO_IMAGE)}"' in low
    assert [o["value"] for o in elements.find("option")] == ["", "bicycle", "cup", "dining table", "person"]
    assert elements.find("input", id="search") and "<script>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network


def test_the_draw_is_seeded_and_reads_only_the_shards_it_needs(corpus, tmp_path, monkeypatch):
    first = drawn_keys(report(corpus, tmp_path, "--samples", "2", "--seed", "4", "--extremes", "1")[1])
    again = drawn_keys(report(corpus, tmp_path, "--samples", "2", "--seed", "4", "--extremes", "1")[1])
    other = drawn_keys(report(corpus, tmp_path, "--samples", "2", "--seed", "7")[1])
    assert len(first) == 2 and first == again != other
    shards = {key: shard_of(corpus, key) for key in first + [sample_key(KNOWN), sample_key(NO_IMAGE)]}
    needed = set(shards.values())  # the drawn samples' shards and the lowest/highest scores'
    assert len(needed) < 3  # so the check below means something: one shard is not needed
    opened = []
    real = webdataset.WebDataset

    def recording(url, *args, **kwargs):
        opened.append(os.path.basename(url))
        return real(url, *args, **kwargs)

    monkeypatch.setattr(webdataset, "WebDataset", recording)
    report(corpus, tmp_path, "--samples", "2", "--seed", "4", "--extremes", "1")
    assert sorted(opened) == sorted(needed)


def shard_of(corpus, key):
    for path in sorted(glob.glob(os.path.join(corpus[0], "shards", "*.tar"))):
        if any(s["__key__"] == key for s in webdataset.WebDataset(path, shardshuffle=False)):
            return os.path.basename(path)
