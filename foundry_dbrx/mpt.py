"""``mpt_dbrx_moe``: LLM Foundry's MPT with DBRX MoE FFNs, its load-balancing loss and MoE-aware FLOPs.

For users who keep MPT's attention and block but want DBRX's experts: ``model.name: mpt_dbrx_moe`` with an
MPT config whose ``ffn_config`` takes ``dbrx_moe``'s keys (``moe_num_experts``, ``moe_top_k``, ...).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

import torch
from llmfoundry.models.mpt import ComposerMPTCausalLM

from foundry_dbrx.moe.experts import DbrxExpertGLU
from foundry_dbrx.moe.layer import MPTDbrxMoE

__all__ = ['ComposerMPTDbrxMoE']


class ComposerMPTDbrxMoE(ComposerMPTCausalLM):
    """MPT whose FFNs are ``dbrx_moe``; the loss is ``ce + sum over layers of moe_loss_weight * lb_loss / L``."""

    def __init__(self, tokenizer: Any = None, **kwargs: Any):
        ffn = dict(kwargs.get('ffn_config') or {})
        if ffn.setdefault('ffn_type', 'dbrx_moe') != 'dbrx_moe':
            raise ValueError(f"ffn_config.ffn_type ({ffn['ffn_type']!r}) must be 'dbrx_moe' for model mpt_dbrx_moe")
        if 'moe_num_layers' in ffn and ffn['moe_num_layers'] != kwargs.get('n_layers', ffn['moe_num_layers']):
            raise ValueError(f"ffn_config.moe_num_layers ({ffn['moe_num_layers']}) must equal n_layers "
                             f"({kwargs['n_layers']})")
        super().__init__(tokenizer=tokenizer, **{**kwargs, 'ffn_config': ffn})
        self._moe_layers = [m for m in self.modules() if isinstance(m, MPTDbrxMoE)]
        for layer in self._moe_layers:
            layer.lb_loss_collected = True
            layer.num_layers = len(self._moe_layers)  # MPTConfig's n_layers, its default included

    def loss(self, outputs: Any, batch: Mapping) -> dict[str, torch.Tensor]:
        ce = super().loss(outputs, batch)
        parts = [lbl for lbl in (layer.pop_lb_loss() for layer in self._moe_layers) if lbl is not None]
        weight = self._moe_layers[0].ffn.cfg.moe_loss_weight if self._moe_layers else 0
        if self.training and torch.is_grad_enabled() and weight > 0 and len(parts) != len(self._moe_layers):
            # Reentrant activation checkpointing runs the blocks without autograd: no layer recorded its loss.
            raise RuntimeError(
                f'only {len(parts)} of {len(self._moe_layers)} dbrx_moe layers recorded a load-balancing loss; with '
                'activation checkpointing set fsdp_config.activation_checkpointing_reentrant: false')
        lbl = torch.stack(parts).sum() if parts else torch.zeros_like(ce)
        return {'total': ce + lbl, 'loss': ce, 'lb_loss_weighted': lbl}

    @cached_property
    def n_active_params(self) -> int:
        """All parameters but the experts a token does not visit: experts count at top_k / E."""
        inactive = 0
        for layer in self._moe_layers:
            cfg = layer.ffn.cfg
            glu: DbrxExpertGLU = layer.ffn.experts.mlp
            per_expert = 3 * glu.ffn_hidden_size * glu.d_model
            inactive += (cfg.moe_num_experts - cfg.moe_top_k) * per_expert
        return super().n_active_params - inactive

