#!/usr/bin/env bash
# Train on every GPU of one node with DDP: deploy/torchrun.sh 'vlp-out/shards/*.tar' RUN_DIR --init BERT_BASE_DIR [--set k=v ...]
# (the base preset starts from BERT-base: --init names a bert-base-uncased folder, or random on purpose)
# Several nodes: torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:29500 -m vlp_train.cli run ...
set -euo pipefail
shards=${1:?shards glob}; out=${2:?run dir}; shift 2
gpus=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
exec torchrun --standalone --nproc_per_node "$gpus" -m vlp_train.cli run --shards "$shards" --output "$out" --config base "$@"
