"""What a search process pays to load a corpus shard's searcher again from the machine's copy:
the cost of letting the shard go when a bundle ends (pipelines/retrieve.py `_SearchShard`,
which releases its shard's cache lease at finish_bundle so an idle process holds none).

    python bench/shard_reload.py                          # 2,000,000 x 384 flat shard (3.1 GB)
    python bench/shard_reload.py --rows 200000 --index ivf --nlist 256

A local shard is written as the pipeline writes one (retrieve.spill_corpus; with --index ivf
also its index, trained and filled as ShardCorpus does), then loaded `--repeats` times through
`retrieve._load_searcher` (np.load mmap, Arrow memory map, faiss IO_FLAG_MMAP), each searcher
dropped before the next, as a new bundle would. Per load: the load itself, and a pass that reads
one float of every 4 KiB page of the vectors through the new mapping (what a fresh mapping adds
to the first exact search after it: page faults on pages already in the page cache), against
the same pass through a mapping already touched. The files stay in the page cache throughout
(the cached copy stays on disk unless evicted), which is the case being measured. Writes
bench/results/shard_reload_cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.env import device_name, write_result  # noqa: E402

DIM = 384
PAGE_FLOATS = 4096 // 4


def _touch(vectors: np.ndarray) -> float:
    """Read one float per page of the mapped vectors; the seconds it took."""
    start = time.perf_counter()
    float(vectors.reshape(-1)[::PAGE_FLOATS].sum())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--index", choices=("flat", "ivf"), default="flat")
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", help="where the shard is written (default: a temp folder, removed)")
    args = parser.parse_args()

    from pipelines.options import RetrieveOptions
    from pipelines.retrieve import _load_searcher, add_shard_to_index, spill_corpus, train_once
    from pipelines.search import Corpus

    options = RetrieveOptions(index=args.index, nlist=args.nlist, train_rows=args.train_rows)
    folder = args.folder or tempfile.mkdtemp(prefix="shard-reload-")
    try:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.rows, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"s{i:09d}" for i in range(args.rows)]
        start = time.perf_counter()
        files = spill_corpus(Corpus(ids, [f"sentence number {i} of the corpus" for i in range(args.rows)], vectors,
                                    f"bench{args.rows}"), folder)
        if args.index != "flat":
            trained = train_once([(f"r{i:09d}", v) for i, v in enumerate(vectors[:args.train_rows])], folder, options)
            files = add_shard_to_index(files, trained)
        written_s = time.perf_counter() - start
        del vectors, ids
        gc.collect()

        loads, fresh, warm = [], [], []
        for _ in range(args.repeats + 1):  # the first load reads the files into the page cache: not counted
            start = time.perf_counter()
            corpus, searcher = _load_searcher(files, options)
            loads.append(time.perf_counter() - start)
            fresh.append(_touch(corpus.vectors))
            warm.append(_touch(corpus.vectors))
            del corpus, searcher
            gc.collect()
        loads, fresh, warm = loads[1:], fresh[1:], warm[1:]
        shard_bytes = sum(os.path.getsize(p) for p in files.paths)
        result = {
            "device": device_name("cpu"), "rows": args.rows, "dim": DIM, "index": args.index,
            "shard_bytes": shard_bytes, "written_s": round(written_s, 1), "repeats": args.repeats,
            "load_ms_median": round(1e3 * statistics.median(loads), 2),
            "first_touch_ms_median": round(1e3 * statistics.median(fresh), 1),
            "warm_touch_ms_median": round(1e3 * statistics.median(warm), 1),
            "reload_cost_ms_median": round(1e3 * statistics.median(l + f - w for l, f, w in zip(loads, fresh, warm)), 1),
            "command": " ".join(["python", "bench/shard_reload.py", *sys.argv[1:]]),
        }
        print(result)
        write_result(f"shard_reload_{args.index}_{args.rows}", result)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
