"""``decoupled_adamw_fused`` against Composer's ``DecoupledAdamW``, the reference it replaces: parameters and state
after several steps of a changing lr (fp64, fp32, bf16; fused and foreach; amsgrad; an ``initial_lr`` of 0), state
dicts loaded in both directions, skipped parameters, the OptimizerMonitor metrics, the registry, one-line errors,
DTensor parameters on two device meshes under FSDP2 (2 gloo ranks), and the benchmark script's two rows."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from composer.optim import DecoupledAdamW

from foundry_dbrx.optim import DecoupledAdamWFused
from tests.conftest import ROOT, subprocess_env
from tests.test_expert_parallel import _free_port

SHAPES = [(64, 32), (32,), (3, 5, 7), (1,)]
STEPS = 8
# fp64: the same arithmetic up to rounding order (torch computes 1 - lr * (wd / initial_lr) where Composer computes
# 1 - (lr / initial_lr) * wd; the fused kernel decays as p - c*p, not p * (1 - c)); a few ulps of values below 4.
# fp32: the fused kernel also forms the bias corrections in fp32 (Composer in Python floats); after 8 steps the
# largest difference measured is 1.2e-7 (params) and 1.5e-7 (state), a quarter ulp of the largest weights
# (|p| < 4): allow 1e-6, two ulps; a wrong decay translation is off by ~1e-4.
ATOL = {torch.float64: 1e-14, torch.float32: 1e-6}


def make_params(dtype, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def groups(params) -> list[dict]:
    # Three groups: the default lr and decay; their own lr and decay; an initial lr of 0 (Composer then decays by
    # 1 - wd whatever the lr, and with lr still 0 the Adam update is 0 too).
    return [{'params': params[:2]}, {'params': params[2:3], 'lr': 3e-2, 'weight_decay': 1e-3},
            {'params': params[3:], 'lr': 0.0}]


def train(opt, params, t0: int, t1: int, gen: torch.Generator) -> None:
    """Steps ``t0`` to ``t1`` with fresh random gradients and a decaying lr written into the groups, as Composer's
    schedulers write it. A zero gradient (updated: Composer skips only missing ones), a parameter without a
    gradient every third step and one with ``requires_grad=False`` (both skipped)."""
    for t in range(t0, t1):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if i == 1 and t % 3 == 2:
                p.grad = None
        params[0].grad[:3].zero_()
        for group in opt.param_groups:
            group['lr'] = group['initial_lr'] * (1.0 - t / 16) if group['initial_lr'] else 0.01 * (t % 2)
        opt.step()


def pair(dtype, implementation, amsgrad=False, frozen=False):
    ref_params, our_params = make_params(dtype), make_params(dtype)
    if frozen:
        ref_params[2].requires_grad_(False)
        our_params[2].requires_grad_(False)
    kwargs = dict(lr=1e-2, weight_decay=1e-4, amsgrad=amsgrad)
    ref = DecoupledAdamW(groups(ref_params), **kwargs)
    ours = DecoupledAdamWFused(groups(our_params), implementation=implementation, **kwargs)
    return ref, ref_params, ours, our_params


def assert_same(ref, ref_params, ours, our_params, atol) -> None:
    for i, (a, b) in enumerate(zip(our_params, ref_params)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f'param {i}: {m}')
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for key in sb:
            torch.testing.assert_close(sa[key].cpu(), sb[key].cpu(), rtol=0, atol=atol,
                                       msg=lambda m: f'param {i} {key}: {m}')
    assert [g['initial_lr'] for g in ours.param_groups] == [g['initial_lr'] for g in ref.param_groups]
    assert [g['weight_decay'] for g in ours.param_groups] == [g['weight_decay'] for g in ref.param_groups]


@pytest.mark.parametrize('implementation', ['fused', 'foreach'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['fp64', 'fp32'])
@pytest.mark.parametrize('amsgrad', [False, True], ids=['adam', 'amsgrad'])
def test_steps_match_composer(implementation, dtype, amsgrad):
    ref, ref_params, ours, our_params = pair(dtype, implementation, amsgrad, frozen=True)
    train(ref, ref_params, 0, STEPS, torch.Generator().manual_seed(1))
    train(ours, our_params, 0, STEPS, torch.Generator().manual_seed(1))
    assert_same(ref, ref_params, ours, our_params, ATOL[dtype])
    assert our_params[2] not in ours.state and ours.state[our_params[1]]['step'].item() == STEPS - STEPS // 3
    start = make_params(dtype)
    assert not torch.equal(our_params[3], start[3])  # the lr-0 group decayed, as Composer's does


@pytest.mark.parametrize('implementation', ['fused', 'foreach'])
def test_bf16_is_as_close_to_fp64_as_composer(implementation):
    """In bf16 both round differently (Composer after each of its nine ops, torch's kernels once per tensor), so
    each is compared with the fp64 run from the same bf16 start: ours is no farther from it than Composer's plus
    one bf16 ulp of the largest weights (2**-7 * 4)."""
    ref, ref_params, ours, our_params = pair(torch.bfloat16, implementation)
    exact_params = [torch.nn.Parameter(p.detach().double()) for p in make_params(torch.bfloat16)]
    exact = DecoupledAdamW(groups(exact_params), lr=1e-2, weight_decay=1e-4)
    for opt, params in ((ref, ref_params), (ours, our_params), (exact, exact_params)):
        train(opt, params, 0, STEPS, torch.Generator().manual_seed(1))
    for a, b, x in zip(our_params, ref_params, exact_params):
        ours_err = (a.double() - x).abs().max().item()
        ref_err = (b.double() - x).abs().max().item()
        assert ours_err <= ref_err + 2 ** -7 * 4, (ours_err, ref_err)
        assert a.dtype == torch.bfloat16 and ours.state[a]['exp_avg'].dtype == torch.bfloat16


@pytest.mark.parametrize('implementation', ['fused', 'foreach'])
def test_state_dict_moves_both_ways(implementation):
    """A checkpoint of Composer's optimizer resumes in ours and one of ours in Composer's: 4 steps, the state dict
    through torch.save / torch.load, 4 more steps (the gradients of one uninterrupted run) equal 8 steps of
    Composer's alone; the checkpoint's param groups (lr, initial_lr, weight_decay) replace the constructor's."""
    ref_params = make_params(torch.float32)
    ref = DecoupledAdamW(groups(ref_params), lr=1e-2, weight_decay=1e-4)
    train(ref, ref_params, 0, STEPS, torch.Generator().manual_seed(5))
    ours = {'implementation': implementation}
    for first, first_kw, then, then_kw in ((DecoupledAdamW, {}, DecoupledAdamWFused, ours),
                                           (DecoupledAdamWFused, ours, DecoupledAdamW, {})):
        params, gen = make_params(torch.float32), torch.Generator().manual_seed(5)
        opt = first(groups(params), lr=1e-2, weight_decay=1e-4, **first_kw)
        train(opt, params, 0, STEPS // 2, gen)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        resumed = then(groups(params), lr=5.0, weight_decay=0.5, **then_kw)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert [g['initial_lr'] for g in resumed.param_groups] == [1e-2, 3e-2, 0.0]
        train(resumed, params, STEPS // 2, STEPS, gen)
        assert_same(ref, ref_params, resumed, params, ATOL[torch.float32])


def test_optimizer_monitor_metrics_match_composer():
    """Composer's OptimizerMonitor calls report_per_parameter_metrics: inherited, so the same four norms."""
    ref, ref_params, ours, our_params = pair(torch.float32, 'fused')
    train(ref, ref_params, 0, 3, torch.Generator().manual_seed(1))
    train(ours, our_params, 0, 3, torch.Generator().manual_seed(1))
    for i, (a, b) in enumerate(zip(our_params, ref_params)):
        if a.grad is None:  # OptimizerMonitor asks only about parameters with a gradient
            continue
        got, want = ours.report_per_parameter_metrics(a, f'p{i}', {}), ref.report_per_parameter_metrics(b, f'p{i}', {})
        assert sorted(got) == sorted(want) and len(want) == 4
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_found_through_llm_foundry_registry():
    from llmfoundry.utils.builders import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = build_optimizer(model, 'decoupled_adamw_fused',
                          {'lr': 2e-3, 'betas': [0.9, 0.95], 'eps': 1e-8, 'weight_decay': 1e-5})
    assert type(opt) is DecoupledAdamWFused and isinstance(opt, DecoupledAdamW)
    assert opt.param_groups[0]['initial_lr'] == 2e-3 and opt.param_groups[0]['betas'] == (0.9, 0.95)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(opt.state[p]['step'].item() == 1 for p in model.parameters())


@pytest.mark.parametrize('kwargs, message', [
    ({'lr': -1.0}, 'optimizer.lr (-1.0) must be a finite float >= 0 (a tensor lr is not supported)'),
    ({'lr': torch.tensor(1e-3)}, 'optimizer.lr (tensor(0.0010)) must be a finite float >= 0'),
    ({'betas': (0.9, 1.0)}, 'optimizer.betas[1] (1.0) must be a float in [0, 1)'),
    ({'betas': 0.9}, 'optimizer.betas (0.9) must be two floats [beta1, beta2]'),
    ({'eps': float('nan')}, 'optimizer.eps (nan) must be a finite float >= 0'),
    ({'weight_decay': -1e-5}, 'optimizer.weight_decay (-1e-05) must be a finite float >= 0'),
    ({'implementation': 'apex'}, "optimizer.implementation ('apex') must be one of auto, fused, foreach"),
])
def test_bad_arguments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        DecoupledAdamWFused(make_params(torch.float32), **kwargs)
    assert str(err.value).startswith(message) and '\n' not in str(err.value)


def test_fused_refuses_what_it_cannot_run():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float32, device='meta'))
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match='implementation=fused needs floating-point parameters on a device with '
                                           'a fused kernel, got torch.float32 on meta'):
        DecoupledAdamWFused([p], implementation='fused').step()


def test_fsdp2_dtensors_on_two_meshes(tmp_path):
    """tests/optim_worker.py on 2 gloo ranks: ours (fused and foreach) equals Composer's on an FSDP2 model whose
    layers live on two device meshes (which torch's fused kernel cannot take in one call)."""
    env = subprocess_env(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-m', 'tests.optim_worker', str(rank), '2', str(tmp_path)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), '\n'.join(log[-3000:] for log in logs)
    assert sorted(f.name for f in tmp_path.glob('ok-*')) == ['ok-0', 'ok-1']


def test_benchmark_prints_both_rows():
    out = subprocess.run([sys.executable, 'benchmarks/optimizer_step.py', '--params-billion', '0.00002',
                          '--device', 'cpu', '--tensors', '10', '--warmup', '1', '--steps', '2'],
                         capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith('10 tensors, ')
    assert [line.split('  ')[0] for line in lines[1:]] == [
        'composer decoupled_adamw', 'decoupled_adamw_fused (auto)', 'decoupled_adamw_fused (foreach)']
    for line in lines[2:]:
        assert float(line.split('max |param - composer| ')[1]) < 1e-6
