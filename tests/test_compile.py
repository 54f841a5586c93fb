"""``training.compile``: the compiled blocks compute what the eager ones do (loss and every gradient), and the experts
and the token dispatch stay out of the graph under ``block``. Compiled with dynamo + AOT autograd but no code
generation (``aot_eager``: no C++ compiler needed), so the test checks the graph capture, not Inductor's kernels
(those run on the GPU: benchmarks/train_step.py)."""

import pytest
import torch

import foundry_dbrx.model as model_mod
from foundry_dbrx import DbrxConfig
from foundry_dbrx.config import DbrxTrainingConfig
from foundry_dbrx.model import DbrxForCausalLM
from tests.conftest import tiny_config


def _loss_and_grads(compile_target, monkeypatch):
    monkeypatch.setattr(model_mod, 'COMPILE_KWARGS', {'backend': 'aot_eager', 'fullgraph': False})
    torch.manual_seed(0)
    cfg = DbrxConfig.from_dict(tiny_config())
    model = DbrxForCausalLM(cfg, DbrxTrainingConfig(compile=compile_target))
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    loss = out.logits.float().logsumexp(-1).mean() + sum(r.probs_TE.square().mean() for r in out.routings)
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('target', ['attention', 'block'])
def test_compiled_blocks_match_eager(target, monkeypatch):
    torch._dynamo.reset()
    _, loss0, grads0 = _loss_and_grads('none', monkeypatch)
    model, loss1, grads1 = _loss_and_grads(target, monkeypatch)
    compiled = [m for m in model.modules() if getattr(m, '_compiled_call_impl', None) is not None]
    assert len(compiled) == model.config.n_layers
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_block_compile_keeps_the_experts_out_of_the_graph(monkeypatch):
    """Under ``block`` the experts must run eagerly (our kernels, the all-to-all under EP): dynamo must never see
    them, so a forward that dynamo traced through them would fail this check."""
    torch._dynamo.reset()
    seen = []
    monkeypatch.setattr(model_mod, 'COMPILE_KWARGS', {'backend': 'aot_eager'})
    torch.manual_seed(0)
    cfg = DbrxConfig.from_dict(tiny_config())
    model = DbrxForCausalLM(cfg, DbrxTrainingConfig(compile='block'))
    for block in model.transformer.blocks:
        block.ffn.experts.register_forward_pre_hook(
            lambda m, args: seen.append(torch.compiler.is_compiling()))
    model(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert seen == [False] * cfg.n_layers


def test_compile_choice_is_checked():
    with pytest.raises(ValueError, match=r"training.compile \('all'\) must be one of \['none', 'attention', 'block'\]"):
        DbrxTrainingConfig(compile='all')


def test_compiled_blocks_under_activation_checkpointing_match_eager(monkeypatch):
    """The shipped recipes checkpoint every block; a compiled block inside torch's non-reentrant checkpoint wrapper
    (what Composer's FSDP and dbrx_parallelize apply) must still give eager's gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    from foundry_dbrx.model import DbrxBlock

    torch._dynamo.reset()
    _, loss0, grads0 = _loss_and_grads('none', monkeypatch)
    monkeypatch.setattr(model_mod, 'COMPILE_KWARGS', {'backend': 'aot_eager'})
    torch.manual_seed(0)
    cfg = DbrxConfig.from_dict(tiny_config())
    model = DbrxForCausalLM(cfg, DbrxTrainingConfig(compile='block'))
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, DbrxBlock))
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    loss = out.logits.float().logsumexp(-1).mean() + sum(r.probs_TE.square().mean() for r in out.routings)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss0, rtol=1e-5, atol=1e-6)
    grads = {n.replace('_checkpoint_wrapped_module.', ''): p.grad for n, p in model.named_parameters()
             if p.grad is not None}
    assert grads.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
