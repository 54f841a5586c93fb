"""The routers' balancing bias across formats.

``transformer.blocks.{i}.ffn.router.expert_bias`` (a buffer of aux-loss-free balancing, docs/moe.md) has no place in
HF's DBRX: an export writes it into config.json as ``foundry_dbrx_router_bias`` (one list of E floats per layer;
left out when every bias is zero), which transformers keeps as a config attribute and ignores, so the safetensors
hold exactly HF's keys and HF's forward routes without it. Every way back (HF -> Composer, ``pretrained_hf_dir``)
restores it bit for bit (fp32 values survive JSON's float64 exactly).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from foundry_dbrx.config import ROUTER_BIAS_HF_KEY, DbrxConfig

__all__ = ['ROUTER_BIAS_KEY', 'ROUTER_BIAS_HF_KEY', 'split_router_bias', 'router_bias_from_state',
           'router_bias_from_hf_config', 'set_router_bias']

ROUTER_BIAS_KEY = 'transformer.blocks.{i}.ffn.router.expert_bias'
_ROUTER_BIAS_RE = re.compile(r'transformer\.blocks\.(\d+)\.ffn\.router\.expert_bias')


def split_router_bias(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(weight keys, router-bias keys) of a state dict's keys."""
    keys = list(keys)
    bias = [k for k in keys if _ROUTER_BIAS_RE.fullmatch(k)]
    return [k for k in keys if k not in set(bias)], bias


def router_bias_from_state(tensors: Mapping[str, torch.Tensor], cfg: DbrxConfig, source: str) -> torch.Tensor:
    """The ``[n_layers, E]`` fp32 bias of every layer's router from state-dict tensors (all layers or an error)."""
    want = [ROUTER_BIAS_KEY.format(i=i) for i in range(cfg.n_layers)]
    e = cfg.ffn_config.moe_num_experts
    problems = [k for k in tensors if k not in want] + [k for k in want if k not in tensors]
    problems += [f'{k} has {list(tensors[k].shape)}, config expects [{e}]' for k in want
                 if k in tensors and tuple(tensors[k].shape) != (e,)]
    if problems:
        raise ValueError(f'{source}: router bias keys do not match the config: {", ".join(problems[:20])}')
    return torch.stack([tensors[k].detach().to('cpu', torch.float32) for k in want])


def router_bias_from_hf_config(raw: Mapping[str, Any], cfg: DbrxConfig, source: str) -> Optional[torch.Tensor]:
    """The ``[n_layers, E]`` bias an export carried in config.json, or None where it carries none."""
    value = raw.get(ROUTER_BIAS_HF_KEY)
    if value is None:
        return None
    e, n = cfg.ffn_config.moe_num_experts, cfg.n_layers
    ok = (isinstance(value, list) and len(value) == n and all(isinstance(row, list) and len(row) == e and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row) for row in value))
    if not ok:
        raise ValueError(f'{source}: {ROUTER_BIAS_HF_KEY} must be {n} lists (n_layers) of {e} finite numbers '
                         '(moe_num_experts)')
    return torch.tensor(value, dtype=torch.float32)


@torch.no_grad()
def set_router_bias(model: nn.Module, bias_LE: Optional[torch.Tensor]) -> None:
    """Gives each router of a ``DbrxForCausalLM`` its row of ``bias_LE`` (zeros when None)."""
    from foundry_dbrx.moe.router import DbrxRouter
    routers = [m for m in model.modules() if isinstance(m, DbrxRouter)]
    for i, router in enumerate(routers):
        if bias_LE is None:
            router.reset_expert_bias()
        else:
            router.expert_bias.copy_(bias_LE[i])
