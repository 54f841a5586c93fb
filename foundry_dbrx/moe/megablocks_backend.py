"""The ``megablocks`` expert backend: the grouped GEMMs MegaBlocks' dropless MoE runs (grouped_gemm's ``gmm``).

MegaBlocks' ``dMoE`` (``mlp_impl: grouped``) owns its router, its parameters, its token permutation and a
module-level list of load-balancing statistics. Here only its GEMMs run, on views of our ``w1``, ``v1`` and ``w2``
and on the rows our dispatcher grouped by expert; routing, dispatch and the load-balancing loss stay ours, so
nothing module-level needs clearing, and MegaBlocks' expert layout (the same fused ``[E*F, D]``) needs no copy.

grouped_gemm takes the per-expert sizes on the host, so this path reads them back once per layer (one sync),
as MegaBlocks itself does; its GEMMs need bf16 (``ffn_config.bf16: true`` in LLM Foundry's terms).

Legend: D d_model, F ffn_hidden_size, El experts on this rank, R rows in expert order.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from foundry_dbrx.moe.kernels import compute_dtype_cast

__all__ = ['available', 'megablocks_experts', 'INSTALL_HINT']

INSTALL_HINT = "pip install 'foundry-dbrx[gpu]' (MegaBlocks 0.10 and grouped_gemm; they compile CUDA code)"

_modules: Optional[SimpleNamespace] = None
_import_error: Optional[BaseException] = None


def _megablocks() -> SimpleNamespace:
    """Imports grouped_gemm (MegaBlocks' GEMM package) once; raises ImportError with the install hint if missing."""
    global _modules, _import_error
    if _modules is None and _import_error is None:
        try:
            import grouped_gemm.ops as gg_ops
            _modules = SimpleNamespace(gg=gg_ops)
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


def megablocks_experts(x_RD: torch.Tensor, w_R: torch.Tensor, offs_El: torch.Tensor, w1_EFD: torch.Tensor,
                       v1_EFD: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The ``megablocks`` backend (the contract of :data:`foundry_dbrx.moe.experts.ExpertFn`)."""
    mods = _megablocks()
    x_RD, w_R, w1_EFD, v1_EFD, w2_EFD = compute_dtype_cast(x_RD, w_R, w1_EFD, v1_EFD, w2_EFD)
    if x_RD.dtype != torch.bfloat16 or w1_EFD.dtype != torch.bfloat16:
        raise TypeError(f'moe_backend megablocks runs grouped_gemm, which needs bf16 activations and weights '
                        f'(got {x_RD.dtype} and {w1_EFD.dtype}); use bf16 or amp_bf16, or moe_backend grouped_mm')
    # grouped_gemm's batch sizes live on the host: one sync
    sizes_El = torch.diff(offs_El, prepend=offs_El.new_zeros(1)).cpu().to(torch.long)
    no_autocast = torch.autocast('cuda', enabled=False) if x_RD.is_cuda else contextlib.nullcontext()
    with no_autocast:
        x_RD = x_RD.contiguous()
        g_RF = mods.gg.gmm(x_RD, w1_EFD, sizes_El, trans_b=True)
        u_RF = mods.gg.gmm(x_RD, v1_EFD, sizes_El, trans_b=True)
        return mods.gg.gmm(F.silu(g_RF) * u_RF * w_R[:, None], w2_EFD, sizes_El)
