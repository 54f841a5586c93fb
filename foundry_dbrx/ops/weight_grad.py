"""A weight's cast to the compute dtype whose gradient goes straight into the fp32 ``.grad``.

Under mixed precision with fp32 weights (one GPU: LLM Foundry drops FSDP there, so there is no ``PURE`` parameter
gather to do the cast), every microbatch casts each weight to bf16 and autograd sends the bf16 weight gradient back
through that cast: torch's bf16 -> fp32 copy (a dynamically-casting kernel that ran at about 1 TB/s on an H200),
then ``AccumulateGrad`` adds the fp32 tensor into ``.grad`` (another 12 bytes per element). For DBRX's expert
weights at four microbatches per step that was 15% of a step (``benchmarks/train_step.py --profile``).

:func:`cast_weight` is the cast with its own backward: one Triton kernel reads the bf16 gradient and adds it into
the parameter's fp32 ``.grad`` (10 bytes per element, or 6 for the first microbatch, which writes ``.grad``), and
returns no gradient to autograd for the parameter. That is only correct where nothing else expects the gradient to
reach ``AccumulateGrad``, so the fused path is taken only when all of these hold, else the cast behaves like
``Tensor.to`` (with the fast upcast kernel where it applies):

- the weight is a plain ``nn.Parameter`` (not a DTensor, not an FSDP flat-parameter view), without
  post-accumulate-grad hooks, and no process group of more than one rank exists (DDP and FSDP hook the
  accumulation);
- backward runs ``tensor.backward()`` / ``torch.autograd.backward`` into ``.grad``, not ``torch.autograd.grad``
  (which returns gradients instead), and not with ``create_graph``;
- an existing ``.grad`` is fp32, contiguous and of the weight's shape.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

__all__ = ['cast_weight', 'compute_dtype', 'accumulate_grad_', 'upcast']


def compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype on ``x``'s device where autocast is on, else None (no cast)."""
    device_type = x.device.type
    if device_type in ('cuda', 'cpu') and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


if triton is not None:

    @triton.jit
    def _add_upcast_kernel(dst_ptr, src_ptr, n, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        val = tl.load(src_ptr + offs, mask=mask).to(tl.float32)
        if ACCUMULATE:
            val += tl.load(dst_ptr + offs, mask=mask)
        tl.store(dst_ptr + offs, val, mask=mask)


def _triton_ok(*tensors: torch.Tensor) -> bool:
    return triton is not None and all(t.is_cuda and t.is_contiguous() for t in tensors)


def _launch(dst: torch.Tensor, src: torch.Tensor, accumulate: bool) -> None:
    n = src.numel()
    if n:
        block = 4096
        _add_upcast_kernel[(triton.cdiv(n, block),)](dst, src, n, ACCUMULATE=accumulate, BLOCK=block, num_warps=8)


def upcast(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g.to(dtype)``; bf16/fp16 -> fp32 by the Triton kernel on CUDA (torch's own cast is the slow one)."""
    if g.dtype == dtype:
        return g
    if dtype == torch.float32 and _triton_ok(g):
        out = torch.empty(g.shape, dtype=dtype, device=g.device)
        _launch(out, g, accumulate=False)
        return out
    return g.to(dtype)


def accumulate_grad_(param: torch.Tensor, g: torch.Tensor) -> None:
    """``param.grad += g`` (``param.grad = g`` in fp32 when there is none), in one pass over ``g``."""
    grad = param.grad
    if grad is None:
        param.grad = upcast(g, param.dtype)
    elif _triton_ok(grad, g) and grad.dtype == torch.float32:
        _launch(grad, g, accumulate=True)
    else:
        grad.add_(g)


def _accumulates_into_grad(node) -> bool:
    """Whether the running backward will execute ``node`` (the parameter's ``AccumulateGrad``).

    torch has no public way for a backward function to ask this. ``torch._C._will_engine_execute_node`` is what
    ``torch.autograd.graph.register_multi_grad_hook`` uses; it answers False under ``backward(inputs=...)`` without
    the parameter and raises under ``torch.autograd.grad`` (which returns gradients instead of accumulating them).
    """
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return False


class _CastWeight(torch.autograd.Function):

    @staticmethod
    def forward(ctx, w, dtype, node):
        ctx.param, ctx.node, ctx.w_dtype = w, node, w.dtype
        return w.to(dtype)

    @staticmethod
    def backward(ctx, g):
        param = ctx.param
        grad = param.grad
        if (ctx.node is not None and not torch.is_grad_enabled() and _accumulates_into_grad(ctx.node)
                and (grad is None or (grad.dtype == torch.float32 and grad.is_contiguous()
                                      and grad.shape == param.shape))):
            accumulate_grad_(param, g.contiguous())
            return None, None, None
        return upcast(g.contiguous(), ctx.w_dtype), None, None


def _fusable(w: torch.Tensor) -> bool:
    if type(w) is not nn.Parameter or not w.is_leaf or not w.requires_grad or w.dtype != torch.float32:
        return False
    if getattr(w, '_post_accumulate_grad_hooks', None):
        return False
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def cast_weight(w: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``w.to(dtype)`` (``w`` itself for ``dtype`` None or equal), with the gradient path of the module docstring."""
    if dtype is None or w.dtype == dtype or not (torch.is_grad_enabled() and w.requires_grad):
        return w if dtype is None else w.to(dtype)
    node = None
    if _fusable(w):
        node = w.view_as(w).grad_fn.next_functions[0][0]  # the parameter's AccumulateGrad
    return _CastWeight.apply(w, dtype, node)
