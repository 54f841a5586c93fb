"""Token dispatch: the seam between the router and the experts.

The MoE layer is router -> ``dispatch`` -> grouped experts -> ``combine``. A dispatcher turns each token's K
routing choices into rows grouped by expert (with each row's routing weight and the per-expert row offsets that a
grouped GEMM takes), and afterwards sums each token's K expert outputs back into one row. Every expert backend sees
only expert-contiguous rows, so there is one routing plan for all of them, and expert parallelism is a different
dispatcher, not a different backend.

- :class:`LocalDispatcher`: all experts on this rank. A stable sort of the T*K slots by expert (no host sync).
- :class:`AllToAllDispatcher`: expert parallelism. The experts are split over the ranks of an EP group, ``E / ep``
  consecutive experts each. Steps, for one rank:
    1. sort the local slots by global expert, as the local dispatcher does: rows bound for EP rank r are now one
       contiguous block, since rank r owns a contiguous range of experts;
    2. exchange the per-expert row counts with an all-to-all of E integers (the one host sync: the split sizes);
    3. all-to-all the rows and their routing weights: each rank receives, from every peer, its rows for this
       rank's experts, in (source rank, local expert) order;
    4. reorder the received rows by local expert (a stable sort of a [rows] vector, no scatter), and hand them to
       the experts with the local experts' offsets;
    5. on the way back, undo 4, all-to-all the expert outputs back to their source ranks (the reverse splits), and
       sum each token's K rows as the local dispatcher does.
  Backward runs the same exchanges in reverse (the all-to-all's gradient is the reverse all-to-all).

Gradients are gathers, never scatters with atomics: the permutation's inverse is kept, so the backward of every
reordering is another gather, and a token's input gradient is a gather-sum of its K rows' gradients.

Legend: T tokens, D d_model, E global experts, El experts on this rank, K top_k, N = T*K routed slots,
R rows this rank's experts receive (N under the local dispatcher).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from foundry_dbrx.moe.kernels import ops_for
from foundry_dbrx.moe.router import Routing

__all__ = ['RoutingPlan', 'plan_routing', 'Dispatched', 'LocalDispatcher', 'AllToAllDispatcher']


class RoutingPlan(NamedTuple):
    """Where every routed slot goes. Slot ``t*K + k`` is token t's k-th choice."""

    order_N: torch.Tensor  # sorted position -> slot (int64)
    token_N: torch.Tensor  # sorted position -> source token (int64)
    pos_N: torch.Tensor  # slot -> sorted position (int64); the inverse of order_N
    offs_E: torch.Tensor  # cumulative slot count through expert e (int32), as torch._grouped_mm takes it


def plan_routing(experts_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sorts the slots by expert on the device, with no host sync (stable, so ties keep token order)."""
    k = experts_TK.shape[1]
    flat_N = experts_TK.reshape(-1)
    sorted_N, order_N = torch.sort(flat_N, stable=True)
    bounds_E = torch.arange(1, num_experts + 1, device=flat_N.device, dtype=sorted_N.dtype)
    # searchsorted rather than bincount: on CUDA bincount reads the maximum back to the host.
    offs_E = torch.searchsorted(sorted_N, bounds_E, out_int32=True)  # number of slots with expert < e+1
    pos_N = _inverse(order_N)
    return RoutingPlan(order_N, order_N // k, pos_N, offs_E)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _GatherSlots(torch.autograd.Function):
    """``x_ND = x_TD[token_N]`` (each token once per slot); backward: ``dx_TD[t] = sum_k dx_ND[pos_N[t*K + k]]``."""

    @staticmethod
    def forward(ctx, x_TD, token_N, pos_N, k):
        ctx.save_for_backward(pos_N)
        ctx.k = k
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, dx_ND):
        (pos_N,) = ctx.saved_tensors
        dx_ND = dx_ND.contiguous()
        return ops_for(dx_ND).unpermute_sum(dx_ND, pos_N, ctx.k), None, None, None


class _SumSlots(torch.autograd.Function):
    """``y_TD[t] = sum_k y_ND[pos_N[t*K + k]]`` (fp32 accumulation); backward: ``dy_ND = dy_TD[token_N]``."""

    @staticmethod
    def forward(ctx, y_ND, token_N, pos_N, k):
        ctx.save_for_backward(token_N)
        y_ND = y_ND.contiguous()
        return ops_for(y_ND).unpermute_sum(y_ND, pos_N, k)

    @staticmethod
    def backward(ctx, dy_TD):
        (token_N,) = ctx.saved_tensors
        return dy_TD.contiguous().index_select(0, token_N), None, None, None


class _Permute(torch.autograd.Function):
    """``x[order]`` for a permutation ``order`` with inverse ``inverse``: the backward is a gather too."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, dx):
        (inverse,) = ctx.saved_tensors
        return dx.contiguous().index_select(0, inverse), None, None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with the given splits; the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list, in_splits: list, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dout):
        out_splits, in_splits = ctx.splits
        dx = dout.new_empty((sum(in_splits), *dout.shape[1:]))
        dist.all_to_all_single(dx, dout.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class Dispatched(NamedTuple):
    """What the experts get: rows grouped by (local) expert, each row's routing weight, the int32 cumulative row
    count per local expert, and the dispatcher's own state for :meth:`combine`."""

    x_RD: torch.Tensor
    w_R: torch.Tensor
    offs_El: torch.Tensor
    state: Any


class LocalDispatcher:
    """Every expert on this rank: rows are the T*K slots sorted by expert."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        k = routing.experts_TK.shape[1]
        plan = plan_routing(routing.experts_TK, self.num_experts)
        x_ND = _GatherSlots.apply(x_TD, plan.token_N, plan.pos_N, k)
        w_N = _Permute.apply(routing.weights_TK.reshape(-1), plan.order_N, plan.pos_N)
        return Dispatched(x_ND, w_N, plan.offs_E, (plan, k))

    def combine(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor:
        plan, k = state
        return _SumSlots.apply(y_ND, plan.token_N, plan.pos_N, k)

    def __repr__(self) -> str:
        return f'LocalDispatcher(experts={self.num_experts})'


class AllToAllDispatcher(LocalDispatcher):
    """Expert parallelism over ``group`` (``ep`` ranks): this rank owns experts ``[rank*El, (rank+1)*El)``.

    Args:
        num_experts: E, the experts of the layer over the whole EP group.
        group: the EP process group; its rank order is the order of the expert ranges.
    """

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup]):
        super().__init__(num_experts)
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f'expert_parallel_degree ({self.ep}) must divide moe_num_experts ({num_experts})')
        self.num_local_experts = num_experts // self.ep
        self.ep_rank = dist.get_rank(group)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        el, ep = self.num_local_experts, self.ep
        # 1. sort by global expert: rows for EP rank r form one block
        x_ND, w_N, offs_E, (plan, k) = super().dispatch(x_TD, routing)
        counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).long()
        # 2. row counts: recv_counts[s*El + e] = rows that rank s sends to our local expert e
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        splits = torch.stack([counts_E.view(ep, el).sum(1), recv_counts.view(ep, el).sum(1)]).cpu()
        send_splits, recv_splits = splits.tolist()
        # 3. rows and their routing weights go to their experts' ranks
        x_RD = _AllToAll.apply(x_ND, recv_splits, send_splits, self.group)
        w_R = _AllToAll.apply(w_N, recv_splits, send_splits, self.group)
        # 4. (source rank, local expert) order -> local expert order
        expert_of_block = torch.arange(el, device=recv_counts.device).repeat(ep)
        expert_R = torch.repeat_interleave(expert_of_block, recv_counts, output_size=sum(recv_splits))
        order_R = torch.sort(expert_R, stable=True).indices
        inverse_R = _inverse(order_R)
        offs_El = recv_counts.view(ep, el).sum(0).cumsum(0).to(torch.int32)
        x_RD = _Permute.apply(x_RD, order_R, inverse_R)
        w_R = _Permute.apply(w_R, order_R, inverse_R)
        return Dispatched(x_RD, w_R, offs_El, (plan, k, order_R, inverse_R, send_splits, recv_splits))

    def combine(self, y_RD: torch.Tensor, state: Any) -> torch.Tensor:
        plan, k, order_R, inverse_R, send_splits, recv_splits = state
        y_RD = _Permute.apply(y_RD, inverse_R, order_R)
        y_ND = _AllToAll.apply(y_RD, send_splits, recv_splits, self.group)
        return super().combine(y_ND, (plan, k))

    def __repr__(self) -> str:
        return (f'AllToAllDispatcher(experts={self.num_experts}, ep={self.ep}, rank={self.ep_rank}, '
                f'local experts {self.ep_rank * self.num_local_experts}..'
                f'{(self.ep_rank + 1) * self.num_local_experts - 1})')
