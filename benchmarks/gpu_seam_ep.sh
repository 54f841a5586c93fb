#!/usr/bin/env bash
# The MoE seam and expert parallelism on the GPU box (nvidia-h200-x2), in one call of about 7 minutes:
#   1. the CUDA tests of the expert backends behind the dispatcher (bf16 against fp32, no host sync);
#   2. the layer benchmark before and after the seam, on the same GPU, alternating, at DBRX's shape and the
#      fine-grained one (needs .before/: `git archive <commit> foundry_dbrx benchmarks/moe_layer.py | tar -x -C .before`);
#   3. benchmarks/gpu_ep_check.py: 1 GPU vs FSDP1 / FSDP2 / FSDP2 + EP 2 on 2 GPUs, and the resharded resume.
# Writes to $OUT: seam_ep.log and seam_ep.tar.gz (the layer tables, ep_check.json and the training logs): the box
# returns at most 8 files.
set -uo pipefail
dest=${OUT:-runs/seam-ep}
mkdir -p "$dest"
out=$(mktemp -d)
exec > >(tee "$dest/seam_ep.log") 2>&1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== [$((SECONDS - start)) s] CUDA tests of the expert backends"
CUDA_VISIBLE_DEVICES=0 python -m pytest -q -p no:cacheprovider tests/test_moe_backends.py -k cuda -s 2>&1 \
  | grep -E "parity|passed|failed|Error" | tail -40

layer() {  # layer TAG SRC SHAPE_ARGS...
  local tag=$1 src=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$src:${PYTHONPATH:-}" python "$src/benchmarks/moe_layer.py" --cases dbrx \
    --only dense,grouped_mm,mb_dmoe --rounds 2 --burn-seconds 5 --out "$out/layer_$tag" "$@" 2>&1 | tail -8
}
fine="--d 2048 --f 1408 --experts 64 --top-k 6 --tokens 16384"
echo "== [$((SECONDS - start)) s] layer benchmark, DBRX shape: before the seam, after, before, after"
layer dbrx_before1 .before
layer dbrx_after1 .
layer dbrx_before2 .before
layer dbrx_after2 .
echo "== [$((SECONDS - start)) s] layer benchmark, fine-grained: before, after"
layer fine_before .before $fine
layer fine_after . $fine

echo "== [$((SECONDS - start)) s] expert parallelism on 2 GPUs"
python benchmarks/gpu_ep_check.py --out "$out/ep_check"
tar czf "$dest/seam_ep.tar.gz" -C "$out" .
echo "== done in $((SECONDS - start)) s"
