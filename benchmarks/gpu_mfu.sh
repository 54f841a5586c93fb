#!/usr/bin/env bash
# Issue 9's MFU rows on one H200 (nvidia-h200), one GPU call:
#   source .gpu/prelude.sh && CASES=diag bash benchmarks/gpu_mfu.sh
# CASES picks a list below; every case is `dbrx` on 1 GPU, fused cross entropy, no activation checkpointing unless
# its line says otherwise. Writes to $OUT: gpu.log, table.md, results.jsonl, cases.tar.gz (kernel tables, no traces).
set -uo pipefail
start=$SECONDS
out=${OUT:-runs/gpu-mfu}
mkdir -p "$out"
work=$(mktemp -d)
budget=${BUDGET_S:-560}
deadline=$(( $(date +%s) + budget ))
exec > >(tee "$out/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
# Which torch GEMMs can write fp32 from bf16 operands (for fusing the weight-gradient cast and accumulation).
import torch
a = torch.randn(256, 128, device='cuda', dtype=torch.bfloat16)
b = torch.randn(4, 128, 64, device='cuda', dtype=torch.bfloat16)
offs = torch.tensor([64, 128, 192, 256], device='cuda', dtype=torch.int32)
for name, fn in [('grouped_mm out_dtype=fp32', lambda: torch._grouped_mm(a.t().contiguous().t(), b.transpose(1, 2).contiguous().transpose(1, 2), offs, out_dtype=torch.float32)),
                 ('grouped_mm dW out_dtype=fp32', lambda: torch._grouped_mm(a.t(), a, offs, out_dtype=torch.float32)),
                 ('mm out_dtype=fp32', lambda: torch.mm(a, a.t(), out_dtype=torch.float32))]:
    try:
        r = fn(); print('feature:', name, 'ok', r.dtype, tuple(r.shape))
    except Exception as e:
        print('feature:', name, 'FAILS', type(e).__name__, str(e).splitlines()[0][:160])
PY
python - "$work/data" "${SIZES:-small,large}" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import train_step
for size in sys.argv[2].split(','):
    train_step.prepare_data(train_step.SIZES[size].seq_len, Path(sys.argv[1]), None)
PY
bench() {
  echo "== [$((SECONDS - start)) s] train_step.py $*"
  python benchmarks/train_step.py --out "$work/bench" --data-root "$work/data" --warmup 3 --steps 5 \
    --timeout 200 --deadline "$deadline" --variant fsdp_config.activation_checkpointing=false "$@" \
    | grep --line-buffered -v '^|'
}
fce='--variant model.training.fused_cross_entropy=true'
case ${CASES:-diag} in
  diag)
    bench --sizes large --label large_mb2 $fce
    bench --sizes large --label large_mb4 $fce --arch microbatch=4
    bench --sizes large --label large_mb4_cblock $fce --arch microbatch=4 --variant model.training.compile=block --profile
    bench --sizes small --label small_mb8_plainCE
    bench --sizes small --label small_mb16_cblock $fce --arch microbatch=16 --variant model.training.compile=block
    ;;
  diag2)
    bench --sizes large --label large_mb4_cblock $fce --arch microbatch=4 --variant model.training.compile=block --profile
    bench --sizes large --label large_mb8_cblock $fce --arch microbatch=8 --variant model.training.compile=block
    bench --sizes small --label small_mb16_cblock $fce --arch microbatch=16 --variant model.training.compile=block --profile
    ;;
  check)  # the new kernels on the GPU before the final rows
    timeout 150 python -m pytest -q -s tests/test_cross_entropy.py -k "cuda" 2>&1 | tail -8
    timeout 120 python benchmarks/cross_entropy.py --d-models 2048,4096 --chunks 4096,8192 --iters 5 2>&1 | tail -20
    timeout 90 python benchmarks/optimizer_step.py --params-billion 3.3 --device cuda 2>&1 | tail -6
    bench --sizes small --nproc ${NPROC:-1,2} --label small_fast $fce --variant model.training.compile=block --arch microbatch=16
    ;;
  scale2)  # nvidia-h200-x2: weak scaling 1 -> 2 GPUs at the fast settings, with and without torch.compile
    bench --sizes small --nproc 1,2 --label small_fast $fce --variant model.training.compile=block --arch microbatch=16
    bench --sizes small --nproc 1,2 --label small_fast_eager $fce --arch microbatch=16
    ;;
  prof)  # SIZES=large: the profile of the final large row
    bench --sizes large --nproc 1 --label large_fast $fce --variant model.training.compile=block --arch microbatch=4 --profile
    ;;
  final)  # nvidia-h200-x2: the bars of issue 9 from one call
    fast="$fce --variant model.training.compile=block"
    bench --sizes small --nproc ${NPROC:-1,2} --label small_fast $fast --arch microbatch=16
    bench --sizes large --nproc 1 --label large_fast $fast --arch microbatch=4
    bench --sizes large --nproc 1 --label large_fast_mb8 $fast --arch microbatch=8
    bench --sizes small --nproc 1 --models mpt_mb_dmoe,mpt_dbrx_moe --label mpt_no_AC
    ;;
  *) echo "unknown CASES=$CASES"; exit 2 ;;
esac
cp "$work/bench/results.jsonl" "$work/bench/table.md" "$out/" 2>/dev/null
cat "$out/table.md" 2>/dev/null
(cd "$work/bench" && tar czf "$out/cases.tar.gz" --exclude='trace_rank*' -- */ 2>/dev/null)
echo "== done in $((SECONDS - start)) s"
rm -rf "$work"
