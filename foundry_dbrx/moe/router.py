"""Top-k softmax router, as in DBRX, with an optional per-expert selection bias (aux-loss-free balancing).

Legend: T tokens, D d_model, E experts, K top_k.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ['DbrxRouter', 'Routing']


class Routing(NamedTuple):
    """What the router decided for one layer. ``probs_TE`` is fp32 and feeds the auxiliary losses and the expert-load
    statistics; ``logsumexp_T`` (fp32, differentiable) is each token's log-sum-exp of the router logits, the
    quantity the router z-loss squares."""

    probs_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    logsumexp_T: Optional[torch.Tensor] = None


class DbrxRouter(nn.Module):
    """``p = softmax(x W^T)`` in fp32, top-k of p, weights renormalised by their p-norm, cast to the input dtype.

    Parameter name ``layer.weight`` ([E, D], no bias) matches HF's ``ffn.router.layer.weight``.

    ``expert_bias`` ([E], fp32 buffer, zeros) is DeepSeek-V3's balancing bias: with ``select_with_bias`` the top-k
    is taken of ``p + expert_bias`` while the weights stay ``p`` of the chosen experts, so the bias steers which
    experts a token visits but never how much each contributes, and no gradient flows through it.
    :meth:`update_expert_bias` moves it toward balance (the ``dbrx_expert_load`` callback calls it after each
    optimizer step). It is a buffer so that it lives in the state dict, hence in every checkpoint; HF's DBRX has no
    such field, and the HF export carries it in config.json (:mod:`foundry_dbrx.hf`).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, jitter_eps: Optional[float] = None,
                 normalize_expert_weights: Optional[float] = 1.0, select_with_bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.layer = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter_eps = jitter_eps
        self.normalize_expert_weights = normalize_expert_weights
        self.select_with_bias = select_with_bias
        self.register_buffer('expert_bias', torch.zeros(num_experts, dtype=torch.float32, device=device))
        # A checkpoint from before the bias existed has no expert_bias: it loads as zeros (the routing it was
        # trained with) instead of failing a strict load.
        self.register_load_state_dict_pre_hook(_default_missing_bias)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        router_in_TD = x_TD
        if self.training and self.jitter_eps:
            # Jitter only the router's input (MegaBlocks' choice). HF 4.x multiplies the FFN input in place, so its
            # experts see the jittered tokens too; DBRX trains with eps 0, where both are the identity.
            noise_TD = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            router_in_TD = x_TD * noise_TD
        logits_TE = self.layer(router_in_TD)
        # fp32 softmax as in transformers 4.x (5.x uses the activation dtype, which changes the routing in bf16).
        probs_TE = logits_TE.softmax(dim=-1, dtype=torch.float32)
        logsumexp_T = torch.logsumexp(logits_TE.float(), dim=-1)
        if self.select_with_bias:
            experts_TK = (probs_TE.detach() + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
            weights_TK = probs_TE.gather(1, experts_TK)
        else:
            weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_expert_weights is not None:
            weights_TK = weights_TK / weights_TK.norm(p=self.normalize_expert_weights, dim=-1, keepdim=True)
        return Routing(probs_TE, weights_TK.to(x_TD.dtype), experts_TK, logsumexp_T)

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update from one step's load ``counts_E`` (slots routed to each expert, over the global
        batch, so that every rank makes the same update): an expert above the mean load has its bias lowered by
        ``rate``, one below raised by ``rate``. The step is then re-centred to mean zero: a shift common to all
        experts changes no top-k, and keeping the bias near zero keeps the ``rate`` steps representable where FSDP
        holds buffers in bf16. On the device, no host sync."""
        step_E = torch.sign(counts_E.mean() - counts_E).to(torch.float32) * rate
        self.expert_bias.add_((step_E - step_E.mean()).to(self.expert_bias.dtype))

    @torch.no_grad()
    def reset_expert_bias(self) -> None:
        self.expert_bias.zero_()

    def extra_repr(self) -> str:
        return f'top_k={self.top_k}, select_with_bias={self.select_with_bias}'


def _default_missing_bias(module: DbrxRouter, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    key = prefix + 'expert_bias'
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.expert_bias)
