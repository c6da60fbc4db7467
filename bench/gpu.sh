#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, in up to three device calls (no Beam, FAISS or spaCy there).
#   here, once:  python bench/gpu_kit.py                                  (-> .carry/gpu-kit)
#   device tool: run(command="bash bench/gpu.sh", carry=[".carry/gpu-kit"], timeout_s=600)
#                run(command="bash bench/gpu.sh families", carry=[".carry/gpu-kit"], timeout_s=600)
#                run(command="bash bench/gpu.sh pixels", carry=[".carry/gpu-kit"], timeout_s=600)
# Groups: `all` (the default: embedding, retrieval, the trainer, the step compiled whole),
# `families` (VLMo's step and retrieval scoring, VLMAE's step, on regions) and `pixels` (the patch
# loader, the patch model's step, VLMAE's step on patches); a group's files fit the 8 a call
# returns. The kit's wheels (simplejpeg, which the patch loader needs) are installed first. The
# parts run in turn, each under what is left of GPU_BUDGET_S (default 540 s), so the call ends
# inside the device's 10-minute limit even when a part runs long; a part cut short keeps what it
# had written. Every part writes its JSON as it finishes, straight into $OUT (bench/results/ where
# $OUT is unset), beside gpu.log (this output) and gpu-util.csv (GPU utilisation and memory, once
# a second). `bash bench/gpu.sh train` (or any part's name) runs one part; GPU_TRAIN_ARGS adds
# flags to the trainer's benchmark. Exit status 1 when a part failed or was cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.carry/gpu-kit}
[ -d "$KIT/site" ] || { echo "no $KIT: run 'python bench/gpu_kit.py' here and carry it" >&2; exit 2; }
export PYTHONPATH="$PWD/$KIT/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export VLP_BENCH_RESULTS="${OUT:-$PWD/bench/results}"
mkdir -p "$VLP_BENCH_RESULTS"
PY=${PYTHON:-python3}
ONLY=${1:-all}
BUDGET=${GPU_BUDGET_S:-540}
START=$SECONDS
FAILED=

part() {  # part GROUP NAME COMMAND...: run it if asked for and time is left, for at most the time left
  local group=$1 name=$2 left
  shift 2
  [ "$ONLY" = "$group" ] || [ "$ONLY" = "$name" ] || return 0
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, $left s of the budget left"; return 0; fi
  echo "== $name: at most $left s, from $((SECONDS - START)) s"
  timeout --kill-after=10 "$left" "$@"
  local code=$?
  echo "== $name: exit $code after $((SECONDS - START)) s"
  [ "$code" = 0 ] || FAILED="$FAILED $name"
}

wheels() {  # the kit's compiled packages (bench/gpu_kit.py), installed for this node's Python
  local target=${TMPDIR:-/tmp}/gpu-kit-wheels
  compgen -G "$KIT/wheels/*.whl" >/dev/null || { echo "== wheels: none in $KIT (the patch loader needs simplejpeg)"; return 0; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "$KIT"/wheels/*.whl || { echo "== wheels: the install failed"; FAILED="$FAILED wheels"; return 0; }
  export PYTHONPATH="$target:$PYTHONPATH"
}

main() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 >"$VLP_BENCH_RESULTS/gpu-util.csv" 2>/dev/null &
  UTIL=$!
  "$PY" -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__,
    'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
  wheels

  part all embed "$PY" bench/retrieval.py --device cuda --only embed --sentences 100000 --repeats 3
  part all retrieve "$PY" bench/retrieval.py --device cuda --only retrieve --queries 1000000 --corpus 1000000 --repeats 3
  # shellcheck disable=SC2086  # GPU_TRAIN_ARGS: more flags for the trainer, e.g. "--compile off"
  part all train "$PY" bench/train.py --device cuda --profile 6 ${GPU_TRAIN_ARGS:-}
  # the step compiled whole (minutes of compilation) against train.py's default, one compiled
  # layer for all; last, so that the budget cutting it short costs no other figure
  part all train-step "$PY" bench/train.py --device cuda --only step --compile-scope step \
    --results-name train_cuda_step_scope

  # the other families at base size, compiled layers (VLMo: attention and FFN regions; VLMAE: every layer kind)
  part families vlmo "$PY" bench/train.py --device cuda --preset vlmo-base --only step --results-name train_cuda_vlmo_step
  part families vlmo-retrieval "$PY" bench/train.py --device cuda --preset vlmo-base --only retrieval \
    --results-name train_cuda_vlmo_retrieval
  part families vlmae "$PY" bench/vlmae.py --device cuda

  part pixels loader-patches "$PY" bench/train.py --device cuda --visual patches --only loader \
    --results-name train_cuda_loader_patches384
  part pixels train-patches "$PY" bench/train.py --device cuda --visual patches --only step \
    --results-name train_cuda_step_patches384
  part pixels vlmae-patches "$PY" bench/vlmae.py --device cuda --visual patches
  kill "$UTIL" 2>/dev/null
  [ -z "$FAILED" ] || { echo "== failed or cut short:$FAILED"; return 1; }
}

main 2>&1 | tee -a "$VLP_BENCH_RESULTS/gpu.log"
