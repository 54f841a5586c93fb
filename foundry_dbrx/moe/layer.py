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
from foundry_dbrx.moe.losses import load_balancing_loss
from foundry_dbrx.moe.router import DbrxRouter, Routing

__all__ = ['DbrxFFN', 'MPTDbrxMoE', 'build_dbrx_moe_ffn', 'init_dbrx_experts_in_mpt', 'routed_experts']


class DbrxFFN(nn.Module):
    """Dropless top-k MoE with GLU/SiLU experts. Parameter names match HF's ``ffn.router`` / ``ffn.experts.mlp``.

    ``forward`` returns the output and this layer's :class:`Routing`; auxiliary losses are computed by whoever
    holds the routing of every layer (the Composer model), so there is no module state to clear between steps.

    ``dispatcher`` (not a module: it holds no parameters) moves the tokens to their experts and back; it is a
    :class:`LocalDispatcher` until :mod:`foundry_dbrx.parallelize` makes the layer expert-parallel.
    """

    def __init__(self, d_model: int, cfg: DbrxFFNConfig, backend: str = 'auto', device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.router = DbrxRouter(d_model, cfg.moe_num_experts, cfg.moe_top_k, jitter_eps=cfg.moe_jitter_eps,
                                 normalize_expert_weights=cfg.moe_normalize_expert_weights, device=device,
                                 dtype=dtype)
        self.experts = DbrxExperts(d_model, cfg.ffn_hidden_size, cfg.moe_num_experts, backend=backend,
                                   device=device, dtype=dtype)
        self.dispatcher = LocalDispatcher(cfg.moe_num_experts)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        x_RD, w_R, offs_El, state = self.dispatcher.dispatch(x_TD, routing)
        y_RD = self.experts(x_RD, w_R, offs_El)
        y_TD = self.dispatcher.combine(y_RD, state)
        return y_TD.view_as(x_BSD), routing

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

    MPT's blocks take a tensor back, so in training this layer keeps its weighted load-balancing loss
    (``moe_loss_weight * lb_loss / n_layers``, still in the graph) until the Composer model collects it with
    :meth:`pop_lb_loss` and adds it to the loss it returns, where Composer's microbatch scaling applies to it like
    to the cross entropy. Only the ``mpt_dbrx_moe`` model (:mod:`foundry_dbrx.mpt`) collects it; under another
    model the layer refuses to train rather than drop its load-balancing loss.
    """

    def __init__(self, d_model: int, cfg: DbrxFFNConfig, training: DbrxTrainingConfig, num_layers: Optional[int],
                 device=None):
        super().__init__()
        self.ffn = DbrxFFN(d_model, cfg, backend=training.moe_backend, device=device)
        self.training_cfg = training
        self.num_layers = num_layers
        self.lb_loss_collected = False  # set by the Composer model that adds pop_lb_loss() to its loss
        self._pending_lb_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, routing = self.ffn(x)
        cfg = self.ffn.cfg
        if self.training and torch.is_grad_enabled() and cfg.moe_loss_weight > 0:
            if not self.lb_loss_collected or not self.num_layers:
                raise RuntimeError(
                    "ffn_type dbrx_moe trains inside LLM Foundry's MPT only as model name 'mpt_dbrx_moe', which "
                    'adds its load-balancing loss to the training loss (and sets ffn_config.moe_num_layers)')
            lbl = load_balancing_loss([routing], cfg.moe_num_experts, self.training_cfg.moe_lb_loss_type)
            self._pending_lb_loss = lbl * (cfg.moe_loss_weight / self.num_layers)
        return y

    def pop_lb_loss(self) -> Optional[torch.Tensor]:
        """The weighted load-balancing loss of the last training forward (None if there was none); clears it."""
        lbl, self._pending_lb_loss = self._pending_lb_loss, None
        return lbl


def build_dbrx_moe_ffn(d_model: int, expansion_ratio: float, device: Optional[str] = None, bias: bool = False,
                       fc_type: Optional[dict] = None, moe_num_layers: Optional[int] = None,
                       **ffn_config: Any) -> nn.Module:
    """LLM Foundry ``ffns`` builder. ``ffn_config`` takes ``DbrxFFNConfig``'s keys plus the MoE training choices
    ``moe_backend`` and ``moe_lb_loss_type`` (MPT has no other place for them); without ``ffn_hidden_size`` the
    hidden size is ``expansion_ratio * d_model``. ``moe_num_layers`` (the model's n_layers, which the
    ``mpt_dbrx_moe`` model fills in) divides each layer's load-balancing loss, so their sum is the mean over layers.
    """
    if bias:
        raise ValueError('ffn_config.bias (True) must be False for dbrx_moe: DBRX experts have no biases '
                         '(set no_bias: true in the MPT config)')
    if fc_type is not None and fc_type.get('name', 'torch') != 'torch':
        raise ValueError(f"fc_type ({fc_type!r}) must be {{'name': 'torch'}} for dbrx_moe")
    if moe_num_layers is not None and (not isinstance(moe_num_layers, int) or moe_num_layers <= 0):
        raise ValueError(f'ffn_config.moe_num_layers ({moe_num_layers!r}) must be a positive integer')
    ffn_config.setdefault('ffn_hidden_size', int(round(expansion_ratio * d_model)))
    training = DbrxTrainingConfig.from_dict({k: ffn_config.pop(k) for k in _MPT_TRAINING_KEYS if k in ffn_config})
    cfg = DbrxFFNConfig.from_dict(ffn_config)
    if device == 'mixed':  # LLM Foundry's "rank 0 on cpu, others on meta"; the wrapper materialises later.
        device = None
    return MPTDbrxMoE(d_model, cfg, training, num_layers=moe_num_layers, device=device)


# The training choices an MPT ffn_config may carry (expert parallelism is the dbrx model's only).
_MPT_TRAINING_KEYS = ('moe_backend', 'moe_lb_loss_type')


def init_dbrx_experts_in_mpt(module: nn.Module, init_fn_, init_div_is_residual: Any = True,
                             div_is_residual: float = 1.0, **kwargs: Any) -> bool:
    """LLM Foundry ``module_init_fns`` entry: MPT's initialiser calls it for every module it walks; it claims
    our expert weights (w2 divided like MPT's other residual-writing weights)."""
    from foundry_dbrx.moe.experts import DbrxExpertGLU

    if not isinstance(module, DbrxExpertGLU):
        return False
    for w in (module.w1, module.v1, module.w2):
        init_fn_(w)
    if init_div_is_residual is not False:
        with torch.no_grad():
            module.w2.div_(div_is_residual)
    return True
