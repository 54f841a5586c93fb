"""``ops.weight_grad.cast_weight``: a weight's cast to the compute dtype whose backward adds the gradient straight
into the fp32 ``.grad``. It must give exactly the gradients of a plain ``.to`` cast, and step aside wherever
autograd's own accumulation is expected (``autograd.grad``, ``backward(inputs=...)``, hooks, double backward)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import foundry_dbrx.ops.weight_grad as wg
from foundry_dbrx import DbrxConfig
from foundry_dbrx.model import DbrxForCausalLM
from tests.conftest import tiny_config


def _microbatches(cast, n=3, seed=0):
    """Three microbatches' backward into one weight's .grad, with `cast` as the weight's cast."""
    torch.manual_seed(seed)
    w = nn.Parameter(torch.randn(6, 5))
    xs = [torch.randn(4, 5) for _ in range(n)]
    for x in xs:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = x @ cast(w).t()
        (y.float() ** 2).sum().backward()
    return w


def test_fused_accumulation_equals_the_plain_cast_exactly():
    fused = _microbatches(lambda w: wg.cast_weight(w, torch.bfloat16))
    plain = _microbatches(lambda w: w.to(torch.bfloat16))
    assert fused.grad.dtype == torch.float32
    assert torch.equal(fused.grad, plain.grad)


def test_fused_path_skips_autograd_accumulation(monkeypatch):
    """The fused path must be the one taken (else the test above proves nothing): count its accumulations."""
    calls = []
    real = wg.accumulate_grad_
    monkeypatch.setattr(wg, 'accumulate_grad_', lambda p, g: (calls.append(g.dtype), real(p, g)))
    _microbatches(lambda w: wg.cast_weight(w, torch.bfloat16))
    assert calls == [torch.bfloat16] * 3


def test_autograd_grad_and_backward_inputs_get_the_gradient_not_grad():
    w = nn.Parameter(torch.randn(6, 5))
    x = torch.randn(4, 5, requires_grad=True)
    ref = torch.autograd.grad((x @ w.to(torch.bfloat16).float().t()).sum(), [w])[0]
    got = torch.autograd.grad((x @ wg.cast_weight(w, torch.bfloat16).float().t()).sum(), [w])[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert w.grad is None
    (x @ wg.cast_weight(w, torch.bfloat16).float().t()).sum().backward(inputs=[x])
    assert w.grad is None and x.grad is not None


def test_hooks_and_non_parameters_take_autograds_path():
    w = nn.Parameter(torch.randn(6, 5))
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    (wg.cast_weight(w, torch.bfloat16).float() * 2).sum().backward()
    assert len(seen) == 1 and torch.equal(w.grad, torch.full_like(w, 2.0))
    base = nn.Parameter(torch.randn(6, 5))
    view = base[:3]  # not a leaf: autograd's accumulation into `base` must run
    (wg.cast_weight(view, torch.bfloat16).float()).sum().backward()
    assert torch.equal(base.grad[:3], torch.ones(3, 5)) and torch.equal(base.grad[3:], torch.zeros(3, 5))


def test_an_existing_non_contiguous_grad_is_left_to_autograd():
    w = nn.Parameter(torch.randn(4, 3))
    w.grad = torch.ones(3, 4).t()  # fp32, right shape, transposed strides: the fused kernel must not write it
    (wg.cast_weight(w, torch.bfloat16).float() * 2).sum().backward()
    assert torch.equal(w.grad, torch.full((4, 3), 3.0))


def _model_grads(fuse, monkeypatch, checkpoint=None):
    monkeypatch.setattr(wg, '_fusable', wg._fusable if fuse else (lambda w: False))
    torch.manual_seed(0)
    cfg = DbrxConfig.from_dict(tiny_config())
    model = DbrxForCausalLM(cfg)
    if checkpoint is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                                 checkpoint_wrapper)

        from foundry_dbrx.model import DbrxBlock
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(
            m, checkpoint_impl=checkpoint), check_fn=lambda m: isinstance(m, DbrxBlock))
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # two microbatches
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(ids, targets=ids).ce_sum
        loss.backward()
    return {n.replace('_checkpoint_wrapped_module.', ''): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('checkpoint', [None, 'NO_REENTRANT', 'REENTRANT'])
def test_model_gradients_are_the_same_with_and_without_the_fused_accumulation(checkpoint, monkeypatch):
    """With the blocks checkpointed too (the shipped recipes; the recompute runs cast_weight again, and the
    reentrant kind runs a backward inside the backward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl
    impl = None if checkpoint is None else CheckpointImpl[checkpoint]
    calls = []
    real = wg.accumulate_grad_
    monkeypatch.setattr(wg, 'accumulate_grad_', lambda p, g: (calls.append(p.shape), real(p, g)))
    fused = _model_grads(True, monkeypatch, impl)
    n_layers = DbrxConfig.from_dict(tiny_config()).n_layers
    assert len(calls) == 2 * (3 * n_layers + 1)  # two microbatches x (w1, v1, w2 of every layer + the head)
    plain = _model_grads(False, monkeypatch, impl)
    assert fused.keys() == plain.keys()
    for name in fused:
        assert (fused[name] is None) == (plain[name] is None), name
        if fused[name] is not None:
            assert fused[name].dtype == torch.float32, name
            assert torch.equal(fused[name], plain[name]), name


_INTERPRETER_SCRIPT = '''
import torch
import foundry_dbrx.ops.weight_grad as wg
for n in (1, 4095, 4096, 10001):
    src = torch.randn(n).to(torch.bfloat16)
    dst = torch.randn(n)
    want = dst + src.float()
    wg._launch(dst, src, accumulate=True)
    assert torch.equal(dst, want), n
    out = torch.empty(n)
    wg._launch(out, src, accumulate=False)
    assert torch.equal(out, src.float()), n
print('ok')
'''


def test_triton_kernel_in_the_interpreter():
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stdout + res.stderr
