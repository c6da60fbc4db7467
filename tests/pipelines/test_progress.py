"""Progress while a build runs: per-stage lines from the pipeline's own counters, which end at
the totals that stats.json records; and the corpus report of that real build."""
import json
import os
import re

import numpy as np
import pytest
import skimage.data
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.progress import ProgressPrinter
from pipelines.sample import SAMPLE_DIR

LINE = re.compile(r"^  (?P<label>[a-z ]+?)\s+(?P<value>[\d,]+)( of |\s*$|  )")


def last_values(output: str) -> dict[str, int]:
    """The last value printed for each stage label."""
    values = {}
    for line in output.splitlines():
        match = LINE.match(line)
        if match:
            values[match["label"]] = int(match["value"].replace(",", ""))
    return values


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build of 4 images (2 of them rejected), its progress output captured."""
    root = tmp_path_factory.mktemp("progress")
    images = root / "images"
    images.mkdir()
    Image.fromarray(skimage.data.coffee()).save(images / "coffee.jpg")
    Image.fromarray(skimage.data.astronaut()).save(images / "astronaut.png")
    Image.fromarray(np.full((90, 120, 3), 80, np.uint8)).save(images / "flat.png")  # no region: rejected
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")                      # undecodable: rejected
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLP_PROGRESS_INTERVAL", "0.5")
        result = CliRunner().invoke(main, ["build-retrieval", "--images", str(images / "*"), "--text",
                                           f"{SAMPLE_DIR}/scenes.txt", "--output", str(out), "--k", "3"])
    assert result.exit_code == 0, result.output
    return out, images, result


def test_build_progress_counters_reach_the_stats_totals(built):
    out, _, result = built
    stats = json.loads((out / "stats.json").read_text())
    before_summary = result.output.split("done in")[0]
    assert before_summary.count("progress after") >= 2, result.output  # updates while it ran, not one at the end
    shown = last_values(before_summary)
    assert shown["images read"] == stats["images_in"] == 4
    assert shown["images detected"] == stats["images_in"]
    assert shown["records rejected"] == stats["rejected_total"] >= 2
    assert shown["sentences read"] == stats["sentences"]
    assert shown["samples written"] == stats["images_out"] >= 1
    assert shown["queries searched"] >= 1 and shown["texts embedded"] >= stats["sentences"]


def test_progress_lines_have_rates_and_an_estimate_where_the_total_is_known():
    now = [0.0]
    printer = ProgressPrinter(stream=open("/dev/null", "w"), clock=lambda: now[0])
    printer.lines({("read_images", "images"): 100})
    now[0] = 5.0
    printer.lines({("read_images", "images"): 100})  # the detector has not started: its rate starts here
    now[0] = 15.0
    lines = printer.lines({("read_images", "images"): 100, ("detect", "images"): 30})
    detected = next(line for line in lines if "images detected" in line)
    assert "30 of 100 (30%)" in detected and "3.0/s" in detected and "~23s left" in detected
    # a later, lagging report never makes a count go back
    assert "30 of 100" in next(line for line in printer.lines({("read_images", "images"): 100, ("detect", "images"): 20}) if "detected" in line)


def test_a_remote_job_is_polled_through_its_result_metrics_while_it_runs():
    """Dataflow's run() returns at once; the job's counters are read from result.metrics() until it ends."""
    import io
    import threading
    from types import SimpleNamespace

    from pipelines.progress import run_with_progress

    finished = threading.Event()
    detected = [0]

    def counter(namespace, name, value):
        return SimpleNamespace(key=SimpleNamespace(metric=SimpleNamespace(namespace=namespace, name=name)),
                               committed=None, attempted=value)

    class RunningJob:
        def metrics(self):
            return SimpleNamespace(query=lambda: {"counters": [counter("read_images", "images", 10),
                                                               counter("detect", "images", detected[0])]})

        def wait_until_finish(self):
            for n in (3, 6, 10):
                detected[0] = n
                finished.wait(0.3)

    pipeline = SimpleNamespace(runner=object(), run=RunningJob)
    stream = io.StringIO()
    run_with_progress(pipeline, ProgressPrinter(stream=stream), interval=0.1)
    shown = stream.getvalue()
    assert "images detected" in shown and " of 10 (" in shown  # seen part way, with its total
    assert last_values(shown)["images detected"] == 10


def test_corpus_report_of_a_real_build(built, tmp_path):
    out, images, _ = built
    stats = json.loads((out / "stats.json").read_text())
    result = CliRunner().invoke(main, ["report", str(out), "--images", str(images / "*"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "index.html").read_text()
    drawn = page[page.index('id="samples"'):]
    assert drawn.count('<article class="sample"') == stats["images_out"]
    assert drawn.count("<image href=") == stats["images_out"] and 'class="placeholder"' not in drawn
    assert len(os.listdir(tmp_path / "r" / "images")) == stats["images_out"]


def test_on_a_terminal_the_block_is_redrawn_in_place_and_plain_lines_elsewhere():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        printer = ProgressPrinter(stream=stream)
        printer.update({("read_images", "images"): 5})
        printer.update({("read_images", "images"): 5, ("detect", "images"): 2})
    assert terminal.getvalue().count("\x1b[2F\x1b[J") == 1  # up over the 2-line block, cleared, redrawn
    assert "\x1b" not in log.getvalue()
    assert log.getvalue().count("images read") == 1  # a plain line only when the count moved


def test_a_beam_without_the_internals_progress_hooks_runs_with_final_totals_only(monkeypatch):
    """Live progress hooks FnApiRunner internals of apache-beam 2.77; where they differ (another
    Beam), the run goes on without the hook and the last line still shows the totals."""
    import io

    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from pipelines import progress

    assert progress.live_progress_supported()  # the pinned Beam has them

    class OtherRequester:  # another Beam's shape of the class
        def __init__(self, handler, instruction, every):
            pass

    with monkeypatch.context() as patched:
        patched.setattr(fn_runner, "ProgressRequester", OtherRequester)
        assert not progress.live_progress_supported()
    monkeypatch.setattr(progress, "live_progress_supported", lambda: False)  # as with such a Beam
    counter = Metrics.counter("read_images", "images")

    def count(x):
        counter.inc()
        return x

    pipeline = beam.Pipeline(runner=fn_runner.FnApiRunner())
    _ = pipeline | beam.Create(range(7)) | beam.Map(count)
    stream = io.StringIO()
    progress.run_with_progress(pipeline, progress.ProgressPrinter(stream=stream), interval=0.05)
    assert type(pipeline.runner) is fn_runner.FnApiRunner  # not swapped for the hooking runner
    assert "7" in stream.getvalue().splitlines()[-1]
