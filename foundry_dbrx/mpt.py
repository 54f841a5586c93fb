"""``mpt_dbrx_moe``: LLM Foundry's MPT with DBRX MoE FFNs, its router losses and MoE-aware FLOPs.

For users who keep MPT's attention and block but want DBRX's experts: ``model.name: mpt_dbrx_moe`` with an
MPT config whose ``ffn_config`` takes ``dbrx_moe``'s keys (``moe_num_experts``, ``moe_top_k``, ...).

The routing reaches the loss as in the ``dbrx`` model: the forward returns every layer's :class:`Routing` with the
logits (:class:`MoECausalLMOutputWithPast`), and ``loss`` forms the load-balancing and z-losses from them. MPT's
blocks only pass tensors on, so the forward gathers the routings with hooks on the DBRX FFNs that exist for the
duration of that forward and no longer: no module keeps a pending loss between steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Mapping, Optional

import torch
from llmfoundry.models.mpt import ComposerMPTCausalLM
from llmfoundry.models.mpt.modeling_mpt import compute_loss_from_logits
from transformers.modeling_outputs import CausalLMOutputWithPast

from foundry_dbrx.composer_model import router_loss_terms
from foundry_dbrx.moe.experts import DbrxExpertGLU
from foundry_dbrx.moe.layer import MPTDbrxMoE
from foundry_dbrx.moe.router import Routing

__all__ = ['ComposerMPTDbrxMoE', 'MoECausalLMOutputWithPast']


@dataclass
class MoECausalLMOutputWithPast(CausalLMOutputWithPast):
    """MPT's output plus each MoE layer's routing, in layer order."""

    routings: Optional[tuple[Routing, ...]] = None


class ComposerMPTDbrxMoE(ComposerMPTCausalLM):
    """MPT whose FFNs are ``dbrx_moe``; the loss is ``ce + moe_loss_weight * lb_loss + moe_z_loss_weight * z_loss``
    with the same formulas, scope and keys as the ``dbrx`` model."""

    def __init__(self, tokenizer: Any = None, **kwargs: Any):
        ffn = dict(kwargs.get('ffn_config') or {})
        if ffn.setdefault('ffn_type', 'dbrx_moe') != 'dbrx_moe':
            raise ValueError(f"ffn_config.ffn_type ({ffn['ffn_type']!r}) must be 'dbrx_moe' for model mpt_dbrx_moe")
        if 'moe_num_layers' in ffn and ffn['moe_num_layers'] != kwargs.get('n_layers', ffn['moe_num_layers']):
            raise ValueError(f"ffn_config.moe_num_layers ({ffn['moe_num_layers']}) must equal n_layers "
                             f"({kwargs['n_layers']})")
        super().__init__(tokenizer=tokenizer, **{**kwargs, 'ffn_config': ffn})
        self._moe_layers = [m for m in self.modules() if isinstance(m, MPTDbrxMoE)]
        if not self._moe_layers:
            raise ValueError('mpt_dbrx_moe built no dbrx_moe layer (check ffn_config and n_layers)')
        for layer in self._moe_layers:
            layer.losses_collected = True
        first = self._moe_layers[0]
        self.ffn_config, self.training_config = first.ffn.cfg, first.training_cfg
        self.lb_loss_key = f'lb_loss_{self.training_config.moe_lb_loss_type}'
        self.bias_updates_attached = False  # set by the dbrx_expert_load callback, which moves the routers' bias

    @contextlib.contextmanager
    def _collect_routings(self) -> Iterator[list[Routing]]:
        routings: list[Routing] = []
        handles = [layer.ffn.register_forward_hook(lambda module, args, out: routings.append(out[1]))
                   for layer in self._moe_layers]
        try:
            yield routings
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, batch: Mapping) -> MoECausalLMOutputWithPast:
        with self._collect_routings() as routings:
            out = super().forward(batch)
        return MoECausalLMOutputWithPast(**out, routings=tuple(routings))

    def loss(self, outputs: MoECausalLMOutputWithPast, batch: Mapping) -> dict[str, torch.Tensor]:
        if not outputs.routings or len(outputs.routings) != len(self._moe_layers):
            raise RuntimeError(f'the forward recorded the routing of {len(outputs.routings or ())} of '
                               f'{len(self._moe_layers)} dbrx_moe layers')
        ce = compute_loss_from_logits(outputs, self.shift_labels, batch['labels'], self.loss_fn)
        return router_loss_terms(self, ce, outputs.routings, self.ffn_config, self.training_config,
                                 self.lb_loss_key)

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
