"""Shared by the benchmarks: what machine this is, and where results go."""
from __future__ import annotations

import json
import os
import platform
import resource

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (and its finished children) in MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def results_folder() -> str:
    """bench/results/, or $VLP_BENCH_RESULTS (tests write there, not over the committed figures)."""
    return os.environ.get("VLP_BENCH_RESULTS") or RESULTS


def results_name(stem: str, only: str | None) -> str:
    """A benchmark's results file name: a partial run (`--only X`) gets its own, `<stem>_X`, so it
    does not replace the full run's figures."""
    return f"{stem}_{only}" if only else stem


def write_result(name: str, result: dict) -> str:
    os.makedirs(results_folder(), exist_ok=True)
    path = os.path.join(results_folder(), f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}")
    return path
