#!/usr/bin/env bash
# Issues 10 and 11 on the GPU box (nvidia-h200-x2), one call of about 9 minutes:
#   source .gpu/prelude.sh && bash benchmarks/gpu_ep_scaling.sh
# 1. the CUDA tests of the expert-load callback and the expert backends;
# 2. benchmarks/gpu_ep_check.py: 1 GPU, FSDP1, FSDP2, FSDP2 + EP 2 and the EP 2 -> EP 1 resume, losses side by side;
# 3. benchmarks/train_step.py, issue 9's small DBRX at a fixed per-GPU batch: 1 GPU, 2 GPUs FSDP1, FSDP2, FSDP2 + EP 2
#    (activation checkpointing on everywhere), tokens/s per GPU, MFU, peak memory, profiles of the 2-GPU cases.
# Writes to $OUT: gpu.log, ep_check.json, table.md, results.jsonl, cases.tar.gz (YAMLs, logs, per-rank JSON).
set -uo pipefail
start=$SECONDS
out=${OUT:-runs/gpu-ep-scaling}
mkdir -p "$out"
work=$(mktemp -d)
budget=${BUDGET_S:-540}
deadline=$(( $(date +%s) + budget ))
exec > >(tee "$out/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== [$((SECONDS - start)) s] CUDA tests: expert load on every backend, no host sync, backends"
python -m pytest -q -p no:cacheprovider tests/test_expert_load.py -k cuda 2>&1 | tail -4

echo "== [$((SECONDS - start)) s] gpu_ep_check.py"
python benchmarks/gpu_ep_check.py --out "$out" 2>&1 | grep -v '^\s*$'

left=$(( deadline - $(date +%s) ))
echo "== [$((SECONDS - start)) s] train_step.py, ${left} s left"
python - "$work/data" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import train_step
train_step.prepare_data(train_step.SIZES['small'].seq_len, Path(sys.argv[1]), None)
PY
bench() {
  python benchmarks/train_step.py --out "$work/bench" --data-root "$work/data" --warmup 3 --steps 5 --sizes small \
    --timeout 150 --deadline "$deadline" "$@" | grep --line-buffered -v '^|'
}
bench --nproc 1,2 --ac-without-fsdp --label FSDP1
bench --nproc 2 --label FSDP2 --baseline FSDP1 --env FSDP_VERSION=2
bench --nproc 2 --label FSDP2_EP2 --baseline FSDP1 --env FSDP_VERSION=2 --profile \
  --variant model.training.expert_parallel_degree=2
cp "$work/bench/results.jsonl" "$work/bench/table.md" "$out/" 2>/dev/null
cat "$out/table.md" 2>/dev/null
(cd "$work/bench" && tar czf "$out/cases.tar.gz" --exclude='trace_rank*' -- */ 2>/dev/null)
echo "== done in $((SECONDS - start)) s"
rm -rf "$work"
