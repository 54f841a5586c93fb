"""GQA through SDPA's enable_gqa (no repeated K/V in memory) against the repeat-K/V path HF uses: outputs and
every gradient; 'auto' keeps the repeat path on the CPU, so the HF parity tests see the same kernels as before."""

import pytest
import torch

from foundry_dbrx import DbrxConfig
from foundry_dbrx.model import DbrxAttention, rotary_cos_sin
from tests.conftest import tiny_config


def _attention_grads(impl, dtype, seed=0):
    cfg = DbrxConfig.from_dict(tiny_config(n_heads=8, attn_config__kv_n_heads=2))  # 4 query heads per K/V head
    torch.manual_seed(seed)
    attn = DbrxAttention(cfg, gqa_impl=impl).to(dtype)
    x = torch.randn(3, 19, cfg.d_model, dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(19), cfg.head_dim, cfg.attn_config.rope_theta)
    y = attn(x, cos, sin)
    grads = torch.autograd.grad(y, [x, *attn.parameters()], torch.randn_like(y))
    return y, grads


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_enable_gqa_matches_repeated_kv(dtype, tol):
    y_rep, g_rep = _attention_grads('repeat_kv', dtype)
    y_gqa, g_gqa = _attention_grads('enable_gqa', dtype)
    torch.testing.assert_close(y_gqa, y_rep, rtol=tol, atol=tol)
    for a, b in zip(g_gqa, g_rep):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_auto_is_repeat_kv_on_cpu_and_bad_names():
    y_auto, g_auto = _attention_grads('auto', torch.float32)
    y_rep, g_rep = _attention_grads('repeat_kv', torch.float32)
    assert torch.equal(y_auto, y_rep) and all(torch.equal(a, b) for a, b in zip(g_auto, g_rep))
    cfg = DbrxConfig.from_dict(tiny_config())
    with pytest.raises(ValueError, match=r"gqa_impl \('flash'\) must be one of \['auto', 'repeat_kv', 'enable_gqa'\]"):
        DbrxAttention(cfg, gqa_impl='flash')


def test_composer_model_gqa_impl_key():
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM

    model = ComposerDbrxCausalLM(**tiny_config(), training={'gqa_impl': 'enable_gqa'})
    impls = {m.gqa_impl for m in model.modules() if isinstance(m, DbrxAttention)}
    assert impls == {'enable_gqa'}
    with pytest.raises(ValueError, match=r"training.gqa_impl \('x'\) must be one of"):
        ComposerDbrxCausalLM(**tiny_config(), training={'gqa_impl': 'x'})
