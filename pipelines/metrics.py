"""Per-stage busy time as Beam counters (namespace `stage_us`, one counter per stage), summed
over workers; the CLI prints them and bench/pipeline.py turns them into per-stage throughput.
Microseconds, since one call of a fast stage (link one sample) takes well under a millisecond."""
from __future__ import annotations

import time

import apache_beam as beam

STAGE_TIME = "stage_us"


def add_stage_time(stage: str, start: float) -> None:
    """Count the time since `start` (a time.perf_counter() value) as `stage`'s busy time."""
    beam.metrics.Metrics.counter(STAGE_TIME, stage).inc(round(1e6 * (time.perf_counter() - start)))
