"""Whole training steps through the real training path: tokens/s per GPU, MFU and peak memory after warm-up.

Each case trains a generated YAML (``yamls/dbrx-gpu-small.yaml`` resized) with ``python -m foundry_dbrx.train``
(or ``python -m composer.cli.launcher -n N -m foundry_dbrx.train`` for N > 1 processes), on data prepared once per
sequence length by ``foundry-dbrx prep-data --default``, with no checkpoint at all (``save_folder: null``: the GPU
box has 64 GiB of disk). One invocation runs every (model, size, process count) combination asked for:

    python benchmarks/train_step.py --models dbrx,mpt_mb_dmoe,mpt_dbrx_moe --sizes small,large --nproc 1,2 --out DIR
    python benchmarks/train_step.py --nproc 2 --profile --out DIR                           # + torch.profiler traces
    python benchmarks/train_step.py --nproc 2 --label fsdp2 --env FSDP_VERSION=2 --out DIR  # a variant, same table
    python benchmarks/train_step.py --nproc 2 --variant fsdp_config.backward_prefetch=BACKWARD_PRE --out DIR

Models (the same architecture in each): ``dbrx`` (ours), ``mpt_mb_dmoe`` (LLM Foundry's MPT with MegaBlocks'
``mb_dmoe``, ``mlp_impl: grouped``, ``bf16: true``), ``mpt_dbrx_moe`` (MPT with our ``dbrx_moe`` experts, also
``bf16: true``: expert weights kept in bf16, as MegaBlocks keeps its). MPT runs
LLM Foundry's torch attention (no FlashAttention on the GPU box).

MFU convention (LLM Foundry's and torchtitan's, ``ComposerDbrxCausalLM.flops_per_batch``): per token
``6 * N + 12 * L * D * S``, N the parameters a token uses (experts at top_k / E; router, attention, norms and the
untied ``lm_head`` included; the input embedding excluded, a lookup), the second term attention's score and value
products, S the sequence length. Model FLOPs, not hardware FLOPs: activation checkpointing's recomputed forward is
not counted. MFU = those FLOPs per second per GPU / 989e12 (H100 SXM / H200 dense bf16 peak, ``--peak-tflops``).

Results: ``DIR/results.jsonl`` (one row per case, appended, so several invocations in one GPU command share one
table), ``DIR/<case>/rank<r>.json`` (what each rank measured: step times, memory, startup timings, FSDP/AC in
effect, resolved MoE backends), ``DIR/<case>/log.txt``; with ``--profile``, per rank a gzipped chrome trace of the
profiled steps and ``kernels_rank<r>.txt`` (GPU time split compute / communication / overlap / idle, the top 40
kernels, torch's ``key_averages`` table). The table of every row in ``results.jsonl`` is printed last.

This file is also the measuring side: each case's YAML lists it under ``code_paths``, so LLM Foundry imports it in
every training process, where it registers the ``bench_step_timer`` callback (:class:`StepTimer`). The steps:
``--warmup`` steps, then ``--steps`` measured steps (wall clock between synchronised batch ends: data loading,
optimizer, logging and Composer's own syncs included), then with ``--profile`` one profiler warm-up step and
``--profile-steps`` profiled steps (never the measured ones). Peak memory is reset when measuring starts.
"""

# No `from __future__ import annotations`: LLM Foundry executes this file as a module missing from sys.modules,
# where dataclasses cannot resolve string annotations.
import argparse
import dataclasses
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
BASE_YAML = ROOT / 'yamls' / 'dbrx-gpu-small.yaml'
PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM and H200 (the same tensor cores)
MODELS = ('dbrx', 'mpt_mb_dmoe', 'mpt_dbrx_moe')
# One process gets no FSDP from LLM Foundry, so no meta-device init either: the model is built and initialised on
# the CPU (about 36 s for 3.3B parameters: CPU normal_ is serial). These registered subclasses, used for 1-process
# cases on a GPU, build it on the GPU instead (`init_device: cpu` read as cuda); the trained model is the same.
GPU_INIT = {'dbrx': 'bench_gpu_init_dbrx', 'mpt_causal_lm': 'bench_gpu_init_mpt_causal_lm',
            'mpt_dbrx_moe': 'bench_gpu_init_mpt_dbrx_moe'}


@dataclass(kw_only=True, frozen=True)
class Arch:
    """One benchmark size: the architecture every model gets, and the per-GPU batch."""

    d_model: int
    n_heads: int
    kv_n_heads: int
    n_layers: int
    ffn_hidden_size: int
    moe_num_experts: int
    moe_top_k: int
    seq_len: int
    batch_per_gpu: int  # sequences per GPU per optimizer step
    microbatch: int  # sequences per forward/backward
    vocab_size: int = 100352


SIZES = {
    # The configuration of issue 9's first table.
    'small': Arch(d_model=2048, n_heads=16, kv_n_heads=4, n_layers=8, ffn_hidden_size=3584, moe_num_experts=16,
                  moe_top_k=4, seq_len=2048, batch_per_gpu=32, microbatch=8),
    # DBRX's shape scaled to fill one H200 (head dim 128, GQA 4:1, F/D = 1.75 as DBRX's 10752/6144) on the path a
    # single GPU gets from LLM Foundry: no FSDP, so fp32 weights, gradients and Adam state (16 bytes per parameter)
    # and no activation checkpointing. 3 layers: 5.2B parameters; `foundry-dbrx plan` sizes it; adjust with --arch.
    'large': Arch(d_model=4096, n_heads=32, kv_n_heads=8, n_layers=3, ffn_hidden_size=7168, moe_num_experts=16,
                  moe_top_k=4, seq_len=4096, batch_per_gpu=16, microbatch=2),
    # For trying the benchmark itself on a CPU (CUDA_VISIBLE_DEVICES=): seconds per case.
    'tiny': Arch(d_model=64, n_heads=4, kv_n_heads=2, n_layers=2, ffn_hidden_size=128, moe_num_experts=4,
                 moe_top_k=2, seq_len=128, batch_per_gpu=4, microbatch=2),
}


def flops_per_token(arch: Arch) -> int:
    """``6 * N_active_without_input_embedding + 12 * L * D * S`` (the module docstring's convention)."""
    d, f, e, k = arch.d_model, arch.ffn_hidden_size, arch.moe_num_experts, arch.moe_top_k
    head_dim = d // arch.n_heads
    attn = (d + 2 * arch.kv_n_heads * head_dim) * d + d * d + 2 * d  # Wqkv, out_proj, norm_1, norm_2
    layer = attn + e * d + 3 * k * f * d  # + router + top_k experts of (w1, v1, w2)
    active = arch.n_layers * layer + arch.vocab_size * d + d  # + lm_head + norm_f
    return 6 * active + 12 * arch.n_layers * d * arch.seq_len


# --- the YAML of one case -----------------------------------------------------------------------------------------

def model_section(model: str, arch: Arch, use_train_metrics: bool) -> dict:
    """The ``model:`` section of ``model`` at ``arch`` (``init_device: meta``: FSDP materialises block by block)."""
    moe = {'ffn_hidden_size': arch.ffn_hidden_size, 'moe_num_experts': arch.moe_num_experts,
           'moe_top_k': arch.moe_top_k, 'moe_jitter_eps': 0.0, 'moe_loss_weight': 0.05,
           'moe_normalize_expert_weights': 1}
    if model == 'dbrx':
        return {'d_model': arch.d_model, 'n_heads': arch.n_heads, 'n_layers': arch.n_layers,
                'max_seq_len': arch.seq_len, 'vocab_size': arch.vocab_size, 'use_train_metrics': use_train_metrics,
                'attn_config': {'kv_n_heads': arch.kv_n_heads}, 'ffn_config': moe}
    if model not in ('mpt_mb_dmoe', 'mpt_dbrx_moe'):
        raise ValueError(f'--models: {model!r} must be one of {list(MODELS)}')
    if model == 'mpt_mb_dmoe':
        # bf16: true, or grouped_gemm refuses the bf16 activations under FSDP PURE (REFERENCE.md).
        ffn = {'ffn_type': 'mb_dmoe', **moe, 'mlp_type': 'glu', 'mlp_impl': 'grouped', 'bf16': True,
               'moe_world_size': 1, 'ffn_act_fn': {'name': 'silu'}}
    else:
        # The same bf16 expert weights as mb_dmoe, so the rows compare like for like; the fp32-expert row is
        # `--models mpt_dbrx_moe --variant model.ffn_config.bf16=false`.
        ffn = {'ffn_type': 'dbrx_moe', **moe, 'bf16': True}
    return {'name': 'mpt_causal_lm' if model == 'mpt_mb_dmoe' else 'mpt_dbrx_moe', 'init_device': 'meta',
            'd_model': arch.d_model, 'n_heads': arch.n_heads, 'n_layers': arch.n_layers,
            'expansion_ratio': arch.ffn_hidden_size / arch.d_model, 'max_seq_len': arch.seq_len,
            'vocab_size': arch.vocab_size, 'no_bias': True, 'learned_pos_emb': False, 'tie_word_embeddings': False,
            'loss_fn': 'torch_crossentropy', 'use_train_metrics': use_train_metrics,
            'attn_config': {'attn_type': 'grouped_query_attention', 'attn_impl': 'torch',
                            'kv_n_heads': arch.kv_n_heads, 'clip_qkv': 8, 'rope': True, 'rope_impl': 'hf',
                            'rope_theta': 500000},
            'ffn_config': ffn}


def total_steps(warmup: int, steps: int, profile_steps: int) -> int:
    return warmup + steps + (1 + profile_steps if profile_steps else 0)


def case_yaml(model: str, arch: Arch, nproc: int, data_dir: str, case_dir: str, *, warmup: int, steps: int,
              profile_steps: int, variants: Sequence[str] = (), on_gpu: bool = True, use_train_metrics: bool = False,
              ac_without_fsdp: bool = False, log_level: str = 'warning', peak_tflops: float = PEAK_TFLOPS,
              gpu_init: bool = True) -> dict:
    """The training config of one case, as a plain dict: the base YAML resized, no checkpoints, no eval, the step
    timer as the only callback; ``variants`` (``key=value`` dot-lists) are merged last. ``gpu_init``: one process
    on a GPU builds the model there (see ``GPU_INIT``)."""
    from omegaconf import OmegaConf as om

    base = om.load(BASE_YAML)
    base.variables.data_local = data_dir
    base.variables.max_seq_len = arch.seq_len
    cfg = om.to_container(base, resolve=True)
    section = model_section(model, arch, use_train_metrics)
    if model == 'dbrx':  # keep the base's dbrx keys (clip_qkv, rope_theta, backend ...), resized
        merged = om.merge(cfg['model'], section)
        cfg['model'] = om.to_container(merged)
    else:
        cfg['model'] = section
    cfg.pop('variables', None)
    # No checkpoints, and no logger (the base YAML's MLflow one would be timed too, and write ./mlruns).
    for key in ('save_interval', 'save_num_checkpoints_to_keep', 'loggers'):
        cfg.pop(key, None)
    cfg.update(
        run_name=f'bench-{Path(case_dir).name}', save_folder=None, autoresume=False,
        max_duration=f'{total_steps(warmup, steps, profile_steps)}ba',
        global_train_batch_size=arch.batch_per_gpu * nproc, device_train_microbatch_size=arch.microbatch,
        # Nothing but the timer between steps: per-step console lines and other callbacks would be timed too.
        console_log_interval='100000ba', python_log_level=log_level, progress_bar=False, log_to_console=True,
        code_paths=[str(Path(__file__).resolve())],
        scheduler={'name': 'cosine_with_warmup', 't_warmup': '1ba', 'alpha_f': 0.1},
        callbacks={'bench_step_timer': {
            'out_dir': case_dir, 'warmup': warmup, 'steps': steps, 'profile_steps': profile_steps,
            'flops_per_token': flops_per_token(arch), 'peak_tflops': peak_tflops,
            'ac_without_fsdp': ac_without_fsdp}},
    )
    cfg['train_loader']['num_workers'] = 2 if on_gpu else 0
    if on_gpu and nproc == 1 and gpu_init:
        cfg['model']['name'] = GPU_INIT[cfg['model'].get('name', 'dbrx')]
        cfg['model']['init_device'] = 'cpu'  # what LLM Foundry turns meta into without FSDP; GPU_INIT takes it on
    if not on_gpu:  # a CPU try-out of the benchmark itself: no FSDP, fp32
        cfg.pop('fsdp_config', None)
        cfg['precision'] = 'fp32'
        cfg['model']['init_device'] = 'cpu'
        cfg['train_loader'].update(num_workers=0, prefetch_factor=None, persistent_workers=False)
    if variants:
        bad = [v for v in variants if '=' not in v]
        if bad:
            raise ValueError(f'--variant {bad}: each must look like key=value (fsdp_config.limit_all_gathers=false)')
        cfg = om.to_container(om.merge(om.create(cfg), om.from_dotlist(list(variants))))
    return cfg


# --- running cases ------------------------------------------------------------------------------------------------

def prepare_data(seq_len: int, root: Path, max_tokens: Optional[int] = None) -> Path:
    """``foundry-dbrx prep-data --default`` at ``seq_len`` into ``root/default-<seq_len>``, once."""
    out = root / (f'default-{seq_len}' + (f'-{max_tokens}' if max_tokens else ''))
    if (out / 'train' / 'index.json').is_file():
        return out
    cmd = [sys.executable, '-m', 'foundry_dbrx.cli', 'prep-data', '--default', '--out', str(out), '--max-seq-len',
           str(seq_len), '--no-progress', '--overwrite', '--workers', str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if max_tokens:
        cmd += ['--max-tokens', str(max_tokens)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env({}), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'prep-data at max_seq_len {seq_len} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}')
    print(f'data: {out} prepared in {time.time() - t0:.0f} s', flush=True)
    return out


def samples_in(data_dir: Path) -> int:
    index = json.loads((data_dir / 'train' / 'index.json').read_text())
    return sum(shard.get('samples', 0) for shard in index['shards'])


def _child_env(extra: dict) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.setdefault('PYTHONWARNINGS', 'ignore')
    env.update(extra)
    return env


def parse_pairs(pairs: Iterable[str], option: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise ValueError(f'{option} {pair!r}: must look like KEY=VALUE')
        out[key] = value
    return out


def run_case(cfg: dict, case_dir: Path, nproc: int, env: dict, timeout: float) -> tuple[int, float]:
    """Trains one case; returns (exit code, wall seconds). On timeout the case's process group is ended."""
    import yaml

    case_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = case_dir / 'train.yaml'
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if nproc > 1:
        cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), '--stdout',
               str(case_dir / 'log_rank{rank}.txt'), '-m', 'foundry_dbrx.train', str(yaml_path)]
    else:
        cmd = [sys.executable, '-m', 'foundry_dbrx.train', str(yaml_path)]
    env = _child_env({**env, 'BENCH_T0': repr(time.time())})
    t0 = time.time()
    with open(case_dir / 'log.txt', 'w') as log:
        log.write('$ ' + ' '.join(f'{k}={shlex.quote(v)}' for k, v in env_diff(env).items()) + ' '
                  + shlex.join(cmd) + '\n')
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its ranks: this case's own process group
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.time() - t0


def env_diff(env: dict) -> dict:
    return {k: v for k, v in env.items() if os.environ.get(k) != v and k not in ('PYTHONPATH', 'BENCH_T0')}


def collect_row(case: dict, case_dir: Path, rc: int, wall: float, nproc: int) -> dict:
    """One table row from the ranks' JSON files (rank 0's timings: every rank waits on the same collectives)."""
    ranks = []
    for r in range(nproc):
        path = case_dir / f'rank{r}.json'
        if path.is_file():
            ranks.append(json.loads(path.read_text()))
    row = dict(case, rc=rc, wall_s=round(wall, 1), ranks_reporting=len(ranks))
    if rc != 0 or len(ranks) != nproc:
        tail = (case_dir / 'log.txt').read_text(errors='replace').strip().splitlines()[-15:] \
            if (case_dir / 'log.txt').is_file() else []
        errors = [line for line in tail if 'Error' in line or 'error' in line]
        row['status'] = 'timeout' if rc == 124 else f'failed (rc {rc})'
        row['error'] = (errors or tail or [''])[-1][-300:]
        return row
    r0 = ranks[0]
    row.update(status='ok', **{k: r0[k] for k in ('tokens_per_s_per_gpu', 'mfu', 'step_s_mean', 'step_s_median',
                                                  'step_s_all', 'tokens_per_gpu_per_step', 'flops_per_token',
                                                  'model_flops_per_token', 'fsdp', 'activation_checkpointing',
                                                  'microbatches_per_step', 'moe_backends', 'startup_s',
                                                  'precision', 'world_size', 'device_name', 'trace', 'kernels')})
    row['peak_allocated_gb'] = max(r['peak_allocated_gb'] for r in ranks)
    row['peak_reserved_gb'] = max(r['peak_reserved_gb'] for r in ranks)
    row['init_peak_allocated_gb'] = max(r['init_peak_allocated_gb'] for r in ranks)
    row['step_s_by_rank'] = [r['step_s_mean'] for r in ranks]
    row['profile_summary'] = [r.get('profile_summary') for r in ranks if r.get('profile_summary')]
    return row


def _fmt(value: Any, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows; "vs 1 GPU" is tokens/s per GPU over that of the 1-GPU row of the same model and
    size with the row's baseline label (its own label unless ``--baseline`` named another; else ``default``)."""
    head = ('| label | model | size | GPUs | tok/s/GPU | vs 1 GPU | MFU | step s | peak alloc GB | peak resv GB '
            '| FSDP | AC | startup s: imports / build / trainer / 1st step | status |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    one = {(r['label'], r['model'], r['size']): r for r in rows if r.get('nproc') == 1 and r.get('status') == 'ok'}
    for r in rows:
        ok = r.get('status') == 'ok'
        base = one.get((r.get('baseline') or r['label'], r['model'], r['size'])) or \
            one.get(('default', r['model'], r['size']))
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}" if ok and base else '-'
        st = r.get('startup_s') or {}
        startup = ' / '.join(_fmt(st.get(k), '.0f') for k in ('imports_and_config', 'model_and_data', 'trainer_init',
                                                              'first_step'))
        lines.append('| ' + ' | '.join([
            r['label'], r['model'], r['size'], str(r['nproc']),
            _fmt(r.get('tokens_per_s_per_gpu'), ',.0f'), ratio,
            _fmt(100 * r['mfu'], '.1f') + '%' if ok else '-', _fmt(r.get('step_s_mean'), '.3f'),
            _fmt(r.get('peak_allocated_gb'), '.1f'), _fmt(r.get('peak_reserved_gb'), '.1f'),
            str(r.get('fsdp', '-')), str(r.get('activation_checkpointing', '-')),
            startup, r['status'] if ok else f"{r['status']}: {r.get('error', '')[:120]}"]) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='dbrx', help=f'comma list of {",".join(MODELS)}')
    p.add_argument('--sizes', default='small', help=f'comma list of {",".join(SIZES)}')
    p.add_argument('--nproc', default='1', help='comma list of process (GPU) counts; N > 1 uses Composer\'s launcher')
    p.add_argument('--arch', action='append', default=[], metavar='FIELD=INT',
                   help=f'change a size\'s field for this run ({", ".join(f.name for f in dataclasses.fields(Arch))})')
    p.add_argument('--warmup', type=int, default=3, help='steps before measuring')
    p.add_argument('--steps', type=int, default=6, help='measured steps')
    p.add_argument('--profile', action='store_true', help='record a torch.profiler trace after the measured steps')
    p.add_argument('--profile-steps', type=int, default=2, help='profiled steps (after one profiler warm-up step)')
    p.add_argument('--variant', action='append', default=[], metavar='KEY=VALUE',
                   help='YAML override for every case of this run (fsdp_config.backward_prefetch=BACKWARD_PRE)')
    p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                   help='environment variable for every case of this run (FSDP_VERSION=2, NCCL_...)')
    p.add_argument('--label', default=None, help='name of this run\'s rows in the table (default: its variants)')
    p.add_argument('--baseline', default=None,
                   help='label of the 1-GPU rows this run\'s rows are compared with (default: the same label)')
    p.add_argument('--ac-without-fsdp', action='store_true',
                   help='1-process cases: checkpoint every block as FSDP would (LLM Foundry drops fsdp_config, and '
                        'with it activation checkpointing, at world size 1)')
    p.add_argument('--train-metrics', action='store_true', help='compute train metrics (off by default)')
    p.add_argument('--cpu-init', dest='gpu_init', action='store_false',
                   help='1-process cases: build the model on the CPU, as LLM Foundry does (default: on the GPU)')
    p.add_argument('--out', required=True, help='results folder (results.jsonl is appended to)')
    p.add_argument('--data-root', default=None, help='where prepared data is kept (default: a temp folder, reused)')
    p.add_argument('--data-max-tokens', type=int, default=None, help='prepare only this many tokens (CPU try-outs)')
    p.add_argument('--timeout', type=float, default=300, help='seconds per case before it is stopped')
    p.add_argument('--deadline', type=float, default=None,
                   help='epoch seconds (date +%%s) by which every case must be over: a case gets at most the time '
                        'left, and none starts with under 45 s left')
    p.add_argument('--log-level', default='warning', help='python_log_level of the runs')
    p.add_argument('--peak-tflops', type=float, default=PEAK_TFLOPS, help='per-GPU peak for MFU')
    p.add_argument('--dry-run', action='store_true', help='write the YAMLs and print the commands, run nothing')
    args = p.parse_args(argv)

    try:
        models = [m for m in args.models.split(',') if m]
        for m in models:
            if m not in MODELS:
                raise ValueError(f'--models: {m!r} must be one of {list(MODELS)}')
        sizes = [s for s in args.sizes.split(',') if s]
        for s in sizes:
            if s not in SIZES:
                raise ValueError(f'--sizes: {s!r} must be one of {list(SIZES)}')
        nprocs = [int(n) for n in args.nproc.split(',') if n]
        if any(n < 1 for n in nprocs):
            raise ValueError(f'--nproc {args.nproc!r}: each count must be >= 1')
        arch_changes = {k: int(v) for k, v in parse_pairs(args.arch, '--arch').items()}
        unknown = set(arch_changes) - {f.name for f in dataclasses.fields(Arch)}
        if unknown:
            raise ValueError(f'--arch {sorted(unknown)}: not a field of a size')
        env = parse_pairs(args.env, '--env')
        if args.warmup < 1 or args.steps < 1:
            raise ValueError(f'--warmup ({args.warmup}) and --steps ({args.steps}) must be >= 1')
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    import torch

    on_gpu = torch.cuda.is_available()
    label = args.label or ' '.join(args.variant + args.env + (['ac_without_fsdp'] if args.ac_without_fsdp else [])) \
        or 'default'
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root or Path(tempfile.gettempdir()) / 'foundry-dbrx-bench-data')
    profile_steps = args.profile_steps if args.profile else 0
    rows = []
    for size in sizes:
        arch = dataclasses.replace(SIZES[size], **arch_changes)
        data = data_root / f'default-{arch.seq_len}' if args.dry_run else \
            prepare_data(arch.seq_len, data_root, args.data_max_tokens)
        steps_needed = total_steps(args.warmup, args.steps, profile_steps)
        for model in models:
            for nproc in nprocs:
                slug = '-'.join([model, size, f'{nproc}gpu'] + ([label.replace(' ', '_').replace('/', '_')]
                                                               if label != 'default' else []))
                slug = ''.join(c if c.isalnum() or c in '-_.=' else '_' for c in slug)[:120]
                case_dir = out / slug
                cfg = case_yaml(model, arch, nproc, str(data), str(case_dir), warmup=args.warmup, steps=args.steps,
                                profile_steps=profile_steps, variants=args.variant, on_gpu=on_gpu,
                                use_train_metrics=args.train_metrics,
                                ac_without_fsdp=args.ac_without_fsdp and nproc == 1, log_level=args.log_level,
                                peak_tflops=args.peak_tflops, gpu_init=args.gpu_init)
                case = {'label': label, 'baseline': args.baseline, 'model': model, 'size': size, 'nproc': nproc,
                        'arch': dataclasses.asdict(arch), 'variants': args.variant, 'env': env,
                        'case_dir': str(case_dir), 'yaml_model': cfg['model'].get('name', 'dbrx')}
                if args.dry_run:
                    import yaml
                    case_dir.mkdir(parents=True, exist_ok=True)
                    (case_dir / 'train.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
                    print(f'{slug}: {case_dir / "train.yaml"}')
                    continue
                per_epoch = samples_in(data) // (arch.batch_per_gpu * nproc)
                if per_epoch < steps_needed:
                    print(f'note: {slug}: {steps_needed} steps cross an epoch boundary ({per_epoch} steps per epoch '
                          'of the default corpus); pass --data-root with a larger corpus for clean timings')
                timeout = args.timeout
                if args.deadline is not None:
                    timeout = min(timeout, args.deadline - time.time() - 25)  # 25 s: stopping a case takes some
                    if timeout < 20:
                        print(f'== {slug}: skipped, deadline in {args.deadline - time.time():.0f} s', flush=True)
                        continue
                print(f'== {slug}: {model} {size} on {nproc} process(es), {label}', flush=True)
                rc, wall = run_case(cfg, case_dir, nproc, env, timeout)
                row = collect_row(case, case_dir, rc, wall, nproc)
                rows.append(row)
                with open(out / 'results.jsonl', 'a') as f:
                    f.write(json.dumps(row) + '\n')
                brief = (f"{row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, MFU {100 * row['mfu']:.1f}%, peak "
                         f"{row['peak_allocated_gb']:.1f} GB" if row['status'] == 'ok' else
                         f"{row['status']}: {row.get('error', '')}")
                print(f'   {brief} ({wall:.0f} s)', flush=True)
    if args.dry_run:
        return 0
    if not (out / 'results.jsonl').is_file():
        print('no case ran')
        return 1
    every = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines() if line.strip()]
    text = table(every)
    (out / 'table.md').write_text(text + '\n')
    print(text)
    return 0 if all(r['status'] == 'ok' for r in rows) else 1


# --- the measuring side: a Composer callback, imported in each training process through code_paths -------------

def kernel_category(name: str, cat: str = 'kernel') -> str:
    """A coarse class for a GPU activity, to split a step's GPU time."""
    n = name.lower()
    if cat != 'kernel':
        return 'memcpy/memset'
    if 'nccl' in n:
        return 'nccl'
    if any(s in n for s in ('flash', 'fmha', 'sdpa', 'attention', 'attn')):
        return 'attention'
    if any(s in n for s in ('gemm', 'cutlass', 'nvjet', 'xmma', 'cublas', 'matmul', 'gmm')):
        return 'grouped_gemm' if 'group' in n else 'gemm'
    if 'triton' in n or (n.startswith('_') and n.endswith('kernel')):
        return 'triton'
    if 'elementwise' in n or 'vectorized' in n:
        return 'elementwise'
    if any(s in n for s in ('reduce', 'norm', 'softmax', 'cross_entropy', 'nll')):
        return 'reduction/norm/softmax'
    if any(s in n for s in ('index', 'gather', 'scatter', 'sort', 'radix', 'cub::')):
        return 'index/sort'
    return 'other'


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_gpu_activity(events: Sequence[dict], steps: int) -> dict:
    """Splits the GPU time of profiled steps: busy (any kernel), compute (non-NCCL), communication (NCCL),
    overlapped (both at once), exposed communication (NCCL alone), idle (nothing), per step in ms; plus time by
    kernel category. ``events``: chrome-trace complete events (``ts``, ``dur`` in microseconds, ``cat``, ``name``)."""
    gpu = [e for e in events if e.get('ph') == 'X' and e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset')]
    if not gpu:
        return {'kernels': 0}
    spans = [(float(e['ts']), float(e['ts']) + float(e.get('dur', 0))) for e in gpu]
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    comm = _union([sp for sp, e in zip(spans, gpu) if 'nccl' in e['name'].lower()])
    compute = _union([sp for sp, e in zip(spans, gpu) if 'nccl' not in e['name'].lower()])
    busy = _union(comm + compute)
    overlap = _intersection(comm, compute)
    by_cat: dict[str, float] = {}
    for (s, e), ev in zip(spans, gpu):
        c = kernel_category(ev['name'], ev['cat'])
        by_cat[c] = by_cat.get(c, 0.0) + (e - s)
    per = 1e-3 / max(steps, 1)  # microseconds in total -> milliseconds per step
    return {
        'kernels': len(gpu), 'steps': steps, 'window_ms_per_step': window * per,
        'busy_ms': _length(busy) * per, 'idle_ms': (window - _length(busy)) * per,
        'compute_ms': _length(compute) * per, 'comm_ms': _length(comm) * per,
        'comm_overlapped_ms': overlap * per, 'comm_exposed_ms': (_length(comm) - overlap) * per,
        'by_category_ms': {k: v * per for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
    }


def kernel_table(events: Sequence[dict], steps: int, top: int = 40) -> str:
    """The ``top`` GPU kernels by total time (NCCL ones included), per step."""
    totals: dict[str, list] = {}
    for e in events:
        if e.get('ph') == 'X' and e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset'):
            t = totals.setdefault(e['name'], [0.0, 0, kernel_category(e['name'], e['cat'])])
            t[0] += float(e.get('dur', 0))
            t[1] += 1
    grand = sum(t[0] for t in totals.values()) or 1.0
    lines = [f'{"ms/step":>9} {"%":>6} {"calls/step":>10}  {"category":<22} kernel']
    for name, (us, calls, cat) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f'{us / 1e3 / steps:9.2f} {100 * us / grand:6.2f} {calls / steps:10.1f}  {cat:<22} {name[:160]}')
    return '\n'.join(lines)


def _cuda_peak_stats() -> tuple[float, float]:
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gpu_init_model(cls):
    """``cls`` built on the GPU where it is asked for the CPU (``GPU_INIT``)."""
    import torch

    class GpuInit(cls):
        def __init__(self, *args, **kwargs):
            if kwargs.get('init_device') == 'cpu' and torch.cuda.is_available():
                kwargs['init_device'] = 'cuda'
            super().__init__(*args, **kwargs)

    GpuInit.__name__ = GpuInit.__qualname__ = f'{cls.__name__}GpuInit'
    return GpuInit


def _define_callback():
    from composer.core import Callback, State
    from composer.loggers import Logger
    from composer.utils import dist

    class StepTimer(Callback):
        """Times steps ``warmup .. warmup+steps-1`` (synchronised wall clock between batch ends), records peak
        memory over them, then optionally profiles; each rank writes ``out_dir/rank<r>.json`` at fit end.

        Args:
            out_dir: the case's folder.
            warmup, steps, profile_steps: see the module docstring.
            flops_per_token: model FLOPs per token by the benchmark's convention (same for every model).
            peak_tflops: per-GPU peak for MFU.
            ac_without_fsdp: wrap every block the model marks for activation checkpointing (its
                ``activation_checkpointing_fn``) in a non-reentrant checkpoint at INIT, as Composer's FSDP would;
                for one process, where LLM Foundry drops the FSDP config and checkpointing with it.
        """

        def __init__(self, out_dir: str, warmup: int, steps: int, profile_steps: int, flops_per_token: int,
                     peak_tflops: float = PEAK_TFLOPS, ac_without_fsdp: bool = False):
            self.out_dir = Path(out_dir)
            self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
            self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
            self.ac_without_fsdp = ac_without_fsdp
            self.t = {'launch': float(os.environ.get('BENCH_T0', time.time())), 'callback_built': time.time()}
            self.step_ends: list[float] = []
            self.tokens = self.model_flops = None
            self.mem: dict = {}
            self.prof = None
            self.profile_summary = self.trace = self.kernels = None

        def init(self, state: State, logger: Logger) -> None:
            self.t['init'] = time.time()
            if self.ac_without_fsdp:
                self._apply_ac(state.model)

        @staticmethod
        def _apply_ac(model) -> None:
            import functools

            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl, CheckpointWrapper, apply_activation_checkpointing, checkpoint_wrapper)

            if any(isinstance(m, CheckpointWrapper) for m in model.modules()):
                return  # foundry-dbrx train's dbrx_parallelize did it already (the YAML asks for checkpointing)

            # The outermost module that names its checkpointing units (modules() is pre-order): wrapping twice
            # would nest wrappers.
            owner = next((m for m in model.modules() if callable(getattr(m, 'activation_checkpointing_fn', None))),
                         None)
            if owner is None:
                raise RuntimeError('ac_without_fsdp: no module of the model has activation_checkpointing_fn')
            apply_activation_checkpointing(
                owner, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                               checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=owner.activation_checkpointing_fn)

        def fit_start(self, state: State, logger: Logger) -> None:
            self.t['fit_start'] = time.time()

        def batch_start(self, state: State, logger: Logger) -> None:
            if self.tokens is None:
                ids = state.batch['input_ids']
                self.tokens = int(ids.numel())
                fpb = getattr(state.model, 'flops_per_batch', None) or \
                    getattr(getattr(state.model, 'module', None), 'flops_per_batch', None)
                try:
                    self.model_flops = int(fpb(state.batch)) / self.tokens if fpb else None
                except Exception:  # a model's own count is a cross-check only
                    self.model_flops = None

        def batch_end(self, state: State, logger: Logger) -> None:
            import torch

            _sync()  # cheap: Composer has just read the loss back to the host
            now = time.time()
            self.step_ends.append(now)
            done = len(self.step_ends)
            if done == 1:
                self.t['first_step_end'] = now
            if done == self.warmup:
                self.mem['init_peak'] = _cuda_peak_stats()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            if done == self.warmup + self.steps:
                self.mem['peak'] = _cuda_peak_stats()
                if self.profile_steps:
                    self._start_profiler()
            elif self.prof is not None:
                self.prof.step()
                if self.trace is not None:  # the profiled steps are written: stop before the next cycle starts
                    self.prof.stop()
                    self.prof = None

        def _start_profiler(self) -> None:
            import torch
            from torch.profiler import ProfilerActivity, profile, schedule

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=self.profile_steps),
                                on_trace_ready=self._trace_ready, record_shapes=False, with_stack=False,
                                profile_memory=False)
            self.prof.start()

        def _trace_ready(self, prof) -> None:
            rank = dist.get_global_rank()
            path = self.out_dir / f'trace_rank{rank}.json.gz'
            prof.export_chrome_trace(str(path))
            with gzip.open(path, 'rt') as f:
                events = json.load(f).get('traceEvents', [])
            self.profile_summary = summarize_gpu_activity(events, self.profile_steps)
            text = [f'# rank {rank}: {self.profile_steps} profiled steps after {self.warmup + self.steps + 1}',
                    '# GPU time per step (ms): ' + json.dumps({k: round(v, 2) for k, v in self.profile_summary.items()
                                                               if isinstance(v, float)}),
                    '# by category (ms/step): ' + json.dumps({k: round(v, 2) for k, v in
                                                              self.profile_summary.get('by_category_ms', {}).items()}),
                    '', '## top GPU kernels by total time', kernel_table(events, self.profile_steps), '',
                    '## torch key_averages, by self device time']
            averages = prof.key_averages()
            for key in ('self_device_time_total', 'self_cuda_time_total', 'self_cpu_time_total'):
                try:
                    text.append(averages.table(sort_by=key, row_limit=40, max_name_column_width=90))
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
            kernels = self.out_dir / f'kernels_rank{rank}.txt'
            kernels.write_text('\n'.join(text) + '\n')
            self.kernels = str(kernels)
            size_mb = path.stat().st_size / 1e6
            if size_mb > 15:  # what comes back from the GPU box is limited to 16 MB a file
                path.unlink()
                self.trace = f'dropped: {size_mb:.0f} MB gzipped (> 15 MB); use fewer --profile-steps'
            else:
                self.trace = str(path)

        def fit_end(self, state: State, logger: Logger) -> None:
            import torch

            if self.prof is not None:
                self.prof.stop()
                self.prof = None
            self.t['fit_end'] = time.time()
            window = self.step_ends[self.warmup - 1:self.warmup + self.steps]
            if len(window) != self.steps + 1:
                raise RuntimeError(f'bench_step_timer: {len(self.step_ends)} steps ran, fewer than warmup '
                                   f'({self.warmup}) + steps ({self.steps})')
            step_s = [b - a for a, b in zip(window, window[1:])]
            mean = (window[-1] - window[0]) / self.steps
            tokens_per_s = self.tokens / mean
            peak_alloc, peak_resv = self.mem.get('peak', (0.0, 0.0))
            t = self.t
            ac = sum(type(m).__name__ == 'CheckpointWrapper' for m in state.model.modules())
            backends = sorted({f'{b.name}' for m in state.model.modules()
                               for b in getattr(m, '_resolved', {}).values() if hasattr(b, 'name')})
            fsdp = state.fsdp_config
            fsdp_desc = 'none' if fsdp is None else (
                f"FSDP2 reshard_after_forward={getattr(fsdp, 'reshard_after_forward', '?')}"
                if type(fsdp).__name__ == 'FSDP2Config' else f"FSDP1 {getattr(fsdp, 'sharding_strategy', '?')}")
            micro = state.device_train_microbatch_size
            result = {
                'rank': dist.get_global_rank(), 'world_size': dist.get_world_size(),
                'device_name': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                'tokens_per_gpu_per_step': self.tokens, 'step_s_mean': mean,
                'step_s_median': sorted(step_s)[len(step_s) // 2], 'step_s_all': step_s,
                'tokens_per_s_per_gpu': tokens_per_s, 'flops_per_token': self.flops_per_token,
                'model_flops_per_token': self.model_flops,
                'mfu': self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12),
                'peak_allocated_gb': peak_alloc, 'peak_reserved_gb': peak_resv,
                'init_peak_allocated_gb': self.mem.get('init_peak', (0.0, 0.0))[0],
                'fsdp': fsdp_desc, 'activation_checkpointing': f'{ac} blocks' if ac else 'off',
                'precision': str(state.precision.value), 'microbatches_per_step':
                    (self.tokens // state.batch['input_ids'].shape[1]) // micro if micro else None,
                'moe_backends': backends,
                'startup_s': {'imports_and_config': t['callback_built'] - t['launch'],
                              'model_and_data': t['init'] - t['callback_built'],
                              'trainer_init': t['fit_start'] - t['init'],
                              'first_step': t['first_step_end'] - t['fit_start'],
                              'to_first_measured_step': self.step_ends[self.warmup - 1] - t['launch']},
                'profile_summary': self.profile_summary, 'trace': self.trace, 'kernels': self.kernels,
            }
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f'rank{result["rank"]}.json').write_text(json.dumps(result, indent=1))

    return StepTimer


if __name__ == '__main__':
    sys.exit(main())
elif __name__ == 'python_code':
    # Imported by LLM Foundry's train through the YAML's code_paths (llmfoundry.utils.registry_utils.import_file
    # names the module 'python_code'): register the callback there, and nowhere else (tests import this file too).
    from llmfoundry import registry as _registry

    StepTimer = _define_callback()
    _registry.callbacks.register('bench_step_timer', func=StepTimer)
    for _name, _bench_name in GPU_INIT.items():
        _registry.models.register(_bench_name, func=_gpu_init_model(_registry.models.get(_name)))
