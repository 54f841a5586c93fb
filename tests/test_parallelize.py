"""parallelize.py on one process: what each activation-checkpointing choice wraps (and that the gradients are the
un-checkpointed model's), checkpointing restored where LLM Foundry drops the FSDP config, the mesh arithmetic and
its errors."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from foundry_dbrx.parallelize import ParallelDims, apply_activation_checkpointing_without_fsdp
from tests.conftest import ROOT, tiny_config


def _model(**training):
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    torch.manual_seed(0)
    return ComposerDbrxCausalLM(**tiny_config(n_layers=4), training=training or None).train()


def _grads(model):
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {'input_ids': ids}
    model.zero_grad(set_to_none=True)
    loss = model.loss(model(batch), batch)['total']
    loss.backward()
    return loss.detach(), {n.replace('_checkpoint_wrapped_module.', ''): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('target, every, wrapped', [
    ('block', 1, ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']),
    ('block', 2, ['blocks.0', 'blocks.2']),
    ('attention', 1, [f'blocks.{i}.norm_attn_norm' for i in range(4)]),
    ('experts', 3, ['blocks.0.ffn.experts', 'blocks.3.ffn.experts']),
])
def test_activation_checkpointing_choices_wrap_their_modules_and_keep_the_gradients(target, every, wrapped):
    plain_loss, plain = _grads(_model())
    model = _model(activation_checkpointing=target, activation_checkpointing_every=every)
    apply_activation_checkpointing_without_fsdp(model)
    got = sorted(n.removeprefix('model.transformer.') for n, m in model.named_modules()
                 if isinstance(m, CheckpointWrapper))
    assert got == wrapped
    loss, grads = _grads(model)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=0, msg=name)


def test_one_process_keeps_the_yamls_activation_checkpointing():
    from foundry_dbrx.train import load_config
    cfg = load_config(str(ROOT / 'yamls' / 'dbrx-gpu-small.yaml'))
    assert cfg.callbacks.dbrx_parallelize.activation_checkpointing is True
    cfg = load_config(str(ROOT / 'yamls' / 'dbrx-gpu-small.yaml'), ['fsdp_config.activation_checkpointing=false'])
    assert 'activation_checkpointing' not in cfg.callbacks.dbrx_parallelize


@pytest.mark.parametrize('world, replicate, ep, experts, message', [
    (8, 3, 1, 16, r'data_parallel_replicate_degree \(3\) must divide the world size \(8\)'),
    (8, 2, 8, 16, r'expert_parallel_degree \(8\) must divide the ranks of one shard group .* = 4\)'),
    (8, 1, 8, 12, r'expert_parallel_degree \(8\) must divide ffn_config.moe_num_experts \(12\)'),
])
def test_parallel_dims_rules(world, replicate, ep, experts, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(world, replicate, ep, experts)


def test_parallel_dims_split():
    dims = ParallelDims(64, 8, 8, 16)
    assert (dims.replicate, dims.shard, dims.shard_mod_ep, dims.ep) == (8, 8, 1, 8)
    assert 'replicate 8 x shard 8' in repr(dims)
