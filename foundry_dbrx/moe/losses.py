"""Auxiliary router losses over the routing of every MoE layer of a forward pass: load balancing and z-loss.

Both load-balancing conventions in the wild are here; ``training.moe_lb_loss_type`` picks one and the Composer
model logs which. The router z-loss is MegaBlocks' (``training.moe_z_loss_weight``). None is multiplied by its
weight: the caller does that once. docs/moe.md writes the formulas side by side.

All are functions of a few statistics per layer: how many of the T*K routed slots chose each expert, the sum
over tokens of each expert's router probability, the sum over tokens of the squared log-sum-exp of the router
logits, and the token count. Over which tokens they are gathered is the
loss's *scope*: ``local``, this rank's microbatch (MegaBlocks'); ``global``, the microbatch of every data-parallel
rank (``group``), summed by an all-reduce before the loss is formed, so that the loss is that of the global batch
and the same whatever the world size or expert-parallel degree. The all-reduce is differentiable (its backward is
the all-reduce of the gradients), and the data-parallel gradient average then gives exactly the gradient of the
global-batch loss.

Legend: L layers, T tokens, E experts, K top_k.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from foundry_dbrx.moe.router import Routing

__all__ = ['RoutingStats', 'routing_stats', 'load_balancing_loss', 'switch_load_balancing_loss',
           'megablocks_load_balancing_loss', 'router_z_loss', 'LB_LOSSES', 'auxiliary_losses']


class RoutingStats(NamedTuple):
    """Per-layer routing statistics (fp32): the loss is a function of these alone."""

    counts_LE: torch.Tensor  # slots routed to each expert (no gradient)
    prob_sums_LE: torch.Tensor  # sum over tokens of each expert's router probability (differentiable)
    tokens_L: torch.Tensor  # tokens
    top_k: int
    lse_sq_sums_L: Optional[torch.Tensor] = None  # sum over tokens of logsumexp(logits)^2 (differentiable)


def _expert_counts(experts_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    # scatter_add, not bincount: on CUDA bincount reads the min and max back to the host (a sync per layer).
    flat = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=dtype))


def routing_stats(routings: Sequence[Routing], num_experts: int,
                  group: Optional[dist.ProcessGroup] = None) -> RoutingStats:
    """The statistics of every layer's routing, summed over the ranks of ``group`` when one is given."""
    if not routings:
        raise ValueError('load_balancing_loss needs the routing of at least one MoE layer')
    probs = routings[0].probs_TE
    counts_LE = torch.stack([_expert_counts(r.experts_TK, num_experts, torch.float32) for r in routings])
    prob_sums_LE = torch.stack([r.probs_TE.float().sum(dim=0) for r in routings])
    # new_full, not torch.tensor(list, device=...): a host-to-device copy of a Python list waits for the GPU.
    tokens_L = torch.stack([probs.new_full((), float(r.probs_TE.shape[0]), dtype=torch.float32) for r in routings])
    lse_sq_sums_L = None
    if all(r.logsumexp_T is not None for r in routings):
        lse_sq_sums_L = torch.stack([r.logsumexp_T.float().square().sum() for r in routings])
    if group is not None:
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
        num_layers = len(routings)
        counts_and_tokens = torch.cat([counts_LE.reshape(-1), tokens_L])
        dist.all_reduce(counts_and_tokens, group=group)
        counts_LE, tokens_L = counts_and_tokens[:-num_layers].view_as(counts_LE), counts_and_tokens[-num_layers:]
        # One differentiable all-reduce for both differentiable statistics.
        parts = [prob_sums_LE.reshape(-1)] + ([lse_sq_sums_L] if lse_sq_sums_L is not None else [])
        summed = differentiable_all_reduce(torch.cat(parts), group=group)
        prob_sums_LE = summed[:prob_sums_LE.numel()].view_as(prob_sums_LE)
        if lse_sq_sums_L is not None:
            lse_sq_sums_L = summed[prob_sums_LE.numel():]
    return RoutingStats(counts_LE, prob_sums_LE, tokens_L, routings[0].experts_TK.shape[1], lse_sq_sums_L)


def switch_load_balancing_loss(stats: RoutingStats) -> torch.Tensor:
    """HF DBRX / Switch Transformer: ``E * sum_e f_e * P_e`` over all layers' tokens concatenated.

    ``f_e`` is the fraction of tokens sent to e in each of the K slots, summed over the slots (not divided by K),
    ``P_e`` the mean router probability. Balanced routing gives K. This is the loss of transformers' DBRX *after*
    its double-softmax bug (transformers issue 39055) was fixed: the pinned 4.51 computes something else.
    """
    n = stats.tokens_L.sum()
    num_experts = stats.counts_LE.shape[1]
    return num_experts * torch.dot(stats.counts_LE.sum(0) / n, stats.prob_sums_LE.sum(0) / n)


def megablocks_load_balancing_loss(stats: RoutingStats) -> torch.Tensor:
    """MegaBlocks / LLM Foundry: ``E / (L T K) * sum_l sum_e count[l, e] * mean_t p[l, t, e]``. Balanced gives 1."""
    num_layers, num_experts = stats.counts_LE.shape
    mean_probs_LE = stats.prob_sums_LE / stats.tokens_L[:, None]
    per_layer_L = (stats.counts_LE * mean_probs_LE).sum(1) * (num_experts / (stats.tokens_L * stats.top_k))
    return per_layer_L.sum() / num_layers


def router_z_loss(stats: RoutingStats) -> torch.Tensor:
    """MegaBlocks' router z-loss (from ST-MoE): per layer the mean over tokens of ``logsumexp_e(logits[t, e])^2``,
    then the mean over layers (MegaBlocks returns one term per layer; its users sum them and divide by the layer
    count). It keeps the router logits small, where the fp32 softmax is well conditioned."""
    if stats.lse_sq_sums_L is None:
        raise ValueError('router_z_loss needs the routings to carry logsumexp_T (DbrxRouter sets it)')
    return (stats.lse_sq_sums_L / stats.tokens_L).mean()


LB_LOSSES = {'switch': switch_load_balancing_loss, 'megablocks': megablocks_load_balancing_loss}


def load_balancing_loss(routings: Sequence[Routing], num_experts: int, kind: str,
                        group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The ``kind`` load-balancing loss of ``routings``, over this rank's tokens, or the tokens of every rank of
    ``group`` (the global batch)."""
    return LB_LOSSES[kind](routing_stats(routings, num_experts, group))


def auxiliary_losses(routings: Sequence[Routing], num_experts: int, kind: str,
                     group: Optional[dist.ProcessGroup] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``kind`` load-balancing loss, the router z-loss) of ``routings``, from one set of statistics (one
    collective pair when ``group`` is given), both unweighted."""
    stats = routing_stats(routings, num_experts, group)
    return LB_LOSSES[kind](stats), router_z_loss(stats)
