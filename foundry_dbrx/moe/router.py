"""Top-k softmax router, as in DBRX.

Legend: T tokens, D d_model, E experts, K top_k.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ['DbrxRouter', 'Routing']


class Routing(NamedTuple):
    """What the router decided for one layer. ``probs_TE`` is fp32 and feeds the auxiliary losses."""

    probs_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor


class DbrxRouter(nn.Module):
    """``p = softmax(x W^T)`` in fp32, top-k of p, weights renormalised by their p-norm, cast to the input dtype.

    Parameter name ``layer.weight`` ([E, D], no bias) matches HF's ``ffn.router.layer.weight``.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, jitter_eps: Optional[float] = None,
                 normalize_expert_weights: Optional[float] = 1.0, device=None, dtype=None):
        super().__init__()
        self.layer = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        self.top_k = top_k
        self.jitter_eps = jitter_eps
        self.normalize_expert_weights = normalize_expert_weights

    def forward(self, x_TD: torch.Tensor) -> Routing:
        router_in_TD = x_TD
        if self.training and self.jitter_eps:
            # Jitter only the router's input (MegaBlocks' choice). HF 4.x multiplies the FFN input in place, so its
            # experts see the jittered tokens too; DBRX trains with eps 0, where both are the identity.
            noise_TD = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            router_in_TD = x_TD * noise_TD
        # fp32 softmax as in transformers 4.x (5.x uses the activation dtype, which changes the routing in bf16).
        probs_TE = self.layer(router_in_TD).softmax(dim=-1, dtype=torch.float32)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_expert_weights is not None:
            weights_TK = weights_TK / weights_TK.norm(p=self.normalize_expert_weights, dim=-1, keepdim=True)
        return Routing(probs_TE, weights_TK.to(x_TD.dtype), experts_TK)
