"""Save and resume everything a run's future depends on: model, optimizer, scheduler, loader
position, RNG states and the config. Files are written whole, then renamed into place."""
from __future__ import annotations

import glob
import os
import random

import numpy as np
import torch

PATTERN = "step-%08d.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_of_rank(state: dict, rank: int) -> dict | None:
    """The RNG state `rank` saved; None when the checkpoint has none of it (saved by fewer ranks,
    or by an earlier version, which kept only rank 0's, as "rng")."""
    states = state["rank_rng"] if "rank_rng" in state else [state["rng"]]
    return states[rank] if rank < len(states) else None


def save(folder: str, step: int, model, optimizer, scheduler, position: dict, config: dict, keep: int = 3,
         rank_rng: list[dict] | None = None) -> str:
    """`rank_rng`: every DDP rank's RNG state, by rank (default: this process's only)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PATTERN % step)
    raw = getattr(model, "module", model)  # DDP
    raw = getattr(raw, "_orig_mod", raw)   # torch.compile
    rank_rng = rank_rng or [rng_state()]
    state = {"step": step, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "position": position, "rank_rng": rank_rng, "config": config}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep]:
        os.remove(old)
    return path


def latest(folder: str) -> str | None:
    found = sorted(glob.glob(os.path.join(folder, "step-*.pt")))
    return found[-1] if found else None


def load(path: str) -> dict:
    # weights_only=False: the checkpoint holds RNG states and the config, written by this code
    return torch.load(path, map_location="cpu", weights_only=False)
