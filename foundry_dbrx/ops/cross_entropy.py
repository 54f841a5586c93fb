"""Cross entropy of a linear output layer without the full logits: ``sum_n CE(h_n @ W^T, t_n)`` chunk by chunk.

The plain path (:func:`linear_cross_entropy_reference`, what the model did before) materialises the logits
``[N, V]`` in the compute dtype, an fp32 copy for the loss, and fp32 and compute-dtype gradients of them: at DBRX's
vocabulary (V = 100352) and 16k tokens per microbatch that is 3.3 GB + 6.6 GB + 6.6 GB + 3.3 GB. Here the tokens go
through in chunks of C rows, and only one chunk's ``[C, V]`` logits exist at a time:

  1. ``logits_CV = h_CD @ W_VD^T`` in the compute dtype (what ``F.linear`` gives, autocast's dtype under autocast)
  2. ``lse_C = logsumexp(logits_CV)`` and the target logit, in fp32: ``loss = sum (lse_C - logit_C[t])`` over the
     rows whose target is not ``ignore_index``
  3. gradient of the chunk: ``dlogits_CV = softmax(logits_CV) - onehot(t)`` (fp32, rounded once to the compute
     dtype, written over the logits; zero rows for ignored targets), ``dh_CD = dlogits_CV @ W_VD``,
     ``dW_VD += dlogits_CV^T @ h_CD`` (accumulated over chunks in fp32)

Steps 2 and the first half of 3 are one Triton kernel on CUDA (two reads of the compute-dtype logits, one write;
:mod:`foundry_dbrx.ops.cross_entropy_kernels`), plain PyTorch elsewhere (an fp32 copy and a chain of elementwise
ops: the reference, tested against it). The fp32 ``dW`` accumulation runs inside the GEMM where torch has an
fp32-output GEMM (``out_dtype``, torch >= 2.8 on CUDA), else as one mixed-dtype add per chunk.

Two schedules for step 3, both tested against the reference:
  - ``grad_in_forward=True`` (the default when gradients are needed): step 3 runs in forward while the chunk's
    logits exist, and backward only scales ``dh``, ``dW`` by the incoming gradient (a scalar). The output layer
    costs what it costs on the plain path, ``6 N V D`` FLOPs; ``dh`` [N, D] and the fp32 ``dW`` [V, D] wait for
    backward, which in training follows at once (Composer calls backward right after the loss).
  - ``grad_in_forward=False``: forward keeps ``h`` and ``lse_N`` only; backward recomputes each chunk's logits
    (``8 N V D`` FLOPs in all). For a caller that may not run backward.

Legend: N tokens, C tokens in a chunk, D d_model, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from foundry_dbrx.ops.cross_entropy_kernels import accumulate_weight_grad, cross_entropy_ops_for

__all__ = ['linear_cross_entropy', 'linear_cross_entropy_reference', 'DEFAULT_CHUNK_TOKENS']

# 8192 tokens x 100352 columns: 1.6 GB of bf16 logits per chunk (rewritten in place by their gradient), what the
# fp32 path needed for 2048 tokens. The per-chunk costs besides the three GEMMs, a pass over the fp32 [V, D] weight
# gradient and the launches, shrink with larger chunks: at 16k tokens per microbatch, two chunks.
DEFAULT_CHUNK_TOKENS = 8192


def linear_cross_entropy_reference(h: torch.Tensor, weight_VD: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """The plain path: full logits ``F.linear(h, W)``, fp32 cross entropy summed over the valid targets."""
    logits = F.linear(h, weight_VD)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction='sum')


def _chunks(n: int, chunk: int):
    return ((s, min(s + chunk, n)) for s in range(0, n, chunk))


def _chunk_grads(dlogits_CV, h_CD, weight_VD, dh_CD, dw_VD, first):
    if dh_CD is not None:
        torch.mm(dlogits_CV, weight_VD, out=dh_CD)
    if dw_VD is not None:
        accumulate_weight_grad(dw_VD, dlogits_CV, h_CD, first)


def _weight_grad_buffer(weight_VD, n):
    # The first chunk writes it whole (beta=0), so it needs no zero fill unless there is no chunk at all.
    return (torch.zeros if n == 0 else torch.empty)(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Steps 1-3 of the module docstring; ``grad_in_forward`` picks the schedule, ``ops`` the step-2 kernels."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, t_N, ignore_index, chunk, grad_in_forward, ops):
        need_h, need_w = ctx.needs_input_grad[:2]
        n = h_ND.shape[0]
        total = h_ND.new_zeros((), dtype=torch.float32)
        dh_ND = torch.empty_like(h_ND) if grad_in_forward and need_h else None
        dw_VD = _weight_grad_buffer(weight_VD, n) if grad_in_forward and need_w else None
        lse_N = None if grad_in_forward else torch.empty(n, dtype=torch.float32, device=h_ND.device)
        for s, e in _chunks(n, chunk):
            # No name holds the logits here: with gradients, ops writes dlogits over them.
            loss_C, lse_C, dlogits_CV = ops.chunk_cross_entropy(h_ND[s:e] @ weight_VD.t(), t_N[s:e], ignore_index,
                                                                grad=grad_in_forward)
            total += loss_C.sum()
            if grad_in_forward:
                _chunk_grads(dlogits_CV, h_ND[s:e], weight_VD, None if dh_ND is None else dh_ND[s:e], dw_VD,
                             first=s == 0)
                del dlogits_CV
            else:
                lse_N[s:e] = lse_C
        if grad_in_forward:
            ctx.save_for_backward(dh_ND, dw_VD)
        else:
            ctx.save_for_backward(h_ND, weight_VD, t_N, lse_N)
        ctx.grad_in_forward, ctx.ignore_index, ctx.chunk, ctx.ops = grad_in_forward, ignore_index, chunk, ops
        ctx.h_dtype, ctx.w_dtype = h_ND.dtype, weight_VD.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.grad_in_forward:
            dh_ND, dw_VD = ctx.saved_tensors
            dh = dh_ND.mul_(grad_out.to(dh_ND.dtype)) if need_h else None
            dw = dw_VD.mul_(grad_out).to(ctx.w_dtype) if need_w else None
            return dh, dw, None, None, None, None, None
        h_ND, weight_VD, t_N, lse_N = ctx.saved_tensors
        n = h_ND.shape[0]
        dh_ND = torch.empty_like(h_ND) if need_h else None
        dw_VD = _weight_grad_buffer(weight_VD, n) if need_w else None
        scale = grad_out.float()
        for s, e in _chunks(n, ctx.chunk):
            _, _, dlogits_CV = ctx.ops.chunk_cross_entropy(h_ND[s:e] @ weight_VD.t(), t_N[s:e], ctx.ignore_index,
                                                           grad=True, lse_C=lse_N[s:e], scale=scale)
            _chunk_grads(dlogits_CV, h_ND[s:e], weight_VD, None if dh_ND is None else dh_ND[s:e], dw_VD,
                         first=s == 0)
            del dlogits_CV
        return dh_ND, None if dw_VD is None else dw_VD.to(ctx.w_dtype), None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight_VD: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                         grad_in_forward: Optional[bool] = None) -> torch.Tensor:
    """``sum over targets != ignore_index of CE(h @ weight^T, target)`` (fp32, 0 when none is valid), without the
    full logits; same value and gradients as :func:`linear_cross_entropy_reference`.

    Args:
        h: hidden states ``[..., D]``; ``targets`` has the same leading shape.
        weight_VD: the output layer's weight ``[V, D]`` (no bias).
        chunk_tokens: tokens per chunk (a chunk holds its ``chunk_tokens x V`` logits in the compute dtype).
        grad_in_forward: compute the gradients in forward (module docstring); default: when gradients are needed.
    """
    d = h.shape[-1]
    if weight_VD.dim() != 2 or weight_VD.shape[1] != d:
        raise ValueError(f'weight shape {tuple(weight_VD.shape)} must be [V, {d}] for hidden states of width {d}')
    if targets.shape != h.shape[:-1]:
        raise ValueError(f'targets shape {tuple(targets.shape)} must be the hidden states\' leading shape '
                         f'{tuple(h.shape[:-1])}')
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f'chunk_tokens ({chunk_tokens!r}) must be a positive integer')
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        # What F.linear does under autocast: both operands in autocast's dtype. The function then runs outside
        # autocast so that its fp32 steps stay fp32.
        dtype = torch.get_autocast_dtype(device_type)
        h, weight_VD = h.to(dtype), weight_VD.to(dtype)
    elif h.dtype != weight_VD.dtype:
        raise ValueError(f'hidden states ({h.dtype}) and weight ({weight_VD.dtype}) must share a dtype outside '
                         'autocast')
    return _linear_cross_entropy(h, weight_VD, targets, ignore_index, chunk_tokens, grad_in_forward, None)


def _linear_cross_entropy(h, weight_VD, targets, ignore_index, chunk_tokens, grad_in_forward, ops):
    """:func:`linear_cross_entropy` after its checks and autocast cast; ``ops`` None picks by device (the tests pass
    the Triton ops to run the kernel in Triton's interpreter on CPU tensors)."""
    d = h.shape[-1]
    h_ND, t_N = h.reshape(-1, d), targets.reshape(-1).contiguous()  # the kernel reads targets densely
    ops = ops or cross_entropy_ops_for(h_ND)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight_VD.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        if not needs_grad:
            with torch.no_grad():
                return sum((ops.chunk_cross_entropy(h_ND[s:e] @ weight_VD.t(), t_N[s:e], ignore_index,
                                                    grad=False)[0].sum()
                            for s, e in _chunks(h_ND.shape[0], chunk_tokens)),
                           h_ND.new_zeros((), dtype=torch.float32))
        return _ChunkedLinearCrossEntropy.apply(h_ND.contiguous(), weight_VD, t_N, ignore_index, chunk_tokens,
                                                True if grad_in_forward is None else grad_in_forward, ops)
