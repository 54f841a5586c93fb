"""The ``grouped_mm`` expert backend: grouped GEMMs over expert-contiguous rows, fused SiLU-GLU, no host sync.

The dispatcher (:mod:`foundry_dbrx.moe.dispatch`) hands the experts their rows already grouped by expert, each with
its routing weight, and the int32 cumulative row counts ``offs_E`` that ``torch._grouped_mm`` takes; it sums the
rows back per token afterwards. This module is only the expert computation, one autograd function:

Forward (N routed rows, in expert order):
  1. ``g_NF = x_ND @ w1_e.T``, ``u_NF = x_ND @ v1_e.T``   two grouped GEMMs (why two: see "gate and up" below)
  2. ``hw_NF = w_N * silu(g_NF) * u_NF``                   one fused kernel; the routing weight is folded in here,
                                                            so the dispatcher's combine is a plain sum
  3. ``y_ND = hw_NF @ w2_e``                               grouped GEMM
Saved for backward: ``x_ND``, ``g_NF``, ``u_NF``, ``w_N``; ``hw`` is recomputed.

Backward:
  1. ``dhw_NF = dy_ND @ w2_e.T``
  2. one fused kernel, in place: ``dhw -> hw`` (recomputed, for dW2), ``g -> dg``, ``u -> du``, and
     ``dw_N = <dhw_n, silu(g_n) * u_n>`` (the routing weights' gradient) as a row reduction
  3. ``dW2 = hw^T dy``; ``dx_ND = dg @ w1_e + du @ v1_e``; ``dW1 = dg^T x_ND``; ``dV1 = du^T x_ND``

Gate and up: w1 and v1 are separate ``[E*F, D]`` parameters (HF's layout, shared with MegaBlocks), so no strided
view makes them one ``[E, D, 2F]`` operand. Concatenating them costs a 4.2 GB copy per step at DBRX size (3.0 ms
on an H100, against 12.9 ms for both GEMMs) for no GEMM speed-up (12.7 ms on weights already concatenated), and
splitting the gradient costs as much again: ``benchmarks/moe_layer.py --cases gateup``. Two GEMMs it is.

``grouped_mm_triton`` is the same function with the GEMMs in Triton too (``triton_gmm``), for torch without
``torch._grouped_mm`` (the pinned 2.7); on an H100 its GEMMs run at 80-98% of ``torch._grouped_mm``'s.

Legend: D d_model, F ffn_hidden_size, E (local) experts, N routed rows in expert order.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from foundry_dbrx.moe.kernels import TorchOps, TritonGemmOps, TritonOps, compute_dtype_cast, triton

__all__ = ['available', 'triton_gemm_available', 'grouped_mm_experts', 'grouped_mm_triton_experts']


def available(device: torch.device) -> Optional[str]:
    """None where the backend runs fast on ``device``, else why not."""
    if device.type != 'cuda':
        return f'needs a CUDA device (got {device.type})'
    if not hasattr(torch, '_grouped_mm'):
        return f'torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 has it)'
    if triton is None:
        return 'needs Triton for its fused elementwise kernels'
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        # Elsewhere torch._grouped_mm loops over the experts after reading their counts back to the host.
        return f'torch._grouped_mm has a fast path on sm90/sm100 only (this GPU is sm{major}{minor})'
    return None


def triton_gemm_available(device: torch.device) -> Optional[str]:
    """None where ``grouped_mm_triton`` (every GEMM in Triton too) runs on ``device``, else why not."""
    if device.type != 'cuda':
        return f'needs a CUDA device (got {device.type})'
    if triton is None:
        return 'needs Triton'
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f'needs sm80 or newer for bf16 tensor cores (this GPU is sm{major}{minor})'
    return None


def _release(t: torch.Tensor) -> None:
    """Frees a dead saved buffer now (safe here: a second backward through the same graph is refused)."""
    t.untyped_storage().resize_(0)


class _GroupedGLUExperts(torch.autograd.Function):
    """The expert computation of one layer on expert-contiguous rows; see the module docstring for the steps."""

    @staticmethod
    def forward(ctx, x_ND, w_N, w1_EFD, v1_EFD, w2_EFD, offs_E, ops):
        n = x_ND.shape[0]
        if n == 0:
            # A rank of an expert-parallel group can receive no rows; its weights still get a (zero) gradient,
            # so data-parallel gradient reduction sees every rank.
            ctx.save_for_backward(w1_EFD, v1_EFD, w2_EFD)
            ctx.empty, ctx.consumed = True, False
            return x_ND.new_empty(0, x_ND.shape[1])
        g_NF = ops.gmm(x_ND, w1_EFD.transpose(-2, -1), offs_E)
        u_NF = ops.gmm(x_ND, v1_EFD.transpose(-2, -1), offs_E)
        hw_NF = ops.glu_forward(g_NF, u_NF, w_N)
        y_ND = ops.gmm(hw_NF, w2_EFD, offs_E)
        del hw_NF
        ctx.save_for_backward(x_ND, g_NF, u_NF, w_N, w1_EFD, v1_EFD, w2_EFD, offs_E)
        ctx.ops, ctx.w_dtype, ctx.empty, ctx.consumed = ops, w_N.dtype, False, False
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        if ctx.consumed:
            raise RuntimeError('moe_backend grouped_mm reuses its saved activations in place during backward; '
                               'backward through the same forward twice (retain_graph=True) is not supported')
        ctx.consumed = True
        if ctx.empty:
            w1_EFD, v1_EFD, w2_EFD = ctx.saved_tensors
            zeros = [torch.zeros_like(w) if need else None
                     for w, need in zip((w1_EFD, v1_EFD, w2_EFD), ctx.needs_input_grad[2:5])]
            return dy_ND.new_empty(0, dy_ND.shape[1]), dy_ND.new_empty(0), *zeros, None, None
        x_ND, g_NF, u_NF, w_N, w1_EFD, v1_EFD, w2_EFD, offs_E = ctx.saved_tensors
        ops = ctx.ops
        need_x, need_w, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:5]

        dy_ND = dy_ND.contiguous()
        dhw_NF = ops.gmm(dy_ND, w2_EFD.transpose(-2, -1), offs_E)
        dw_N = ops.glu_backward(dhw_NF, g_NF, u_NF, w_N)  # now dhw_NF holds hw, g_NF dg, u_NF du
        hw_NF, dg_NF, du_NF = dhw_NF, g_NF, u_NF
        dw2 = ops.gmm(hw_NF.t(), dy_ND, offs_E) if need_w2 else None
        del dy_ND, hw_NF, dhw_NF

        dx_ND = None
        if need_x:
            dx_ND = ops.gmm(dg_NF, w1_EFD, offs_E)
            dx_ND += ops.gmm(du_NF, v1_EFD, offs_E)
        # dg and du are saved tensors, which autograd frees only after backward returns; free each as soon as its
        # weight gradient is done, so the last weight gradient does not stack on both (peak memory).
        dw1 = ops.gmm(dg_NF.t(), x_ND, offs_E) if need_w1 else None
        _release(dg_NF)
        dv1 = ops.gmm(du_NF.t(), x_ND, offs_E) if need_v1 else None
        _release(du_NF)
        for grad in (dw1, dv1, dw2):
            if grad is not None:
                ops.zero_empty_experts(grad, offs_E)
        dw_N = dw_N.to(ctx.w_dtype) if need_w else None
        return dx_ND, dw_N, dw1, dv1, dw2, None, None


def grouped_mm_experts(x_ND: torch.Tensor, w_N: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor,
                       v1_EFD: torch.Tensor, w2_EFD: torch.Tensor, ops: Optional[type] = None) -> torch.Tensor:
    """The ``grouped_mm`` backend (the contract of :data:`foundry_dbrx.moe.experts.ExpertFn`).

    ``ops`` defaults to :class:`TritonOps` on CUDA and to :class:`TorchOps` elsewhere (the CPU path that tests the
    weight folding and gradient logic without a GPU).
    """
    d, f = x_ND.shape[1], w1_EFD.shape[1]
    if ops is None:
        ops = TritonOps if x_ND.is_cuda else TorchOps
    if ops is TritonOps and (d % 8 or f % 8):
        raise ValueError(f'moe_backend grouped_mm needs d_model ({d}) and ffn_hidden_size ({f}) to be multiples '
                         'of 8 (torch._grouped_mm wants 16-byte row strides); use moe_backend eager')
    x_ND, w_N, w1_EFD, v1_EFD, w2_EFD = compute_dtype_cast(x_ND, w_N, w1_EFD, v1_EFD, w2_EFD)
    no_autocast = torch.autocast('cuda', enabled=False) if x_ND.is_cuda else contextlib.nullcontext()
    with no_autocast:
        return _GroupedGLUExperts.apply(x_ND.contiguous(), w_N.contiguous(), w1_EFD, v1_EFD, w2_EFD, offs_E, ops)


def grouped_mm_triton_experts(x_ND: torch.Tensor, w_N: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor,
                              v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The ``grouped_mm_triton`` backend: ``grouped_mm`` with its GEMMs in Triton, for torch without
    ``torch._grouped_mm`` (the pinned 2.7) and GPUs without its fast path (sm80)."""
    return grouped_mm_experts(x_ND, w_N, offs_E, w1_EFD, v1_EFD, w2_EFD, ops=TritonGemmOps)
