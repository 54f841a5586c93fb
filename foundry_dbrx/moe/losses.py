"""Auxiliary load-balancing losses over the routing of every MoE layer of a forward pass.

Both conventions in the wild are here; ``ffn_config.moe_lb_loss_type`` picks one and the Composer model logs
which. Neither is multiplied by ``moe_loss_weight``: the caller does that once.

Legend: L layers, T tokens, E experts, K top_k.
"""

from __future__ import annotations

from typing import Sequence

import torch

from foundry_dbrx.moe.router import Routing

__all__ = ['load_balancing_loss', 'switch_load_balancing_loss', 'megablocks_load_balancing_loss']


def _expert_counts(experts_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    # scatter_add, not bincount: on CUDA bincount reads the min and max back to the host (a sync per layer).
    flat = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=dtype))


def switch_load_balancing_loss(routings: Sequence[Routing], num_experts: int) -> torch.Tensor:
    """HF DBRX / Switch Transformer: ``E * sum_e f_e * P_e`` over all layers' tokens concatenated.

    ``f_e`` is the fraction of tokens sent to e in each of the K slots, summed over the slots (not divided by K),
    ``P_e`` the mean router probability. Balanced routing gives K. This is the loss of transformers' DBRX *after*
    its double-softmax bug (transformers issue 39055) was fixed: the pinned 4.51 computes something else.
    """
    probs_NE = torch.cat([r.probs_TE for r in routings], dim=0)
    experts_NK = torch.cat([r.experts_TK for r in routings], dim=0)
    n = experts_NK.shape[0]
    counts_E = _expert_counts(experts_NK, num_experts, probs_NE.dtype)
    return num_experts * torch.dot(counts_E / n, probs_NE.mean(dim=0))


def megablocks_load_balancing_loss(routings: Sequence[Routing], num_experts: int) -> torch.Tensor:
    """MegaBlocks / LLM Foundry: ``E / (L T K) * sum_l sum_e count[l, e] * mean_t p[l, t, e]``. Balanced gives 1."""
    total = None
    for r in routings:
        t, k = r.experts_TK.shape
        counts_E = _expert_counts(r.experts_TK, num_experts, r.probs_TE.dtype)
        layer = torch.dot(counts_E, r.probs_TE.mean(dim=0)) * (num_experts / (t * k))
        total = layer if total is None else total + layer
    return total / len(routings)


_LOSSES = {'switch': switch_load_balancing_loss, 'megablocks': megablocks_load_balancing_loss}


def load_balancing_loss(routings: Sequence[Routing], num_experts: int, kind: str) -> torch.Tensor:
    if not routings:
        raise ValueError('load_balancing_loss needs the routing of at least one MoE layer')
    return _LOSSES[kind](routings, num_experts)
