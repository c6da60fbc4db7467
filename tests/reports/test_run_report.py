"""`vlp-train report`: every logged number plotted (named losses and metrics the report cannot know
in advance), the ITM weighting switch, the summary and the resolved config."""
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

import vlp_train.report as run_report
from vlp_train.cli import main


def test_run_report_plots_every_logged_number_generically(run_folder, tmp_path, monkeypatch):
    plotted = {}
    real = run_report.plot_grid

    def recording(path, rows, keys, title, switch=None, **kwargs):
        plotted[title] = (list(keys), switch)
        return real(path, rows, keys, title, switch, **kwargs)

    monkeypatch.setattr(run_report, "plot_grid", recording)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", run_folder, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output
    losses, switch = plotted["Training losses (per log interval)"]
    assert losses == ["loss", "rt/mlm", "is/itm", "zz/novel"] and switch == 14
    assert plotted["Evaluation"][0] == ["tag_mlm_acc", "sentence_mlm_acc", "itm_auc"]
    assert sorted(plotted["Training"][0]) == ["bad_samples", "epoch", "lr", "samples_per_s"]
    page = (out / "index.html").read_text()
    assert "<td>training rows logged</td><td class=\"n\">20</td>" in page  # the keys row and the torn line left out
    assert "<td>ITM weighting switched on at step</td><td class=\"n\">14</td>" in page
    assert "<td>bad samples (total)</td><td class=\"n\">1</td>" in page
    assert page.count("<tr><td class=\"n\">") == 4 and ">nan<" in page  # one row per evaluation
    config = page[page.index('<pre id="config">') + len('<pre id="config">'):page.index("</pre>")]
    assert json.loads(config.replace("&quot;", '"')) == json.loads(open(f"{run_folder}/config.json").read())
    for name in ("losses.png", "eval.png", "training.png"):
        assert f'src="plots/{name}"' in page
        pixels = np.asarray(Image.open(out / "plots" / name).convert("RGB")).astype(int)
        curve = (np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 60).sum()  # matplotlib's first colour
        assert curve > 300, name  # the curves are drawn, not only the axes
