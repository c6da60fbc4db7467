"""The VLMAE step at several mask ratios: what MAE's masking saves (the paper: 49.6 vs ALBEF's
60.5 GMACs a pair at mask ratio 0.5).

    python bench/vlmae.py --device cpu                   # 2 CPU cores: a reduced model, batch 16, regions
    python bench/vlmae.py --device cpu --visual patches  # the same on 128 px images in 16 px patches (64 a image)
    python bench/vlmae.py --device cuda --visual patches # vlmae-base's shape (12 x 768 text and image encoders, 4 x 512 decoder, 256 px)
    python bench/vlmae.py --device cpu --visual patches --shape base --flops-only --batch-size 2   # base's FLOPs here

For each mask ratio (their timed windows interleaved, so that on a shared machine each meets the
same load): the model step of `vlp-train run` (`vlp_train.components.build_run` with the
preset, AdamW, `compute_loss`, backward, clipping, optimizer step; batches built beforehand and on
the device, so no loader cost) on the synthetic corpus of bench/train.py (36 regions of 2048-d
features, 5 sentences with linked phrases an image; with `--visual patches` each sample carries its
image as --store-images stores it), VLMAE's pair task alone; samples/s as the
median of `--repeats` windows of `--steps` steps after `--warmup`, and the model FLOPs per sample
(forward and backward, matrix products and attention, torch's FlopCounterMode on one real step).
The whole image is always seen by the momentum image encoder, so its cost stays at every ratio.
Writes bench/results/vlmae_<device>_<visual>.json.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.env import device_name, peak_rss_mb, results_name, write_result  # noqa: E402
from bench.train import Trainer, build_config, measure_interleaved, synthetic_corpus  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--mask-ratios", default="0,0.5,0.75")
    parser.add_argument("--visual", choices=["regions", "patches"], default="regions")
    parser.add_argument("--image-size", type=int, help="patches: the square side (default 128 in the reduced shape, 256 in base)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default: 16 on CPU, 128 on CUDA)")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--steps", type=int, help="steps per timed window (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="steps before timing (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-name", default=None)
    parser.add_argument("--flops-only", action="store_true",
                        help="count the FLOPs per pair (forward, and forward + backward) of one step, time nothing: "
                             "with --shape base, vlmae-base's shape on a CPU")
    parser.add_argument("--shape", choices=["reduced", "base", "tiny"],
                        help="default: reduced on CPU, base on CUDA; tiny: 1 + 1 x 32 text, 1 x 32 image encoder (tests)")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    args.shape = args.shape or ("reduced" if cpu else "base")
    args.batch_size = args.batch_size or (16 if cpu else 128)
    args.steps = args.steps or (3 if cpu else 20)
    args.warmup = args.warmup or (2 if cpu else 10)
    args.image_size = args.image_size or {"reduced": 128, "base": 256, "tiny": 32}[args.shape]
    other_shape = f"_{args.shape}" if args.shape != ("reduced" if cpu else "base") else ""
    args.results_name = args.results_name or results_name(f"vlmae_{args.device}_{args.visual}{other_shape}",
                                                          "flops" if args.flops_only else None)
    return args


def vlmae_config(args, mask_ratio: float):
    """vlmae-base's shape on CUDA; on CPU 4 x 256 text (2 text + 2 fusion layers), a 4 x 256 image
    encoder and a 2 x 128 decoder (tiny: 2 x 32, 1 x 32, 1 x 16)."""
    tiny = args.shape == "tiny"
    cpu = args.shape == "reduced" or tiny
    width = 32 if tiny else 256
    shape = argparse.Namespace(
        preset="vlmae-base", layers=(2 if tiny else 4) if cpu else None, hidden=width if cpu else None,
        heads=(2 if tiny else 4) if cpu else None,
        feature_dim=args.feature_dim, compile="auto", compile_scope="layers", batch_size=args.batch_size,
        num_workers=0, shuffle_buffer=args.batch_size, regions=args.regions, schedule="round_robin",
        device=args.device, visual=args.visual, image_size=args.image_size)
    cfg = build_config(shape)
    if cpu:
        cfg.model.vision_layers, cfg.model.vision_hidden, cfg.model.vision_heads = (1, 32, 2) if tiny else (4, 256, 4)
        cfg.model.decoder_layers, cfg.model.decoder_hidden, cfg.model.decoder_heads = (1, 16, 2) if tiny else (2, 128, 4)
    if tiny:
        cfg.model.patch_size = 8
    cfg.model.mask_ratio = mask_ratio
    return cfg


def flops_per_sample(trainer: Trainer, views: dict) -> tuple[float, float]:
    """Model FLOPs per pair of one step, (forward + backward, forward), counted in one pass on a
    copy of the model: the counter's total read after the forward and again after the backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp_train.step import Pretraining, compute_loss
    step = Pretraining(copy.deepcopy(trainer.model), trainer.run.family)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = compute_loss(step, views, False, nullcontext())
        forward = counter.get_total_flops()
        loss.backward()
    batch = int(next(iter(views.values()))["input_ids"].shape[0])
    del step
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return counter.get_total_flops() / batch, forward / batch


def main(argv=None) -> dict:
    load_average = os.getloadavg()[0]
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from bench.train import STORED_IMAGE_SIZE
    shards = synthetic_corpus(args.images, args.regions, args.feature_dim,
                              stored_images=STORED_IMAGE_SIZE if args.visual == "patches" else 0)
    result = {"device": device_name(args.device), "load_average_at_start": load_average,
              "command": "python " + " ".join(sys.argv if argv is None else ["bench/vlmae.py", *argv]),
              "batch": args.batch_size, "regions": args.regions, "feature_dim": args.feature_dim, "visual": args.visual,
              "image_size": args.image_size if args.visual == "patches" else None, "ratios": {}}
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    runs = {}
    for ratio in ratios:
        trainer = Trainer(vlmae_config(args, ratio), shards)
        model = trainer.model
        prebuilt = trainer.prebuilt(2)
        result["shape"] = {"text_layers": model.text_layers, "fusion_layers": model.fusion_layers,
                           "hidden": model.bert.config.hidden_size, "vision": model.spec["vision"],
                           "decoder": model.spec["decoder"], "parameters": trainer.parameters}
        flops, forward_flops = flops_per_sample(trainer, prebuilt[0]["views"])
        entry = {"visible_per_image": int(prebuilt[0]["views"]["vl"]["visible_mask"].sum(1).float().mean()),
                 "elements_per_image": int(prebuilt[0]["views"]["vl"]["hidden"].shape[1]),
                 "gflops_per_sample": flops / 1e9, "forward_gflops_per_sample": forward_flops / 1e9}
        result["ratios"][str(ratio)] = entry
        print(f"mask ratio {ratio}: {entry['gflops_per_sample']:.2f} GFLOPs/pair forward + backward, "
              f"{entry['forward_gflops_per_sample']:.2f} forward; {entry['visible_per_image']} of "
              f"{entry['elements_per_image']} {args.visual} visible", flush=True)
        write_result(args.results_name, result)
        if not args.flops_only:
            runs[ratio] = (trainer, prebuilt)
    if args.flops_only:
        return result
    # the ratios' windows interleaved (0, 0.5, 0.75, 0, 0.5, ...): on a shared machine each ratio
    # meets the same load, so their rates compare even when the absolute figures drift
    def one_step(trainer: Trainer, prebuilt: list[dict]):
        batches = itertools.cycle(prebuilt)

        def step() -> int:
            views = next(batches)["views"]
            trainer.step(views, False)
            return int(views["vl"]["input_ids"].shape[0])
        return step
    steps = {ratio: one_step(*run) for ratio, run in runs.items()}
    sync = next(iter(runs.values()))[0].sync  # one device for all
    for ratio, measured in measure_interleaved(steps, args.warmup, args.steps, args.repeats, sync).items():
        entry = result["ratios"][str(ratio)]
        entry.update(samples_per_s=measured["samples_per_s"], windows_samples_per_s=measured["windows_samples_per_s"])
        print(f"mask ratio {ratio}: {entry['samples_per_s']:.2f} pairs/s (windows {entry['windows_samples_per_s']})",
              flush=True)
    result["peak_rss_mb"] = peak_rss_mb()
    if args.device == "cuda":
        import torch
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_result(args.results_name, result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1)[:2000])
