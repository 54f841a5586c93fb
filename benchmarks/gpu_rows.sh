#!/usr/bin/env bash
# The second GPU call of issues 9 and 10 (nvidia-h200-x2, about 9 minutes):
#   source .gpu/prelude.sh && bash benchmarks/gpu_rows.sh
# 1. gpu_ep_check.py: 1 GPU, FSDP2 + EP 2 with a sharded checkpoint at step 5, and that checkpoint resumed at EP 1;
# 2. train_step.py, issue 9's small size: 1 GPU, 2 GPUs FSDP2 + EP 2 (activation checkpointing that does not
#    replay the all-to-all), profiled;
# 3. train_step.py, memory and speed rows on 1 GPU: MPT + MegaBlocks mb_dmoe, MPT + our dbrx_moe, dbrx with the
#    fused cross entropy; the DBRX-shaped large size.
# Writes to $OUT: gpu.log, ep_check.json, table.md, results.jsonl, cases.tar.gz.
set -uo pipefail
start=$SECONDS
out=${OUT:-runs/gpu-rows}
mkdir -p "$out"
work=$(mktemp -d)
budget=${BUDGET_S:-540}
deadline=$(( $(date +%s) + budget ))
exec > >(tee "$out/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== [$((SECONDS - start)) s] gpu_ep_check.py: one, ep2, ep2->ep1"
python benchmarks/gpu_ep_check.py --out "$out" --cases 'one,ep2,ep2->ep1' 2>&1 | grep -v '^\s*$' | grep -v '^\[prep-data\]'
rm -f "$out"/*.log.tmp

python - "$work/data" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import train_step
for size in ('small', 'large'):
    train_step.prepare_data(train_step.SIZES[size].seq_len, Path(sys.argv[1]), None)
PY
bench() {
  echo "== [$((SECONDS - start)) s] train_step.py $*"
  python benchmarks/train_step.py --out "$work/bench" --data-root "$work/data" --warmup 3 --steps 5 \
    --timeout 150 --deadline "$deadline" "$@" | grep --line-buffered -v '^|'
}
bench --sizes small --nproc 1 --ac-without-fsdp --label AC
bench --sizes small --nproc 2 --label FSDP2_EP2 --baseline AC --env FSDP_VERSION=2 --profile \
  --variant model.training.expert_parallel_degree=2
bench --sizes small --nproc 1 --label fused_CE --variant model.training.fused_cross_entropy=true \
  --variant fsdp_config.activation_checkpointing=false
bench --sizes small --nproc 1 --models mpt_mb_dmoe,mpt_dbrx_moe --label no_AC \
  --variant fsdp_config.activation_checkpointing=false
bench --sizes large --nproc 1 --label large_fused_CE --variant model.training.fused_cross_entropy=true
cp "$work/bench/results.jsonl" "$work/bench/table.md" "$out/" 2>/dev/null
cat "$out/table.md" 2>/dev/null
(cd "$work/bench" && tar czf "$out/cases.tar.gz" --exclude='trace_rank*' -- */ 2>/dev/null)
(cd "$out" && tar czf logs.tar.gz ./*.log 2>/dev/null && rm -f one.log ep2.log 'ep2->ep1.log' fsdp1.log fsdp2.log)
echo "== done in $((SECONDS - start)) s"
rm -rf "$work"
