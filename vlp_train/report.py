"""`vlp-train report RUN`: one HTML page of a run, readable without TensorBoard.

From RUN/log.jsonl and RUN/config.json: a curve per logged number (every named loss, whatever the
trainer logs: nothing is listed here), the evaluation metrics over steps, learning rate,
throughput, bad samples, the step at which ITM weighting switched on (a dashed line on every
training plot), and the resolved config. Plots are matplotlib PNGs beside index.html.
"""
from __future__ import annotations

import html
import json
import math
import os

from schemas.folders import replace_report_folder

SKIP_KEYS = {"step"}  # the x axis


def read_log(run: str) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of log.jsonl; other rows (e.g. batch keys) are left out.
    A truncated last line (a run still writing, or killed) is skipped."""
    train, evals = [], []
    with open(os.path.join(run, "log.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "step" not in row:
                continue
            if isinstance(row.get("eval"), dict):
                evals.append({"step": row["step"], **row["eval"]})
            elif "keys" not in row:
                train.append(row)
    return train, evals


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(rows: list[dict]) -> list[str]:
    """Every key holding a number in some row, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k not in SKIP_KEYS and is_number(v):
                keys.setdefault(k, None)
    return list(keys)


def is_loss(key: str) -> bool:
    """The total loss and every named loss ('granularity/objective', e.g. rt/mlm, is/itm)."""
    return key == "loss" or "/" in key


def weighting_switch(rows: list[dict]) -> int | None:
    """The first logged step with ITM weighting on (after a row with it off, or from the start)."""
    for row in rows:
        if row.get("itm_weighting") is True:
            return row["step"]
    return None


def plot_grid(path: str, rows: list[dict], keys: list[str], title: str, switch: int | None = None,
              columns: int = 3) -> str | None:
    """One small plot per key against step; None if there is nothing to plot."""
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(keys))
    lines = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.8 * lines), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.4)
        if switch is not None:
            ax.axvline(switch, color="#d62728", linestyle="--", linewidth=1, label="ITM weighting on")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if switch is not None:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.basename(path)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1300px;padding:0 16px;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse} td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} img{max-width:100%}
pre{background:#f6f6f6;padding:10px;border-radius:6px;overflow:auto;font-size:12px}
"""


def write_run_report(run: str, out_dir: str = "report", overwrite: bool = False) -> str:
    """Write the run report folder; returns the path of its index.html."""
    train, evals = read_log(run)
    config_path = os.path.join(run, "config.json")
    config = None
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    replace_report_folder(out_dir, run, overwrite)
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir)

    switch = weighting_switch(train)
    keys = numeric_keys(train)
    losses = [k for k in keys if is_loss(k)]
    others = [k for k in keys if not is_loss(k)]  # lr, samples_per_s, bad_samples, epoch, ...
    eval_keys = numeric_keys(evals)
    plots = [
        ("Losses", plot_grid(os.path.join(plot_dir, "losses.png"), train, losses, "Training losses (per log interval)",
                             switch)),
        ("Evaluation", plot_grid(os.path.join(plot_dir, "eval.png"), evals, eval_keys, "Evaluation")),
        ("Learning rate, throughput, bad samples",
         plot_grid(os.path.join(plot_dir, "training.png"), train, others, "Training", switch)),
    ]

    bad_total = sum(r.get("bad_samples", 0) for r in train if is_number(r.get("bad_samples")))
    throughput = [r["samples_per_s"] for r in train if is_number(r.get("samples_per_s"))]
    summary = [
        ("training rows logged", len(train)),
        ("last step", train[-1]["step"] if train else (evals[-1]["step"] if evals else 0)),
        ("first loss / last loss", f"{_fmt(train[0]['loss'])} / {_fmt(train[-1]['loss'])}"
         if train and is_number(train[0].get("loss")) and is_number(train[-1].get("loss")) else "-"),
        ("ITM weighting switched on at step", switch if switch is not None else "never (in the logged rows)"),
        ("bad samples (total)", bad_total),
        ("throughput (median samples/s)", _fmt(sorted(throughput)[len(throughput) // 2]) if throughput else "-"),
        ("evaluations", len(evals)),
    ]
    eval_table = ""
    if evals:
        head = "".join(f"<th>{_e(k)}</th>" for k in ["step"] + eval_keys)
        body = "".join("<tr>" + "".join(f'<td class="n">{_e(_fmt(r.get(k, "")))}</td>' for k in ["step"] + eval_keys)
                       + "</tr>" for r in evals)
        eval_table = f'<table id="eval-table"><tr>{head}</tr>{body}</table>'
    figures = "".join(f'<h2>{_e(title)}</h2><img src="plots/{_e(f)}" alt="{_e(title)}">' for title, f in plots if f)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlp-train report: {_e(run)}</title><style>{STYLE}</style></head>
<body>
<h1>Run report</h1>
<p>{_e(os.path.abspath(run))}</p>
<table id="summary">{"".join(f'<tr><td>{_e(k)}</td><td class="n">{_e(v)}</td></tr>' for k, v in summary)}</table>
{figures or "<p>no logged rows yet</p>"}
{("<h2>Evaluation rows</h2>" + eval_table) if eval_table else ""}
<h2>Resolved config</h2>
<pre id="config">{_e(json.dumps(config, indent=2, sort_keys=True)) if config is not None else "no config.json"}</pre>
</body></html>
"""
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(page)
    return index
