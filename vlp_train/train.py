"""`vlp-train run`: build the run's components, then the loop: resume -> step -> log -> eval -> save."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vlp_train import checkpoint, distributed
from vlp_train.components import Run, build_run
from vlp_train.config import TrainConfig, dumps
from vlp_train.curriculum import weighted_tasks
from vlp_train.data import make_loader
from vlp_train.pretrained import EXPORT_FOLDER
from vlp_train.runlog import MetricsWindow, RunLogger, prepare_run_folder
from vlp_train.step import compute_loss, to_device

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) training into cfg.run.output. Returns a summary. A fresh run refuses a
    folder holding an earlier run unless `overwrite`."""
    run, logger, step, epoch, start_batch = start_run(cfg, resume, overwrite, build_run, TrainConfig,
                                                      describe=describe_run)
    cfg = run.cfg

    def batches(epoch: int, start_batch: int):
        run.dataset.set_position(epoch, start_batch, run.batches_of(epoch) if cfg.data.resampled else None,
                                 task_offset=sum(run.batches_of(e) for e in range(epoch)))
        return make_loader(run.dataset, cfg.data.num_workers, pin_memory=run.device.type == "cuda")

    def batch_loss(batch: dict, epoch: int):
        loss, named, _ = compute_loss(run.step_module, to_device(batch["views"], run.device),
                                      weighted_tasks(epoch, cfg.objectives), run.autocast)
        return loss, named

    hooks = LoopHooks(batches=batches, loss=batch_loss, evaluate=lambda: evaluate_run(run),
                      row_extra=lambda epoch: {"itm_weighting": bool(weighted_tasks(epoch, cfg.objectives))})
    step, epoch, start_batch, last_eval, stopped = run_loop(run, hooks, logger, step, epoch, start_batch)
    summary = {"steps": step, "epoch": epoch, "stopped": stopped, "eval": last_eval, "arch": cfg.model.arch}
    if stopped:
        return summary
    save_checkpoint(run, step, epoch, start_batch)
    if run.dist.main:
        summary["eval"] = evaluate_run(run)
        logger.eval(step, summary["eval"])
        run.model.save_pretrained(os.path.join(cfg.run.output, EXPORT_FOLDER), run.tokenizer)
        logger.close()
        summary["bad_samples"] = logger.bad_samples
    distributed.leave_together(run.dist)
    return summary


@dataclass
class LoopHooks:
    """What a loop over epochs of batches needs from the job it trains (pre-training, fine-tuning)."""
    batches: Callable[[int, int], Iterable[dict]]  # (epoch, first batch) -> batches, each with "index" (its
    #                                                 position in the epoch), "keys" and "bad_samples"
    loss: Callable[[dict, int], tuple]             # (batch, epoch) -> (scalar loss, named [sum, count] means)
    evaluate: Callable[[], dict]                   # held-out metrics (rank 0)
    row_extra: Callable[[int], dict] = lambda epoch: {}  # epoch -> what each log row adds


def run_loop(run, hooks: LoopHooks, logger: RunLogger | None, step: int, epoch: int, start_batch: int):
    """The loop: step -> log -> eval -> save, from (step, epoch, batch in epoch) until
    run.total_steps or run.cfg.run.stop_after. `run`: model, optimizer, scheduler, step_module,
    dist, grad_accum, total_steps, cfg (a Run, or fine-tuning's). Returns (step, epoch, batch in
    epoch, the last evaluation, whether it stopped early)."""
    cfg = run.cfg
    progress = tqdm(total=run.total_steps, initial=step, desc="train", disable=not run.dist.main, dynamic_ncols=True)
    with progress as bar:  # closed also when the run stops with an error
        last_eval, stopped, window, skipped_in_a_row = None, False, MetricsWindow(), 0
        run.model.train()
        while step < run.total_steps and not stopped:
            batch_in_epoch, micro, any_batch = start_batch, 0, False
            for batch in distributed.synchronised(hooks.batches(epoch, start_batch), run.dist):
                any_batch = True
                with distributed.accumulating(run.step_module, completes_step=(micro + 1) % run.grad_accum == 0):
                    loss, named = hooks.loss(batch, epoch)
                    (loss / run.grad_accum).backward()
                batch_in_epoch, micro = batch["index"] + 1, micro + 1
                window.add(loss, named, len(batch["keys"]) * run.dist.world, batch["bad_samples"], batch["keys"])
                if logger and cfg.run.log_keys:
                    logger.keys(step, batch["keys"])
                if micro % run.grad_accum:
                    continue
                step += 1
                window.end_step(step, optimizer_step(run, loss))
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == run.total_steps:
                    skipped_in_a_row = check_skipped(window, skipped_in_a_row, cfg.run.max_skipped_steps, logger)
                    lr = run.scheduler.get_last_lr()[0]
                    row = logger.flush(window, step, epoch, lr, hooks.row_extra(epoch)) if logger else None
                    if row:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                    window = MetricsWindow()
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and run.dist.main:
                    last_eval = hooks.evaluate()
                    logger.eval(step, last_eval)
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    save_checkpoint(run, step, epoch, batch_in_epoch)
                if cfg.run.stop_after and step >= cfg.run.stop_after:
                    stopped = True  # as if the process were killed here
                    break
                if step >= run.total_steps:
                    break
            else:
                if not any_batch and start_batch == 0:  # (a resume at an epoch's end starts with none left)
                    # every sample of the epoch was bad, or a rank had none: never loop on empty epochs
                    raise RuntimeError(f"epoch {epoch} gave no batch on some rank (bad or missing shards: see the "
                                       "warnings above)")
                # an epoch's last micro-batches short of a whole step are dropped (as a loader drops a
                # partial batch): kept, they would join the next epoch's first step
                run.optimizer.zero_grad(set_to_none=True)
                epoch, start_batch = epoch + 1, 0
                continue
            start_batch = batch_in_epoch
    return step, epoch, start_batch, last_eval, stopped


def optimizer_step(run, loss: torch.Tensor) -> torch.Tensor:
    """Clip, step, schedule. A step whose loss or gradient is not finite leaves the weights and the
    optimizer's moments as they were: the fused AdamW skips its update on the device when told
    `found_inf` (as under AMP's GradScaler), so no host sync is needed here. Returns that flag."""
    if run.cfg.optim.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    skipped = ~(torch.isfinite(norm) & torch.isfinite(loss.detach()))
    run.optimizer.found_inf = skipped.float()
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return skipped


def check_skipped(window: MetricsWindow, in_a_row: int, limit: int, logger: RunLogger | None) -> int:
    """Log the window's skipped steps with their samples' keys; stop the run when more than
    `limit` were skipped in a row. Every rank decides alike: a skipped step's gradient, all-reduced,
    is non-finite on every rank."""
    skipped = window.skipped_steps()
    if logger:
        logger.skipped(skipped)
    skipped_at = {step for step, _ in skipped}
    for step, _, _ in window.steps:
        in_a_row = in_a_row + 1 if step in skipped_at else 0
        if limit and in_a_row > limit:
            keys = sorted({k for _, ks in skipped[-in_a_row:] for k in ks})
            raise RuntimeError(f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient and "
                               f"were skipped (run.max_skipped_steps={limit}); their samples: {keys[:20]}"
                               f"{' ...' if len(keys) > 20 else ''} (every key in log.jsonl)")
    return in_a_row


def evaluate_run(run: Run) -> dict:
    return run.family.evaluate(run.model, run.builder, run.eval_urls, run.tasks, run.cfg, run.device, run.autocast)


def resume_state(ckpt_dir: str, config_class=TrainConfig):
    """The newest readable checkpoint and the config it was saved with (a `config_class`): the run
    continues with its own config."""
    found = checkpoint.load_latest(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
    path, state = found
    cfg = config_class.from_dict(state["config"])
    log.info("resuming from %s (step %d)", path, state["step"])
    return state, cfg


def load_state(run, state: dict) -> tuple[int, int, int]:
    """Model, optimizer, scheduler and RNG from a checkpoint -> (step, epoch, batch in epoch). The
    loader position counts batches of one rank: it means the same data only with the same ranks and
    micro-batches, so another layout is refused rather than resumed on other samples."""
    position = state["position"]
    saved = {k: position[k] for k in ("world", "batch_size", "grad_accum") if k in position}
    now = {"world": run.dist.world, "batch_size": run.batch_size, "grad_accum": run.grad_accum}
    if saved and saved != {k: now[k] for k in saved}:
        raise ValueError(f"the checkpoint was saved with {saved} (ranks, micro-batch, accumulation) and this run has "
                         f"{now}: its loader position would point at other samples; resume with as many processes")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    distributed.restore_rng(state, run.dist)
    return state["step"], position["epoch"], position["batch"]


def start_run(cfg, resume: bool, overwrite: bool, build: Callable, config_class=TrainConfig,
              describe: Callable = lambda run: "", entries: tuple[str, ...] = ()):
    """The start every job of the loop shares (pre-training, fine-tuning): a fresh run prepares its
    folder (rank 0 alone; `entries`: what else the job writes there, refused or removed with the
    rest), a resumed one takes its newest checkpoint and the config saved with it (a
    `config_class`; this process's run.stop_after kept); `build(cfg)` -> the run, into which the
    checkpoint is loaded; then rank 0's logger. -> (run, logger or None, step, epoch, batch in
    epoch); run.cfg is the config the job runs with."""
    state = None
    if not resume and int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone writes the folder
        prepare_run_folder(cfg.run.output, overwrite, entries)
    if resume:
        stop_after = cfg.run.stop_after  # a simulated kill belongs to this process, not to the one stopped
        state, cfg = resume_state(os.path.join(cfg.run.output, "checkpoints"), config_class)
        cfg.run.stop_after = stop_after
    run = build(cfg)
    step, epoch, start_batch = load_state(run, state) if state is not None else (0, 0, 0)
    logger = start_logging(run, step if state is not None else None, describe(run))
    return run, logger, step, epoch, start_batch


def describe_run(run: Run) -> str:
    return (f"training {run.cfg.run.output}: {run.family.name}, {len(run.urls)} shard(s), "
            f"{sum(run.shard_samples.values())} samples, {len(run.tags)} tags, tasks {[str(t) for t in run.tasks]}, "
            f"batch {run.batch_size} x {run.grad_accum} accumulated x {run.dist.world} ranks, {run.total_steps} steps")


def start_logging(run, resumed_at: int | None, description: str = "") -> RunLogger | None:
    """Rank 0 logs; a fresh run records its resolved config, a resumed one drops what the killed
    run logged after its checkpoint."""
    os.makedirs(run.cfg.run.output, exist_ok=True)
    if not run.dist.main:
        return None
    if resumed_at is None:
        with open(os.path.join(run.cfg.run.output, "config.json"), "w", encoding="utf-8") as f:
            f.write(dumps(run.cfg))
    if description:
        log.info("%s", description)
    return RunLogger(run.cfg.run.output, resumed_at)


def save_checkpoint(run, step: int, epoch: int, batch: int) -> None:
    """Rank 0 writes the checkpoint; every rank calls this, to hand in its own RNG state."""
    position = {"epoch": epoch, "batch": batch, "world": run.dist.world, "batch_size": run.batch_size,
                "grad_accum": run.grad_accum}
    rank_rng = distributed.rank_rng_states(run.dist)
    if run.dist.main:
        checkpoint.save(os.path.join(run.cfg.run.output, "checkpoints"), step, run.model, run.optimizer,
                        run.scheduler, position, run.cfg.to_dict(), rank_rng=rank_rng)
