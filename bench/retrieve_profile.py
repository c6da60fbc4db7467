"""Where the retrieve stage's Beam overhead goes: cProfile over one run of the synthetic retrieve
pipeline of `bench/pipeline.py --only overhead --only-stage retrieve` and one run of its empty
pipeline (same rows and queries, no search), diffed function by function.

    python bench/retrieve_profile.py          # 200,000 x 384 corpus, 2,000 queries; prints the top 30

Each pipeline runs once unprofiled first (imports, FAISS load). Seconds are cumulative per
function under the profiler (which inflates Python-heavy work), so read them as shares.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.pipeline import CHUNK, _synthetic_retrieval  # noqa: E402

CORPUS, QUERIES = 200_000, 2_000


def main() -> None:
    import apache_beam as beam

    from pipelines.build import beam_options

    synthetic = _synthetic_retrieval()
    chunks = list(range(CORPUS // CHUNK))
    per_chunk = QUERIES // len(chunks)
    spill = tempfile.mkdtemp(prefix="bench-corpus-")

    def run(stage) -> None:
        with beam.Pipeline(options=beam_options([])) as p:
            _ = p | beam.Create(chunks, reshuffle=False) | stage | beam.combiners.Count.Globally()

    run(synthetic(per_chunk))
    run(synthetic(per_chunk, spill))
    times = {}
    for name, make in (("empty", lambda: synthetic(per_chunk)), ("stage", lambda: synthetic(per_chunk, spill))):
        profiler = cProfile.Profile()
        profiler.enable()
        run(make())
        profiler.disable()
        times[name] = {f"{f.split('/')[-1]}:{line}({fn})": (stats[2], stats[1])
                       for (f, line, fn), stats in pstats.Stats(profiler).stats.items()}
    shutil.rmtree(spill, ignore_errors=True)
    empty, stage = times["empty"], times["stage"]
    rows = sorted(((stage.get(k, (0, 0))[0] - empty.get(k, (0, 0))[0], k) for k in set(empty) | set(stage)),
                  reverse=True)
    for seconds, key in rows[:30]:
        print(f"{seconds:+.3f} s  {key}  calls {empty.get(key, (0, 0))[1]} -> {stage.get(key, (0, 0))[1]}")
    print(f"total: stage - empty = {sum(v[0] for v in stage.values()) - sum(v[0] for v in empty.values()):.3f} s")


if __name__ == "__main__":
    main()
