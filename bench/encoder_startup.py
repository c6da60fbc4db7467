"""A Beam worker process's start-up with the ONNX export already cached: fresh processes, each
importing the embed transform's module (as an SDK process unpickling the pipeline does), then timing
its model load (`pipelines.embed.process_model`) to a ready encoder, and listing which of torch,
transformers and sentence-transformers it imported.

    python bench/encoder_startup.py                           # this checkout
    python bench/encoder_startup.py --tree /tmp/before        # another checkout (e.g. `git archive main`)

Each backend's cache is warmed by one process first (not timed), in a cache folder of its own per
run. Median of --repeats processes per backend. Writes bench/results/encoder_startup_cpu[_NAME].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.env import device_name, write_result  # noqa: E402

HEAVY = ("torch", "transformers", "sentence_transformers")
CHILD = f"""
import json, sys, time
start = time.perf_counter()
import pipelines.embed as embed
from pipelines.options import EmbedOptions
imported = time.perf_counter()
encoder = embed.process_model(EmbedOptions(backend=sys.argv[1]))
encoder.encode(["a dog on a sofa"], 8)
ready = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "load_s": ready - imported,
                  "modules": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def one_process(tree: str, backend: str, env: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, backend], cwd=tree, env=env, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose code runs (default: this one)")
    parser.add_argument("--backends", nargs="+", default=["onnx", "onnx-int8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="", help="results file suffix")
    args = parser.parse_args()

    tree = os.path.abspath(args.tree)
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "not a git checkout"
    result = {"device": device_name("cpu"), "tree": tree, "commit": commit, "repeats": args.repeats,
              "command": "python bench/encoder_startup.py " + " ".join(sys.argv[1:]),
              "load_before": os.getloadavg(), "backends": {}}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, VLP_CACHE_DIR=cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=tree)
        for backend in args.backends:
            one_process(tree, backend, env)  # warms the cache (the export), not timed
            runs = [one_process(tree, backend, env) for _ in range(args.repeats)]
            summary = {key: statistics.median(r[key] for r in runs) for key in ("import_s", "load_s", "process_s")}
            summary["each_load_s"] = [round(r["load_s"], 3) for r in runs]
            summary["modules"] = runs[-1]["modules"]
            result["backends"][backend] = summary
            print(backend, json.dumps(summary))
    result["load_after"] = os.getloadavg()
    write_result("encoder_startup_cpu" + (f"_{args.name}" if args.name else ""), result)
    return result


if __name__ == "__main__":
    main()
