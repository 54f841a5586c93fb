"""HF weights straight into a model: ``ComposerDbrxCausalLM(pretrained_hf_dir=...)`` and ``model.pretrained_hf_dir``
in a YAML."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from foundry_dbrx.hf.files import HF_CONFIG
from foundry_dbrx.hf.keys import check_keys
from foundry_dbrx.hf.readers import HFSource
from foundry_dbrx.hf.router_bias import router_bias_from_hf_config, set_router_bias

__all__ = ['load_hf_weights', 'hf_param_init_fn', 'load_pretrained_hf']

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@torch.no_grad()
def load_hf_weights(model: nn.Module, hf_dir: PathLike) -> None:
    """Copies an HF DBRX checkpoint into a materialised ``DbrxForCausalLM``, one tensor at a time, after checking
    every key and shape; the routers' bias comes from config.json (zeros where it carries none)."""
    source = HFSource(hf_dir)
    params = dict(model.named_parameters())
    check_keys({k: s.shape for k, s in source.specs.items()}, model.config, str(hf_dir))
    bias_LE = _hf_router_bias(model, hf_dir)
    for key, tensor in source.iter_tensors(list(params)):
        params[key].copy_(tensor)
    set_router_bias(model, bias_LE)


def _hf_router_bias(model: nn.Module, hf_dir: PathLike) -> Optional[torch.Tensor]:
    raw = json.loads((Path(hf_dir) / HF_CONFIG).read_text())
    return router_bias_from_hf_config(raw, model.config, str(Path(hf_dir) / HF_CONFIG))


def hf_param_init_fn(model: nn.Module, hf_dir: PathLike) -> Callable[[nn.Module], None]:
    """A ``param_init_fn`` for a ``DbrxForCausalLM`` built on the meta device: when FSDP materialises a module, its
    own parameters are read from the HF shards instead of being initialised randomly (the keys are checked now),
    and a router's bias from config.json."""
    from foundry_dbrx.moe.router import DbrxRouter
    source = HFSource(hf_dir)
    check_keys({k: s.shape for k, s in source.specs.items()}, model.config, str(hf_dir))
    bias_LE = _hf_router_bias(model, hf_dir)
    owner = {id(m): prefix for prefix, m in model.named_modules()}
    layer_of_router = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, DbrxRouter))}

    @torch.no_grad()
    def init(module: nn.Module) -> None:
        from foundry_dbrx.model import assign_full
        prefix = owner[id(module)]
        params = {(f'{prefix}.{n}' if prefix else n): p for n, p in module.named_parameters(recurse=False)}
        for key, tensor in source.iter_tensors(list(params)):
            # a sharded parameter (FSDP2, expert parallelism) keeps its shard of the full tensor
            assign_full(params[key], tensor.to(_local_device(params[key])))
        if isinstance(module, DbrxRouter):
            if bias_LE is None:
                module.reset_expert_bias()
            else:
                module.expert_bias.copy_(bias_LE[layer_of_router[id(module)]])

    return init


def _local_device(param: torch.Tensor) -> torch.device:
    return param.to_local().device if hasattr(param, 'to_local') else param.device


def load_pretrained_hf(model: nn.Module, hf_dir: PathLike) -> Optional[Callable[[nn.Module], None]]:
    """Gives a ``DbrxForCausalLM`` the weights of an HF DBRX folder: copied now if the model is materialised; if it
    is on the meta device, returns the ``param_init_fn`` that reads them as FSDP materialises each module (the
    caller hands it to :func:`foundry_dbrx.parallelize.attach_composer_hooks`)."""
    if any(p.is_meta for p in model.parameters()):
        log.info('weights will be read from %s as FSDP materialises each module', hf_dir)
        return hf_param_init_fn(model, hf_dir)
    load_hf_weights(model, hf_dir)
    log.info('loaded weights from %s', hf_dir)
    return None
