"""What a run writes as it goes: JSON Lines (log.jsonl) and TensorBoard events in the run folder,
from a window of steps' metrics kept on the device until they are logged."""
from __future__ import annotations

import json
import os
import time

import torch


class MetricsWindow:
    """The metrics of the steps since the last log row. Losses stay on the device (no host sync
    per step); `row()` reads them once."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.named: dict[str, list[torch.Tensor]] = {}
        self.samples = 0
        self.bad = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, named: dict[str, torch.Tensor], samples: int, bad: int) -> None:
        self.losses.append(loss.detach())
        for name, value in named.items():
            self.named.setdefault(name, []).append(value)
        self.samples += samples
        self.bad += bad

    def row(self) -> dict | None:
        """Mean loss and named losses, samples/s and bad samples of the window; None when empty."""
        if not self.losses:
            return None
        elapsed = time.perf_counter() - self.start
        row = {"loss": torch.stack(self.losses).float().mean().item(),
               "samples_per_s": self.samples / max(elapsed, 1e-9), "bad_samples": self.bad}
        for name, values in sorted(self.named.items()):
            row[name] = torch.stack(values).float().mean().item()
        return row


class RunLogger:
    def __init__(self, out: str):
        from torch.utils.tensorboard import SummaryWriter
        self._jsonl = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(out, "tensorboard"))
        self.bad_samples = 0

    def _write(self, row: dict):
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()

    def flush(self, window: MetricsWindow, step: int, epoch: int, lr: float, weighting: bool) -> dict | None:
        metrics = window.row()
        if metrics is None:
            return None
        row = {"step": step, "epoch": epoch, "lr": lr, "itm_weighting": weighting, **metrics}
        self.bad_samples += window.bad
        self._write(row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(f"train/{k}", v, step)
        return row

    def keys(self, step: int, keys: list[str]):
        self._write({"step": step, "keys": keys})

    def eval(self, step: int, result: dict):
        self._write({"step": step, "eval": result})
        for k, v in result.items():
            self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self):
        self._jsonl.close()
        self._tb.close()
