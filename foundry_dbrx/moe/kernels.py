"""Kernels behind the MoE layer's two halves: the dispatch (row gathers and the gather-sum that un-permutes) and the
grouped GLU experts (grouped GEMMs, the fused SiLU-GLU forward and backward with the routing weight folded in).

Each op has two implementations behind one small interface, so the same autograd functions run everywhere:
``TorchOps`` (plain PyTorch: the CPU path of the tests and CI, and the reference for the kernels) and ``TritonOps``
(``torch._grouped_mm`` plus the Triton kernels below; CUDA, or Triton's CPU interpreter in the tests).
``TritonGemmOps`` also runs the grouped GEMMs in Triton (``triton_gmm``), for torch without ``torch._grouped_mm``.

Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k, N = T*K routed rows in expert order.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the reference ops
    triton = None

__all__ = ['TorchOps', 'TritonOps', 'TritonGemmOps', 'triton_gmm', 'TRITON_GEMM_CONFIG', 'compute_dtype_cast',
           'ops_for']


def compute_dtype_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Casts to autocast's dtype where CUDA autocast is on (these backends run their GEMMs outside autocast)."""
    if tensors[0].is_cuda and torch.is_autocast_enabled('cuda'):
        dtype = torch.get_autocast_dtype('cuda')
        return tuple(t.to(dtype) for t in tensors)
    return tensors


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
    def unpermute_sum(src_ND: torch.Tensor, pos_N: torch.Tensor, k: int) -> torch.Tensor:
        """``out[t] = sum_k src[pos[t*K + k]]``, accumulated in fp32 (fp64 stays fp64)."""
        rows = src_ND.index_select(0, pos_N).to(torch.promote_types(src_ND.dtype, torch.float32))
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
    def _unpermute_sum_kernel(src_ptr, pos_ptr, out_ptr, D, stride_src, stride_out, K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            p = tl.load(pos_ptr + tok * K + j).to(tl.int64)
            acc += tl.load(src_ptr + p * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
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
    def unpermute_sum(src_ND: torch.Tensor, pos_N: torch.Tensor, k: int) -> torch.Tensor:
        t, d = pos_N.shape[0] // k, src_ND.shape[1]
        out = torch.empty((t, d), dtype=src_ND.dtype, device=src_ND.device)
        if t:
            block = 1024
            _unpermute_sum_kernel[(t, triton.cdiv(d, block))](src_ND, pos_N, out, d, src_ND.stride(0),
                                                              out.stride(0), K=k, BLOCK_D=block, num_warps=4)
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


def ops_for(x: torch.Tensor) -> type:
    """The dispatch kernels for a tensor: Triton's on CUDA (where Triton is installed), plain PyTorch elsewhere."""
    return TritonOps if x.is_cuda and triton is not None else TorchOps
