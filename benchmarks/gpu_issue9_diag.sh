#!/usr/bin/env bash
# Issue 9, first GPU call (nvidia-h200-x2): why 2 H200s keep only 74% of one H200's tokens/s per GPU.
# On the GPU box:   source .gpu/prelude.sh && bash benchmarks/gpu_issue9_diag.sh        (8 to 9 minutes)
# Hypotheses and what each row answers: benchmarks/NOTES-issue9.md. Every case is `benchmarks/train_step.py` on
# the issue's small configuration (d 2048, 8 layers, 16 experts top-4, seq 2048, 32 x 2048 tokens per GPU,
# microbatch 8, FSDP FULL_SHARD + PURE + amp_bf16); a case that fails is reported and the next one runs. Nothing
# starts after BUDGET_S (default 480 s) from this script's start, and a running case is stopped there.
# Writes to $OUT (7 files at most, each under 16 MB): diag.log (everything printed), table.md, results.jsonl,
# cases.tar.gz (per case: YAML, logs, each rank's JSON and kernel table), trace_<case>_rank<r>.json.gz (chrome traces).
set -uo pipefail
start=$SECONDS
out=${OUT:-runs/issue9-diag}
mkdir -p "$out"
work=$(mktemp -d)
budget=${BUDGET_S:-480}
size=${DIAG_SIZE:-small}          # DIAG_SIZE=tiny DIAG_MAX_TOKENS=100000: the whole script on a CPU, to try it
max_tokens=${DIAG_MAX_TOKENS:-}
deadline=$(( $(date +%s) + budget ))
exec > >(tee "$out/diag.log") 2>&1

echo "== box"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -4
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
echo "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-unset} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"

echo "== data: prep-data --default at the size's sequence length"
t=$SECONDS
python - "$work/data" "$size" "$max_tokens" <<'PY' || echo "data preparation FAILED"
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import train_step
data = train_step.prepare_data(train_step.SIZES[sys.argv[2]].seq_len, Path(sys.argv[1]), int(sys.argv[3] or 0) or None)
print('train samples:', train_step.samples_in(data))
PY
echo "   $((SECONDS - t)) s"

# bench EXPECTED_SECONDS ARGS...: one train_step.py invocation; not started when the budget cannot hold it.
bench() {
  local need=$1; shift
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt "$need" ]; then echo "== SKIPPED (${left} s left, needs about ${need} s): $*"; return; fi
  echo "== [$((SECONDS - start)) s] train_step.py $*"
  python benchmarks/train_step.py --out "$work/bench" --data-root "$work/data" --warmup 3 --steps 5 \
    --sizes "$size" ${max_tokens:+--data-max-tokens "$max_tokens"} --timeout 240 --deadline "$deadline" "$@" | grep --line-buffered -v '^|'   # the table comes once, at the end
}

# A. The same work on 1 and 2 GPUs, activation checkpointing on both (LLM Foundry drops fsdp_config, and with it
#    checkpointing, at world size 1: the benchmark's callback checkpoints the blocks itself there). Profiled.
#    NCCL's INIT lines say which transport (P2P over NVLink, SHM, ...) the ranks use.
bench 140 --nproc 1,2 --ac-without-fsdp --label AC --profile --env NCCL_DEBUG=INFO --env NCCL_DEBUG_SUBSYS=INIT
# B. The same work without checkpointing: the user path on 1 GPU (what the issue's 57.6k measured) and FSDP
#    without checkpointing on 2 GPUs. B's 1-GPU row against A's 2-GPU row is the issue's 74%.
bench 110 --nproc 1,2 --label no_AC --variant fsdp_config.activation_checkpointing=false
# C. Composer 0.32's FSDP2 (fully_shard) instead of FSDP1, checkpointing on.
bench 50 --nproc 2 --label FSDP2 --baseline AC --env FSDP_VERSION=2
# D. NCCL on high-priority streams: its kernels go first when both wait for SMs.
bench 50 --nproc 2 --label nccl_high_priority --baseline AC --env TORCH_NCCL_HIGH_PRIORITY=1
# G. The load-balancing loss over this rank's tokens only: the default (training.moe_lb_loss_scope: global) adds two
#    small all-reduces per microbatch (forward and backward), each a point where the ranks wait for each other.
bench 50 --nproc 2 --label lb_loss_local --baseline AC --variant model.training.moe_lb_loss_scope=local
# E. One microbatch per step (8 x 2048 tokens per GPU), 1 and 2 GPUs, checkpointing on: FSDP then moves the
#    model once per step instead of four times.
bench 100 --nproc 1,2 --ac-without-fsdp --label AC_1_microbatch --arch batch_per_gpu=8
# F. Not a scaling question, a first look at a new path: the chunked cross entropy (no [T, V] logits), 2 GPUs.
bench 50 --nproc 2 --label fused_CE --baseline AC --variant model.training.fused_cross_entropy=true

echo "== NCCL transport (case A, 2 GPUs)"
grep -hE "via (P2P|SHM|NET)|NVLS|nRanks 2|comm 0x" "$work"/bench/*2gpu-AC/log*.txt 2>/dev/null \
  | sed -e 's/^.*NCCL INFO //' -e 's/[0-9]\+\/[0-9]\+ :/N :/' | sort | uniq -c | sort -rn | head -10

echo "== GPU time per step from the profiles, ms"
python - "$work/bench" <<'PY'
import json, sys
from pathlib import Path
keys = ('window_ms_per_step', 'busy_ms', 'idle_ms', 'compute_ms', 'comm_ms', 'comm_overlapped_ms', 'comm_exposed_ms')
for p in sorted(Path(sys.argv[1]).glob('*/rank*.json')):
    s = json.loads(p.read_text()).get('profile_summary') or {}
    if s.get('kernels'):
        print(f'{p.parent.name} {p.stem}: ' + ', '.join(f'{k.replace("_ms_per_step", "").replace("_ms", "")} '
                                                     f'{s[k]:.0f}' for k in keys))
        print('   by category: ' + ', '.join(f'{k} {v:.0f}' for k, v in s['by_category_ms'].items()))
PY

echo "== table (tokens/s per GPU; 'vs 1 GPU': against the 1-GPU row of the same label, or of --baseline's)"
cp "$work/bench/results.jsonl" "$work/bench/table.md" "$out/" 2>/dev/null
cat "$out/table.md" 2>/dev/null
(cd "$work/bench" && tar czf "$out/cases.tar.gz" --exclude='trace_rank*' -- */ 2>/dev/null)
for f in "$work"/bench/*/trace_rank*.json.gz; do
  [ -f "$f" ] && cp "$f" "$out/trace_$(basename "$(dirname "$f")")_$(basename "$f" | sed 's/trace_//')"
done
ls -la "$out"
echo "== done in $((SECONDS - start)) s"
rm -rf "$work"
