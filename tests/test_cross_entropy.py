"""The chunked linear cross entropy against the plain one (full logits, fp32 F.cross_entropy): loss and the
gradients of the hidden states and of the output weight, in fp32 and bf16, with ignored targets, all-ignored
rows, sizes that do not divide into chunks, both gradient schedules and a scaled incoming gradient. The Triton
kernel runs in Triton's CPU interpreter against the PyTorch ops (the CUDA test runs the compiled one at DBRX's
vocabulary on a GPU box)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from foundry_dbrx.ops import cross_entropy_kernels as kernels
from foundry_dbrx.ops import linear_cross_entropy, linear_cross_entropy_reference
from foundry_dbrx.ops.cross_entropy import _linear_cross_entropy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def _inputs(n, d, v, dtype, ignore_every=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t, scale, **kwargs):
    loss = fn(h, w, t, **kwargs)
    dh, dw = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), dh, dw


@pytest.mark.parametrize('grad_in_forward', [True, False])
@pytest.mark.parametrize('chunk', [1, 5, 16, 37, 1000])
def test_fp32_matches_reference(chunk, grad_in_forward):
    h, w, t = _inputs(37, 16, 53, torch.float32)  # 37 tokens: chunks of 5 and 16 leave a remainder
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t, 0.37)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, 0.37, chunk_tokens=chunk, grad_in_forward=grad_in_forward)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert got[1][::3].abs().max() == 0  # ignored targets: no gradient into their hidden states


@pytest.mark.parametrize('grad_in_forward', [True, False])
def test_all_targets_ignored(grad_in_forward):
    h, w, t = _inputs(9, 8, 11, torch.float32)
    t[:] = -100
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, t, 1.0, chunk_tokens=4,
                                   grad_in_forward=grad_in_forward)
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw.abs().max() == 0
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t, 1.0)
    assert want[0].item() == 0.0  # the reference agrees: a sum over nothing


@pytest.mark.parametrize('grad_in_forward', [True, False])
def test_bf16_as_close_to_exact_as_the_reference(grad_in_forward):
    """In bf16 both round the logits and the logit gradients to bf16; ours sums the weight gradient over chunks in
    fp32. Against float64 math on the same bf16 inputs, ours is no further off than the reference."""
    h, w, t = _inputs(70, 32, 97, torch.bfloat16, ignore_every=4)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, 0.5, chunk_tokens=16, grad_in_forward=grad_in_forward)
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t, 0.5)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = _loss_and_grads(linear_cross_entropy_reference, h64, w64, t, 0.5)
    for name, g, r, x in zip(('loss', 'dh', 'dw'), got, ref, exact):
        assert g.dtype == r.dtype
        err_got = (g.double() - x).abs().max().item()
        err_ref = (r.double() - x).abs().max().item()
        assert err_got <= 1.5 * err_ref + 1e-3 * x.abs().max().item(), (name, err_got, err_ref)
        torch.testing.assert_close(g.double(), r.double(), rtol=2e-2, atol=2e-2 * x.abs().max().item())


def test_autocast_batched_and_no_grad():
    """Under autocast (CPU bf16) fp32 inputs are cast as F.linear casts them; [B, S, D] inputs; without gradients
    the loss is the same and nothing is kept for backward."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 13, 24, generator=gen, requires_grad=True)
    w = (torch.randn(40, 24, generator=gen) / 5).requires_grad_()
    t = torch.randint(0, 40, (2, 13), generator=gen)
    t[1, -4:] = -100
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, h, w, t, 1.0, chunk_tokens=7)
        want = _loss_and_grads(linear_cross_entropy_reference, h, w, t, 1.0)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # gradients reach the fp32 leaves
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)
    with torch.no_grad():
        plain = linear_cross_entropy(h, w, t, chunk_tokens=5)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, linear_cross_entropy_reference(h, w, t).detach(), rtol=1e-5, atol=1e-5)


def test_bad_input():
    h, w, t = _inputs(6, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r'weight shape \(10, 7\) must be \[V, 8\]'):
        linear_cross_entropy(h, w[:, :7], t)
    with pytest.raises(ValueError, match=r'targets shape \(5,\) must be'):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match=r'chunk_tokens \(0\) must be a positive integer'):
        linear_cross_entropy(h, w, t, chunk_tokens=0)
    with pytest.raises(ValueError, match='must share a dtype'):
        linear_cross_entropy(h, w.detach().bfloat16(), t)


def test_composer_model_fused_loss_matches_logits_path():
    """``fused_cross_entropy: true``: the training forward returns the summed loss (no logits), and the losses,
    every parameter's gradient and the train metrics equal those of the logits path; eval still gets logits."""
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    from foundry_dbrx.model import DbrxLossOutput, DbrxOutput
    from tests.conftest import tiny_config

    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        models.append(ComposerDbrxCausalLM(**tiny_config(), training={'fused_cross_entropy': fused}).train())
    plain, fused = models
    ids = torch.randint(0, 512, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2] = -100  # a row with nothing to predict
    batch = {'input_ids': ids, 'labels': labels, 'attention_mask': torch.ones_like(ids)}
    results = []
    for model in models:
        out = model(batch)
        loss = model.loss(out, batch)
        loss['total'].backward()
        for metric in model.get_metrics(is_train=True).values():
            model.update_metric(batch, out, metric)
        results.append((out, loss, {n: p.grad for n, p in model.named_parameters()},
                        {k: m.compute() for k, m in model.get_metrics(is_train=True).items()}))
    (out_p, loss_p, grads_p, metrics_p), (out_f, loss_f, grads_f, metrics_f) = results
    assert isinstance(out_p, DbrxOutput) and isinstance(out_f, DbrxLossOutput)
    assert set(loss_f) == set(loss_p)
    for key in loss_p:
        torch.testing.assert_close(loss_f[key], loss_p[key], rtol=1e-5, atol=1e-6)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert metrics_p.keys() == metrics_f.keys() == {'LanguageCrossEntropy', 'LanguagePerplexity'}
    for key, value in metrics_p.items():
        torch.testing.assert_close(metrics_f[key], value, rtol=1e-5, atol=1e-6)
    assert isinstance(fused.eval()(batch), DbrxOutput)  # evaluation still computes logits
    with pytest.raises(ValueError, match=r"training.fused_cross_entropy \('yes'\) must be true or false"):
        ComposerDbrxCausalLM(**tiny_config(), training={'fused_cross_entropy': 'yes'})


def test_weight_grad_accumulation():
    """The fp32 weight gradient: the first chunk overwrites whatever the buffer held (it is not zero-filled), the
    next ones add; fp32 operands through addmm, bf16 ones through the product and one add (no fp32-output GEMM on
    CPU)."""
    assert kernels.cross_entropy_ops_for(torch.zeros(1)) is kernels.TorchCrossEntropyOps
    assert not kernels.fp32_out_gemm(torch.device('cpu'))
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(9, 20, generator=gen), torch.randn(5, 20, generator=gen)
    h1, h2 = torch.randn(9, 8, generator=gen), torch.randn(5, 8, generator=gen)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        dw = torch.full((20, 8), float('nan'))
        kernels.accumulate_weight_grad(dw, g1.to(dtype), h1.to(dtype), first=True)
        kernels.accumulate_weight_grad(dw, g2.to(dtype), h2.to(dtype), first=False)
        want = g1.double().t() @ h1.double() + g2.double().t() @ h2.double()
        torch.testing.assert_close(dw.double(), want, rtol=tol, atol=tol)


_INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    from foundry_dbrx.ops import cross_entropy_kernels as kernels
    from foundry_dbrx.ops.cross_entropy import _linear_cross_entropy, linear_cross_entropy_reference
    from foundry_dbrx.ops.cross_entropy_kernels import TorchCrossEntropyOps as Torch, TritonCrossEntropyOps as Triton

    # BLOCK_V 16: V = 53 leaves a last block of 5 columns, V = 64 none.
    kernels.TRITON_CE_CONFIG.update(BLOCK_V=16, num_warps=1)
    gen = torch.Generator().manual_seed(0)

    def close_dlogits(got, want):
        if want.dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # the same fp32 value up to exp's last bits, rounded once: at most one bf16 unit apart
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-30)

    # One chunk: loss, lse, and the gradient written over the logits.
    for dtype in (torch.float32, torch.bfloat16):
        for v in (53, 64):
            logits = (torch.randn(7, v, generator=gen) * 3).to(dtype)
            t = torch.randint(0, v, (7,), generator=gen)
            t[2] = t[5] = -100
            t[6] = v - 1  # the last column of the last block
            want = Torch.chunk_cross_entropy(logits.clone(), t, -100, grad=True)
            buf = logits.clone()
            got = Triton.chunk_cross_entropy(buf, t, -100, grad=True)
            assert got[2] is buf  # in place
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-5)
            assert got[0][2] == 0 and got[2][2].abs().max() == 0  # ignored rows: no loss, no gradient
            close_dlogits(got[2], want[2])
            # Without gradients the logits stay; with a given lse and a scale, the scaled gradient.
            buf = logits.clone()
            loss, lse, none = Triton.chunk_cross_entropy(buf, t, -100, grad=False)
            assert none is None and torch.equal(buf, logits)
            torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-5)
            scale = torch.tensor(0.37)
            want_s = Torch.chunk_cross_entropy(logits.clone(), t, -100, grad=True, lse_C=lse, scale=scale)
            got_s = Triton.chunk_cross_entropy(logits.clone(), t, -100, grad=True, lse_C=lse, scale=scale)
            close_dlogits(got_s[2], want_s[2])
            torch.testing.assert_close(got_s[2].float(), 0.37 * got[2].float(), rtol=2 ** -6, atol=1e-30)

    # A target outside [0, V) that is not ignore_index: a NaN loss, no read outside the row.
    loss, _, _ = Triton.chunk_cross_entropy(torch.randn(2, 53, generator=gen), torch.tensor([53, 1]), -100,
                                            grad=False)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])

    # The whole function: loss, dh, dW against the PyTorch ops (and the plain path in fp32), both schedules,
    # 37 tokens in chunks of 16, a scaled incoming gradient.
    for dtype in (torch.float32, torch.bfloat16):
        h = (torch.randn(37, 16, generator=gen) * 2).to(dtype).requires_grad_()
        w = (torch.randn(53, 16, generator=gen) / 4).to(dtype).requires_grad_()
        t = torch.randint(0, 53, (37,), generator=gen)
        t[::3] = -100
        for grad_in_forward in (True, False):
            results = []
            for ops in (Torch, Triton):
                loss = _linear_cross_entropy(h, w, t, -100, 16, grad_in_forward, ops)
                results.append((loss.detach(), *torch.autograd.grad(loss * 0.37, (h, w))))
            (loss, dh, dw), (want_loss, want_dh, want_dw) = results[1], results[0]
            assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
            # fp32: summation order only; bf16: dlogits one unit apart at most, so dh, dW within two units of
            # their largest entry.
            for got, want in ((dh, want_dh), (dw, want_dw)):
                tol = 1e-6 if dtype == torch.float32 else 2 ** -6
                torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * want.float().abs().max())
            if dtype == torch.float32:
                ref = linear_cross_entropy_reference(h, w, t)
                for got, want in zip(results[1], (ref.detach(), *torch.autograd.grad(ref * 0.37, (h, w)))):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(_linear_cross_entropy(h, w, t, -100, 16, None, Triton), loss)
    print('ok')
''')


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter, against the PyTorch ops: per chunk (loss, lse, the
    in-place gradient, a given lse and a scale, ignored rows, a V that is and one that is not a multiple of the
    block, an out-of-range target) and inside the chunked function (loss, dh, dW, both schedules, fp32 and
    bf16)."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stdout + res.stderr


@cuda
@pytest.mark.parametrize('grad_in_forward', [True, False])
def test_cuda_triton_matches_torch_ops_at_dbrx_vocabulary(grad_in_forward):
    """The compiled kernel at V = 100352 (not a multiple of the 4096-column block) in bf16, and the fp32-output
    weight-gradient GEMM where torch has it, against the PyTorch ops; prints the largest differences (-s)."""
    h, w, t = (x.cuda() for x in _inputs(3000, 256, 100352, torch.bfloat16, ignore_every=7))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    results = []
    for ops in (kernels.TorchCrossEntropyOps, kernels.TritonCrossEntropyOps):
        loss = _linear_cross_entropy(h, w, t, -100, 1024, grad_in_forward, ops)
        results.append((loss.detach(), *torch.autograd.grad(loss * 0.5, (h, w))))
    exact = _loss_and_grads(linear_cross_entropy_reference, h.double(), w.double(), t.cuda(), 0.5)
    print(f'fp32-output GEMM: {kernels.fp32_out_gemm(h.device)}')
    for name, got, want, x in zip(('loss', 'dh', 'dw'), results[1], results[0], exact):
        err = (got.double() - x).abs().max().item() / x.abs().max().item()
        err_torch = (want.double() - x).abs().max().item() / x.abs().max().item()
        print(f'{name}: triton {err:.2e}, torch ops {err_torch:.2e} (relative to the largest entry, vs float64)')
        assert err <= 1.5 * err_torch + 2 ** -8, (name, err, err_torch)


def test_plan_sizes_the_default_chunk():
    from foundry_dbrx.ops.cross_entropy import DEFAULT_CHUNK_TOKENS
    from foundry_dbrx.plan import TrainSetup
    assert TrainSetup(gpus=1, seq_len=8, batch_per_gpu=1, microbatch=1).ce_chunk_tokens == DEFAULT_CHUNK_TOKENS
