#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, on the device machine (no Beam, FAISS or spaCy there).
#   here, once:  python bench/gpu_kit.py                      (-> .carry/gpu-kit)
#   device tool: run(command="bash bench/gpu.sh retrieval", carry=[".carry/gpu-kit"])   # ~3 min
#                run(command="bash bench/gpu.sh train",     carry=[".carry/gpu-kit"])   # ~8 min
#   (no argument: both, which may not fit one 10-minute call). JSON results and the trainer's
#   profile table are copied to $OUT (bench/results/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.carry/gpu-kit
[ -d "$KIT/site" ] || { echo "no $KIT: run 'python bench/gpu_kit.py' here and carry it" >&2; exit 2; }
export PYTHONPATH="$PWD/$KIT/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
PART=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
if [ "$PART" = all ] || [ "$PART" = retrieval ]; then
  "$PY" bench/retrieval.py --device cuda --sentences 200000 --queries 1000000 --corpus 1000000 --repeats 3
fi
if [ "$PART" = all ] || [ "$PART" = train ]; then
  "$PY" bench/train.py --device cuda --profile 6
fi
mkdir -p "$DEST"
cp bench/results/*_cuda*.json bench/results/*_cuda*.txt "$DEST"/ 2>/dev/null || true
