"""DBRX's GLU experts: the fused ``[E*F, D]`` parameters and the backends that run them.

Every backend computes, for each token t and each of its K slots,
``y_t = sum_k w_tk * (silu(x_t @ w1_e.T) * (x_t @ v1_e.T)) @ w2_e`` with ``e = experts_TK[t, k]``,
from the same three parameters, so a state dict moves between backends (and to HF and MegaBlocks) untouched.

Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k, N = T*K routed slots.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from foundry_dbrx.moe import grouped_mm, megablocks_backend

__all__ = ['DbrxExpertGLU', 'DbrxExperts', 'ExpertBackend', 'BACKENDS', 'resolve_backend', 'eager_experts',
           'sort_by_expert']

log = logging.getLogger(__name__)

# (x_TD, weights_TK, experts_TK, w1_EFD, v1_EFD, w2_EFD) -> y_TD
ExpertFn = Callable[..., torch.Tensor]


def sort_by_expert(experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot order that groups the N = T*K routed slots by expert (stable), and the count per expert (on device)."""
    flat_N = experts_TK.reshape(-1)
    order_N = flat_N.argsort(stable=True)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return order_N, counts_E


def eager_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, w1_EFD: torch.Tensor,
                  v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """Reference backend in plain PyTorch: sort the slots by expert, one GEMM chain per expert, gather back.

    One host sync per call (the expert counts, to split the sorted tokens), not one per expert; empty experts
    cost an empty matmul and get zero gradients.
    """
    t, k = experts_TK.shape
    num_experts = w1_EFD.shape[0]
    order_N, counts_E = sort_by_expert(experts_TK, num_experts)
    # A permutation of the K copies of each token, not x_TD[order_N // k]: that index holds every token K times, and
    # its backward (index_put_ with accumulate) then adds the K slots into one row with parallel atomic adds on CPU
    # (aten/src/ATen/native/cpu/IndexKernel.cpp; atomics on CUDA too), in an order set by thread timing, so the same
    # seed gave different gradients from run to run on a busy machine. Here each slot's gradient lands in a row of
    # its own and the K copies are summed by expand's backward, in a fixed order.
    x_ND = x_TD.unsqueeze(1).expand(t, k, x_TD.shape[-1]).reshape(t * k, -1)[order_N]
    outs = []
    # unbind, not w1_EFD[e]: each indexing op's backward would materialise a zero [E, F, D] gradient.
    per_expert = zip(x_ND.split(counts_E.tolist()), w1_EFD.unbind(0), v1_EFD.unbind(0), w2_EFD.unbind(0))
    for x_nD, w1_FD, v1_FD, w2_FD in per_expert:
        h_nF = F.silu(x_nD @ w1_FD.t()) * (x_nD @ v1_FD.t())
        outs.append(h_nF @ w2_FD)
    y_ND = torch.cat(outs)
    # Un-permute with a gather (the inverse permutation) rather than an index_add_ scatter.
    inverse_N = order_N.argsort()
    y_TKD = y_ND[inverse_N].view(t, k, -1)
    return torch.einsum('tkd,tk->td', y_TKD, weights_TK.to(y_TKD.dtype))


class ExpertBackend:
    """One way to run the experts: ``fn`` plus a check of whether it can run here, and in which compute dtypes
    (``dtypes=None``: any)."""

    def __init__(self, name: str, fn: ExpertFn, available: Callable[[torch.device], Optional[str]],
                 priority: int, note: str, dtypes: Optional[tuple[torch.dtype, ...]] = None):
        self.name, self.fn, self.available, self.priority, self.note = name, fn, available, priority, note
        self.dtypes = dtypes

    def unusable(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """None where this backend runs on ``device`` in ``dtype`` (None: not known yet), else why not."""
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f'computes in {[str(d).removeprefix("torch.") for d in self.dtypes]} only (got {dtype})'
        return self.available(device)

    def __repr__(self) -> str:
        return f'ExpertBackend({self.name!r})'


def _always(device: torch.device) -> Optional[str]:
    return None


# Name -> backend. `auto` takes the highest-priority backend whose `available(device)` returns None (a reason
# string means "not here"). Priorities follow benchmarks/moe_layer.py on an H100 (docs/backends.md): grouped_mm
# beats MegaBlocks' grouped path, which beats the per-expert loop.
BACKENDS: dict[str, ExpertBackend] = {
    'eager': ExpertBackend('eager', eager_experts, _always, priority=0,
                           note='plain PyTorch reference; runs anywhere'),
    # The fast paths are built and tested for bf16 (grouped_gemm refuses anything else); an fp32 run on a GPU
    # gets `eager` from `auto` rather than an error at its first step.
    'megablocks': ExpertBackend('megablocks', megablocks_backend.megablocks_experts, megablocks_backend.available,
                                priority=10, note="MegaBlocks' dropless grouped GEMMs, bf16 only",
                                dtypes=(torch.bfloat16,)),
    'grouped_mm': ExpertBackend('grouped_mm', grouped_mm.grouped_mm_experts, grouped_mm.available, priority=20,
                                note='torch._grouped_mm + fused Triton kernels, no host sync',
                                dtypes=(torch.bfloat16,)),
    'grouped_mm_triton': ExpertBackend('grouped_mm_triton', grouped_mm.grouped_mm_triton_experts,
                                       grouped_mm.triton_gemm_available, priority=5,
                                       note='grouped_mm with Triton GEMMs, for torch without _grouped_mm',
                                       dtypes=(torch.bfloat16,)),
}


_LOGGED_AUTO_CHOICES: set[tuple[str, str, str]] = set()


def resolve_backend(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> ExpertBackend:
    """The backend for ``ffn_config.moe_backend`` on ``device`` computing in ``dtype``; ``auto`` logs what it
    picked and why."""
    if name == 'auto':
        candidates = sorted(BACKENDS.values(), key=lambda b: -b.priority)
        skipped = []
        for backend in candidates:
            reason = backend.unusable(device, dtype)
            if reason is None:
                # Every layer resolves its backend; say it once per device and choice, not once per layer.
                if (str(device), str(dtype), backend.name) not in _LOGGED_AUTO_CHOICES:
                    _LOGGED_AUTO_CHOICES.add((str(device), str(dtype), backend.name))
                    log.info('moe_backend auto -> %s on %s (%s)%s', backend.name, device, backend.note,
                             f'; skipped: {"; ".join(skipped)}' if skipped else '')
                return backend
            skipped.append(f'{backend.name}: {reason}')
        raise RuntimeError(f'no MoE backend can run on {device}: {skipped}')
    if name not in BACKENDS:
        raise ValueError(f'ffn_config.moe_backend ({name!r}) must be one of {["auto", *BACKENDS]}')
    reason = BACKENDS[name].unusable(device, dtype)
    if reason is not None:
        where = f'{device} in {dtype}' if dtype is not None else str(device)
        raise RuntimeError(f'ffn_config.moe_backend {name!r} cannot run on {where}: {reason}')
    return BACKENDS[name]


class DbrxExpertGLU(nn.Module):
    """Holds ``w1`` (gate), ``v1`` (up) and ``w2`` (down), each ``[E*F, D]``; expert e owns rows [e*F, (e+1)*F).

    ``w2`` is used untransposed (``h @ w2_e``), as in HF DBRX, MegaBlocks' GLU and LLM Foundry's torch dMoE.
    """

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.d_model, self.ffn_hidden_size, self.num_experts = d_model, ffn_hidden_size, num_experts
        shape = (num_experts * ffn_hidden_size, d_model)
        self.w1 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.v1 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if self.w1.device.type != 'meta':
            self.reset_parameters()

    # The model's initialiser scales these down: they write into the residual stream.
    residual_out_params = ('w2',)

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.v1, self.w2):
            nn.init.normal_(w, std=std)

    def expert_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e, f, d = self.num_experts, self.ffn_hidden_size, self.d_model
        return self.w1.view(e, f, d), self.v1.view(e, f, d), self.w2.view(e, f, d)


class DbrxExperts(nn.Module):
    """The experts of one layer, run by the backend that ``ffn_config.moe_backend`` names."""

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, backend: str = 'auto',
                 device=None, dtype=None):
        super().__init__()
        self.mlp = DbrxExpertGLU(d_model, ffn_hidden_size, num_experts, device=device, dtype=dtype)
        self.backend_name = backend
        self._resolved: dict[tuple[torch.device, torch.dtype], ExpertBackend] = {}

    def backend_for(self, x_TD: torch.Tensor) -> ExpertBackend:
        """Resolved at the first forward on the device the weights then live on (after FSDP or ``.to()``) and in
        the dtype the experts compute in (autocast's where it is on)."""
        device = self.mlp.w1.device
        dtype = x_TD.dtype
        if device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
            dtype = torch.get_autocast_dtype('cuda')
        key = (device, dtype)
        if key not in self._resolved:
            self._resolved[key] = resolve_backend(self.backend_name, device, dtype)
        return self._resolved[key]

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return self.backend_for(x_TD).fn(x_TD, weights_TK, experts_TK, *self.mlp.expert_views())

    def extra_repr(self) -> str:
        return f'backend={self.backend_name!r}'

