"""`vlp-train run`: the multi-granular trainer over vlp-data shards."""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from vlp_train.config import PRESETS
from vlp_train.finetune.config import PRESETS as FINETUNE_PRESETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@click.group(help=__doc__)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    click.get_current_context().call_on_close(_leave_process_group)  # after the command (every stage), even on error


def _leave_process_group():
    if "vlp_train.distributed" in sys.modules:  # a command that trained: torchrun's process group ends here
        sys.modules["vlp_train.distributed"].shut_down()


@main.command("run")
@click.option("--shards", default=None, help="Shards: glob, comma list or brace pattern [default: vlp-out/shards/*.tar].")
@click.option("--output", default="vlp-run", show_default=True, help="Run folder: logs, checkpoints, hf/ export.")
@click.option("--config", "preset", default="debug", show_default=True, type=click.Choice(sorted(PRESETS)))
@click.option("--init", default=None, help="Start from: a run folder or its hf/ export (the whole model), a HF BERT "
              "folder (the backbone), or 'random' (model.init).")
@click.option("--set", "overrides", multiple=True, help="Override a config key, e.g. --set optim.lr=6e-5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output.")
@click.option("--stage", default=None, help="VLMo's pre-training stage (model.stage): vision, language or vl; or a "
              "comma list (vision,language,vl) run one after another, each into OUTPUT/STAGE and started from the "
              "one before.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an --output that holds an earlier run (its log, "
              "checkpoints, TensorBoard events and export are removed).")
def run(shards, output, preset, init, overrides, resume, overwrite, stage):
    """Train; with --resume, continue exactly where the last checkpoint stopped."""
    from vlp_train.config import check_init, load_config
    from vlp_train.train import train

    if init and resume:
        raise click.UsageError("--init with --resume: a resumed run keeps the model it started from")
    stages = [s.strip() for s in stage.split(",") if s.strip()] if stage else []
    if len(stages) > 1:
        if resume:
            raise click.UsageError("--resume with several --stage: resume the unfinished stage's folder (OUTPUT/STAGE)")
        previous = init
        for one in stages:
            folder = os.path.join(output, one)
            click.echo(f"stage {one} -> {folder}")
            run.callback(shards, folder, preset, previous, overrides, False, overwrite, one)
            previous = folder
        return
    overrides = list(overrides) + ([f"model.stage={stages[0]}"] if stages else [])
    try:
        cfg = load_config(preset, list(overrides) + ([f"model.init={init}"] if init else []))
        if not resume:
            check_init(cfg, preset)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    cfg.run.output = output
    if shards:
        cfg.data.shards = shards
    try:
        summary = train(cfg, resume=resume, overwrite=overwrite)
    except (OSError, ValueError, RuntimeError) as err:  # FileNotFoundError is an OSError
        raise click.ClickException(str(err)) from err
    click.echo(f"{summary['steps']} steps -> {output}")
    if summary.get("eval"):
        click.echo("eval: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary["eval"].items()}))
    if not summary.get("stopped"):
        backbone = ("; the backbone alone: transformers.BertModel.from_pretrained" if summary["arch"] == "single_stream"
                    else "")  # VLMo's and VLMAE's weights are not a BertModel's
        click.echo(f"model: {os.path.join(output, 'hf')} (the whole model: vlp_train.pretrained.load or --init{backbone})")


@main.command("report")
@click.argument("run_dir", metavar="RUN", default="vlp-run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", default="report", show_default=True,
              help="Report folder (replaced when it is an earlier report's or empty).")
@click.option("--overwrite", is_flag=True, help="Replace --out even when it is not an earlier report's folder.")
def report(run_dir, out_dir, overwrite):
    """One HTML page of a run: loss curves per named loss, evaluation, learning rate, throughput,
    bad samples, when ITM weighting switched on, and the resolved config."""
    from vlp_train.report import write_run_report
    try:
        click.echo(f"run report: {write_run_report(run_dir, out_dir, overwrite)}")
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err


FINETUNE_TASKS = list(FINETUNE_PRESETS)  # each task has its preset (finetune/config.py)


@main.command("finetune")
@click.option("--task", required=True, type=click.Choice(FINETUNE_TASKS), help="The downstream task (its preset: "
              "the literature's epochs, lr and batch).")
@click.option("--init", default=None, help="Start from: a run folder or its hf/ export (the whole pre-trained model), "
              "a HF BERT folder, or 'random' [default: the bundled MiniLM].")
@click.option("--data", default="", help="The dataset's folder in its public release layout (easy-vqa: the "
              "installed package's data by default).")
@click.option("--detections", default=None, help="Detections of the dataset's images: glob or comma list of "
              "vlp-data detect Parquet or JSON Lines files.")
@click.option("--images", default=None, help="The folder of the dataset's image files (matched to its image ids as "
              "detections are): a model pre-trained on pixels (model.visual patches or both) needs them.")
@click.option("--output", default="vlp-ft", show_default=True, help="Fine-tuning folder: logs, checkpoints, best/.")
@click.option("--set", "overrides", multiple=True, help="Override a config key, e.g. --set optim.lr=5e-5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an --output that holds an earlier fine-tuning.")
def finetune_cmd(task, init, data, detections, images, output, overrides, resume, overwrite):
    """Fine-tune on a downstream task; the best epoch by the validation metric is kept (OUTPUT/best)."""
    from vlp_train.finetune.config import load_config
    from vlp_train.finetune.train import finetune

    try:
        cfg = load_config(task, list(overrides) + ([f"model.init={init}"] if init else []))
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    cfg.run.output = output
    cfg.data.data = data or cfg.data.data
    cfg.data.detections = detections or cfg.data.detections
    cfg.data.images = images or cfg.data.images
    try:
        summary = finetune(cfg, resume=resume, overwrite=overwrite)
    except (OSError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{summary['steps']} steps -> {output}")
    if summary.get("best"):
        best = summary["best"]
        click.echo(f"best (step {best['step']}): " + json.dumps(_rounded(best["metrics"])))
        click.echo(f"model: {os.path.join(output, 'best')}; metrics: {os.path.join(output, 'metrics.json')}")


@main.command("evaluate")
@click.option("--task", required=True, type=click.Choice(FINETUNE_TASKS))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A fine-tuning folder (its best/ model).")
@click.option("--data", default="", help="The dataset's folder (easy-vqa: the installed package's data by default).")
@click.option("--split", required=True, help="The split to score (e.g. val, test, dev, testA).")
@click.option("--detections", default=None, help="Detections of the split's images (glob or comma list); "
              "required but for a model on patches alone.")
@click.option("--images", default=None, help="The folder of the split's image files: a model on pixels needs them.")
@click.option("--max-examples", default=0, show_default=True, type=click.IntRange(0), help="Score the first N only (0: all).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--output", default=None, help="Metrics file [default: MODEL/metrics-SPLIT.json].")
@click.option("--candidates", default=16, show_default=True, type=click.IntRange(1),
              help="retrieval fine-tuned by ITM: ITM re-ranks each query's top K of the first stage (sentence-BERT of "
              "the image's tags).")
@click.option("--rerank-k", default=0, show_default=True, type=click.IntRange(0),
              help="retrieval fine-tuned as a dual encoder (ITC): ITM re-scores each query's top K of the dual encoder "
              "(0: the dual encoder alone, as VLMo evaluates).")
def evaluate_cmd(task, model_dir, data, split, detections, images, max_examples, batch_size, device, output,
                 candidates, rerank_k):
    """Score a fine-tuned model on a split: prints the metrics and writes them as JSON."""
    from vlp_train.finetune.train import evaluate

    try:
        result = evaluate(task, model_dir, data, split, detections, device, max_examples, batch_size, output,
                          candidates, rerank_k, images)
    except (OSError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(_rounded(result), sort_keys=True))


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
