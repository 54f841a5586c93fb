"""Mixture-of-experts FFN: router, token dispatch, expert backends and load-balancing losses."""

from foundry_dbrx.moe.dispatch import AllToAllDispatcher, LocalDispatcher, RoutingPlan, plan_routing
from foundry_dbrx.moe.experts import BACKENDS, DbrxExpertGLU, DbrxExperts, eager_experts, resolve_backend
from foundry_dbrx.moe.layer import DbrxFFN, MPTDbrxMoE, build_dbrx_moe_ffn
from foundry_dbrx.moe.losses import load_balancing_loss
from foundry_dbrx.moe.router import DbrxRouter, Routing

__all__ = ['AllToAllDispatcher', 'BACKENDS', 'DbrxExpertGLU', 'DbrxExperts', 'DbrxFFN', 'DbrxRouter',
           'LocalDispatcher', 'MPTDbrxMoE', 'Routing', 'RoutingPlan', 'build_dbrx_moe_ffn', 'eager_experts',
           'load_balancing_loss', 'plan_routing', 'resolve_backend']
