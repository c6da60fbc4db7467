#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one device call (no Beam, FAISS or spaCy there).
#   here, once:  python bench/gpu_kit.py                                  (-> .carry/gpu-kit)
#   device tool: run(command="bash bench/gpu.sh", carry=[".carry/gpu-kit"], timeout_s=600)
# The parts run in turn (embedding, retrieval, trainer, the step compiled whole), each under
# what is left of GPU_BUDGET_S (default 540 s), so the call ends inside the device's 10-minute
# limit even when a part runs long; a part cut short keeps what it had written. Every part writes
# its JSON as it finishes, straight into $OUT (bench/results/ where $OUT is unset), beside gpu.log
# (this output) and gpu-util.csv (GPU utilisation and memory, once a second). `bash bench/gpu.sh
# train` (or embed, retrieve, train-step) runs one part; GPU_TRAIN_ARGS adds flags to the
# trainer's benchmark. Exit status 1 when a part failed or was cut short.
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

part() {  # part NAME COMMAND...: run it if asked for and time is left, for at most the time left
  local name=$1 left
  shift
  [ "$ONLY" = all ] || [ "$ONLY" = "$name" ] || return 0
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, $left s of the budget left"; return 0; fi
  echo "== $name: at most $left s, from $((SECONDS - START)) s"
  timeout --kill-after=10 "$left" "$@"
  local code=$?
  echo "== $name: exit $code after $((SECONDS - START)) s"
  [ "$code" = 0 ] || FAILED="$FAILED $name"
}

main() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 >"$VLP_BENCH_RESULTS/gpu-util.csv" 2>/dev/null &
  UTIL=$!
  "$PY" -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__,
    'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"

  part embed "$PY" bench/retrieval.py --device cuda --only embed --sentences 100000 --repeats 3
  part retrieve "$PY" bench/retrieval.py --device cuda --only retrieve --queries 1000000 --corpus 1000000 --repeats 3
  # shellcheck disable=SC2086  # GPU_TRAIN_ARGS: more flags for the trainer, e.g. "--compile off"
  part train "$PY" bench/train.py --device cuda --profile 6 ${GPU_TRAIN_ARGS:-}
  # the step compiled whole (minutes of compilation) against train.py's default, one compiled
  # layer for all; last, so that the budget cutting it short costs no other figure
  part train-step "$PY" bench/train.py --device cuda --only step --compile-scope step \
    --results-name train_cuda_step_scope
  kill "$UTIL" 2>/dev/null
  [ -z "$FAILED" ] || { echo "== failed or cut short:$FAILED"; return 1; }
}

main 2>&1 | tee -a "$VLP_BENCH_RESULTS/gpu.log"
