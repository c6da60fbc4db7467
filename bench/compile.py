"""What compiling the training step costs before it runs at speed: graphs and seconds, for
train.py's two scopes, `layers` (`vlp_train.compile.CompiledLayers`: one compiled transformer layer
serves all, the default) and `step` (`CompiledStep`: the whole step, batch and length dims marked
dynamic up front), vs a plain `torch.compile` of the step, over the same batches of varying sizes.

    python bench/compile.py                  # CPU: the 2 x 256 model of bench/train.py, batch 32, inductor
    python bench/compile.py --device cuda    # the base model, batch 480 (bench/gpu.sh does not run it)
    python bench/compile.py --layers 12 --hidden 64 --heads 2 --batch-size 16 --variants layers,step,eager

The batches are bench/train.py's synthetic shards (36 regions x 2048-d, 5 sentences per image):
text lengths and labelled-position counts vary from batch to batch, as in training; the last
quarter have fewer images (an epoch's last batch). Round robin, ITM weighting
switched on after a third of the batches (as at epoch m). Each variant runs in its own process
with an empty inductor cache, so neither reuses the other's kernels; the eager step (no
compilation) runs the same batches for scale. Reported per variant:
graphs compiled, seconds for the first pass over the batches (compilation included), and the
step's samples/s on a second pass (everything compiled). Writes bench/results/compile_<device>.json
(with other shapes or a subset of the variants, compile_<device>_<layers>x<hidden>_<heads>heads_batch<size>_<variants>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.env import device_name, write_result  # noqa: E402

VARIANTS = ("layers", "step", "plain", "eager")


def varied_batches(trainer, count: int) -> list[dict]:
    """`count` prebuilt batches, regions padded to 36 as a step compiled whole needs (the same
    batches for every variant); the last quarter with 5/8 of the images (an epoch's last batch)."""
    trainer.builder.pad_regions = True
    full = count - count // 4
    batches = trainer.prebuilt(full)
    trainer.cfg.data.batch_size = max(2, trainer.cfg.data.batch_size * 5 // 8)
    return batches + trainer.prebuilt(count - full)


def shape_flags(args) -> list[str]:
    """The model and batch flags given, passed on to bench/train.py (its CPU defaults otherwise)."""
    return [flag for name in ("batch_size", "layers", "hidden", "heads") if getattr(args, name)
            for flag in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def run_variant(variant: str, args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from bench import train as bench_train
    from vlp_train.compile import STEP_GRAPHS, allow_graphs, step_module_for
    from vlp_train.step import Pretraining

    train_args = bench_train.parse_args(["--device", args.device, "--compile", "off", "--itm-weighting", "on"]
                                        + shape_flags(args))
    cfg = bench_train.build_config(train_args)
    trainer = bench_train.Trainer(cfg, bench_train.synthetic_corpus(train_args.images, train_args.regions,
                                                                    train_args.feature_dim))
    batches = varied_batches(trainer, args.batches)
    counters.clear()
    if variant in ("layers", "step"):  # train.py's
        trainer.step_module = step_module_for(trainer.model, trainer.run.family, variant)
    elif variant == "plain":  # what a researcher writes: torch.compile, with the same raised graph limit
        allow_graphs(STEP_GRAPHS)
        trainer.step_module = torch.compile(Pretraining(trainer.model, trainer.run.family))
    else:  # the uncompiled step, for scale
        trainer.step_module = Pretraining(trainer.model, trainer.run.family)
    weighting_from = len(batches) // 3
    trainer.sync()
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        trainer.step(batch["views"], n >= weighting_from)
    trainer.sync()
    first_pass = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        trainer.step(batch["views"], n >= weighting_from)
    trainer.sync()
    second_pass = time.perf_counter() - start
    samples = sum(bench_train.samples_in(b) for b in batches)
    return {"graphs": graphs, "graphs_after_second_pass": counters["stats"]["unique_graphs"],
            "first_pass_s": first_pass, "second_pass_s": second_pass, "samples_per_s": samples / second_pass,
            "distinct_sizes": len({(task, tuple(v["input_ids"].shape), tuple(v["mlm_positions"].shape),
                                    tuple(v["features"].shape)) for b in batches for task, v in b["views"].items()}),
            "shape": {"layers": trainer.model.bert.config.num_hidden_layers,
                      "hidden": trainer.model.bert.config.hidden_size,
                      "heads": trainer.model.bert.config.num_attention_heads, "batch": train_args.batch_size}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, help="images per batch (default: bench/train.py's)")
    parser.add_argument("--layers", type=int, help="model layers (default: bench/train.py's)")
    parser.add_argument("--hidden", type=int, help="model width (default: bench/train.py's)")
    parser.add_argument("--heads", type=int, help="attention heads (default: bench/train.py's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return None
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants {args.variants!r}: expected a comma list of {', '.join(VARIANTS)}")
    result = {"device": device_name(args.device), "command": "python " + " ".join(sys.argv), "batches": args.batches,
              "backend": "inductor", "itm_weighting_from_batch": args.batches // 3}
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--device", args.device,
                       "--batches", str(args.batches)] + shape_flags(args)
            done = subprocess.run(command, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                  capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
        result[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, json.dumps(result[variant]), flush=True)
    for variant in ("layers", "step"):  # compile cost against the plain torch.compile, and against ours whole
        for other in ("plain", "step"):
            if variant != other and variant in result and other in result:
                result[f"first_pass_ratio_{variant}_to_{other}"] = (result[variant]["first_pass_s"]
                                                                    / result[other]["first_pass_s"])
    write_result(results_name(args, variants, result[variants[0]]["shape"]), result)
    return result


def results_name(args, variants: list[str], shape: dict) -> str:
    """compile_<device> for the default run; any other shape or subset of variants is named by both,
    so it cannot overwrite the default run's figures or another shape's."""
    name = f"compile_{args.device}"
    if variants == list(VARIANTS) and not any((args.batch_size, args.layers, args.hidden, args.heads)):
        return name
    return (f"{name}_{shape['layers']}x{shape['hidden']}_{shape['heads']}heads_batch{shape['batch']}_"
            + "_".join(variants))


if __name__ == "__main__":
    main()
