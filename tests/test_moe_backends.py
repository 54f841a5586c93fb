"""Every expert backend against ``eager``: outputs and gradients, on balanced, skewed and empty-expert routings.

Every backend runs behind the local dispatcher (routing plan, row gather, gather-sum combine), as in the layer.
On CPU the ``grouped_mm`` autograd function runs with plain-PyTorch stand-ins for ``torch._grouped_mm``
(``TorchOps``), and again with its Triton kernels in Triton's interpreter, so the permutation, weight folding,
in-place backward and kernel math are all checked in CI. The CUDA tests run the real kernels in bf16 against an
fp32 reference and print the max abs differences (run them with ``-s`` on a GPU box).

Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from foundry_dbrx.config import MOE_BACKENDS, DbrxFFNConfig
from foundry_dbrx.moe import BACKENDS, DbrxFFN, eager_experts, resolve_backend
from foundry_dbrx.moe import grouped_mm, kernels, megablocks_backend
from foundry_dbrx.moe.dispatch import plan_routing
from foundry_dbrx.moe.grouped_mm import grouped_mm_experts
from foundry_dbrx.moe.kernels import TorchOps
from foundry_dbrx.moe.layer import routed_experts
from tests.conftest import make_routing

ROUTINGS = ('balanced', 'skewed', 'empty')
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def make_inputs(t, d, f, e, k, kind, dtype=torch.float32, device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(t, d, generator=gen)
    weights_TK = torch.rand(t, k, generator=gen) + 0.1
    weights_TK = weights_TK / weights_TK.sum(dim=1, keepdim=True)
    ws = [torch.randn(e, f, d, generator=gen) * d ** -0.5 for _ in range(3)]
    experts_TK = make_routing(kind, t, k, e, gen)
    leaves = [v.to(device=device, dtype=dtype).requires_grad_() for v in (x_TD, weights_TK, *ws)]
    dy_TD = torch.randn(t, d, generator=gen).to(device=device, dtype=dtype)
    return leaves, experts_TK.to(device), dy_TD


def run(fn, leaves, experts_TK, dy_TD, **kwargs):
    """Output and the gradients of (x, weights, w1, v1, w2) of backend ``fn`` behind the local dispatcher, on fresh
    copies of the leaves."""
    leaves = [v.detach().clone().requires_grad_() for v in leaves]
    x_TD, weights_TK, w1, v1, w2 = leaves
    y_TD = routed_experts(functools.partial(fn, **kwargs), x_TD, weights_TK, experts_TK, w1, v1, w2)
    y_TD.backward(dy_TD)
    return [y_TD.detach()] + [v.grad for v in leaves]


NAMES = ('y', 'dx', 'dweights', 'dw1', 'dv1', 'dw2')


def assert_close_all(got, want, rtol, atol):
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f'{name}: {m}')


# --- CPU: the logic --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ROUTINGS)
def test_plan_routing_is_a_consistent_permutation(kind):
    t, k, e = 37, 3, 8
    experts_TK = make_routing(kind, t, k, e, torch.Generator().manual_seed(1))
    plan = plan_routing(experts_TK, e)
    flat_N = experts_TK.reshape(-1)
    n = flat_N.numel()
    assert torch.equal(plan.pos_N[plan.order_N], torch.arange(n))  # pos is the inverse permutation
    assert torch.equal(plan.token_N, plan.order_N // k)
    sorted_N = flat_N[plan.order_N]
    assert torch.all(sorted_N[1:] >= sorted_N[:-1])
    for ex in range(e):  # stable: within an expert, slots keep their original order
        same = plan.order_N[sorted_N == ex]
        assert torch.all(same[1:] > same[:-1])
    assert plan.offs_E.dtype == torch.int32
    assert torch.equal(plan.offs_E.long(), torch.bincount(flat_N, minlength=e).cumsum(0))


def test_torch_gmm_stand_in_matches_per_expert_matmuls():
    gen = torch.Generator().manual_seed(2)
    offs_E = torch.tensor([3, 3, 7, 12], dtype=torch.int32)  # expert 1 is empty
    a_ND = torch.randn(12, 5, generator=gen)
    b_EDF = torch.randn(4, 5, 6, generator=gen)
    out = TorchOps.gmm(a_ND, b_EDF, offs_E)
    bounds = [0, 3, 3, 7, 12]
    for e in range(4):
        torch.testing.assert_close(out[bounds[e]:bounds[e + 1]], a_ND[bounds[e]:bounds[e + 1]] @ b_EDF[e])
    c_NF = torch.randn(12, 6, generator=gen)
    grad = TorchOps.gmm(a_ND.t(), c_NF, offs_E)  # contraction grouped: [E, D, F]
    assert torch.count_nonzero(grad[1]) == 0
    for e in range(4):
        s, t = bounds[e], bounds[e + 1]
        torch.testing.assert_close(grad[e], a_ND[s:t].t() @ c_NF[s:t])


@pytest.mark.parametrize('kind', ROUTINGS)
def test_grouped_mm_logic_matches_eager_on_cpu(kind):
    leaves, experts_TK, dy_TD = make_inputs(t=41, d=16, f=24, e=8, k=3, kind=kind)
    want = run(eager_experts, leaves, experts_TK, dy_TD)
    got = run(grouped_mm_experts, leaves, experts_TK, dy_TD, ops=TorchOps)
    assert_close_all(got, want, rtol=1e-4, atol=1e-5)
    if kind == 'empty':
        for g in got[3:]:
            assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[-1]) == 0


def _ffn_pair(backend: str, d=32, f=48, e=8, k=2, dtype=torch.float32, device='cpu'):
    torch.manual_seed(0)
    cfg = dict(ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, moe_loss_weight=0.0)
    ref = DbrxFFN(d, DbrxFFNConfig(**cfg), backend='eager', device=device, dtype=dtype)
    ffn = DbrxFFN(d, DbrxFFNConfig(**cfg), backend=backend, device=device, dtype=dtype)
    ffn.load_state_dict(ref.state_dict())
    return ref, ffn


def _ffn_grads(ffn, x_BSD, dy_BSD):
    x_BSD = x_BSD.detach().clone().requires_grad_()
    y_BSD, _ = ffn(x_BSD)
    y_BSD.backward(dy_BSD)
    mlp = ffn.experts.mlp
    return {'y': y_BSD.detach(), 'dx': x_BSD.grad, 'drouter': ffn.router.layer.weight.grad,
            'dw1': mlp.w1.grad, 'dv1': mlp.v1.grad, 'dw2': mlp.w2.grad}


def test_grouped_mm_through_the_full_ffn_on_cpu(monkeypatch):
    """The router's gradient reaches it through the backend's routing-weight gradient."""
    monkeypatch.setattr(BACKENDS['grouped_mm'], 'available', lambda device: None)
    monkeypatch.setattr(BACKENDS['grouped_mm'], 'dtypes', None)  # fp32 on CPU, through the stand-in GEMMs
    ref, ffn = _ffn_pair('grouped_mm')
    assert ffn.experts.backend_for(torch.zeros(1, 32)) is BACKENDS['grouped_mm']
    gen = torch.Generator().manual_seed(3)
    x_BSD, dy_BSD = torch.randn(2, 19, 32, generator=gen), torch.randn(2, 19, 32, generator=gen)
    want, got = _ffn_grads(ref, x_BSD, dy_BSD), _ffn_grads(ffn, x_BSD, dy_BSD)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f'{name}: {m}')


def test_grouped_mm_refuses_a_second_backward():
    leaves, experts_TK, dy_TD = make_inputs(t=8, d=8, f=8, e=4, k=2, kind='balanced')
    y_TD = routed_experts(functools.partial(grouped_mm_experts, ops=TorchOps), *leaves[:2], experts_TK, *leaves[2:])
    y_TD.backward(dy_TD, retain_graph=True)
    with pytest.raises(RuntimeError, match='retain_graph'):
        y_TD.backward(dy_TD)


def test_grouped_mm_names_the_alignment_rule():
    leaves, experts_TK, _ = make_inputs(t=8, d=12, f=8, e=4, k=2, kind='balanced')
    with pytest.raises(ValueError, match=r'd_model \(12\).*multiples of 8'):
        routed_experts(functools.partial(grouped_mm_experts, ops=kernels.TritonOps), *leaves[:2], experts_TK,
                       *leaves[2:])


_INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    from foundry_dbrx.moe import eager_experts
    from foundry_dbrx.moe.grouped_mm import grouped_mm_experts
    from foundry_dbrx.moe.kernels import TorchOps, TritonOps
    import test_moe_backends as t

    import numpy as np
    from foundry_dbrx.moe import kernels

    class InterpretedOps(TritonOps):
        gmm = staticmethod(TorchOps.gmm)  # torch._grouped_mm has no CPU kernel in torch 2.7

    # The interpreter runs a loop whose bound is loaded from memory (the weight-gradient GEMM's token range) through
    # int() of a 1-element array, which NumPy >= 2.3 refuses; the compiled kernel is checked on the GPU instead.
    try:
        int(np.array([1]))
        loaded_loop_bounds = True
    except TypeError:
        loaded_loop_bounds = False
    for form in kernels.TRITON_GEMM_CONFIG.values():
        form.update(BM=16, BN=16, BK=16, GROUP_M=2)  # small tiles: the interpreter is slow
    for kind in t.ROUTINGS:
        leaves, experts_TK, dy_TD = t.make_inputs(t=13, d=16, f=40, e=6, k=2, kind=kind)
        want = t.run(eager_experts, leaves, experts_TK, dy_TD)
        for ops in (InterpretedOps, kernels.TritonGemmOps) if loaded_loop_bounds else (InterpretedOps,):
            got = t.run(grouped_mm_experts, leaves, experts_TK, dy_TD, ops=ops)
            t.assert_close_all(got, want, rtol=1e-4, atol=1e-5)

    # The Triton grouped GEMM alone: both forms, transposed operands, empty groups, a group count not a power of 2.
    gen = torch.Generator().manual_seed(6)
    for ends in ([5, 5, 40, 41, 70], [0, 0, 33], [17, 17, 17, 17]):
        offs_E = torch.tensor(ends, dtype=torch.int32)
        a_ND = torch.randn(ends[-1], 24, generator=gen)
        for b in (torch.randn(len(ends), 24, 40, generator=gen),
                  torch.randn(len(ends), 40, 24, generator=gen).transpose(1, 2)):
            torch.testing.assert_close(kernels.triton_gmm(a_ND, b, offs_E), TorchOps.gmm(a_ND, b, offs_E))
        c_NF = torch.randn(ends[-1], 40, generator=gen)
        if loaded_loop_bounds:
            torch.testing.assert_close(kernels.triton_gmm(a_ND.t(), c_NF, offs_E),
                                       TorchOps.gmm(a_ND.t(), c_NF, offs_E))

    # The dispatcher's gather-sum (the combine, and the input gradient of the row gather).
    src_ND = torch.randn(21, 40, generator=gen)
    pos_N = torch.randperm(21, generator=gen)
    torch.testing.assert_close(TritonOps.unpermute_sum(src_ND, pos_N, 3), TorchOps.unpermute_sum(src_ND, pos_N, 3))

    # The empty-expert zero fill, on a gradient that is not zero to begin with.
    grad = torch.ones(4, 3, 5)
    TritonOps.zero_empty_experts(grad, torch.tensor([2, 2, 5, 5], dtype=torch.int32))
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0
    assert torch.all(grad[0] == 1) and torch.all(grad[2] == 1)
    print('ok')
''')


def test_triton_kernels_in_the_interpreter():
    """The Triton kernels (the grouped GEMM too), run by Triton's CPU interpreter inside the full autograd
    function, against eager."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(__file__), env.get('PYTHONPATH', '')])
    res = subprocess.run([sys.executable, '-c', _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stdout + res.stderr


def test_backend_table_and_auto_on_cpu():
    assert set(MOE_BACKENDS) == {'auto', *BACKENDS}
    assert resolve_backend('auto', torch.device('cpu')) is BACKENDS['eager']
    assert 'CUDA' in grouped_mm.available(torch.device('cpu'))
    assert 'CUDA' in megablocks_backend.available(torch.device('cpu'))
    with pytest.raises(RuntimeError, match="'grouped_mm' cannot run on cpu"):
        resolve_backend('grouped_mm', torch.device('cpu'))
    assert [b.name for b in sorted(BACKENDS.values(), key=lambda b: -b.priority)] == [
        'grouped_mm', 'megablocks', 'grouped_mm_triton', 'eager']


def test_megablocks_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(megablocks_backend, '_modules', None)
    monkeypatch.setattr(megablocks_backend, '_import_error', None)
    monkeypatch.setitem(sys.modules, 'megablocks', None)  # makes `import megablocks...` raise ImportError
    monkeypatch.setitem(sys.modules, 'megablocks.ops', None)
    reason = megablocks_backend.available(torch.device('cuda'))
    assert reason is not None and "pip install 'foundry-dbrx[gpu]'" in reason
    leaves, experts_TK, _ = make_inputs(t=4, d=8, f=8, e=4, k=2, kind='balanced')
    with pytest.raises(ImportError, match=r'foundry-dbrx\[gpu\]'):
        routed_experts(megablocks_backend.megablocks_experts, *leaves[:2], experts_TK, *leaves[2:])


# --- CUDA: the real kernels, bf16 against an fp32 reference ----------------------------------------------------

def _max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def _report(label, got, ref32, eager16):
    diffs = {n: (_max_abs(g, r), _max_abs(e, r), _max_abs(g, e)) for n, g, r, e in zip(NAMES, got, ref32, eager16)}
    print(f'\n[parity] {label}: max|backend-fp32ref| / max|eager_bf16-fp32ref| / max|backend-eager_bf16|')
    for n, (bd, ed, be) in diffs.items():
        print(f'[parity]   {n:9s} {bd:.3e} / {ed:.3e} / {be:.3e}')
    return diffs


def _check_bf16(diffs, got, ref32):
    for (name, (bd, ed, _)), r in zip(diffs.items(), ref32):
        scale = r.float().abs().max().item()
        # bf16 rounds at 2^-8 relative: the backend must be as close to fp32 as eager bf16 is, up to 2x.
        assert bd <= 2 * ed + 1e-2 * scale, f'{name}: backend err {bd:.3e} vs eager bf16 err {ed:.3e}'


FAST = ['grouped_mm', 'megablocks', 'grouped_mm_triton']


@cuda
@pytest.mark.parametrize('backend', FAST)
@pytest.mark.parametrize('kind', ROUTINGS)
def test_backend_matches_eager_cuda(backend, kind):
    reason = BACKENDS[backend].available(torch.device('cuda'))
    if reason:
        pytest.skip(reason)
    fn = BACKENDS[backend].fn
    leaves, experts_TK, dy_TD = make_inputs(t=1000, d=256, f=384, e=8, k=2, kind=kind, device='cuda')
    ref32 = run(eager_experts, leaves, experts_TK, dy_TD)
    leaves16 = [v.detach().bfloat16() for v in leaves]
    eager16 = run(eager_experts, leaves16, experts_TK, dy_TD.bfloat16())
    got = run(fn, leaves16, experts_TK, dy_TD.bfloat16())
    _check_bf16(_report(f'{backend} {kind}', got, ref32, eager16), got, ref32)
    if kind == 'empty':
        for g in got[3:]:
            assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[-1]) == 0


@cuda
@pytest.mark.parametrize('backend', FAST)
def test_backend_through_the_full_ffn_cuda(backend):
    if BACKENDS[backend].available(torch.device('cuda')):
        pytest.skip(BACKENDS[backend].available(torch.device('cuda')))
    ref32, _ = _ffn_pair('eager', d=256, f=384, e=8, k=2, device='cuda')
    ref16, ffn16 = _ffn_pair(backend, d=256, f=384, e=8, k=2, device='cuda', dtype=torch.bfloat16)
    ref16.load_state_dict(ref32.state_dict())
    ffn16.load_state_dict(ref32.state_dict())
    gen = torch.Generator().manual_seed(4)
    x_BSD, dy_BSD = torch.randn(4, 250, 256, generator=gen).cuda(), torch.randn(4, 250, 256, generator=gen).cuda()
    # Route on the bf16 model's decisions everywhere, so a near-tie flipped by rounding cannot differ.
    want = _ffn_grads(ref32, x_BSD, dy_BSD)
    eager = _ffn_grads(ref16, x_BSD.bfloat16(), dy_BSD.bfloat16())
    got = _ffn_grads(ffn16, x_BSD.bfloat16(), dy_BSD.bfloat16())
    names = list(want)
    diffs = {}
    print(f'\n[parity] {backend} full DbrxFFN: max|backend-eager_bf16| (max|eager_bf16-fp32ref|)')
    for n in names:
        diffs[n] = _max_abs(got[n], eager[n])
        print(f'[parity]   {n:9s} {diffs[n]:.3e} ({_max_abs(eager[n], want[n]):.3e})')
        scale = eager[n].float().abs().max().item()
        assert diffs[n] <= 2 * _max_abs(eager[n], want[n]) + 2e-2 * scale, n


@cuda
@pytest.mark.parametrize('backend', ['grouped_mm', 'grouped_mm_triton'])
def test_no_host_sync_cuda(backend):
    reason = BACKENDS[backend].available(torch.device('cuda'))
    if reason:
        pytest.skip(reason)
    fn = BACKENDS[backend].fn
    leaves, experts_TK, dy_TD = make_inputs(t=512, d=256, f=384, e=8, k=2, kind='skewed', device='cuda',
                                            dtype=torch.bfloat16)
    run(fn, leaves, experts_TK, dy_TD)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        run(fn, leaves, experts_TK, dy_TD)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
def test_grouped_gemms_match_the_cpu_stand_in_cuda():
    if not hasattr(torch, '_grouped_mm'):
        pytest.skip('torch has no _grouped_mm')
    gen = torch.Generator().manual_seed(5)
    offs_E = torch.tensor([64, 64, 200, 200, 333], dtype=torch.int32)
    a_ND = torch.randn(333, 64, generator=gen).bfloat16()
    b_EDF = torch.randn(5, 64, 48, generator=gen).bfloat16()
    c_NF = torch.randn(333, 48, generator=gen).bfloat16()
    for a, b in ((a_ND, b_EDF), (a_ND.t(), c_NF), (a_ND, b_EDF.transpose(1, 2).contiguous().transpose(1, 2))):
        want = TorchOps.gmm(a.float(), b.float(), offs_E)
        for gmm in (torch._grouped_mm, kernels.triton_gmm):
            got = gmm(a.cuda(), b.cuda(), offs=offs_E.cuda())
            torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)
    assert resolve_backend('auto', torch.device('cuda')).name in ('grouped_mm', 'megablocks', 'grouped_mm_triton',
                                                                  'eager')


def test_fast_backends_declare_bf16_and_auto_skips_them_in_fp32():
    """An fp32 run on a GPU gets `eager` from `auto`, not a dtype error at its first step."""
    for name in ('grouped_mm', 'megablocks', 'grouped_mm_triton'):
        reason = BACKENDS[name].unusable(torch.device('cuda'), torch.float32)
        assert reason is not None and 'bfloat16' in reason, (name, reason)
    assert BACKENDS['eager'].unusable(torch.device('cpu'), torch.float32) is None
    with pytest.raises(RuntimeError, match=r"'grouped_mm' cannot run on cpu in torch.float32: computes in"):
        resolve_backend('grouped_mm', torch.device('cpu'), torch.float32)
    ffn = DbrxFFN(16, DbrxFFNConfig(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2), backend='auto')
    ffn(torch.randn(3, 16))
    assert [b.name for b in ffn.experts._resolved.values()] == ['eager']
