"""Router controls against hand computations: the router z-loss and both load-balancing formulas on small tensors,
their gradients with respect to the router weight (derived by hand through the softmax), the balancing bias (choice
only, never weights or gradients) and its update rule, and the bias's place in the state dict."""

from __future__ import annotations

import math

import pytest
import torch

from foundry_dbrx import DbrxConfig, DbrxForCausalLM
from foundry_dbrx.config import DbrxTrainingConfig
from foundry_dbrx.moe.losses import (LB_LOSSES, auxiliary_losses, load_balancing_loss, router_z_loss,
                                     routing_stats)
from foundry_dbrx.moe.router import DbrxRouter, Routing
from tests.conftest import tiny_config


def _identity_router(e: int, k: int, **kwargs) -> DbrxRouter:
    """A router whose logits are its input (D = E, W = I): tests choose the logits directly."""
    router = DbrxRouter(e, e, k, normalize_expert_weights=None, **kwargs)
    with torch.no_grad():
        router.layer.weight.copy_(torch.eye(e))
    return router


def test_z_loss_matches_hand_computation():
    router = _identity_router(e=2, k=1)
    # token 0: logits (0, ln 3) -> logsumexp ln 4; token 1: (ln 2, ln 2) -> ln 4 as well; token 2: (0, 0) -> ln 2
    logits = torch.tensor([[0.0, math.log(3)], [math.log(2), math.log(2)], [0.0, 0.0]])
    layer_a = router(logits)
    layer_b = router(logits[2:])  # a second layer that saw only token 2
    want_a = (math.log(4) ** 2 + math.log(4) ** 2 + math.log(2) ** 2) / 3
    want_b = math.log(2) ** 2
    z = router_z_loss(routing_stats([layer_a, layer_b], 2))
    assert z.item() == pytest.approx((want_a + want_b) / 2, rel=1e-6)  # mean over tokens, then over layers


def test_both_load_balancing_formulas_match_hand_computation():
    e, k = 3, 2
    # Layer 1, two tokens; layer 2, two tokens; probabilities and top-2 choices written out.
    p1 = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    p2 = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    r1 = Routing(p1, torch.zeros(2, k), torch.tensor([[0, 1], [0, 2]]))
    r2 = Routing(p2, torch.zeros(2, k), torch.tensor([[2, 0], [1, 2]]))
    # counts: layer 1 (2, 1, 1), layer 2 (1, 1, 2); mean probabilities: layer 1 (.55, .2, .25), layer 2 (.15, .45, .4)
    megablocks = (e / (2 * k) * (2 * .55 + 1 * .2 + 1 * .25) + e / (2 * k) * (1 * .15 + 1 * .45 + 2 * .4)) / 2
    # switch: both layers' 4 tokens together: f = counts (3, 2, 3) / 4, P = (.35, .325, .325)
    switch = e * (3 / 4 * .35 + 2 / 4 * .325 + 3 / 4 * .325)
    assert megablocks == pytest.approx(1.10625) and switch == pytest.approx(2.00625)
    assert load_balancing_loss([r1, r2], e, 'megablocks').item() == pytest.approx(megablocks, rel=1e-6)
    assert load_balancing_loss([r1, r2], e, 'switch').item() == pytest.approx(switch, rel=1e-6)


def _hand_logit_grad(probs_TE: torch.Tensor, dloss_dprobs_TE: torch.Tensor) -> torch.Tensor:
    """Back through the softmax by hand: dL/dlogit_tj = p_tj (g_tj - sum_e g_te p_te)."""
    return probs_TE * (dloss_dprobs_TE - (dloss_dprobs_TE * probs_TE).sum(1, keepdim=True))


@pytest.mark.parametrize('loss', ['megablocks', 'switch', 'z'])
def test_router_gradients_match_hand_derivation(loss):
    torch.manual_seed(0)
    t, d, e, k = 7, 5, 4, 2
    router = DbrxRouter(d, e, k)
    x_TD = torch.randn(t, d)
    routing = router(x_TD)
    lbl, z = auxiliary_losses([routing], e, 'switch' if loss == 'switch' else 'megablocks')
    value = z if loss == 'z' else lbl
    (grad,) = torch.autograd.grad(value, router.layer.weight)
    assert grad.abs().sum() > 0  # the loss reaches the router

    with torch.no_grad():
        logits_TE = x_TD @ router.layer.weight.t()
        p_TE = logits_TE.softmax(-1)
        counts_E = torch.bincount(routing.experts_TK.reshape(-1), minlength=e).float()
        if loss == 'z':
            lse_T = logits_TE.logsumexp(-1)
            dlogits = 2 / t * lse_T[:, None] * p_TE  # d/dlogit of mean_t lse_t^2
        else:
            # both are sum_e a_e * sum_t p_te with the counts held fixed: megablocks a_e = E c_e / (T^2 K),
            # switch a_e = E c_e / T^2
            a_E = e * counts_E / t ** 2 / (k if loss == 'megablocks' else 1)
            dlogits = _hand_logit_grad(p_TE, a_E.expand(t, e))
        want = dlogits.t() @ x_TD
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_bias_steers_the_choice_not_the_weights():
    router = _identity_router(e=4, k=2, select_with_bias=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]], requires_grad=True)
    plain = router(logits)
    assert plain.experts_TK.tolist() == [[0, 1], [1, 2]]  # zero bias: the plain top-k
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # expert 3 pushed into every top-2
    biased = router(logits)
    assert biased.experts_TK.tolist() == [[3, 0], [3, 1]]
    # The weights stay the router's probabilities of the chosen experts (normalisation off here).
    torch.testing.assert_close(biased.weights_TK, biased.probs_TE.gather(1, biased.experts_TK))
    biased.weights_TK.sum().backward()
    assert logits.grad.abs().sum() > 0 and router.expert_bias.grad is None

    off = _identity_router(e=4, k=2)  # without select_with_bias the bias is ignored
    with torch.no_grad():
        off.expert_bias.fill_(5.0)
    assert off(logits).experts_TK.tolist() == [[0, 1], [1, 2]]


def test_bias_update_rule():
    router = DbrxRouter(8, 4, 2, select_with_bias=True)
    router.update_expert_bias(torch.tensor([10.0, 0.0, 2.0, 4.0]), rate=0.1)  # mean load 4
    # signs (-, +, +, 0) * 0.1, re-centred by their mean 0.025
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.125, 0.075, 0.075, -0.025]))
    router.update_expert_bias(torch.tensor([4.0, 4.0, 4.0, 4.0]), rate=0.1)  # balanced: no change
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.125, 0.075, 0.075, -0.025]))


def test_bias_is_state_and_old_checkpoints_load():
    cfg = DbrxConfig.from_dict(tiny_config())
    model = DbrxForCausalLM(cfg, DbrxTrainingConfig(moe_bias_balancing=True))
    keys = [k for k in model.state_dict() if k.endswith('expert_bias')]
    assert keys == [f'transformer.blocks.{i}.ffn.router.expert_bias' for i in range(cfg.n_layers)]
    assert all(k not in dict(model.named_parameters()) for k in keys)  # a buffer: no optimizer touches it
    with torch.no_grad():
        model.transformer.blocks[1].ffn.router.expert_bias.fill_(0.5)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith('expert_bias')}
    model.load_state_dict(old, strict=True)  # a checkpoint from before the bias: zeros, not an error
    assert all(not b.ffn.router.expert_bias.any() for b in model.transformer.blocks)

    meta = DbrxForCausalLM(cfg, device='meta')  # materialised module by module: the bias is zeroed, not garbage
    meta.to_empty(device='cpu')
    for module in meta.modules():
        if isinstance(module, DbrxRouter):
            module.expert_bias.fill_(float('nan'))
            meta.init_module(module)
            assert not module.expert_bias.any()


@pytest.mark.parametrize('values, message', [
    ({'moe_z_loss_weight': -1}, r'training.moe_z_loss_weight \(-1\) must be a number >= 0'),
    ({'moe_z_loss_weight': float('nan')}, r'training.moe_z_loss_weight \(nan\) must be a number >= 0'),
    ({'moe_bias_balancing': 'yes'}, r"training.moe_bias_balancing \('yes'\) must be true or false"),
    ({'moe_bias_update_rate': -0.1}, r'training.moe_bias_update_rate \(-0.1\) must be a number >= 0'),
])
def test_router_training_choices_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        DbrxTrainingConfig.from_dict(values)


def test_z_loss_weight_enters_the_total():
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM

    torch.manual_seed(0)
    model = ComposerDbrxCausalLM(**tiny_config(), training={'moe_z_loss_weight': 0.01})
    ids = torch.randint(0, 512, (2, 8))
    batch = {'input_ids': ids}
    loss = model.loss(model(batch), batch)
    torch.testing.assert_close(loss['total'],
                               loss['ce'] + 0.05 * loss['lb_loss_megablocks'] + 0.01 * loss['z_loss'])
    assert set(LB_LOSSES) == {'megablocks', 'switch'}

    # Bias balancing without the callback that moves the bias: refused, not trained silently.
    model = ComposerDbrxCausalLM(**tiny_config(), training={'moe_bias_balancing': True})
    with pytest.raises(RuntimeError, match='needs the dbrx_expert_load callback'):
        model.loss(model(batch), batch)
