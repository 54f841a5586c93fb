"""The ``megablocks`` expert backend: MegaBlocks' dropless grouped-GEMM path on our parameters and routing.

MegaBlocks' ``dMoE`` (``mlp_impl: grouped``) owns its router, its parameters and a module-level list of
load-balancing statistics. Here we drive only its kernels: its radix sort, histogram and cumsum build the bins, its
``gather`` / ``scatter`` permute the tokens (``scatter`` also applies and differentiates the routing weights), and
grouped_gemm's ``gmm`` runs the GLU on views of our ``w1``, ``v1`` and ``w2``. Routing and the load-balancing loss
stay ours (``DbrxRouter``, ``foundry_dbrx.moe.losses``), so nothing module-level needs clearing.

grouped_gemm takes the per-expert sizes on the host, so this path reads them back once per layer (one sync),
as MegaBlocks itself does; its GEMMs need bf16 (``ffn_config.bf16: true`` in LLM Foundry's terms).

Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k, N = T*K routed slots in expert order.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from foundry_dbrx.moe.grouped_mm import compute_dtype_cast

__all__ = ['available', 'megablocks_experts', 'INSTALL_HINT']

INSTALL_HINT = "pip install 'foundry-dbrx[gpu]' (MegaBlocks 0.10 and grouped_gemm; they compile CUDA code)"

_modules: Optional[SimpleNamespace] = None
_import_error: Optional[BaseException] = None


def _megablocks() -> SimpleNamespace:
    """Imports MegaBlocks' ops and grouped_gemm once; raises ImportError with the install hint if missing."""
    global _modules, _import_error
    if _modules is None and _import_error is None:
        try:
            import grouped_gemm.ops as gg_ops
            import megablocks.ops as mb_ops
            _modules = SimpleNamespace(mb=mb_ops, gg=gg_ops)
        except Exception as e:  # a broken CUDA extension raises more than ImportError
            _import_error = e
    if _modules is None:
        raise ImportError(f'moe_backend megablocks needs MegaBlocks and grouped_gemm: {INSTALL_HINT} '
                          f'({type(_import_error).__name__}: {_import_error})') from _import_error
    return _modules


def available(device: torch.device) -> Optional[str]:
    """None where MegaBlocks can run on ``device``, else why not."""
    if device.type != 'cuda':
        return f'needs a CUDA device (got {device.type})'
    try:
        _megablocks()
    except ImportError as e:
        return str(e)
    return None


def megablocks_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                       w1_EFD: torch.Tensor, v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The ``megablocks`` backend (same contract as ``eager_experts``)."""
    mods = _megablocks()
    k = experts_TK.shape[1]
    num_experts = w1_EFD.shape[0]
    x_TD, weights_TK, w1_EFD, v1_EFD, w2_EFD = compute_dtype_cast(x_TD, weights_TK, w1_EFD, v1_EFD, w2_EFD)
    if x_TD.dtype != torch.bfloat16 or w1_EFD.dtype != torch.bfloat16:
        raise TypeError(f'moe_backend megablocks runs grouped_gemm, which needs bf16 activations and weights '
                        f'(got {x_TD.dtype} and {w1_EFD.dtype}); use bf16 or amp_bf16, or moe_backend grouped_mm')

    with torch.no_grad():
        flat_N = experts_TK.reshape(-1).int()
        bin_ids_N, order_N = mods.mb.sort(flat_N, max(math.ceil(math.log2(num_experts)), 1))
        counts_E = mods.mb.histogram(flat_N, num_experts)
        bins_E = mods.mb.inclusive_cumsum(counts_E, 0)
        bins_E = bins_E.view(1) if bins_E.dim() == 0 else bins_E
        sizes_E = counts_E.cpu().to(torch.long)  # grouped_gemm's batch sizes live on the host: one sync

    no_autocast = torch.autocast('cuda', enabled=False) if x_TD.is_cuda else contextlib.nullcontext()
    with no_autocast:
        x_ND = mods.mb.gather(x_TD.contiguous(), order_N, bin_ids_N, bins_E, k)
        g_NF = mods.gg.gmm(x_ND, w1_EFD, sizes_E, trans_b=True)
        u_NF = mods.gg.gmm(x_ND, v1_EFD, sizes_E, trans_b=True)
        y_ND = mods.gg.gmm(F.silu(g_NF) * u_NF, w2_EFD, sizes_E)
        return mods.mb.scatter(y_ND, order_N, bin_ids_N, weights_TK.reshape(-1), bins_E, k)
