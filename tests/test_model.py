"""The model and its MoE FFN on CPU: shapes, dtypes, the eager experts against a per-token reference (outputs
and every gradient), the two load-balancing losses, and the FFN inside LLM Foundry's MPT."""

import math

import pytest
import torch
import torch.nn.functional as F

from foundry_dbrx import DbrxConfig, DbrxForCausalLM
from foundry_dbrx.config import DbrxFFNConfig
from foundry_dbrx.moe import DbrxFFN, eager_experts, load_balancing_loss
from foundry_dbrx.moe.layer import routed_experts
from foundry_dbrx.moe.router import Routing
from tests.conftest import tiny_config


def _model(**overrides):
    torch.manual_seed(0)
    return DbrxForCausalLM(DbrxConfig.from_dict(tiny_config(**overrides)))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_forward_shapes_and_dtypes(dtype):
    model = _model().to(dtype)
    ids = torch.randint(0, 512, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, 512) and out.logits.dtype == dtype
    assert len(out.routings) == 2
    for r in out.routings:
        assert r.probs_TE.shape == (51, 16) and r.probs_TE.dtype == torch.float32  # fp32 router softmax
        assert r.weights_TK.shape == (51, 4) and r.weights_TK.dtype == dtype
        assert r.experts_TK.shape == (51, 4) and r.experts_TK.dtype == torch.int64
        # moe_normalize_expert_weights = 1: the top-k weights sum to one.
        torch.testing.assert_close(r.weights_TK.float().sum(-1), torch.ones(51), atol=1e-2, rtol=0)


def test_causal_and_too_long_input():
    model = _model().eval()
    ids = torch.randint(0, 512, (1, 12))
    full = model(ids).logits
    prefix = model(ids[:, :7]).logits
    torch.testing.assert_close(full[:, :7], prefix, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r'input length \(65\) must be at most max_seq_len \(64\)'):
        model(torch.zeros(1, 65, dtype=torch.long))


def _per_token_reference(x_TD, weights_TK, experts_TK, w1_EFD, v1_EFD, w2_EFD):
    """The dumbest correct MoE: every token, every slot, one expert at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            h = F.silu(x_TD[t] @ w1_EFD[e].t()) * (x_TD[t] @ v1_EFD[e].t())
            acc = acc + weights_TK[t, k] * (h @ w2_EFD[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize('routing', ['random', 'skewed', 'one_expert'])
def test_eager_experts_match_per_token_reference(routing):
    torch.manual_seed(1)
    t, d, f, e, k = 40, 16, 24, 6, 2
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    ws = [(torch.randn(e, f, d, dtype=torch.float64) * 0.3).requires_grad_() for _ in range(3)]
    if routing == 'random':
        experts = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    elif routing == 'skewed':  # expert 0 gets most slots, experts 4 and 5 none
        experts = torch.stack([torch.tensor([0, 1 + (i % 3)]) for i in range(t)])
    else:  # a single expert overall (top-1), the rest empty
        experts = torch.full((t, 1), 3)
        k = 1
    weights = torch.rand(t, k, dtype=torch.float64, requires_grad=True)
    got = routed_experts(eager_experts, x, weights, experts, *ws)
    want = _per_token_reference(x, weights, experts, *ws)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(got)
    inputs = [x, weights, *ws]
    g_got = torch.autograd.grad(got, inputs, grad_out)
    g_want = torch.autograd.grad(want, inputs, grad_out)
    for name, a, b in zip(['x', 'weights', 'w1', 'v1', 'w2'], g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if routing == 'skewed':
        assert g_got[2][4:].abs().max() == 0  # empty experts: zero gradient


def test_router_topk_and_renormalisation():
    cfg = DbrxFFNConfig(ffn_hidden_size=8, moe_num_experts=5, moe_top_k=2, moe_normalize_expert_weights=2.0)
    ffn = DbrxFFN(4, cfg)
    x = torch.randn(7, 4)
    r = ffn.router(x)
    probs = torch.softmax(x @ ffn.router.layer.weight.t(), dim=-1)
    top, idx = probs.topk(2, dim=-1)
    torch.testing.assert_close(r.probs_TE, probs)
    assert torch.equal(r.experts_TK, idx)
    torch.testing.assert_close(r.weights_TK, top / top.norm(p=2, dim=-1, keepdim=True))


def _routing(probs_TE, k):
    w, e = probs_TE.topk(k, dim=-1)
    return Routing(probs_TE, w, e)


def test_load_balancing_losses_balanced_and_formulas():
    e, k, t = 4, 2, 8
    # Perfectly balanced: uniform probabilities, each expert gets T*K/E slots.
    probs = torch.full((t, e), 1 / e)
    experts = torch.tensor([[i % e, (i + 1) % e] for i in range(t)])
    balanced = Routing(probs, torch.full((t, k), 0.5), experts)
    assert load_balancing_loss([balanced, balanced], e, 'megablocks').item() == pytest.approx(1.0)
    assert load_balancing_loss([balanced, balanced], e, 'switch').item() == pytest.approx(k)

    torch.manual_seed(0)
    layers = [_routing(torch.softmax(torch.randn(t, e) * 3, -1), k) for _ in range(3)]
    # MegaBlocks: per-layer E/(T K) sum_e count_e mean_p_e, averaged over layers.
    mb = sum(e / (t * k) * sum(int((r.experts_TK == j).sum()) * float(r.probs_TE[:, j].mean()) for j in range(e))
             for r in layers) / 3
    # Switch (HF, double-softmax bug fixed): tokens of all layers concatenated, f summed over the K slots.
    all_p = torch.cat([r.probs_TE for r in layers])
    all_e = torch.cat([r.experts_TK for r in layers])
    sw = e * sum(float((all_e == j).float().mean(0).sum()) * float(all_p[:, j].mean()) for j in range(e))
    assert load_balancing_loss(layers, e, 'megablocks').item() == pytest.approx(mb, rel=1e-6)
    assert load_balancing_loss(layers, e, 'switch').item() == pytest.approx(sw, rel=1e-6)


def test_init_scales_residual_writers():
    model = _model(n_layers=8, d_model=64, ffn_config__ffn_hidden_size=256)
    blk = model.transformer.blocks[0]
    std = 0.02
    assert blk.norm_attn_norm.attn.Wqkv.weight.std().item() == pytest.approx(std, rel=0.1)
    assert blk.norm_attn_norm.attn.out_proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.1)
    assert blk.ffn.experts.mlp.w2.std().item() == pytest.approx(std / math.sqrt(16), rel=0.1)
    assert blk.ffn.experts.mlp.w1.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(blk.norm_attn_norm.norm_1.weight, torch.ones(64))


def test_composer_model_loss_parts_and_flops():
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM

    torch.manual_seed(0)
    model = ComposerDbrxCausalLM(**tiny_config(), training={'moe_lb_loss_type': 'switch'})
    ids = torch.randint(0, 512, (2, 16))
    batch = {'input_ids': ids, 'labels': ids.clone()}
    out = model(batch)
    loss = model.loss(out, batch)
    assert set(loss) == {'total', 'ce', 'lb_loss_switch', 'z_loss'}
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss['ce'], ce)
    torch.testing.assert_close(loss['total'], ce + 0.05 * loss['lb_loss_switch'])  # z-loss weight 0 by default
    loss['total'].backward()
    assert model.model.transformer.blocks[0].ffn.router.layer.weight.grad.abs().sum() > 0
    # Counted by hand for TINY (d 32, 4 heads of 8, 2 KV heads, 2 layers, vocab 512, F 48, 16 experts, top-4):
    attn = (32 + 2 * 2 * 8) * 32 + 32 * 32 + 2 * 32          # Wqkv, out_proj, two norms
    active_layer = attn + 16 * 32 + 3 * 4 * 48 * 32            # + router + 4 of 16 experts
    active_no_wte = 2 * active_layer + 512 * 32 + 32           # + lm_head + norm_f; the wte lookup has no FLOPs
    assert active_no_wte == 60576
    assert model.flops_per_batch(batch) == (6 * 60576 + 12 * 2 * 32 * 16) * 2 * 16


def test_dbrx_moe_inside_llm_foundry_mpt():
    """`model.name: mpt_dbrx_moe` builds MPT with our FFN; the load-balancing loss is part of the returned loss
    (so Composer's microbatch scaling applies to it) and experts count at top_k / E in the FLOPs."""
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    from foundry_dbrx.mpt import ComposerMPTDbrxMoE
    from foundry_dbrx.registry import register_all

    register_all()
    torch.manual_seed(0)
    common = dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=256,
                  no_bias=True, attn_config={'attn_impl': 'torch'})
    ffn = {'ffn_type': 'dbrx_moe', 'moe_num_experts': 4, 'moe_top_k': 2, 'moe_backend': 'eager',
           'moe_loss_weight': 0.5}
    model = ComposerMPTDbrxMoE(**common, ffn_config=ffn, loss_fn='torch_crossentropy')
    layers = [b.ffn for b in model.model.transformer.blocks]
    assert all(type(m).__name__ == 'MPTDbrxMoE' and m.losses_collected for m in layers)
    assert layers[0].ffn.cfg.ffn_hidden_size == 64
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    batch = {'input_ids': ids, 'labels': ids.clone()}
    out = model(batch)
    assert len(out.routings) == 2 and out.routings[0].probs_TE.shape == (32, 4)
    loss = model.loss(out, batch)
    assert set(loss) == {'total', 'ce', 'lb_loss_megablocks', 'z_loss'}
    # The same formulas as the dbrx model, from the routings the forward returned.
    torch.testing.assert_close(loss['lb_loss_megablocks'], load_balancing_loss(out.routings, 4, 'megablocks'))
    torch.testing.assert_close(loss['total'], loss['ce'] + 0.5 * loss['lb_loss_megablocks'])
    assert 1.0 <= loss['lb_loss_megablocks'].item() < 4  # balanced gives 1
    router = layers[-1].ffn.router.layer.weight
    (grad,) = torch.autograd.grad(loss['lb_loss_megablocks'], router)
    assert grad.abs().sum() > 0
    assert all(not m.ffn._forward_hooks for m in layers)  # the collecting hooks lived for that forward only
    total = sum(p.numel() for p in model.parameters())
    assert model.n_active_params == total - 2 * (4 - 2) * 3 * 64 * 32

    # n_layers left to MPTConfig's default (24): every layer's routing reaches the loss.
    deep = ComposerMPTDbrxMoE(**{k: v for k, v in common.items() if k != 'n_layers'}, ffn_config=ffn,
                              loss_fn='torch_crossentropy')
    assert len(deep(batch).routings) == 24

    # Reentrant checkpointing runs the blocks without autograd: the loss refuses rather than train without it.
    model.train()
    with torch.no_grad():
        out = model(batch)
    with pytest.raises(RuntimeError, match='activation_checkpointing_reentrant: false'):
        model.loss(out, batch)

    # Plain MPT cannot add the loss: it refuses to train rather than drop it silently.
    plain = MPTForCausalLM(MPTConfig(**common, ffn_config={**ffn, 'moe_num_layers': 2}))
    with pytest.raises(RuntimeError, match="model name 'mpt_dbrx_moe'"):
        plain(input_ids=ids)


def test_all_ignored_labels_give_zero_loss_and_padding_rules():
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM

    torch.manual_seed(0)
    model = ComposerDbrxCausalLM(**tiny_config())
    ids = torch.randint(0, 512, (2, 8))
    batch = {'input_ids': ids, 'labels': torch.full_like(ids, -100)}
    loss = model.loss(model(batch), batch)
    assert loss['ce'].item() == 0.0 and torch.isfinite(loss['total'])

    right = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = {'input_ids': ids, 'attention_mask': right}
    targets = model.targets(batch)
    assert (targets[1, 4:] == -100).all() and (targets[1, :4] == ids[1, 1:5]).all()  # padding never a target
    left = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    with pytest.raises(ValueError, match='attention_mask must only pad on the right'):
        model({'input_ids': ids, 'attention_mask': left})


@pytest.mark.parametrize('reentrant', [False, True])
def test_load_balancing_gradient_under_activation_checkpointing(reentrant):
    """Composer wraps each block with torch's checkpoint wrapper; only the non-reentrant one keeps the routing
    in the graph, and the model refuses to train silently without the load-balancing gradient."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    from foundry_dbrx.model import DbrxBlock

    torch.manual_seed(0)
    model = ComposerDbrxCausalLM(**tiny_config())
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(model.model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, impl),
                                   check_fn=lambda m: isinstance(m, DbrxBlock))
    model.train()
    ids = torch.randint(0, 512, (2, 8))
    batch = {'input_ids': ids}
    out = model(batch)
    if reentrant:
        with pytest.raises(RuntimeError, match='activation_checkpointing_reentrant: false'):
            model.loss(out, batch)
        return
    lbl = model.loss(out, batch)[model.lb_loss_key]
    router = model.model.transformer.blocks[1].ffn.router.layer.weight
    (grad,) = torch.autograd.grad(lbl, router)
    assert grad.abs().sum() > 0
