#!/usr/bin/env bash
# What FOUNDRY_DBRX_DETERMINISTIC=1 costs on a GPU, and whether it makes two runs bit-identical: four runs of
# yamls/dbrx-gpu-small.yaml on the default corpus (1024-token samples), two with the switch off and two with it on,
# each STEPS steps from the same seed, no checkpoints. Prints each run's tokens/s (this process, after start-up) and,
# for each pair, at how many steps the losses differ.
# On the GPU box:  source .gpu/prelude.sh && [STEPS=40] [NPROC=1] bash benchmarks/determinism_cost.sh
set -uo pipefail
out=${OUT:-runs/determinism}; mkdir -p "$out"; work=$(mktemp -d)
steps=${STEPS:-40}
nproc=${NPROC:-1}
if [ "$nproc" -gt 1 ]; then train=(python -m composer.cli.launcher -n "$nproc" -m foundry_dbrx.train)
else train=(python -m foundry_dbrx.train); fi
python -m foundry_dbrx.cli prep-data --default --out "$work/data" --max-seq-len 1024 --no-progress --workers 8 | tail -2
for run in off1 off2 on1 on2; do
  det=0; [[ $run == on* ]] && det=1
  FOUNDRY_DBRX_DETERMINISTIC=$det "${train[@]}" yamls/dbrx-gpu-small.yaml variables.data_local="$work/data" \
    max_duration=${steps}ba save_folder=null autoresume=false eval_interval=100000ba console_log_interval=10ba \
    callbacks.dbrx_run_summary.json_path="$out/$run.json" > "$out/$run.log" 2>&1
  echo "$run (FOUNDRY_DBRX_DETERMINISTIC=$det): rc=$?"
  grep -E "\[foundry-dbrx\]|Traceback|Error" "$out/$run.log" | tail -4
done
python - "$out" <<'PY'
import json, sys
runs = {r: json.load(open(f'{sys.argv[1]}/{r}.json')) for r in ('off1', 'off2', 'on1', 'on2')}
for r, s in runs.items():
    print(f"{r}: {s['tokens_per_second']:,.0f} tokens/s over {s['steps']} steps, last loss {s['last_loss']:.6f}")
for a, b in (('off1', 'off2'), ('on1', 'on2')):
    la, lb = dict(runs[a]['losses']), dict(runs[b]['losses'])
    differ = [s for s in la if la[s] != lb.get(s)]
    print(f'{a} vs {b}: losses differ at {len(differ)} of {len(la)} steps' + (f' (first: {differ[0]})' if differ else ''))
# The faster run of each pair: the first run of the script fills Triton's autotuning and kernel caches (on the H200
# it ran at 29k tokens/s against 51k for the second), which an average would charge to the switch being off.
off = max(runs['off1']['tokens_per_second'], runs['off2']['tokens_per_second'])
on = max(runs['on1']['tokens_per_second'], runs['on2']['tokens_per_second'])
print(f'deterministic mode: {on:,.0f} vs {off:,.0f} tokens/s ({100 * (on / off - 1):+.1f}%), the faster run of each pair')
PY
