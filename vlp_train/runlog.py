"""What a run writes as it goes: JSON Lines (log.jsonl) and TensorBoard events in the run folder,
from a window of steps' metrics kept on the device until they are logged."""
from __future__ import annotations

import json
import os
import time

import torch


class MetricsWindow:
    """The metrics of the steps since the last log row. Losses and the skipped-step flags stay on
    the device (no host sync per step); `row()` and `skipped_steps()` read them once."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.named: dict[str, list[torch.Tensor]] = {}
        self.samples = 0
        self.bad = 0
        self.start = time.perf_counter()
        self.steps: list[tuple[int, torch.Tensor, list[str]]] = []  # (step, skipped flag, its samples' keys)
        self._keys: list[str] = []
        self._skipped: list[tuple[int, list[str]]] | None = None

    def add(self, loss: torch.Tensor, named: dict[str, torch.Tensor], samples: int, bad: int, keys: list[str]) -> None:
        """One micro-batch."""
        self.losses.append(loss.detach())
        for name, value in named.items():
            self.named.setdefault(name, []).append(value)
        self.samples += samples
        self.bad += bad
        self._keys += keys

    def end_step(self, step: int, skipped: torch.Tensor) -> None:
        self.steps.append((step, skipped, self._keys))
        self._keys = []
        self._skipped = None

    def skipped_steps(self) -> list[tuple[int, list[str]]]:
        """(step, sample keys) of the window's steps whose loss or gradient was not finite; the
        flags are read from the device once (the log row and the stop check both ask)."""
        if self._skipped is None:
            flags = torch.stack([flag for _, flag, _ in self.steps]).tolist() if self.steps else []
            self._skipped = [(step, keys) for (step, _, keys), skipped in zip(self.steps, flags) if skipped]
        return self._skipped

    def row(self) -> dict | None:
        """Mean loss (over finite values) and named losses, samples/s, bad samples and skipped
        steps of the window; None when empty."""
        if not self.losses:
            return None
        elapsed = time.perf_counter() - self.start
        losses = torch.stack(self.losses).float()
        row = {"loss": losses[torch.isfinite(losses)].mean().item(),
               "samples_per_s": self.samples / max(elapsed, 1e-9), "bad_samples": self.bad,
               "skipped_steps": len(self.skipped_steps())}
        for name, values in sorted(self.named.items()):
            total, count = torch.stack(values).sum(0).tolist()
            if count:  # no sample had this loss in the window: no value, rather than a 0 that reads as a loss
                row[name] = total / count
        return row


RUN_ENTRIES = ("config.json", "log.jsonl", "checkpoints", "tensorboard", "hf")  # what a run writes in its folder


def prepare_run_folder(out: str, overwrite: bool, entries: tuple[str, ...] = ()) -> None:
    """A fresh run's folder: refuse one holding an earlier run (its log would continue and an old
    checkpoint could later be resumed), unless `overwrite`, which removes that run's entries (and
    nothing else of the folder). `entries`: what else the job writes there (fine-tuning's best/)."""
    import shutil
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"run.output {out} is a file, not a folder")
    earlier = [name for name in RUN_ENTRIES + tuple(entries) if os.path.exists(os.path.join(out, name))]
    if earlier and not overwrite:
        raise ValueError(f"{out} holds an earlier run ({', '.join(earlier)}): --resume to continue it, --overwrite "
                         "to start afresh there, or another --output")
    for name in earlier:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def trim_log(path: str, step: int) -> None:
    """Drop the rows a killed run wrote after the checkpoint it resumes from (the resumed run
    writes those steps again), and a last line the kill cut short; the log then reads as one run.
    A `keys` row is logged before its step is taken (its step is the one before)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= (step - 1 if "keys" in row and "skipped" not in row else step):
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class RunLogger:
    def __init__(self, out: str, resumed_at: int | None = None):
        """`resumed_at`: the step of the checkpoint a resumed run starts from."""
        from torch.utils.tensorboard import SummaryWriter
        if resumed_at is not None:
            trim_log(os.path.join(out, "log.jsonl"), resumed_at)
        self._jsonl = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(out, "tensorboard"))
        self.bad_samples = 0

    def _write(self, row: dict):
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()

    def flush(self, window: MetricsWindow, step: int, epoch: int, lr: float, extra: dict | None = None) -> dict | None:
        """A log row of the window; `extra`: what the job adds (pre-training: itm_weighting)."""
        metrics = window.row()
        if metrics is None:
            return None
        row = {"step": step, "epoch": epoch, "lr": lr, **(extra or {}), **metrics}
        self.bad_samples += window.bad
        self._write(row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(f"train/{k}", v, step)
        return row

    def keys(self, step: int, keys: list[str]):
        self._write({"step": step, "keys": keys})

    def skipped(self, skipped: list[tuple[int, list[str]]]):
        for step, keys in skipped:
            self._write({"step": step, "skipped": "non-finite loss or gradient", "keys": keys})

    def eval(self, step: int, result: dict):
        self._write({"step": step, "eval": result})
        for k, v in result.items():
            self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self):
        self._jsonl.close()
        self._tb.close()
