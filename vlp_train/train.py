"""`vlp-train run`: build the run's components, then the loop: resume -> step -> log -> eval -> save."""
from __future__ import annotations

import logging
import os

import torch
from tqdm import tqdm

from vlp_train import checkpoint, distributed
from vlp_train.components import Run, build_run
from vlp_train.config import TrainConfig, dumps
from vlp_train.curriculum import itm_weighting_on
from vlp_train.data import make_loader
from vlp_train.evaluate import evaluate
from vlp_train.pretrained import EXPORT_FOLDER
from vlp_train.runlog import MetricsWindow, RunLogger
from vlp_train.step import compute_loss, to_device

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training into cfg.run.output. Returns a summary."""
    ckpt_dir = os.path.join(cfg.run.output, "checkpoints")
    state = None
    if resume:
        state, cfg = resume_state(ckpt_dir)
    run = build_run(cfg)
    step, epoch, start_batch = 0, 0, 0
    if state is not None:
        step, epoch, start_batch = load_state(run, state)
    logger = start_logging(run, fresh=state is None)

    bar = tqdm(total=run.total_steps, initial=step, desc="train", disable=not run.dist.main, dynamic_ncols=True)
    last_eval, stopped, window = None, False, MetricsWindow()
    run.model.train()
    while step < run.total_steps and not stopped:
        weighting = itm_weighting_on(epoch, cfg.objectives)
        run.dataset.set_position(epoch, start_batch, run.batches_of(epoch) if cfg.data.resampled else None,
                                 task_offset=sum(run.batches_of(e) for e in range(epoch)))
        loader = make_loader(run.dataset, cfg.data.num_workers, pin_memory=run.device.type == "cuda")
        batch_in_epoch, micro = start_batch, 0
        for batch in distributed.synchronised(loader, run.dist):
            with distributed.accumulating(run.step_module, completes_step=(micro + 1) % run.grad_accum == 0):
                loss, named, _ = compute_loss(run.step_module, to_device(batch["views"], run.device), weighting,
                                              run.autocast)
                (loss / run.grad_accum).backward()
            batch_in_epoch, micro = batch["index"] + 1, micro + 1
            window.add(loss, named, len(batch["keys"]) * run.dist.world, batch["bad_samples"])
            if logger and cfg.run.log_keys:
                logger.keys(step, batch["keys"])
            if micro % run.grad_accum:
                continue
            optimizer_step(run)
            step += 1
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == run.total_steps:
                row = logger.flush(window, step, epoch, run.scheduler.get_last_lr()[0], weighting) if logger else None
                if row:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                window = MetricsWindow()
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and run.dist.main:
                last_eval = evaluate_run(run)
                logger.eval(step, last_eval)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                save_checkpoint(run, step, {"epoch": epoch, "batch": batch_in_epoch})
            if cfg.run.stop_after and step >= cfg.run.stop_after:
                stopped = True  # as if the process were killed here
                break
            if step >= run.total_steps:
                break
        else:
            # an epoch's last micro-batches short of a whole step are dropped (as a loader drops a
            # partial batch): kept, they would join the next epoch's first step
            run.optimizer.zero_grad(set_to_none=True)
            epoch, start_batch = epoch + 1, 0
            continue
        start_batch = batch_in_epoch
    bar.close()
    summary = {"steps": step, "epoch": epoch, "stopped": stopped, "eval": last_eval}
    if stopped:
        return summary
    save_checkpoint(run, step, {"epoch": epoch, "batch": start_batch})
    if not run.dist.main:
        return summary
    summary["eval"] = evaluate_run(run)
    logger.eval(step, summary["eval"])
    run.model.save_pretrained(os.path.join(cfg.run.output, EXPORT_FOLDER), run.tokenizer)
    logger.close()
    summary["bad_samples"] = logger.bad_samples
    return summary


def optimizer_step(run: Run) -> None:
    if run.cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def evaluate_run(run: Run) -> dict:
    return evaluate(run.model, run.builder, run.eval_urls, run.tasks, run.cfg, run.device, run.autocast)


def resume_state(ckpt_dir: str) -> tuple[dict, TrainConfig]:
    """The newest checkpoint and the config it was saved with: the run continues with its own config."""
    path = checkpoint.latest(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
    state = checkpoint.load(path)
    cfg = TrainConfig.from_dict(state["config"])
    cfg.run.stop_after = 0  # a simulated kill belongs to the process that was stopped
    log.info("resuming from %s (step %d)", path, state["step"])
    return state, cfg


def load_state(run: Run, state: dict) -> tuple[int, int, int]:
    """Model, optimizer, scheduler and RNG from a checkpoint -> (step, epoch, batch in epoch)."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    distributed.restore_rng(state, run.dist)
    return state["step"], state["position"]["epoch"], state["position"]["batch"]


def start_logging(run: Run, fresh: bool) -> RunLogger | None:
    """Rank 0 logs; a fresh run records its resolved config."""
    os.makedirs(run.cfg.run.output, exist_ok=True)
    if not run.dist.main:
        return None
    if fresh:
        with open(os.path.join(run.cfg.run.output, "config.json"), "w", encoding="utf-8") as f:
            f.write(dumps(run.cfg))
    log.info("training %s: %s, %d shard(s), %d samples, %d tags, tasks %s, batch %d x %d accumulated x %d ranks, "
             "%d steps", run.cfg.run.output, run.family.name, len(run.urls), sum(run.shard_samples.values()),
             len(run.tags), [str(t) for t in run.tasks], run.batch_size, run.grad_accum, run.dist.world,
             run.total_steps)
    return RunLogger(run.cfg.run.output)


def save_checkpoint(run: Run, step: int, position: dict) -> None:
    """Rank 0 writes the checkpoint; every rank calls this, to hand in its own RNG state."""
    rank_rng = distributed.rank_rng_states(run.dist)
    if run.dist.main:
        checkpoint.save(os.path.join(run.cfg.run.output, "checkpoints"), step, run.model, run.optimizer,
                        run.scheduler, position, run.cfg.to_dict(), rank_rng=rank_rng)
