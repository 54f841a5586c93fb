"""The ``grouped_mm`` expert backend: tokens sorted by expert, ``torch._grouped_mm``, fused Triton elementwise.

One autograd function runs all experts of a layer with no host-device sync in forward or backward: expert
counts stay on the device as the int32 offsets ``torch._grouped_mm`` takes, so nothing waits on ``.item()``.

Forward (N = T*K routed slots, in expert order):
  1. plan: a stable sort of the slots by expert; each sorted slot's source token; each slot's sorted position;
     the cumulative expert counts (all on device, no ``bincount``: on CUDA it reads the max back to the host).
  2. ``x_ND = x_TD[token_N]``                      a row gather
  3. ``g_NF = x_ND @ w1_e.T``, ``u_NF = x_ND @ v1_e.T``  two grouped GEMMs (why two: see "gate and up" below)
  4. ``hw_NF = w_N * silu(g_NF) * u_NF``           one fused kernel; the routing weight is folded in here, so the
                                                   un-permute is a plain sum and needs no weights
  5. ``y_ND = hw_NF @ w2_e``                       grouped GEMM
  6. ``y_TD[t] = sum_k y_ND[pos_TK[t, k]]``        one gather-sum kernel (no ``index_add_`` scatter)
Saved for backward: ``x_ND``, ``g_NF``, ``u_NF``, ``w_N`` and the plan; ``hw`` is recomputed.

Backward:
  1. ``dy_ND = dy_TD[token_N]``, ``dhw_NF = dy_ND @ w2_e.T``
  2. one fused kernel, in place: ``dhw -> hw`` (recomputed, for dW2), ``g -> dg``, ``u -> du``, and
     ``dw_N = <dhw_n, silu(g_n) * u_n>`` (the routing weights' gradient) as a row reduction
  3. ``dW2 = hw^T dy``; ``dx_ND = dg @ w1_e + du @ v1_e``; ``dW1 = dg^T x_ND``; ``dV1 = du^T x_ND``
  4. ``dx_TD[t] = sum_k dx_ND[pos_TK[t, k]]`` (the two dx GEMM outputs are summed inside the gather)

Gate and up: w1 and v1 are separate ``[E*F, D]`` parameters (HF's layout, shared with MegaBlocks), so no strided
view makes them one ``[E, D, 2F]`` operand. Concatenating them costs a 4.2 GB copy per step at DBRX size (3.0 ms
on an H100, against 12.9 ms for both GEMMs) for no GEMM speed-up (12.7 ms on weights already concatenated), and
splitting the gradient costs as much again: ``benchmarks/moe_layer.py --cases gateup``. Two GEMMs it is.

``grouped_mm_triton`` is the same function with the GEMMs in Triton too (``triton_gmm``), for torch without
``torch._grouped_mm`` (the pinned 2.7); on an H100 its GEMMs run at 80-98% of ``torch._grouped_mm``'s.

Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k, N = T*K routed slots in expert order.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the reference ops
    triton = None

__all__ = ['available', 'triton_gemm_available', 'grouped_mm_experts', 'grouped_mm_triton_experts', 'RoutingPlan',
           'plan_routing', 'TorchOps', 'TritonOps', 'TritonGemmOps', 'triton_gmm', 'compute_dtype_cast']


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


def compute_dtype_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Casts to autocast's dtype where CUDA autocast is on (these backends run their GEMMs outside autocast)."""
    if tensors[0].is_cuda and torch.is_autocast_enabled('cuda'):
        dtype = torch.get_autocast_dtype('cuda')
        return tuple(t.to(dtype) for t in tensors)
    return tensors


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
    offs_E = torch.searchsorted(sorted_N, bounds_E, out_int32=True)  # number of slots with expert < e+1
    pos_N = torch.empty_like(order_N)
    pos_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return RoutingPlan(order_N, order_N // k, pos_N, offs_E)


# --- the kernels behind one small interface, so the same autograd function runs on CPU in tests ----------------

class TorchOps:
    """Plain PyTorch versions of the ops: the CPU path (tests, CI) and the reference for the Triton kernels.

    ``gmm`` loops over the experts and reads the offsets back to the host: a test stand-in, never the fast path.
    """

    @staticmethod
    def gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """``torch._grouped_mm(a, b, offs=offs_E)`` for 2D x 3D (rows grouped) and 2D x 2D (contraction grouped)."""
        ends = offs_E.tolist()
        starts = [0] + ends[:-1]
        if b.dim() == 3:
            out = a.new_empty(a.shape[0], b.shape[-1])
            for e, (s, t) in enumerate(zip(starts, ends)):
                torch.mm(a[s:t], b[e], out=out[s:t])
            return out
        out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
        for e, (s, t) in enumerate(zip(starts, ends)):
            if t > s:
                torch.mm(a[:, s:t], b[s:t], out=out[e])
        return out

    @staticmethod
    def glu_forward(g_NF: torch.Tensor, u_NF: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        """``w_n * silu(g) * u`` in fp32, rounded once."""
        gf = g_NF.float()
        return (gf * torch.sigmoid(gf) * u_NF.float() * w_N.float()[:, None]).to(g_NF.dtype)

    @staticmethod
    def glu_backward(dhw_NF: torch.Tensor, g_NF: torch.Tensor, u_NF: torch.Tensor,
                     w_N: torch.Tensor) -> torch.Tensor:
        """In place: ``dhw -> hw``, ``g -> dg``, ``u -> du``; returns ``dw_N`` (fp32)."""
        dhw, g, u, w = dhw_NF.float(), g_NF.float(), u_NF.float(), w_N.float()[:, None]
        sig = torch.sigmoid(g)
        silu = g * sig
        h = silu * u
        dw_N = (dhw * h).sum(dim=1)
        dh = dhw * w
        g_NF.copy_(dh * u * sig * (1.0 + g * (1.0 - sig)))
        u_NF.copy_(dh * silu)
        dhw_NF.copy_(h * w)
        return dw_N

    @staticmethod
    def unpermute_sum(src_ND: torch.Tensor, pos_N: torch.Tensor, k: int,
                      src2_ND: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out[t] = sum_k src[pos[t*K + k]]`` (plus ``src2``'s rows), accumulated in fp32."""
        rows = src_ND.index_select(0, pos_N).float()
        if src2_ND is not None:
            rows += src2_ND.index_select(0, pos_N).float()
        return rows.view(-1, k, src_ND.shape[1]).sum(dim=1).to(src_ND.dtype)

    @staticmethod
    def zero_empty_experts(grad_EFD: torch.Tensor, offs_E: torch.Tensor) -> None:
        """``gmm`` above writes zeros for experts with no tokens already."""


if triton is not None:

    @triton.jit
    def _glu_forward_kernel(g_ptr, u_ptr, w_ptr, out_ptr, F, stride_g, stride_u, stride_out,
                            BLOCK_F: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = cols < F
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        hw = g * tl.sigmoid(g) * u * w
        tl.store(out_ptr + row * stride_out + cols, hw.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_backward_kernel(dhw_ptr, g_ptr, u_ptr, w_ptr, dw_ptr, stride_dhw, stride_g, stride_u,
                             F: tl.constexpr, BLOCK_F: tl.constexpr):
        # One row per program, so the routing-weight gradient is a deterministic in-register reduction.
        # F is a compile-time constant: the loop bound then stays a Python int in Triton's interpreter too.
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        acc = tl.zeros([BLOCK_F], dtype=tl.float32)
        for start in range(0, F, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            mask = cols < F
            dhw = tl.load(dhw_ptr + row * stride_dhw + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            h = silu * u
            acc += dhw * h
            dh = dhw * w
            tl.store(g_ptr + row * stride_g + cols, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(
                g_ptr.dtype.element_ty), mask=mask)
            tl.store(u_ptr + row * stride_u + cols, (dh * silu).to(u_ptr.dtype.element_ty), mask=mask)
            tl.store(dhw_ptr + row * stride_dhw + cols, (h * w).to(dhw_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _unpermute_sum_kernel(src_ptr, src2_ptr, pos_ptr, out_ptr, D, stride_src, stride_src2, stride_out,
                              K: tl.constexpr, HAS_SRC2: tl.constexpr, BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            p = tl.load(pos_ptr + tok * K + j).to(tl.int64)
            acc += tl.load(src_ptr + p * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SRC2:
                acc += tl.load(src2_ptr + p * stride_src2 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tok * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _zero_empty_experts_kernel(grad_ptr, offs_ptr, NUMEL: tl.constexpr, BLOCK: tl.constexpr,
                                   PROGRAMS: tl.constexpr):
        # Masked rather than branched: experts with tokens do no memory traffic, and no loop bound is a tensor.
        e = tl.program_id(0)
        end = tl.load(offs_ptr + e)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        base = grad_ptr + e.to(tl.int64) * NUMEL
        zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
        for i in range(0, NUMEL, PROGRAMS * BLOCK):
            idx = i + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            tl.store(base + idx, zeros, mask=(idx < NUMEL) & (end == start))

    @triton.jit
    def _gmm_tile(pid, tiles_m, num_n, GROUP_M: tl.constexpr):
        # Grouped ordering: GROUP_M row tiles sweep the columns together, so each weight tile is read from HBM
        # once per GROUP_M row tiles instead of once per row tile.
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m

    @triton.jit
    def _gmm_rows_kernel(a_ptr, b_ptr, out_ptr, offs_ptr, tile_end_ptr, N, stride_am, stride_ak, stride_be,
                         stride_bk, stride_bn, stride_om, stride_on, E: tl.constexpr, K: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # out[rows of e] = a[rows of e] @ b[e]. Expert e owns programs [tile_end[e-1], tile_end[e]) * num_n, with
        # tile_end the cumulative count of BM-row tiles (computed on the device); the programs past the last exit.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BN)
        experts = tl.arange(0, E)
        ends = tl.load(tile_end_ptr + experts)
        if pid >= tl.max(ends) * num_n:
            return
        e = tl.sum((ends * num_n <= pid).to(tl.int32))
        tile_start = tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0)
        row_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        row_end = tl.load(offs_ptr + e)
        m, n = _gmm_tile(pid - tile_start * num_n, tl.load(tile_end_ptr + e) - tile_start, num_n, GROUP_M)
        rows = row_start + m * BM + tl.arange(0, BM)
        cols = n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptrs, mask=(rows[:, None] < row_end) & (k + ks[None, :] < K), other=0.0)
            b = tl.load(b_ptrs, mask=(k + ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
            a_ptrs += BK * stride_ak
            b_ptrs += BK * stride_bk
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < row_end) & (cols[None, :] < N))

    @triton.jit
    def _gmm_k_kernel(a_ptr, b_ptr, out_ptr, offs_ptr, stride_am, stride_ak, stride_bk, stride_bn, stride_oe,
                      stride_om, stride_on, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr):
        # out[e] = a[:, ks of e] @ b[ks of e]: the weight-gradient form, contraction over expert e's tokens.
        pid = tl.program_id(0)
        tiles_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        e = pid // (tiles_m * num_n)
        m, n = _gmm_tile(pid % (tiles_m * num_n), tiles_m, num_n, GROUP_M)
        k_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        k_end = tl.load(offs_ptr + e)
        rows = m * BM + tl.arange(0, BM)
        cols = n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(k_start, k_end, BK):
            kk = (k + ks).to(tl.int64)
            a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(rows[:, None] < M) & (kk[None, :] < k_end), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=(kk[:, None] < k_end) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


class TritonOps:
    """The fast path: ``torch._grouped_mm`` and the Triton kernels above (CUDA, or Triton's CPU interpreter)."""

    @staticmethod
    def gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(a, b, offs=offs_E)

    @staticmethod
    def glu_forward(g_NF: torch.Tensor, u_NF: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        n, f = g_NF.shape
        out = torch.empty((n, f), dtype=g_NF.dtype, device=g_NF.device)
        if n:
            block = 1024
            _glu_forward_kernel[(n, triton.cdiv(f, block))](g_NF, u_NF, w_N, out, f, g_NF.stride(0),
                                                            u_NF.stride(0), out.stride(0), BLOCK_F=block,
                                                            num_warps=4)
        return out

    @staticmethod
    def glu_backward(dhw_NF: torch.Tensor, g_NF: torch.Tensor, u_NF: torch.Tensor,
                     w_N: torch.Tensor) -> torch.Tensor:
        n, f = g_NF.shape
        dw_N = torch.empty(n, dtype=torch.float32, device=g_NF.device)
        if n:
            _glu_backward_kernel[(n,)](dhw_NF, g_NF, u_NF, w_N, dw_N, dhw_NF.stride(0), g_NF.stride(0),
                                       u_NF.stride(0), F=f, BLOCK_F=1024, num_warps=4)
        return dw_N

    @staticmethod
    def unpermute_sum(src_ND: torch.Tensor, pos_N: torch.Tensor, k: int,
                      src2_ND: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, d = src_ND.shape
        t = n // k
        out = torch.empty((t, d), dtype=src_ND.dtype, device=src_ND.device)
        if t:
            block = 1024
            src2 = src_ND if src2_ND is None else src2_ND
            _unpermute_sum_kernel[(t, triton.cdiv(d, block))](
                src_ND, src2, pos_N, out, d, src_ND.stride(0), src2.stride(0), out.stride(0), K=k,
                HAS_SRC2=src2_ND is not None, BLOCK_D=block, num_warps=4)
        return out

    @staticmethod
    def zero_empty_experts(grad_EFD: torch.Tensor, offs_E: torch.Tensor) -> None:
        # torch._grouped_mm leaves an empty expert's weight gradient unwritten on some GPUs (pytorch issue
        # 172439, sm100); Hopper writes zeros. This costs one early-exiting launch where nothing is empty.
        assert grad_EFD.is_contiguous()
        e = grad_EFD.shape[0]
        programs = 64
        _zero_empty_experts_kernel[(e, programs)](grad_EFD, offs_E, NUMEL=grad_EFD[0].numel(), BLOCK=4096,
                                                  PROGRAMS=programs, num_warps=4)


def _release(t: torch.Tensor) -> None:
    """Frees a dead saved buffer now (safe here: a second backward through the same graph is refused)."""
    t.untyped_storage().resize_(0)


class _GroupedGLUExperts(torch.autograd.Function):
    """The whole expert computation of one layer; see the module docstring for the steps."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EFD, v1_EFD, w2_EFD, experts_TK, ops):
        t, k = experts_TK.shape
        plan = plan_routing(experts_TK, w1_EFD.shape[0])
        x_ND = x_TD.index_select(0, plan.token_N)
        g_NF = ops.gmm(x_ND, w1_EFD.transpose(-2, -1), plan.offs_E)
        u_NF = ops.gmm(x_ND, v1_EFD.transpose(-2, -1), plan.offs_E)
        w_N = weights_TK.reshape(-1).index_select(0, plan.order_N)
        hw_NF = ops.glu_forward(g_NF, u_NF, w_N)
        y_ND = ops.gmm(hw_NF, w2_EFD, plan.offs_E)
        del hw_NF
        y_TD = ops.unpermute_sum(y_ND, plan.pos_N, k)
        ctx.save_for_backward(x_ND, g_NF, u_NF, w_N, w1_EFD, v1_EFD, w2_EFD, *plan)
        ctx.ops, ctx.k, ctx.weights_dtype, ctx.consumed = ops, k, weights_TK.dtype, False
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        if ctx.consumed:
            raise RuntimeError('moe_backend grouped_mm reuses its saved activations in place during backward; '
                               'backward through the same forward twice (retain_graph=True) is not supported')
        ctx.consumed = True
        x_ND, g_NF, u_NF, w_N, w1_EFD, v1_EFD, w2_EFD, *plan_tensors = ctx.saved_tensors
        plan = RoutingPlan(*plan_tensors)
        ops, k, offs_E = ctx.ops, ctx.k, plan.offs_E
        need_x, need_w, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:5]

        dy_ND = dy_TD.contiguous().index_select(0, plan.token_N)
        dhw_NF = ops.gmm(dy_ND, w2_EFD.transpose(-2, -1), offs_E)
        dw_N = ops.glu_backward(dhw_NF, g_NF, u_NF, w_N)  # now dhw_NF holds hw, g_NF dg, u_NF du
        hw_NF, dg_NF, du_NF = dhw_NF, g_NF, u_NF
        dw2 = ops.gmm(hw_NF.t(), dy_ND, offs_E) if need_w2 else None
        del dy_ND, hw_NF, dhw_NF

        dx_TD = None
        if need_x:
            dxa_ND = ops.gmm(dg_NF, w1_EFD, offs_E)
            dxb_ND = ops.gmm(du_NF, v1_EFD, offs_E)
            dx_TD = ops.unpermute_sum(dxa_ND, plan.pos_N, k, dxb_ND)
            del dxa_ND, dxb_ND
        # dg and du are saved tensors, which autograd frees only after backward returns; free each as soon as its
        # weight gradient is done, so the last weight gradient does not stack on both (peak memory).
        dw1 = ops.gmm(dg_NF.t(), x_ND, offs_E) if need_w1 else None
        _release(dg_NF)
        dv1 = ops.gmm(du_NF.t(), x_ND, offs_E) if need_v1 else None
        _release(du_NF)
        for grad in (dw1, dv1, dw2):
            if grad is not None:
                ops.zero_empty_experts(grad, offs_E)
        dweights_TK = dw_N.index_select(0, plan.pos_N).view(-1, k).to(ctx.weights_dtype) if need_w else None
        return dx_TD, dweights_TK, dw1, dv1, dw2, None, None


def grouped_mm_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                       w1_EFD: torch.Tensor, v1_EFD: torch.Tensor, w2_EFD: torch.Tensor,
                       ops: Optional[type] = None) -> torch.Tensor:
    """The ``grouped_mm`` backend (same contract as ``eager_experts``).

    ``ops`` defaults to :class:`TritonOps` on CUDA and to :class:`TorchOps` elsewhere (the CPU path that tests
    the permutation, weight folding and gradient logic without a GPU).
    """
    d, f = x_TD.shape[1], w1_EFD.shape[1]
    if ops is None:
        ops = TritonOps if x_TD.is_cuda else TorchOps
    if ops is TritonOps and (d % 8 or f % 8):
        raise ValueError(f'moe_backend grouped_mm needs d_model ({d}) and ffn_hidden_size ({f}) to be multiples '
                         'of 8 (torch._grouped_mm wants 16-byte row strides); use moe_backend eager')
    x_TD, weights_TK, w1_EFD, v1_EFD, w2_EFD = compute_dtype_cast(x_TD, weights_TK, w1_EFD, v1_EFD, w2_EFD)
    no_autocast = torch.autocast('cuda', enabled=False) if x_TD.is_cuda else contextlib.nullcontext()
    with no_autocast:
        return _GroupedGLUExperts.apply(x_TD.contiguous(), weights_TK, w1_EFD, v1_EFD, w2_EFD, experts_TK, ops)


# Tile shapes for the Triton grouped GEMM, per form (rows grouped / contraction grouped): the best of the few that
# `benchmarks/moe_layer.py --cases triton_gemm` compares, on an H100 with Triton 3.6 at the DBRX shape.
TRITON_GEMM_CONFIG = {'rows': dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
                      'k': dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)}


def triton_gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs_E)`` in Triton, for the two forms the experts use, without host sync:
    2D x 3D (a's rows grouped by expert, ``b[e]`` per group) and 2D x 2D (contraction grouped: ``out[e] =
    a[:, group] @ b[group]``). Any strides; bf16 or fp32. ``offs`` as torch._grouped_mm names it."""
    offs_E = offs
    cfg = dict(TRITON_GEMM_CONFIG['rows' if b.dim() == 3 else 'k'], **(config or {}))
    bm, bn, bk, group_m = cfg.pop('BM'), cfg.pop('BN'), cfg.pop('BK'), cfg.pop('GROUP_M')
    num_experts = offs_E.shape[0]
    if b.dim() == 3:
        rows, k = a.shape
        n = b.shape[2]
        out = torch.empty((rows, n), dtype=a.dtype, device=a.device)
        counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
        tile_end_E = torch.cumsum(torch.div(counts_E + bm - 1, bm, rounding_mode='floor'), 0).to(torch.int32)
        e_pad = triton.next_power_of_2(num_experts)
        if e_pad != num_experts:  # padded experts own no tiles
            tile_end_E = torch.cat([tile_end_E, tile_end_E[-1:].expand(e_pad - num_experts)])
        grid = ((triton.cdiv(rows, bm) + num_experts) * triton.cdiv(n, bn),)  # an upper bound: no sync
        _gmm_rows_kernel[grid](a, b, out, offs_E, tile_end_E, n, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               b.stride(2), out.stride(0), out.stride(1), E=e_pad, K=k, BM=bm, BN=bn, BK=bk,
                               GROUP_M=group_m, **cfg)
        return out
    m, n = a.shape[0], b.shape[1]
    out = torch.empty((num_experts, m, n), dtype=a.dtype, device=a.device)
    grid = (num_experts * triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gmm_k_kernel[grid](a, b, out, offs_E, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                        out.stride(1), out.stride(2), M=m, N=n, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, **cfg)
    return out


class TritonGemmOps(TritonOps):
    """TritonOps with the grouped GEMMs in Triton as well: torch without ``_grouped_mm`` (the pinned 2.7)."""

    gmm = staticmethod(triton_gmm)


def grouped_mm_triton_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                              w1_EFD: torch.Tensor, v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The ``grouped_mm_triton`` backend: ``grouped_mm`` with its GEMMs in Triton, for torch without
    ``torch._grouped_mm`` (the pinned 2.7) and GPUs without its fast path (sm80)."""
    return grouped_mm_experts(x_TD, weights_TK, experts_TK, w1_EFD, v1_EFD, w2_EFD, ops=TritonGemmOps)
