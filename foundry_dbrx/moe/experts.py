"""DBRX's GLU experts: the fused ``[E*F, D]`` parameters and the backends that run them.

A backend is only the expert computation, on rows the dispatcher (:mod:`foundry_dbrx.moe.dispatch`) has already
grouped by expert. Every backend computes, for each row r of local expert e (rows ``offs[e-1]:offs[e]``),
``y_r = w_r * (silu(x_r @ w1_e.T) * (x_r @ v1_e.T)) @ w2_e``, where ``w_r`` is the row's routing weight,
from the same three parameters, so a state dict moves between backends (and to HF and MegaBlocks) untouched. The
number of experts a backend runs is the length of ``offs``, which the caller checks against the weights' view;
no backend infers it from a weight shape.

Legend: D d_model, F ffn_hidden_size, E experts, El experts on this rank, R rows in expert order.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from foundry_dbrx.moe import grouped_mm, megablocks_backend
from foundry_dbrx.ops.weight_grad import cast_weight, compute_dtype

__all__ = ['DbrxExpertGLU', 'DbrxExperts', 'ExpertBackend', 'ExpertFn', 'BACKENDS', 'resolve_backend',
           'eager_experts']

log = logging.getLogger(__name__)

# (x_RD, w_R, offs_El, w1_ElFD, v1_ElFD, w2_ElFD) -> y_RD; offs_El int32, cumulative rows per local expert.
ExpertFn = Callable[..., torch.Tensor]


def eager_experts(x_RD: torch.Tensor, w_R: torch.Tensor, offs_El: torch.Tensor, w1_EFD: torch.Tensor,
                  v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """Reference backend in plain PyTorch: one GEMM chain per expert on its slice of rows.

    One host sync per call (the row counts, to split the rows), not one per expert; an empty expert costs an
    empty matmul and gets a zero gradient.
    """
    counts = torch.diff(offs_El.long(), prepend=offs_El.new_zeros(1, dtype=torch.long)).tolist()
    outs = []
    # unbind, not w1_EFD[e]: each indexing op's backward would materialise a zero [E, F, D] gradient.
    per_expert = zip(x_RD.split(counts), w_R.split(counts), w1_EFD.unbind(0), v1_EFD.unbind(0), w2_EFD.unbind(0))
    for x_rD, w_r, w1_FD, v1_FD, w2_FD in per_expert:
        h_rF = F.silu(x_rD @ w1_FD.t()) * (x_rD @ v1_FD.t())
        outs.append((h_rF @ w2_FD) * w_r.to(h_rF.dtype)[:, None])
    return torch.cat(outs) if outs else x_RD.new_empty(0, x_RD.shape[1])


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
    """The backend for ``training.moe_backend`` on ``device`` computing in ``dtype``; ``auto`` logs what it
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
        raise ValueError(f'training.moe_backend ({name!r}) must be one of {["auto", *BACKENDS]}')
    reason = BACKENDS[name].unusable(device, dtype)
    if reason is not None:
        where = f'{device} in {dtype}' if dtype is not None else str(device)
        raise RuntimeError(f'training.moe_backend {name!r} cannot run on {where}: {reason}')
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

    def expert_views(self, num_local_experts: int, grad_scale: float = 1.0, dtype: Optional[torch.dtype] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[El, F, D]`` views of this rank's experts, cast to ``dtype`` if given (by :func:`cast_weight`, whose
        backward adds the gradient straight into an fp32 ``.grad`` where it can). Under expert parallelism the
        parameters are DTensors sharded by expert over the EP group, and the local shard is taken
        (differentiably); ``grad_scale`` multiplies the gradient that flows back to them (expert parallelism's
        correction, see parallelize.py)."""
        f, d = self.ffn_hidden_size, self.d_model
        views = []
        for w in (self.w1, self.v1, self.w2):
            local = w.to_local() if hasattr(w, 'to_local') else w
            if local.shape != (num_local_experts * f, d):
                raise RuntimeError(f'expert weights hold {list(local.shape)} on this rank, not the '
                                   f'[{num_local_experts} experts x {f}, {d}] the dispatcher routes to')
            local = cast_weight(local, dtype)
            if grad_scale != 1.0:
                local = _ScaleGrad.apply(local, grad_scale)
            views.append(local.view(num_local_experts, f, d))
        return tuple(views)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        return dx * ctx.scale, None


class DbrxExperts(nn.Module):
    """The experts of one layer, run by the backend that ``training.moe_backend`` names.

    ``num_local_experts`` and ``grad_scale`` are set from outside (:mod:`foundry_dbrx.parallelize`) when the layer
    is made expert-parallel; on one rank they are E and 1.
    """

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, backend: str = 'auto',
                 device=None, dtype=None):
        super().__init__()
        self.mlp = DbrxExpertGLU(d_model, ffn_hidden_size, num_experts, device=device, dtype=dtype)
        self.backend_name = backend
        self.num_local_experts = num_experts
        self.grad_scale = 1.0
        self._resolved: dict[tuple[torch.device, torch.dtype], ExpertBackend] = {}

    def backend_for(self, x_RD: torch.Tensor) -> ExpertBackend:
        """Resolved at the first forward on the device the weights then live on (after FSDP or ``.to()``) and in
        the dtype the experts compute in (autocast's where it is on)."""
        device = self.mlp.w1.device
        dtype = x_RD.dtype
        if device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
            dtype = torch.get_autocast_dtype('cuda')
        key = (device, dtype)
        if key not in self._resolved:
            self._resolved[key] = resolve_backend(self.backend_name, device, dtype)
        return self._resolved[key]

    def forward(self, x_RD: torch.Tensor, w_R: torch.Tensor, offs_El: torch.Tensor) -> torch.Tensor:
        """``y_RD`` for rows grouped by local expert (``offs_El``: int32 cumulative rows per local expert)."""
        if offs_El.numel() != self.num_local_experts:
            raise RuntimeError(f'the dispatcher routed to {offs_El.numel()} experts; this rank holds '
                               f'{self.num_local_experts}')
        dtype = compute_dtype(x_RD)
        weights = self.mlp.expert_views(self.num_local_experts, self.grad_scale, dtype=dtype)
        w_dtype = weights[0].dtype
        if dtype is None and x_RD.dtype != w_dtype:
            # Low-precision experts (mpt_dbrx_moe's ffn_config.bf16) in an fp32 model without autocast (a CPU
            # run, precision fp32): they compute in their own dtype, as under autocast, and hand back the model's.
            x_low = x_RD.to(w_dtype)
            return self.backend_for(x_low).fn(x_low, w_R, offs_El, *weights).to(x_RD.dtype)
        return self.backend_for(x_RD).fn(x_RD, w_R, offs_El, *weights)

    def extra_repr(self) -> str:
        return f'backend={self.backend_name!r}, local_experts={self.num_local_experts}'

