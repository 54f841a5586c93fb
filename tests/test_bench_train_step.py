"""benchmarks/train_step.py on the CPU: the YAML each case trains, the GPU-time split of a profile, and one real
run through `python -m foundry_dbrx.train` whose per-rank JSON must hold consistent numbers (no timing is
asserted: a benchmark prints numbers, a test checks the arithmetic)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

BENCH = ROOT / 'benchmarks' / 'train_step.py'


@pytest.fixture(scope='module')
def bench():
    # Imported under its own name: the callback registers itself only when LLM Foundry imports the file.
    spec = importlib.util.spec_from_file_location('train_step_under_test', BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_case_yaml(bench, tmp_path):
    small = bench.SIZES['small']
    cfg = bench.case_yaml('dbrx', small, 2, '/data', str(tmp_path), warmup=3, steps=5, profile_steps=2,
                          variants=['fsdp_config.backward_prefetch=BACKWARD_PRE'])
    model = cfg['model']
    assert (model['name'], model['init_device'], model['d_model'], model['n_layers']) == ('dbrx', 'meta', 2048, 8)
    assert model['attn_config']['kv_n_heads'] == 4 and model['attn_config']['clip_qkv'] == 8  # base kept, resized
    assert model['ffn_config']['ffn_hidden_size'] == 3584 and model['use_train_metrics'] is False
    assert cfg['save_folder'] is None and cfg['max_duration'] == '11ba'  # 3 + 5 + 1 profiler warm-up + 2
    assert cfg['global_train_batch_size'] == 64 and cfg['device_train_microbatch_size'] == 8
    assert cfg['fsdp_config']['backward_prefetch'] == 'BACKWARD_PRE'
    assert cfg['train_loader']['dataset']['max_seq_len'] == 2048 and cfg['train_loader']['dataset']['local'] == '/data'
    assert list(cfg['callbacks']) == ['bench_step_timer'] and cfg['code_paths'] == [str(BENCH)]
    assert 'loggers' not in cfg  # nothing else timed, nothing written outside the case folder
    timer = cfg['callbacks']['bench_step_timer']
    assert timer['flops_per_token'] == bench.flops_per_token(small)
    # One process on a GPU: LLM Foundry drops FSDP; the model is built on the GPU by the registered subclass.
    one = bench.case_yaml('mpt_dbrx_moe', small, 1, '/data', str(tmp_path), warmup=1, steps=1, profile_steps=0)
    assert (one['model']['name'], one['model']['init_device']) == ('bench_gpu_init_mpt_dbrx_moe', 'cpu')
    # Like for like with mb_dmoe: bf16 expert weights; the fp32-expert row is one --variant away.
    assert one['model']['ffn_config']['bf16'] is True
    fp32 = bench.case_yaml('mpt_dbrx_moe', small, 1, '/data', str(tmp_path), warmup=1, steps=1, profile_steps=0,
                           variants=['model.ffn_config.bf16=false'])
    assert fp32['model']['ffn_config']['bf16'] is False
    mb = bench.case_yaml('mpt_mb_dmoe', small, 2, '/data', str(tmp_path), warmup=1, steps=1, profile_steps=0)
    assert mb['model']['name'] == 'mpt_causal_lm' and mb['model']['ffn_config']['mlp_impl'] == 'grouped'
    assert mb['model']['ffn_config']['bf16'] is True and mb['model']['expansion_ratio'] * 2048 == 3584
    with pytest.raises(ValueError, match='must look like key=value'):
        bench.case_yaml('dbrx', small, 2, '/d', str(tmp_path), warmup=1, steps=1, profile_steps=0, variants=['x'])


def test_flops_convention_matches_the_composer_model(bench, tmp_path):
    import torch

    from foundry_dbrx.composer_model import ComposerDbrxCausalLM

    arch = bench.SIZES['tiny']
    model_cfg = bench.case_yaml('dbrx', arch, 2, '/d', str(tmp_path), warmup=1, steps=1, profile_steps=0)['model']
    model = ComposerDbrxCausalLM(**{k: v for k, v in model_cfg.items() if k != 'name'})
    batch = {'input_ids': torch.zeros(2, arch.seq_len, dtype=torch.long)}
    assert bench.flops_per_token(arch) * 2 * arch.seq_len == model.flops_per_batch(batch)


def test_gpu_time_split(bench):
    """Kernel intervals in microseconds: compute 0-10 and 20-30, NCCL 5-25, a memcpy 40-42: one step."""
    ev = lambda name, ts, dur, cat='kernel': {'ph': 'X', 'cat': cat, 'name': name, 'ts': ts, 'dur': dur}  # noqa
    events = [ev('sm90_xmma_gemm_bf16', 0, 10), ev('triton_poi_fused', 20, 10),
              ev('ncclDevKernel_AllGather_RING_LL', 5, 20), ev('Memcpy DtoD', 40, 2, 'gpu_memcpy'),
              {'ph': 'X', 'cat': 'cpu_op', 'name': 'aten::mm', 'ts': 0, 'dur': 100}]
    s = bench.summarize_gpu_activity(events, steps=1)
    assert s['kernels'] == 4
    assert s['window_ms_per_step'] == pytest.approx(0.042) and s['busy_ms'] == pytest.approx(0.032)
    assert s['idle_ms'] == pytest.approx(0.010) and s['compute_ms'] == pytest.approx(0.022)
    assert s['comm_ms'] == pytest.approx(0.020) and s['comm_overlapped_ms'] == pytest.approx(0.010)
    assert s['comm_exposed_ms'] == pytest.approx(0.010)
    assert s['by_category_ms'] == pytest.approx({'nccl': 0.020, 'gemm': 0.010, 'triton': 0.010,
                                                 'memcpy/memset': 0.002})
    table = bench.kernel_table(events, steps=1)
    assert table.splitlines()[1].split()[-1] == 'ncclDevKernel_AllGather_RING_LL'


def test_one_cpu_run(tmp_path):
    """dbrx, tiny size, one process with activation checkpointing forced and a profile: the JSON a rank writes and
    the table row agree with the arithmetic (tokens per step, MFU from FLOPs and tokens/s)."""
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, str(BENCH), '--sizes', 'tiny', '--models', 'dbrx', '--nproc', '1', '--warmup', '1',
         '--steps', '2', '--profile', '--profile-steps', '1', '--ac-without-fsdp', '--out', str(out),
         '--data-root', str(tmp_path / 'data'), '--data-max-tokens', '20000', '--timeout', '400'],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    case = out / 'dbrx-tiny-1gpu-ac_without_fsdp'
    rank0 = json.loads((case / 'rank0.json').read_text())
    assert rank0['tokens_per_gpu_per_step'] == 4 * 128 and len(rank0['step_s_all']) == 2
    assert rank0['tokens_per_s_per_gpu'] == pytest.approx(512 / rank0['step_s_mean'])
    assert rank0['mfu'] == pytest.approx(rank0['flops_per_token'] * rank0['tokens_per_s_per_gpu'] / 989e12)
    assert rank0['model_flops_per_token'] == rank0['flops_per_token']  # the model's own count agrees
    assert rank0['activation_checkpointing'] == '2 blocks' and rank0['moe_backends'] == ['eager']
    assert rank0['microbatches_per_step'] == 2 and rank0['fsdp'] == 'none'
    assert (case / 'trace_rank0.json.gz').is_file() and 'top GPU kernels' in (case / 'kernels_rank0.txt').read_text()
    row = json.loads((out / 'results.jsonl').read_text().splitlines()[-1])
    assert row['status'] == 'ok' and row['label'] == 'ac_without_fsdp'
    assert proc.stdout.strip().splitlines()[-1].startswith('| ac_without_fsdp | dbrx | tiny | 1 |')
