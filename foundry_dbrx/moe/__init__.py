"""Mixture-of-experts FFN: router, expert backends and load-balancing losses."""

from foundry_dbrx.moe.experts import BACKENDS, DbrxExpertGLU, DbrxExperts, eager_experts, resolve_backend
from foundry_dbrx.moe.layer import DbrxFFN, MPTDbrxMoE, build_dbrx_moe_ffn
from foundry_dbrx.moe.losses import load_balancing_loss
from foundry_dbrx.moe.router import DbrxRouter, Routing

__all__ = ['BACKENDS', 'DbrxExpertGLU', 'DbrxExperts', 'DbrxFFN', 'DbrxRouter', 'MPTDbrxMoE', 'Routing',
           'build_dbrx_moe_ffn', 'eager_experts', 'load_balancing_loss', 'resolve_backend']
