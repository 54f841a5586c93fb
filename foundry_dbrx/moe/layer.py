"""The DBRX MoE FFN (router -> dispatch -> experts -> combine) and its LLM Foundry ``ffns`` registry builder.

Legend: B batch, S sequence, T = B*S tokens, D d_model, E experts, K top_k, R rows the local experts run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from foundry_dbrx.config import DbrxFFNConfig, DbrxTrainingConfig
from foundry_dbrx.moe.dispatch import LocalDispatcher
from foundry_dbrx.moe.experts import DbrxExperts
from foundry_dbrx.moe.router import DbrxRouter, Routing

__all__ = ['DbrxFFN', 'MPTDbrxMoE', 'build_dbrx_moe_ffn', 'init_dbrx_experts_in_mpt', 'routed_experts']


class DbrxFFN(nn.Module):
    """Dropless top-k MoE with GLU/SiLU experts. Parameter names match HF's ``ffn.router`` / ``ffn.experts.mlp``.

    ``forward`` returns the output and this layer's :class:`Routing`; auxiliary losses are computed by whoever
    holds the routing of every layer (the Composer model), so there is no module state to clear between steps.

    ``dispatcher`` (not a module: it holds no parameters) moves the tokens to their experts and back; it is a
    :class:`LocalDispatcher` until :mod:`foundry_dbrx.parallelize` makes the layer expert-parallel.
    """

    def __init__(self, d_model: int, cfg: DbrxFFNConfig, backend: str = 'auto', bias_balancing: bool = False,
                 device=None, dtype=None, expert_dtype=None):
        super().__init__()
        self.cfg = cfg
        self.router = DbrxRouter(d_model, cfg.moe_num_experts, cfg.moe_top_k, jitter_eps=cfg.moe_jitter_eps,
                                 normalize_expert_weights=cfg.moe_normalize_expert_weights,
                                 select_with_bias=bias_balancing, device=device, dtype=dtype)
        self.experts = DbrxExperts(d_model, cfg.ffn_hidden_size, cfg.moe_num_experts, backend=backend,
                                   device=device, dtype=expert_dtype or dtype)
        self.dispatcher = LocalDispatcher(cfg.moe_num_experts)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        return self.run_experts(x_TD, routing).view_as(x_BSD), routing

    def run_experts(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """dispatch -> experts -> combine (kept out of ``torch.compile``'s graph by ``training.compile: block``)."""
        x_RD, w_R, offs_El, state = self.dispatcher.dispatch(x_TD, routing)
        return self.dispatcher.combine(self.experts(x_RD, w_R, offs_El), state)

    def extra_repr(self) -> str:
        return f'dispatcher={self.dispatcher!r}'


def routed_experts(fn: Callable[..., torch.Tensor], x_TD: torch.Tensor, weights_TK: torch.Tensor,
                   experts_TK: torch.Tensor, w1_EFD: torch.Tensor, v1_EFD: torch.Tensor, w2_EFD: torch.Tensor,
                   dispatcher: Optional[LocalDispatcher] = None) -> torch.Tensor:
    """The expert half of the layer for a given routing: dispatch, the backend ``fn`` on this rank's experts
    (``w*_EFD`` hold them: all E, or El under expert parallelism), combine. For tests and benchmarks, which drive
    the backends without a router."""
    dispatcher = dispatcher or LocalDispatcher(w1_EFD.shape[0])
    routing = Routing(probs_TE=None, weights_TK=weights_TK, experts_TK=experts_TK)
    x_RD, w_R, offs_El, state = dispatcher.dispatch(x_TD, routing)
    return dispatcher.combine(fn(x_RD, w_R, offs_El, w1_EFD, v1_EFD, w2_EFD), state)


class MPTDbrxMoE(nn.Module):
    """``DbrxFFN`` for LLM Foundry's MPT (``ffn_config.ffn_type: dbrx_moe``): returns only the output tensor.

    MPT's blocks take a tensor back, so the routing leaves by another door: the ``mpt_dbrx_moe`` Composer model
    (:mod:`foundry_dbrx.mpt`) collects every layer's :class:`Routing` during its forward (a hook on ``self.ffn``
    that lives for that forward only) and returns them with the logits, and its ``loss`` forms the auxiliary losses
    exactly as the ``dbrx`` model does. Under another model nobody would collect them, so the layer refuses to
    train rather than drop its load-balancing loss.

    ``expert_dtype`` (``ffn_config.bf16`` / ``fp16``) keeps w1, v1 and w2 in that dtype, parameters and hence
    gradients and optimizer moments, as MegaBlocks does; the router stays fp32 (see :func:`build_dbrx_moe_ffn`).
    """

    def __init__(self, d_model: int, cfg: DbrxFFNConfig, training: DbrxTrainingConfig, device=None,
                 expert_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.ffn = DbrxFFN(d_model, cfg, backend=training.moe_backend, bias_balancing=training.moe_bias_balancing,
                           device=device, expert_dtype=expert_dtype)
        if expert_dtype is not None:
            # FSDP (1 and 2) flattens or groups one unit's parameters in one dtype, and LLM Foundry wraps the
            # whole MPTBlock: fp32 attention and router beside low-precision experts would be refused there. The
            # experts become their own unit, which Composer's auto-wrap honours under both FSDP versions. The unit
            # is DbrxExperts, not its DbrxExpertGLU: FSDP gathers a unit's weights when the unit's forward runs,
            # and the GLU's weights are read by DbrxExperts.forward (the GLU has no forward).
            self.ffn.experts._fsdp_wrap = True
        self.training_cfg = training
        self.losses_collected = False  # set by the Composer model that collects the routings and adds the losses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not self.losses_collected and (
                self.ffn.cfg.moe_loss_weight > 0 or self.training_cfg.moe_z_loss_weight > 0):
            raise RuntimeError(
                "ffn_type dbrx_moe trains inside LLM Foundry's MPT only as model name 'mpt_dbrx_moe', which "
                'adds its load-balancing loss to the training loss')
        y, _ = self.ffn(x)
        return y


def build_dbrx_moe_ffn(d_model: int, expansion_ratio: float, device: Optional[str] = None, bias: bool = False,
                       fc_type: Optional[dict] = None, moe_num_layers: Optional[int] = None,
                       **ffn_config: Any) -> nn.Module:
    """LLM Foundry ``ffns`` builder. ``ffn_config`` takes ``DbrxFFNConfig``'s keys plus the MoE training choices
    (``moe_backend``, ``moe_lb_loss_type``, ``moe_z_loss_weight``, ... of :data:`_MPT_TRAINING_KEYS`: MPT has no
    other place for them); without ``ffn_hidden_size`` the hidden size is ``expansion_ratio * d_model``.
    ``moe_num_layers``, if given, must be the model's n_layers (the
    ``mpt_dbrx_moe`` model checks it); the losses no longer need it, as the model averages over the layers it finds.

    ``bf16: true`` (or ``fp16: true``), MegaBlocks' keys, creates and keeps the expert weights (w1, v1, w2) in
    that dtype: half the bytes of fp32 weights, gradients and Adam moments, at the price of updating them in low
    precision (docs/moe.md). The router stays fp32: it is E x D per layer (nothing to save), and its small
    updates decide the routing and its load balance.
    """
    if bias:
        raise ValueError('ffn_config.bias (True) must be False for dbrx_moe: DBRX experts have no biases '
                         '(set no_bias: true in the MPT config)')
    if fc_type is not None and fc_type.get('name', 'torch') != 'torch':
        raise ValueError(f"fc_type ({fc_type!r}) must be {{'name': 'torch'}} for dbrx_moe")
    if moe_num_layers is not None and (not isinstance(moe_num_layers, int) or moe_num_layers <= 0):
        raise ValueError(f'ffn_config.moe_num_layers ({moe_num_layers!r}) must be a positive integer')
    ffn_config.setdefault('ffn_hidden_size', int(round(expansion_ratio * d_model)))
    expert_dtype = _expert_dtype(ffn_config)
    training = DbrxTrainingConfig.from_dict({k: ffn_config.pop(k) for k in _MPT_TRAINING_KEYS if k in ffn_config})
    cfg = DbrxFFNConfig.from_dict(ffn_config)
    if device == 'mixed':  # LLM Foundry's "rank 0 on cpu, others on meta"; the wrapper materialises later.
        device = None
    return MPTDbrxMoE(d_model, cfg, training, device=device, expert_dtype=expert_dtype)


# MegaBlocks' names for the dtype its expert weights are created in (megablocks.layers.arguments.Arguments).
_EXPERT_DTYPE_KEYS = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def _expert_dtype(ffn_config: dict) -> Optional[torch.dtype]:
    """Pops ``bf16`` / ``fp16`` from ``ffn_config``: the expert weights' dtype, None for the default (fp32)."""
    chosen = []
    for key in _EXPERT_DTYPE_KEYS:
        value = ffn_config.pop(key, False)
        if not isinstance(value, bool):
            raise ValueError(f'ffn_config.{key} ({value!r}) must be true or false')
        if value:
            chosen.append(key)
    if len(chosen) > 1:
        raise ValueError('ffn_config.bf16 (true) and ffn_config.fp16 (true) must not both be true: the expert '
                         'weights are kept in one dtype')
    return _EXPERT_DTYPE_KEYS[chosen[0]] if chosen else None


# The training choices an MPT ffn_config may carry (expert parallelism is the dbrx model's only).
_MPT_TRAINING_KEYS = ('moe_backend', 'moe_lb_loss_type', 'moe_lb_loss_scope', 'moe_z_loss_weight',
                      'moe_bias_balancing', 'moe_bias_update_rate')


def init_dbrx_experts_in_mpt(module: nn.Module, init_fn_, init_div_is_residual: Any = True,
                             div_is_residual: float = 1.0, **kwargs: Any) -> bool:
    """LLM Foundry ``module_init_fns`` entry: MPT's initialiser calls it for every module it walks; it claims
    our expert weights (w2 divided like MPT's other residual-writing weights) and the routers' balancing bias (a
    buffer, which MPT's initialiser would leave as whatever memory a meta-device materialisation gave it)."""
    from foundry_dbrx.moe.experts import DbrxExpertGLU

    if isinstance(module, DbrxRouter):
        module.reset_expert_bias()
        return True
    if not isinstance(module, DbrxExpertGLU):
        return False
    for w in (module.w1, module.v1, module.w2):
        init_fn_(w)
    if init_div_is_residual is not False:
        with torch.no_grad():
            module.w2.div_(div_is_residual)
    return True
