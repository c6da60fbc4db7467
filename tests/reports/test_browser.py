"""Both reports opened in headless Chromium and checked from the page itself, as a person would
look at them: no console errors, every image loads, hovering a phrase lights its box in the same
colour, the filter and search work, the plots are drawn; a screenshot of each is kept in the
test's temp folder. Skips (saying why) where Chromium is not installed: `make test` installs it
with apt-get where it can."""
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from pipelines.report import region_colour, write_report
from schemas.corpus import sample_key
from .browser import Browser, find_chromium
from .conftest import KNOWN
from vlp_train.report import write_run_report

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (`apt-get install chromium`; make test does it where apt-get works)")

IMAGES_LOADED = """Promise.all(Array.from(document.querySelectorAll('img, svg image')).map(el => new Promise(done => {
  const src = el.tagName.toLowerCase() === 'img' ? el.src : new URL(el.href.baseVal, document.baseURI).href;
  const probe = new Image();
  probe.onload = () => done([src, probe.naturalWidth]);
  probe.onerror = () => done([src, 0]);
  probe.src = src;
})))"""

DOCUMENT_BOX = """(() => {{ const el = document.querySelector({selector!r}); el.scrollIntoView({{block: 'center'}});
  const r = el.getBoundingClientRect();
  return {{x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height,
          cx: r.left + r.width / 2, cy: r.top + r.height / 2}}; }})()"""


@pytest.fixture(scope="module")
def browser():
    chromium = Browser(CHROMIUM)
    yield chromium
    chromium.close()


def rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)))


def drawn(png: bytes) -> bool:
    """Not blank: a real plot has ink on white (a spread of grey levels)."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L")).std()) > 10


def check_common(page, index: pathlib.Path, shot: pathlib.Path, min_images: int):
    page.open(index.as_uri())
    loaded = page.evaluate(IMAGES_LOADED, await_promise=True)
    assert len(loaded) >= min_images
    assert [src for src, width in loaded if not width] == []
    plots = page.evaluate("Array.from(document.querySelectorAll('img')).map(el => el.getAttribute('src'))")
    for src in plots:
        box = page.evaluate(DOCUMENT_BOX.format(selector=f"img[src='{src}']"))
        assert box["width"] > 100 and box["height"] > 100
        assert drawn(page.screenshot({k: box[k] for k in ("x", "y", "width", "height")})), src
    shot.write_bytes(page.screenshot())
    assert Image.open(shot).size[1] > 800


def test_corpus_report_in_chromium(browser, corpus, tmp_path):
    output, images = corpus
    index = pathlib.Path(write_report(output, str(tmp_path / "report"), images=images))
    page = browser.new_page()
    try:
        check_common(page, index, tmp_path / "corpus-report.png", min_images=5 + 13)

        # the known sample: each linked phrase and its region's box share one colour; hovering lights that box
        key = sample_key(KNOWN)
        for region in (0, 1):
            phrase = f"#samples #s-{key} .phrase.linked[data-region='{region}']"
            box = page.evaluate(DOCUMENT_BOX.format(selector=phrase))
            page.hover(box["cx"], box["cy"])
            state = page.evaluate(f"""(() => {{
              const sample = document.querySelector('#samples #s-{key}');
              const phrase = sample.querySelector(".phrase.linked[data-region='{region}']");
              return {{phrase: getComputedStyle(phrase).borderBottomColor,
                      box: getComputedStyle(sample.querySelector("g.region[data-region='{region}'] rect")).stroke,
                      hot: Array.from(sample.querySelectorAll('g.region.hot')).map(g => g.dataset.region),
                      dim: Array.from(sample.querySelectorAll('g.region.dim')).map(g => g.dataset.region),
                      phraseHot: phrase.classList.contains('hot')}}; }})()""")
            assert state["phrase"] == state["box"] == rgb(region_colour(region))
            assert state["hot"] == [str(region)] and state["dim"] == [str(1 - region)] and state["phraseHot"]
        unlinked = page.evaluate(f"getComputedStyle(document.querySelector('#samples #s-{key} .phrase.unlinked'))"
                                 ".borderBottomStyle")
        assert unlinked == "dotted"

        # the tag filter and the sentence search, in plain JavaScript
        def shown(tag, words):
            return page.evaluate(f"""(() => {{
              const select = document.getElementById('tag-filter'); select.value = {json.dumps(tag)};
              select.dispatchEvent(new Event('change'));
              const search = document.getElementById('search'); search.value = {json.dumps(words)};
              search.dispatchEvent(new Event('input'));
              return [document.querySelectorAll('#samples .sample:not(.hidden)').length,
                      document.getElementById('shown').textContent]; }})()""")
        assert shown("", "") == [14, "14 of 14 samples shown"]
        assert shown("cup", "")[0] == 1
        assert shown("bicycle", "")[0] == 6
        assert shown("", "rides a bicycle")[0] == 13
        assert shown("person", "number 3 ")[0] == 1
        assert page.console_errors() == []
    finally:
        page.close()


def test_run_report_in_chromium(browser, run_folder, tmp_path):
    index = pathlib.Path(write_run_report(run_folder, str(tmp_path / "run-report")))
    page = browser.new_page()
    try:
        check_common(page, index, tmp_path / "run-report.png", min_images=3)
        assert "ITM weighting switched on at step" in page.evaluate("document.getElementById('summary').innerText")
        assert json.loads(page.evaluate("document.getElementById('config').textContent"))["optim"]["epochs"] == 3
        assert page.console_errors() == []
    finally:
        page.close()
