#!/usr/bin/env bash
# Ctrl-C of a 2-GPU run under the composer launcher (nvidia-h200-x2): the time from SIGINT to exit and what it says.
#   source .gpu/prelude.sh && bash benchmarks/gpu_interrupt_check.sh
set -uo pipefail
work=$(mktemp -d)
python -m foundry_dbrx.cli prep-data --default --out "$work/data" --max-seq-len 1024 --no-progress >/dev/null
setsid python -m composer.cli.launcher -n 2 -m foundry_dbrx.train yamls/dbrx-gpu-small.yaml \
  variables.data_local="$work/data" variables.max_seq_len=1024 model.n_layers=4 model.d_model=768 \
  model.ffn_config.ffn_hidden_size=1536 max_duration=200ba global_train_batch_size=16 device_train_microbatch_size=8 \
  console_log_interval=1ba save_folder="$work/ckpt" save_interval=5ba python_log_level=warning \
  > "$work/raw.txt" 2>&1 &
pid=$!   # setsid made the launcher the leader of its own process group, as a terminal's Ctrl-C would reach it
tail -F "$work/raw.txt" 2>/dev/null | python -u -c "import sys, time
for line in sys.stdin: print(f'{time.time():.1f}', line, end='', flush=True)" > "$work/log.txt" &
stamper=$!
for _ in $(seq 240); do grep -q '\[batch=1[0-9]/' "$work/log.txt" 2>/dev/null && break; sleep 0.5; done
t0=$(date +%s.%N)
kill -INT -- -"$pid"
wait "$pid"; rc=$?
t1=$(date +%s.%N)
sleep 1; kill "$stamper" 2>/dev/null
echo "SIGINT at $(python -c "print(round($t0, 1))")"
echo "exit status $rc, $(python -c "print(round($t1 - $t0, 1))") s after SIGINT to the launcher's process group"
grep -i 'stopped\|ctrl-c\|sigint\|sigterm\|checkpoint\|resume\|this process\|foundry-dbrx\|exited' "$work/log.txt" \
  | grep -v 'UserWarning\|warnings.warn' | tail -25
ls "$work/ckpt"
rm -rf "$work"
