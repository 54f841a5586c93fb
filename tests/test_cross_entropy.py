"""The chunked linear cross entropy against the plain one (full logits, fp32 F.cross_entropy): loss and the
gradients of the hidden states and of the output weight, in fp32 and bf16, with ignored targets, all-ignored
rows, sizes that do not divide into chunks, both gradient schedules and a scaled incoming gradient."""

import pytest
import torch

from foundry_dbrx.ops import linear_cross_entropy, linear_cross_entropy_reference


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
