"""Expert parallelism on 2 GPUs against 1 GPU: the same small DBRX, the same global batch, the same losses.

On a machine with 2 GPUs (the GPU box's ``nvidia-h200-x2``)::

    source .gpu/prelude.sh && python benchmarks/gpu_ep_check.py

Runs, each through ``foundry_dbrx.train`` (the composer launcher for 2 GPUs), ``--steps`` steps of
``yamls/dbrx-gpu-small.yaml`` shrunk to ``--layers`` layers of d_model ``--d-model`` (16 experts, top-4), one
microbatch per step so every run sees each global batch whole (the load-balancing statistics are global):

  one       1 GPU, no FSDP
  fsdp1     2 GPUs, FSDP1 (Composer's default)
  fsdp2     2 GPUs, FSDP2, no expert parallelism
  ep2       2 GPUs, FSDP2 + expert_parallel_degree 2, a sharded checkpoint at the middle step
  ep2->ep1  2 GPUs, FSDP2 without expert parallelism, resumed from ep2's checkpoint

and prints every step's loss side by side and the largest relative difference from ``one`` (``ep2`` for the
resumed run). bf16 GEMMs over different row groupings round differently, so the runs agree to about 1e-3, not
bit for bit. Writes ``ep_check.json`` and the logs to ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_data(folder: Path, seq_len: int) -> Path:
    out = folder / f'default-{seq_len}'
    if not (out / 'train' / 'index.json').is_file():
        subprocess.run([sys.executable, '-m', 'foundry_dbrx.cli', 'prep-data', '--default', '--out', str(out),
                        '--max-seq-len', str(seq_len), '--no-progress'], check=True, cwd=ROOT)
    return out


def run_case(name: str, nproc: int, overrides: list[str], env: dict, work: Path, log_dir: Path) -> dict:
    run_dir = work / name
    summary = run_dir / 'summary.json'
    args = ['yamls/dbrx-gpu-small.yaml', *overrides, f'callbacks.dbrx_run_summary.json_path={summary}']
    if nproc == 1:
        cmd = [sys.executable, '-m', 'foundry_dbrx.train', *args]
    else:
        cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), '-m', 'foundry_dbrx.train', *args]
    start = time.time()
    with open(log_dir / f'{name}.log', 'w') as log:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0 or not summary.is_file():
        tail = (log_dir / f'{name}.log').read_text()[-2500:]
        print(f'== {name} FAILED (exit {proc.returncode}) after {seconds:.0f} s\n{tail}', flush=True)
        return {'name': name, 'ok': False, 'seconds': seconds}
    losses = {int(s): v for s, v in json.loads(summary.read_text())['losses']}
    print(f'== {name}: {len(losses)} steps in {seconds:.0f} s', flush=True)
    return {'name': name, 'ok': True, 'seconds': seconds, 'losses': losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--layers', type=int, default=4)
    p.add_argument('--d-model', type=int, default=768)
    p.add_argument('--seq-len', type=int, default=1024)
    p.add_argument('--batch', type=int, default=16, help='global batch (samples); one microbatch per GPU')
    p.add_argument('--out', default=os.environ.get('OUT', 'runs/ep-check'))
    p.add_argument('--cases', default='one,fsdp1,fsdp2,ep2,ep2->ep1', help='comma list of the runs above')
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='ep-check-'))
    data = prepare_data(work, args.seq_len)
    half = args.steps // 2
    common = [f'variables.data_local={data}', f'variables.max_seq_len={args.seq_len}', f'model.n_layers={args.layers}',
              f'model.d_model={args.d_model}', f'model.ffn_config.ffn_hidden_size={args.d_model * 2}',
              f'max_duration={args.steps}ba', f'global_train_batch_size={args.batch}', 'scheduler.t_warmup=2ba',
              'console_log_interval=1ba', 'python_log_level=warning', 'save_folder=null']

    def micro(nproc: int) -> list[str]:
        return [f'device_train_microbatch_size={args.batch // nproc}']

    sharded = ['fsdp_config.state_dict_type=sharded']
    ckpt = work / 'ep2' / 'checkpoints'
    cases = [
        ('one', 1, micro(1), {'CUDA_VISIBLE_DEVICES': '0'}),
        ('fsdp1', 2, micro(2), {}),
        ('fsdp2', 2, micro(2) + sharded, {'FSDP_VERSION': '2'}),
        ('ep2', 2, micro(2) + sharded + ['model.training.expert_parallel_degree=2', f'save_folder={ckpt}',
                                         f'save_interval={half}ba', 'save_num_checkpoints_to_keep=-1'],
         {'FSDP_VERSION': '2'}),
        ('ep2->ep1', 2, micro(2) + sharded + [f'load_path={ckpt}/ep0-ba{half}'], {'FSDP_VERSION': '2'}),
    ]
    wanted = args.cases.split(',')
    results = {}
    for name, nproc, overrides, env in [c for c in cases if c[0] in wanted]:
        results[name] = run_case(name, nproc, common + overrides, env, work, out)

    def worst(a: dict, b: dict) -> float:
        common_steps = sorted(set(a) & set(b))
        return max(abs(a[s] - b[s]) / abs(b[s]) for s in common_steps) if common_steps else float('nan')

    one = results.get('one', {}).get('losses', {})
    lines = ['| step | ' + ' | '.join(results) + ' |', '|---' * (len(results) + 1) + '|']
    for step in range(1, args.steps + 1):
        cells = [f'{results[n]["losses"][step]:.4f}' if results[n].get('losses', {}).get(step) is not None else ''
                 for n in results]
        lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
    diffs = {n: worst(r.get('losses', {}), one) for n, r in results.items() if n not in ('one', 'ep2->ep1')}
    if 'ep2->ep1' in results and 'ep2' in results:
        diffs['ep2->ep1 vs ep2'] = worst(results['ep2->ep1'].get('losses', {}), results['ep2'].get('losses', {}))
    lines.append('')
    lines.append('largest relative difference: ' + ', '.join(f'{n} {d:.2e}' for n, d in diffs.items()))
    table = '\n'.join(lines)
    (out / 'ep_check.json').write_text(json.dumps({'results': results, 'diffs': diffs}, indent=1))
    print(table, flush=True)
    ok = all(r['ok'] for r in results.values()) and all(d < 2e-2 for d in diffs.values())
    print('ep_check:', 'OK' if ok else 'DIFFERENCES ABOVE 2e-2 OR A FAILED RUN', flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
