"""`foundry-dbrx plan`: its arithmetic against real objects (parameter counts of a model built on the meta device,
bytes a CPU forward saves for backward, the Composer model's FLOPs) and the rules of its memory model."""

import dataclasses

import pytest
import torch

from foundry_dbrx import DbrxConfig, DbrxForCausalLM
from foundry_dbrx.model import DbrxNormAttentionNorm, rotary_cos_sin
import functools

from foundry_dbrx.moe.grouped_mm import grouped_mm_experts
from foundry_dbrx.moe.kernels import TorchOps
from foundry_dbrx.moe.layer import routed_experts
from foundry_dbrx.moe.router import DbrxRouter
from foundry_dbrx.plan import (GB, TrainSetup, attention_saved_bytes, experts_saved_bytes, param_counts,
                               plan_communication, plan_memory, router_saved_bytes)
from tests.conftest import ROOT, tiny_config

SHAPES = [dict(d_model=64, n_heads=8, attn_config__kv_n_heads=2, ffn_config__ffn_hidden_size=96),  # GQA 4:1
          dict(d_model=48, n_heads=4, attn_config__kv_n_heads=4, ffn_config__ffn_hidden_size=40,  # no GQA
               ffn_config__moe_num_experts=6, ffn_config__moe_top_k=3)]


@pytest.mark.parametrize('shape', SHAPES)
def test_param_counts_equal_a_meta_model(shape):
    cfg = DbrxConfig.from_dict(tiny_config(**shape))
    model = DbrxForCausalLM(cfg, device='meta')
    counts = param_counts(cfg)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert counts['total'] == numel(model)
    assert counts['block'] == numel(model.transformer.blocks[0])
    assert counts['block_experts'] == numel(model.transformer.blocks[0].ffn.experts)
    assert counts['root'] == numel(model.transformer.wte) + numel(model.transformer.norm_f) + numel(model.lm_head)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and 'wte' not in name)
    assert counts['matrices'] == matrices  # what autocast casts: every matrix but the embedding


def _saved_bytes(fn, params):
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize('shape', SHAPES)
def test_saved_activation_bytes_equal_a_cpu_forward(shape):
    """fp32 on the CPU: every dtype is 4 bytes (c = n = 4), so the count of each saved tensor is what is checked;
    the attention runs its repeat-K/V path there (SDPA's CPU kernel saves q, k, v, out, lse as flash does)."""
    torch.manual_seed(0)
    cfg = DbrxConfig.from_dict(tiny_config(**shape))
    b, s = 3, 10
    t = b * s
    attn = DbrxNormAttentionNorm(cfg)
    x = torch.randn(b, s, cfg.d_model, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(s), cfg.head_dim, cfg.attn_config.rope_theta)
    rope = cos.nbytes + sin.nbytes  # saved by RoPE's products; the plan counts the tables once, in the head
    got = _saved_bytes(lambda: attn(x, cos, sin), attn.parameters()) - rope
    assert got == attention_saved_bytes(cfg, t, c=4, n=4, gqa='repeat_kv')

    ffn = cfg.ffn_config
    router = DbrxRouter(cfg.d_model, ffn.moe_num_experts, ffn.moe_top_k)
    x_TD = torch.randn(t, cfg.d_model, requires_grad=True)
    assert _saved_bytes(lambda: router(x_TD), router.parameters()) == router_saved_bytes(cfg, t, c=4)

    ws = [torch.randn(ffn.moe_num_experts, ffn.ffn_hidden_size, cfg.d_model, requires_grad=True) for _ in range(3)]
    weights = torch.rand(t, ffn.moe_top_k, requires_grad=True)
    experts = torch.stack([torch.randperm(ffn.moe_num_experts)[:ffn.moe_top_k] for _ in range(t)])
    fn = functools.partial(grouped_mm_experts, ops=TorchOps)
    got = _saved_bytes(lambda: routed_experts(fn, x_TD, weights, experts, *ws), ws)
    assert got == experts_saved_bytes(cfg, t, c=4)


def _small():
    return DbrxConfig.from_dict(tiny_config(d_model=256, n_heads=8, n_layers=4, vocab_size=100352,
                                            max_seq_len=1024, attn_config__kv_n_heads=2,
                                            ffn_config__ffn_hidden_size=448))


def test_states_sharding_and_the_one_gpu_rule():
    cfg = _small()
    total = param_counts(cfg)['total']
    base = TrainSetup(gpus=8, seq_len=1024, batch_per_gpu=8, microbatch=2)
    p = plan_memory(cfg, base)
    assert p.terms[f'weights fp32 (1/8 of {total / 1e9:.2f}B)'] == 4 * total / 8
    assert p.terms[f'optimizer state, decoupled_adamw (1/8 of {total / 1e9:.2f}B)'] == 8 * total / 8
    lion = plan_memory(cfg, dataclasses.replace(base, optimizer='decoupled_lionw'))
    assert lion.terms[f'optimizer state, decoupled_lionw (1/8 of {total / 1e9:.2f}B)'] == 4 * total / 8
    assert 'activations: block inputs (checkpointed)' in p.terms and not p.notes
    # One GPU: LLM Foundry drops the FSDP config; dbrx_parallelize keeps the YAML's activation checkpointing.
    one = plan_memory(cfg, dataclasses.replace(base, gpus=1))
    assert one.notes and 'activations: block inputs (checkpointed)' in one.terms
    no_ac = plan_memory(cfg, dataclasses.replace(base, gpus=1, activation_checkpointing=False))
    assert 'activations: all blocks' in no_ac.terms and no_ac.peak > one.peak
    assert one.terms['autocast weight copies (no FSDP)'] == 2 * param_counts(cfg)['matrices']
    assert one.terms['root unit gathered (wte, norm_f, lm_head)'] == 0
    assert one.peak > p.peak


def test_expert_parallel_and_fused_loss_terms():
    cfg = _small()
    base = TrainSetup(gpus=8, seq_len=1024, batch_per_gpu=8, microbatch=2)
    p, ep = plan_memory(cfg, base), plan_memory(cfg, dataclasses.replace(base, ep=4))
    exp = param_counts(cfg)['block_experts']
    # Expert states per GPU stay 1/gpus (EP x FSDP over gpus/EP); a gathered block holds 1/EP of its experts.
    assert p.terms['blocks gathered, forward'] - ep.terms['blocks gathered, forward'] == 2 * 2 * exp * (1 - 1 / 4)
    t, k, d = 2 * 1024, cfg.ffn_config.moe_top_k, cfg.d_model
    assert ep.terms['all-to-all buffers, one layer (EP)'] == 4 * t * k * d * 2
    with pytest.raises(ValueError, match=r'--ep \(3\) must divide --gpus \(8\)'):
        TrainSetup(gpus=8, ep=3, seq_len=1024, batch_per_gpu=8, microbatch=2)
    few_experts = DbrxConfig.from_dict(tiny_config(ffn_config__moe_num_experts=4))
    with pytest.raises(ValueError, match=r'--ep \(8\) must divide ffn_config.moe_num_experts \(4\)'):
        plan_memory(few_experts, TrainSetup(gpus=16, ep=8, seq_len=64, batch_per_gpu=1, microbatch=1))
    fused = plan_memory(cfg, dataclasses.replace(base, fused_cross_entropy=True))
    v = cfg.vocab_size
    assert p.terms['loss: backward start'] == (2 + 12) * t * v  # bf16 logits + fp32 log_softmax + two fp32 grads
    assert fused.terms['loss: backward start'] < p.terms['loss: backward start'] / 10
    assert fused.peak < p.peak


def test_bytes_moved_per_step_fsdp_alone_and_with_expert_parallelism():
    """Counted by hand for 8 GPUs, 4 microbatches per step, PURE (bf16 gathers and reductions)."""
    cfg = _small()
    pc = param_counts(cfg)
    layers, experts = cfg.n_layers, cfg.n_layers * pc['block_experts']
    dense_blocks = layers * (pc['block'] - pc['block_experts'])
    base = TrainSetup(gpus=8, seq_len=1024, batch_per_gpu=8, microbatch=2)
    fsdp = plan_communication(cfg, base)
    # forward gathers everything, backward every block again (the root stays gathered); 4 microbatches
    assert fsdp['FSDP all-gather'] == pytest.approx(4 * 2 * 7 / 8 * (2 * (dense_blocks + experts) + pc['root']))
    assert fsdp['FSDP reduce-scatter'] == pytest.approx(4 * 2 * 7 / 8 * (dense_blocks + experts + pc['root']))
    assert 'EP all-to-all' not in fsdp
    ep = plan_communication(cfg, dataclasses.replace(base, ep=4))
    # experts: 1/4 of them per GPU, sharded over the 2 GPUs that hold the same ones
    local = experts / 4
    assert ep['FSDP all-gather'] == pytest.approx(4 * 2 * (7 / 8 * (2 * dense_blocks + pc['root']) + 1 / 2 * 2 * local))
    slots = 2 * 1024 * cfg.ffn_config.moe_top_k
    # dispatch + combine, forward + backward: 4 exchanges a layer (checkpointing replays none of them)
    assert ep['EP all-to-all'] == pytest.approx(4 * layers * 4 * 3 / 4 * slots * cfg.d_model * 2)
    experts_only = plan_communication(cfg, dataclasses.replace(base, ep=4, ac_target='experts'))
    assert experts_only['EP all-to-all'] == pytest.approx(ep['EP all-to-all'])
    assert sum(ep.values()) < sum(fsdp.values())
    assert plan_communication(cfg, dataclasses.replace(base, gpus=1)) == {}


def test_microbatch_sweep_and_flops_match_the_composer_model():
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    from foundry_dbrx.plan import report

    cfg = _small()
    setup = TrainSetup(gpus=2, seq_len=1024, batch_per_gpu=16, microbatch=4)
    peaks = {mb: plan_memory(cfg, dataclasses.replace(setup, microbatch=mb)).peak for mb in (1, 2, 4, 8, 16)}
    assert all(peaks[a] < peaks[b] for a, b in [(1, 2), (2, 4), (4, 8), (8, 16)])
    limit = (peaks[4] + peaks[8]) / 2 * 1.05 + 3 * GB  # room for 4 sequences a microbatch, not 8
    assert 'recommended microbatch: 4' in report(cfg, setup, limit)
    assert 'recommended microbatch: none fits' in report(cfg, setup, 1 * GB)

    p = plan_memory(cfg, setup)
    model = ComposerDbrxCausalLM(**cfg.to_dict(), init_device='meta')
    batch = {'input_ids': torch.zeros(3, 1024, dtype=torch.long)}
    assert p.model_flops_per_token * 3 * 1024 == model.flops_per_batch(batch)
    active_blocks = cfg.num_params()['active'] - 2 * cfg.vocab_size * cfg.d_model - cfg.d_model
    assert p.executed_flops_per_token - p.model_flops_per_token == \
        2 * active_blocks + 4 * cfg.n_layers * cfg.d_model * 1024


def test_cli(capsys):
    from foundry_dbrx.cli import main

    yaml = str(ROOT / 'yamls' / 'dbrx-gpu-small.yaml')
    assert main(['plan', yaml, 'global_train_batch_size=32', '--gpus', '2']) == 0
    out = capsys.readouterr().out
    assert 'FSDP FULL_SHARD PURE' in out and '<- peak' in out and 'recommended microbatch:' in out
    assert main(['plan', yaml, '--gpus', '3']) == 1
    assert capsys.readouterr().err.strip() == \
        'error: global_train_batch_size (16) must be an integer that --gpus (3) divides'
    assert main(['plan', yaml, '--gpus', '2', '--ep', '3']) == 1
    assert 'error: --ep (3) must divide --gpus (2)' in capsys.readouterr().err
