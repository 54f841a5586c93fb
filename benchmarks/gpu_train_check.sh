#!/usr/bin/env bash
# One GPU end to end: prep the default corpus at 1024 tokens, train yamls/dbrx-gpu-small.yaml under FSDP (meta init,
# bf16, activation checkpointing, moe_backend auto) writing an HF checkpoint, restart from that HF folder
# (pretrained_hf_dir, meta init: weights read as FSDP materialises each block), and load it in transformers.
# On the GPU box:  source .gpu/prelude.sh && [NPROC=2] bash benchmarks/gpu_train_check.sh   (results under $OUT or ./runs/gpu-check)
set -uo pipefail
out=${OUT:-runs/gpu-check}; mkdir -p "$out"; work=$(mktemp -d)
steps=${STEPS:-60}
nproc=${NPROC:-1}   # NPROC=2: Composer's launcher, one process per GPU, FSDP really shards
if [ "$nproc" -gt 1 ]; then train=(python -m composer.cli.launcher -n "$nproc" -m foundry_dbrx.train)
else train=(python -m foundry_dbrx.train); fi
python -m foundry_dbrx.cli prep-data --default --out "$work/data" --max-seq-len 1024 --no-progress --workers 8 | tail -4
common=(variables.data_local="$work/data" console_log_interval=10ba)
"${train[@]}" yamls/dbrx-gpu-small.yaml "${common[@]}" max_duration=${steps}ba \
  save_folder="$work/r1/ck" save_interval=${steps}ba callbacks.dbrx_run_summary.json_path="$out/run1.json" \
  callbacks.dbrx_hf_checkpointer.save_folder="$work/r1/hf" callbacks.dbrx_hf_checkpointer.save_interval=${steps}ba \
  callbacks.dbrx_hf_checkpointer.precision=bfloat16 > "$out/run1.log" 2>&1
echo "run1 rc=$?"
grep -E "moe_backend auto|parameters in all|\[foundry-dbrx\]|device/mfu|memory/peak_allocated_mem|Traceback|Error" "$out/run1.log" | tail -14
"${train[@]}" yamls/dbrx-gpu-small.yaml "${common[@]}" max_duration=5ba \
  model.pretrained_hf_dir="$work/r1/hf/ba${steps}" save_folder="$work/r2/ck" save_interval=5ba \
  callbacks.dbrx_run_summary.json_path="$out/run2.json" > "$out/run2.log" 2>&1
echo "run2 rc=$?"
grep -E "\[foundry-dbrx\]|Traceback|Error" "$out/run2.log" | tail -6
python - "$work/r1/hf/ba${steps}" <<'PY'
import sys, torch, transformers
from foundry_dbrx import DbrxForCausalLM
from foundry_dbrx.hf import load_hf_config
path = sys.argv[1]
hf = transformers.DbrxForCausalLM.from_pretrained(path, torch_dtype=torch.float32).cuda().eval()
ours = DbrxForCausalLM(load_hf_config(path)[0], device='cuda').eval()
missing = ours.load_state_dict(hf.state_dict(), strict=True)
ids = torch.randint(0, 100352, (2, 256), device='cuda')
with torch.no_grad():
    d = (hf(ids).logits - ours(ids).logits).abs().max().item()
print(f'HF export {path}: transformers loads it ({transformers.__version__}); fp32 logits max|diff| ours vs HF = {d:.2e}')
PY
