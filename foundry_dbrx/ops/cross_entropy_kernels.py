"""The per-chunk steps of :mod:`foundry_dbrx.ops.cross_entropy`: the cross entropy of one chunk's logits with its
gradient, and the fp32 accumulation of the output weight's gradient.

``chunk_cross_entropy`` has two implementations behind one small interface (the pattern of
:mod:`foundry_dbrx.moe.kernels`): ``TorchCrossEntropyOps`` (plain PyTorch, an fp32 copy of the chunk and a chain of
elementwise ops: the CPU path and the reference) and ``TritonCrossEntropyOps`` (one Triton kernel that reads the
compute-dtype logits twice and writes the gradient once over them; CUDA, or Triton's CPU interpreter in the tests).
Both return the same values up to the order of the fp32 sums and the last bit of ``exp``: the loss and lse to about
1e-6 relative, the logit gradient to one unit in the last place of the compute dtype (only where the fp32 values
straddle a rounding boundary).

Legend: C tokens in a chunk, V vocabulary, D d_model.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the reference ops
    triton = None

__all__ = ['TorchCrossEntropyOps', 'TritonCrossEntropyOps', 'TRITON_CE_CONFIG', 'cross_entropy_ops_for',
           'accumulate_weight_grad', 'fp32_out_gemm']


class TorchCrossEntropyOps:
    """Plain PyTorch: the CPU path and the reference for the Triton kernel."""

    @staticmethod
    def chunk_cross_entropy(logits_CV: torch.Tensor, t_C: torch.Tensor, ignore_index: int, *, grad: bool,
                            lse_C: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
        """Per row ``loss_C = lse - logit[t]`` (0 where ``t == ignore_index``) and ``lse_C``, both fp32; with
        ``grad``, also ``dlogits_CV = (softmax - onehot(t)) * valid * scale`` computed in fp32 and rounded once to
        the logits' dtype and written over ``logits_CV`` (returned; else None). ``lse_C``, when given, is used
        instead of being computed."""
        x_CV = logits_CV.float()
        if lse_C is None:
            lse_C = torch.logsumexp(x_CV, dim=-1)
        valid_C = t_C != ignore_index
        safe_t_C = torch.where(valid_C, t_C, torch.zeros_like(t_C))
        target_logit_C = x_CV.gather(1, safe_t_C[:, None]).squeeze(1)
        loss_C = torch.where(valid_C, lse_C - target_logit_C, torch.zeros_like(lse_C))
        if not grad:
            return loss_C, lse_C, None
        probs_CV = x_CV.sub_(lse_C[:, None]).exp_()
        probs_CV.scatter_add_(1, safe_t_C[:, None], torch.full_like(lse_C[:, None], -1.0))
        probs_CV.mul_(valid_C[:, None])
        if scale is not None:
            probs_CV.mul_(scale)
        if probs_CV.data_ptr() != logits_CV.data_ptr():
            logits_CV.copy_(probs_CV)  # over the logits, as the kernel: the caller's reference keeps no extra C V
        return loss_C, lse_C, logits_CV


if triton is not None:
    @triton.jit
    def _chunk_cross_entropy_kernel(logits_ptr, t_ptr, lse_ptr, loss_ptr, scale_ptr, V, stride_row, ignore_index,
                                    BLOCK_V: tl.constexpr, LSE_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                    HAS_SCALE: tl.constexpr):
        """One program per row. Pass 1: online max and sum of exp over blocks of V (fp32) -> lse. Pass 2 (with
        WRITE_GRAD): ``exp(x - lse) - [col == t]``, times valid and scale, stored over the logits."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        t = tl.load(t_ptr + row).to(tl.int64)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < V)
        if LSE_GIVEN:
            lse = tl.load(lse_ptr + row)
        else:
            m = float('-inf')
            s = 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                x = tl.load(row_ptr + offs, mask=offs < V, other=float('-inf')).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            tl.store(lse_ptr + row, lse)
        # Read before pass 2 overwrites it. A target outside [0, V) that is not ignore_index reads nothing and
        # gives a NaN loss (torch's gather would raise; a kernel cannot).
        target_logit = tl.load(row_ptr + tl.where(in_range, t, 0), mask=valid & in_range, other=0.0).to(tl.float32)
        loss = tl.where(in_range, lse - target_logit, float('nan'))
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            if HAS_SCALE:
                scale = tl.load(scale_ptr).to(tl.float32)
            else:
                scale = 1.0
            row_scale = tl.where(valid, scale, 0.0)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(offs == t, 1.0, 0.0)
                tl.store(row_ptr + offs, (g * row_scale).to(logits_ptr.dtype.element_ty), mask=mask)


# BLOCK_V columns per step of a row's loop: 4096 bf16 are 8 KB per load, 16 per thread at 8 warps. The tests shrink
# it (the interpreter is slow, and a small block leaves a remainder at their V).
TRITON_CE_CONFIG = dict(BLOCK_V=4096, num_warps=8)


class TritonCrossEntropyOps:
    """The fast path: one kernel per chunk (CUDA, or Triton's CPU interpreter)."""

    @staticmethod
    def chunk_cross_entropy(logits_CV: torch.Tensor, t_C: torch.Tensor, ignore_index: int, *, grad: bool,
                            lse_C: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
        """As :meth:`TorchCrossEntropyOps.chunk_cross_entropy`."""
        c, v = logits_CV.shape
        if logits_CV.stride(1) != 1:
            raise ValueError(f'logits stride {tuple(logits_CV.stride())}: the vocabulary dimension must be dense')
        loss_C = torch.empty(c, dtype=torch.float32, device=logits_CV.device)
        lse_given = lse_C is not None
        if not lse_given:
            lse_C = torch.empty(c, dtype=torch.float32, device=logits_CV.device)
        if c:
            cfg = dict(TRITON_CE_CONFIG)
            block = min(cfg.pop('BLOCK_V'), triton.next_power_of_2(v))
            _chunk_cross_entropy_kernel[(c,)](
                logits_CV, t_C, lse_C, loss_C, loss_C if scale is None else scale, v, logits_CV.stride(0),
                ignore_index, BLOCK_V=block, LSE_GIVEN=lse_given, WRITE_GRAD=grad, HAS_SCALE=scale is not None,
                **cfg)
        return loss_C, lse_C, logits_CV if grad else None


def cross_entropy_ops_for(x: torch.Tensor) -> type:
    """Triton's kernel on CUDA (where Triton is installed), plain PyTorch elsewhere."""
    return TritonCrossEntropyOps if x.is_cuda and triton is not None else TorchCrossEntropyOps


@functools.lru_cache(maxsize=None)
def fp32_out_gemm(device: torch.device) -> bool:
    """Whether ``torch.addmm(c_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=c_fp32)`` works here: cuBLAS adds
    the bf16 product to an fp32 matrix in its epilogue, with no bf16 product in memory and no separate add.

    Feature-detected once per device: ``out_dtype`` came to mm/addmm in torch 2.8 (pytorch PR 150812, CUDA only),
    and early versions required ``input`` in the operands' dtype; torch 2.7 has neither."""
    if device.type != 'cuda':
        return False
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    c = torch.ones(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (TypeError, RuntimeError):
        return False
    return bool((c == 3).all())


def accumulate_weight_grad(dw_VD: torch.Tensor, dlogits_CV: torch.Tensor, h_CD: torch.Tensor, first: bool) -> None:
    """``dw_VD (fp32) = or += dlogits_CV^T @ h_CD``, with the fewest passes over ``dw_VD`` that this torch allows:
    fp32 operands or an fp32-output GEMM accumulate inside the GEMM; otherwise the compute-dtype product is added
    in one mixed-dtype ``add_`` (no separate fp32 copy of it)."""
    if dlogits_CV.dtype == dw_VD.dtype:
        torch.addmm(dw_VD, dlogits_CV.t(), h_CD, beta=0 if first else 1, out=dw_VD)
    elif fp32_out_gemm(dw_VD.device):
        torch.addmm(dw_VD, dlogits_CV.t(), h_CD, out_dtype=dw_VD.dtype, beta=0 if first else 1, out=dw_VD)
    elif first:
        dw_VD.copy_(dlogits_CV.t() @ h_CD)
    else:
        dw_VD.add_(dlogits_CV.t() @ h_CD)
