"""Parity with the reference: transformers' ``DbrxForCausalLM`` (the pinned 4.51.3).

Random tiny HF DBRX models are built here (nothing is downloaded) with transformers' own initialisation, plus
perturbed LayerNorm weights so that a swapped norm would show. Our model gets the HF state dict by key name.

Tolerances (measured figures in the comments; the report in docs/hf.md lists them per config):
- fp32 logits: max abs difference <= 1e-5 (measured <= 7.2e-7).
- bf16 logits: both models run wholly in bf16 and are compared with the fp64 logits of the same weights; our bf16
  error may be at most 1.5x transformers' own bf16 error plus one bf16 step at the logit scale. A direct bound on
  ours-vs-HF in bf16 would be meaningless: a router score that rounds differently in bf16 flips a token's expert in
  either model (measured: up to 0.15 on top-4 routing, with HF itself 0.17 away from fp64).
- fp32 gradients of every parameter (cross-entropy loss): max abs difference <= 1e-5 x the parameter's largest HF
  gradient (measured <= 9e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from foundry_dbrx.composer_model import ComposerDbrxCausalLM
from foundry_dbrx.config import DbrxConfig
from foundry_dbrx.model import DbrxForCausalLM
from foundry_dbrx.moe.losses import load_balancing_loss

# Named tiny configs covering: GQA / MHA / MQA, clip_qkv engaged and off, top-1 / top-2 / top-3 / top-4,
# rope_theta 10000 and 500000, p-norm 1, 2 and none, odd sizes (d_model 36, head_dim 12, vocab 997, F 50, E 5).
CONFIGS = {
    'gqa_clip_top4_theta500k': dict(
        d_model=64, n_heads=8, n_layers=2, vocab_size=1000, max_seq_len=64, initializer_range=0.05,
        attn_config=dict(kv_n_heads=2, clip_qkv=0.15, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=8, moe_top_k=4)),
    'mha_noclip_top1_theta10k': dict(
        d_model=32, n_heads=4, n_layers=2, vocab_size=1000, max_seq_len=64, initializer_range=0.05,
        attn_config=dict(kv_n_heads=4, clip_qkv=None, rope_theta=10000.0),
        # top-1 with p-norm renormalisation would make every weight 1 and the router gradient 0: keep raw p
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=1, moe_normalize_expert_weights=None)),
    'mqa_odd_sizes_top3': dict(
        d_model=36, n_heads=3, n_layers=2, vocab_size=997, max_seq_len=64, initializer_range=0.05,
        attn_config=dict(kv_n_heads=1, clip_qkv=0.2, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=50, moe_num_experts=5, moe_top_k=3)),
    'gqa_top2_p2norm_16experts': dict(
        d_model=48, n_heads=6, n_layers=2, vocab_size=1000, max_seq_len=64, initializer_range=0.05,
        attn_config=dict(kv_n_heads=3, clip_qkv=8.0, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=40, moe_num_experts=16, moe_top_k=2, moe_normalize_expert_weights=2.0)),
}
SEQ_LEN = 23  # odd on purpose


def hf_config(cfg: dict, attn_implementation: str = 'eager') -> transformers.DbrxConfig:
    cfg = copy.deepcopy(cfg)
    if cfg['attn_config']['clip_qkv'] is None:
        # transformers 4.51.3's eager DBRX attention calls clamp(min=None, max=None) when clip_qkv is None, which
        # torch 2.7 refuses; a bound no activation reaches is the same function. Ours runs with None.
        cfg['attn_config']['clip_qkv'] = 1e30
    return transformers.DbrxConfig(**cfg, attn_implementation=attn_implementation)


def make_pair(name: str, attn_implementation: str = 'eager', seed: int = 0):
    """(HF model, our model) with the same random weights, both fp32, in eval mode."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    hf = transformers.DbrxForCausalLM(hf_config(cfg, attn_implementation)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if 'norm' in key:
                p.add_(0.1 * torch.randn_like(p))
    ours = DbrxForCausalLM(DbrxConfig.from_dict(cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def input_ids(name: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIGS[name]['vocab_size'], (2, SEQ_LEN), generator=g)


@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
@pytest.mark.parametrize('name', list(CONFIGS))
def test_fp32_logits_match_transformers(name, attn_implementation):
    hf, ours = make_pair(name, attn_implementation)
    ids = input_ids(name)
    qkv = []
    ours.transformer.blocks[0].norm_attn_norm.attn.Wqkv.register_forward_hook(lambda m, i, o: qkv.append(o))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    diff = (out.logits - ref).abs().max().item()
    print(f'{name} vs HF {attn_implementation}: fp32 max abs diff {diff:.2e} (logit scale {ref.abs().max():.2f})')
    assert diff <= 1e-5
    # The features under test are really exercised: clipping bites when on, tokens spread over experts.
    clip = CONFIGS[name]['attn_config']['clip_qkv']
    if clip is not None and clip < 1:
        assert (qkv[0].abs() > clip).float().mean() > 0.05
    used = torch.unique(torch.cat([r.experts_TK.reshape(-1) for r in out.routings]))
    assert len(used) == CONFIGS[name]['ffn_config']['moe_num_experts']


@pytest.mark.parametrize('name', list(CONFIGS))
def test_bf16_logits_as_close_to_fp64_as_transformers(name):
    hf, ours = make_pair(name, 'sdpa')
    ids = input_ids(name)
    with torch.no_grad():
        truth = copy.deepcopy(hf).double()(ids).logits
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.double()
        ours_bf16 = ours.to(torch.bfloat16)(ids).logits.double()
    err_hf = (hf_bf16 - truth).abs().max().item()
    err_ours = (ours_bf16 - truth).abs().max().item()
    one_step = 2.0 ** -8 * truth.abs().max().item()
    print(f'{name}: bf16 max abs diff ours-HF {(ours_bf16 - hf_bf16).abs().max():.2e}, '
          f'mean {(ours_bf16 - hf_bf16).abs().mean():.2e}; vs fp64: ours {err_ours:.2e}, HF {err_hf:.2e}')
    assert err_ours <= 1.5 * err_hf + one_step


@pytest.mark.parametrize('name', list(CONFIGS))
def test_fp32_gradients_match_transformers(name):
    """Cross-entropy gradients of every parameter. The loss on our side is ComposerDbrxCausalLM's, so its label
    shift is checked against transformers' too."""
    hf, ours = make_pair(name)
    hf.train()
    composer = ComposerDbrxCausalLM(**CONFIGS[name])
    composer.model.load_state_dict(ours.state_dict())
    composer.train()
    ids = input_ids(name)
    hf_loss = hf(ids, labels=ids).loss  # output_router_logits is off: cross entropy only
    hf_loss.backward()
    batch = {'input_ids': ids}
    ce = composer.loss(composer(batch), batch)['ce']
    ce.backward()
    assert abs(ce.item() - hf_loss.item()) <= 1e-6
    hf_params = dict(hf.named_parameters())
    worst = 0.0
    for key, p in composer.model.named_parameters():
        ref = hf_params[key].grad
        scale = ref.abs().max().item()
        assert scale > 0, f'{key}: zero gradient in HF, the comparison would be empty'
        rel = (p.grad - ref).abs().max().item() / scale
        assert rel <= 1e-5, f'{key}: gradient differs by {rel:.2e} of its scale'
        worst = max(worst, rel)
    print(f'{name}: fp32 gradients, worst max abs diff / grad scale {worst:.2e} over {len(hf_params)} parameters')


def switch_loss_by_formula(probs_per_layer: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer / HF DBRX, written out: E * sum_e f_e * P_e over all layers' tokens concatenated, with f_e
    the share of tokens routed to e summed over the K slots."""
    probs_NE = torch.cat(probs_per_layer)
    n, e = probs_NE.shape
    chosen_NK = probs_NE.topk(top_k, dim=-1).indices
    f_E = torch.zeros(e).index_add_(0, chosen_NK.reshape(-1), torch.ones(chosen_NK.numel())) / n
    return e * (f_E * probs_NE.mean(dim=0)).sum()


def megablocks_loss_by_formula(probs_per_layer: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """MegaBlocks: per layer E / (T K) * sum_e count_e * mean_t p_e, averaged over layers."""
    losses = []
    for probs_TE in probs_per_layer:
        t, e = probs_TE.shape
        chosen = probs_TE.topk(top_k, dim=-1).indices.reshape(-1)
        counts_E = torch.zeros(e).index_add_(0, chosen, torch.ones(chosen.numel()))
        losses.append(e / (t * top_k) * (counts_E * probs_TE.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize('name', ['gqa_clip_top4_theta500k', 'mqa_odd_sizes_top3'])
def test_load_balancing_losses_match_their_formulas(name):
    hf, ours = make_pair(name)
    ids = input_ids(name)
    top_k, e = CONFIGS[name]['ffn_config']['moe_top_k'], CONFIGS[name]['ffn_config']['moe_num_experts']
    with torch.no_grad():
        hf_out = hf(ids, output_router_logits=True)
        routings = ours(ids).routings
    # transformers 4.51 returns the router's softmax probabilities as "router_logits"; they equal ours.
    hf_probs = [p.float() for p in hf_out.router_logits]
    for r, p in zip(routings, hf_probs):
        torch.testing.assert_close(r.probs_TE, p, atol=1e-6, rtol=0)
    expected = switch_loss_by_formula(hf_probs, top_k)
    torch.testing.assert_close(load_balancing_loss(routings, e, 'switch'), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(load_balancing_loss(routings, e, 'megablocks'),
                               megablocks_loss_by_formula(hf_probs, top_k), atol=1e-6, rtol=0)
    # transformers 4.51's own aux loss softmaxes those probabilities a second time (transformers issue 39055): it is
    # the formula applied to softmax(p), not to p, which is why it is not the ground truth here.
    double_softmax = switch_loss_by_formula([p.softmax(dim=-1) for p in hf_probs], top_k)
    torch.testing.assert_close(hf_out.aux_loss.float(), double_softmax, atol=1e-6, rtol=0)
    assert abs(hf_out.aux_loss.item() - expected.item()) > 1e-3


def greedy(model: DbrxForCausalLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The simplest greedy decoder: recompute the whole sequence each step, take the argmax."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize('name', ['gqa_clip_top4_theta500k', 'mqa_odd_sizes_top3'])
def test_greedy_generation_through_the_converters(name, tmp_path):
    """HF -> Composer .pt -> HF: 20 greedy tokens from the export (in transformers, KV cache on) equal those of the
    original HF model, and those of our model loaded from the Composer checkpoint (no cache)."""
    from foundry_dbrx.hf import COMPOSER_MODEL_PREFIX, composer_to_hf, hf_to_composer
    hf, _ = make_pair(name, 'sdpa')
    hf.save_pretrained(tmp_path / 'hf', max_shard_size='100KB')
    hf_to_composer(tmp_path / 'hf', tmp_path / 'model.pt')
    composer_to_hf(tmp_path / 'model.pt', tmp_path / 'export')
    exported = transformers.DbrxForCausalLM.from_pretrained(tmp_path / 'export').eval()

    prompt = input_ids(name, seed=2)[:, :5]
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    reference = hf.generate(prompt, **kwargs)
    assert reference.shape == (2, 25)
    torch.testing.assert_close(exported.generate(prompt, **kwargs), reference, atol=0, rtol=0)

    state = torch.load(tmp_path / 'model.pt', weights_only=True)['state']['model']
    ours = DbrxForCausalLM(DbrxConfig.from_dict(CONFIGS[name])).eval()
    ours.load_state_dict({k.removeprefix(COMPOSER_MODEL_PREFIX): v for k, v in state.items()})
    torch.testing.assert_close(greedy(ours, prompt, 20), reference, atol=0, rtol=0)
    # and the tokens are not degenerate (a constant continuation would match trivially)
    assert len(torch.unique(reference[:, 5:])) > 3


def test_bf16_logits_need_no_routing_flip_to_agree_when_weights_are_small():
    """With DBRX's own init scale (0.02) the router scores are far from ties and bf16 agrees tightly."""
    cfg = dict(CONFIGS['gqa_clip_top4_theta500k'], initializer_range=0.02)
    torch.manual_seed(0)
    hf = transformers.DbrxForCausalLM(hf_config(cfg, 'sdpa')).eval().to(torch.bfloat16)
    ours = DbrxForCausalLM(DbrxConfig.from_dict(cfg)).eval().to(torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, cfg['vocab_size'], (2, SEQ_LEN))
    with torch.no_grad():
        diff = (hf(ids).logits.float() - ours(ids).logits.float()).abs().max().item()
    print(f'init 0.02, bf16 max abs diff ours-HF {diff:.2e}')
    assert diff <= 1.6e-2
