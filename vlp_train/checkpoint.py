"""Save and resume everything a run's future depends on: model, optimizer, scheduler, loader
position, RNG states and the config. Files are written whole, then renamed into place.

A checkpoint holds tensors and plain values only (RNG states too), so it is read with
`torch.load(weights_only=True)`: nothing in it can run code. A checkpoint that cannot be read
(cut short, or not ours) is named, and the newest readable one is used instead.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import zipfile

import numpy as np
import torch

log = logging.getLogger(__name__)

PATTERN = "step-%08d.pt"


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (readable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_of_rank(state: dict, rank: int) -> dict | None:
    """The RNG state `rank` saved; None when the checkpoint has none of it (saved by fewer ranks)."""
    states = state["rank_rng"]
    return states[rank] if rank < len(states) else None


def unwrap(model):
    """The model inside DDP and torch.compile wrappers (their state dicts prefix the names)."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save(folder: str, step: int, model, optimizer, scheduler, position: dict, config: dict, keep: int = 3,
         rank_rng: list[dict] | None = None) -> str:
    """`rank_rng`: every DDP rank's RNG state, by rank (default: this process's only). A model
    holding inf or nan is never saved (it could only poison a resume)."""
    raw = unwrap(model)
    if not all_finite(raw):
        raise RuntimeError(f"step {step}: the model's weights hold inf or nan; no checkpoint written "
                           f"(the last good one stays in {folder})")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PATTERN % step)
    rank_rng = rank_rng or [rng_state()]
    state = {"step": step, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "position": position, "rank_rng": rank_rng, "config": config}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(glob.glob(os.path.join(folder, "step-*.pt")))[:-keep]:
        os.remove(old)
    return path


def load(path: str) -> dict:
    """A checkpoint, tensors and plain values only; ValueError naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds objects other than tensors and plain values (not written by this "
                         f"vlp-train); refusing to unpickle it: {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable checkpoint (cut short?): {str(err).splitlines()[0]}") from err


def load_latest(folder: str) -> tuple[str, dict] | None:
    """The newest readable checkpoint in `folder` (path, state); an unreadable newer one is named
    and passed over. None when there is none; ValueError when none can be read."""
    found = sorted(glob.glob(os.path.join(folder, "step-*.pt")), reverse=True)
    errors = []
    for path in found:
        try:
            state = load(path)
        except ValueError as err:
            errors.append(str(err))
            log.warning("%s; trying an older checkpoint", err)
            continue
        if errors:
            log.warning("resuming from %s, the newest readable checkpoint (%d newer one(s) unreadable)",
                        path, len(errors))
        return path, state
    if errors:
        raise ValueError("no readable checkpoint in " + folder + ": " + "; ".join(errors))
    return None
